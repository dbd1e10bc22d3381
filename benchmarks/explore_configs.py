"""Coordinate sweep of launch parameters for the four benchmark specs (GPU only).

Used to pick attncc's defaults; `attncc tune` does the same for one user spec.
    python benchmarks/explore_configs.py --shape 2,4096,16,128
"""

import argparse
import sys
import time

import torch

from attncc import tune
from attncc.bench import BENCH_SPECS, import_source
from attncc.check import parse_spec
from attncc.compiler import compile_source


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="2,4096,16,128")
    parser.add_argument("--decays", default=",".join(BENCH_SPECS))
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    for decay in args.decays.split(","):
        source = BENCH_SPECS[decay][0]
        spec = parse_spec(source).specs[0]
        module = import_source(compile_source(source, f"{decay}.attn"), f"explore_{decay}")
        started = time.time()
        results = tune.sweep(module, spec, shape, torch.bfloat16)
        print(f"{decay} {shape}: {len(results)} configs in {time.time() - started:.0f}s", flush=True)
        for ms, config in results[:4]:
            print(f"  {ms:7.3f} ms  {config}", flush=True)
        print(f"  worst {results[-1][0]:7.3f} ms  {results[-1][1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
