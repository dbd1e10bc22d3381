"""Shared memory, registers and spills of every delta-rule kernel at its default launch,
compiled for Hopper (sm_90a) with Triton's own ptxas: no GPU needed. Flags each kernel
that asks for more shared memory than an H100 / H200 block may take.

    python benchmarks/delta_fit.py --decays none,per_channel --pairs 128:64,256:256 --dtypes bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from attncc.check import parse_spec
from attncc.compiler import compile_source
from attncc.derive import plan
from attncc.hopper import (
    HOPPER_SHARED_MEMORY,
    compile_kernel,
    delta_kernels,
    load_compiled_mode,
    ptxas_summary,
)

GATES = {"none": "", "per_token": "    gate = -softplus(x)\n", "per_channel": "    gate = -softplus(x)\n"}


def spec_source(decay: str) -> str:
    return (f"attention fit_{decay} {{\n    update = delta\n    decay = {decay}\n{GATES[decay]}"
            "    feature_map = l2norm\n    beta = sigmoid(x)\n}\n")


def report(decay: str, D: int, E: int, dtype: str, only: list[str]) -> int:
    """Print one line per kernel; the number of kernels that do not fit."""
    source = spec_source(decay)
    kernel_plan = plan(parse_spec(source).specs[0])
    module = load_compiled_mode(compile_source(source, "fit.attn"), f"fit_{decay}")
    too_big = 0
    for label, kernel, constexprs, warps, stages in delta_kernels(module, kernel_plan, D, E, dtype):
        if only and not any(word in label for word in only):
            continue
        start = time.perf_counter()
        compiled = compile_kernel(kernel, constexprs, dtype, warps, stages)
        fits = compiled.metadata.shared <= HOPPER_SHARED_MEMORY
        too_big += not fits
        print(f"{decay:11s} {dtype} D={D:3d} E={E:3d} {label:16s} chunk {constexprs.get('CHUNK', '-')}, "
              f"block_e {constexprs['BLOCK_E']}, {warps} warps: {ptxas_summary(compiled)}"
              f"{'' if fits else '  DOES NOT FIT'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return too_big


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decays", default="none,per_token,per_channel")
    parser.add_argument("--pairs", default="16:16,64:16,128:64,128:128,256:16,256:256")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--kernels", default="", help="label words to keep, comma-separated (default: all)")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU (the modules are imported below)
    only = [word for word in args.kernels.split(",") if word]
    too_big = 0
    for decay in args.decays.split(","):
        for pair in args.pairs.split(","):
            D, E = (int(x) for x in pair.split(":"))
            for dtype in args.dtypes.split(","):
                too_big += report(decay, D, E, dtype, only)
    print(f"{too_big} kernel(s) over {HOPPER_SHARED_MEMORY} B of shared memory")
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
