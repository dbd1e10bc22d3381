"""Compile a benchmark spec's kernels for Hopper (sm_90a) on any machine, GPU or not,
and print what ptxas says about each: registers, spill stores and loads, shared memory.

    python benchmarks/ptx_report.py --decay per_channel --chunk 64 --bwd-chunk 16 --block-e 128 --warps 8

Triton ships ptxas, so this needs no GPU: it catches kernels that the interpreter
runs but the compiler rejects, and shows register spills before any device time
is spent. Kernel arguments are typed by name (q, k, v, o, do, dq, dk, dv take the
input dtype; states, decays and decay gradients are float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from attncc.bench import BENCH_SPECS
from attncc.compiler import compile_source

INPUT_DTYPE_ARGS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def load_compiled_mode(source: str, name: str):
    """Import a generated module without its no-GPU switch to the interpreter."""
    source = re.sub(r"if not torch\.cuda\.is_available\(\):[\s\S]*?\n(?=import triton)", "", source, count=1)
    path = Path(tempfile.mkdtemp(prefix="attncc-ptx-")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int):
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("cu_seqlens", "segment_starts"):
            signature[arg] = "*i32"
        else:
            signature[arg] = f"*{dtype}" if arg in INPUT_DTYPE_ARGS else "*fp32"
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_summary(compiled) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    arch = "sm_90a"
    result = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={arch}", f.name, "-o", "/dev/null"],
                            capture_output=True, text=True, check=True)
    used = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return (f"{used.group(1) if used else '?'} registers, spill stores/loads {spills.group(1)}/{spills.group(2)} B, "
            f"shared {compiled.metadata.shared} B") if spills else result.stderr.strip()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decay", default="none", choices=list(BENCH_SPECS))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--bwd-chunk", type=int, default=16)
    parser.add_argument("--block-e", type=int, default=128)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    source = BENCH_SPECS[args.decay][0]
    name = source.split()[1]
    module = load_compiled_mode(compile_source(source, f"{name}.attn"), f"ptx_{name}")
    D = E = args.dim
    common = {"H": 16, "HKV": 16, "D": D, "E": E, "BLOCK_D": triton.next_power_of_2(D),
              "PRECISION": "ieee" if args.dtype == "fp32" else "tf32"}
    if args.decay == "per_channel":
        common.update(SUB=16, SPLIT_IN_FP32=args.dtype == "fp16")
    forward = dict(common, BLOCK_T=args.chunk, BLOCK_E=args.block_e)
    if args.decay == "per_channel":
        forward["FAST_PATH"] = True
    backward = dict(common, BLOCK_T=args.bwd_chunk, BLOCK_E=triton.next_power_of_2(E))
    store_db = args.decay in ("per_token", "per_channel")
    kernels = [
        ("fwd (output)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=False, STORE_OUTPUT=True)),
        ("fwd (state only)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=False, STORE_FINAL_STATE=True,
                                                 STORE_OUTPUT=False)),
        ("bwd dq", "bwd_dq_kernel", dict(backward, HAS_INITIAL_STATE=True, STORE_DB=store_db)),
        ("bwd dk dv", "bwd_dkv_kernel", dict(backward, HAS_DFINAL_STATE=True, STORE_DINITIAL_STATE=False,
                                             STORE_DB=store_db, STATE_ONLY=False)),
    ]
    print(f"{name}: D = E = {D}, {args.dtype}, chunk {args.chunk}, bwd chunk {args.bwd_chunk}, "
          f"block_e {args.block_e}, {args.warps} warps, {args.stages} stages")
    for label, kernel_name, constexprs in kernels:
        kernel = getattr(module, f"_{name}_{kernel_name}")
        try:
            compiled = compile_kernel(kernel, constexprs, args.dtype, args.warps, args.stages)
            print(f"  {label:18s} {ptxas_summary(compiled)}", flush=True)
        except Exception as error:  # report and go on to the next kernel
            print(f"  {label:18s} FAILED: {type(error).__name__}: {str(error)[-600:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
