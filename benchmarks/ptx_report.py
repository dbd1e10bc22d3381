"""Compile a benchmark spec's kernels for Hopper (sm_90a) on any machine, GPU or not,
and print what ptxas says about each: registers, spill stores and loads, shared memory.

    python benchmarks/ptx_report.py --decay per_channel --chunk 64 --bwd-chunk 16 --block-e 128 --warps 8
"""

import argparse
import sys

from attncc.bench import BENCH_SPECS
from attncc.check import parse_spec
from attncc.compiler import compile_source
from attncc.derive import plan
from attncc.hopper import causal_kernels, compile_kernel, load_compiled_mode, ptxas_summary


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
    kernel_plan = plan(parse_spec(source).specs[0])
    module = load_compiled_mode(compile_source(source, f"{kernel_plan.name}.attn"), f"ptx_{kernel_plan.name}")
    config = {"chunk": args.chunk, "bwd_chunk": args.bwd_chunk, "block_e": args.block_e}
    print(f"{kernel_plan.name}: D = E = {args.dim}, {args.dtype}, chunk {args.chunk}, bwd chunk {args.bwd_chunk}, "
          f"block_e {args.block_e}, {args.warps} warps, {args.stages} stages")
    for label, kernel, constexprs in causal_kernels(module, kernel_plan, args.dim, args.dim, args.dtype, config):
        try:
            compiled = compile_kernel(kernel, constexprs, args.dtype, args.warps, args.stages)
            print(f"  {label:20s} {ptxas_summary(compiled)}", flush=True)
        except Exception as error:  # report and go on to the next kernel
            print(f"  {label:20s} FAILED: {type(error).__name__}: {str(error)[-600:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
