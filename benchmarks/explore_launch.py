"""Time the bench specs' kernels under a list of launch configs (GPU only).

    python benchmarks/explore_launch.py --shape 2,4096 --decays none,per_head
    python benchmarks/explore_launch.py --step --configs '[{}, {"bwd_chunk": 32}]'

For each decay and config: the eager forward (no autograd; with --step, forward
and backward) and the replay of a captured graph, i.e. GPU time alone. Used to
choose launch defaults; the timings to quote come from bench.py.
"""

import argparse
import json
import sys

import torch
import triton.testing

from attncc.bench import bench_inputs, bench_module, shape_arguments

CONFIGS = [
    {},
    {"block_e": 32},
    {"block_e": 32, "num_stages": 3},
    {"block_e": 32, "num_warps": 8},
    {"num_stages": 3},
    {"num_warps": 8},
    {"block_e": 128, "num_warps": 8},
    {"segment": 2048},
    {"segment": 1024},
    {"segment": 512},
    {"segment": 1024, "block_e": 32},
    {"chunk": 128, "block_e": 32, "num_warps": 8},
]


def main() -> int:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--configs", default=None, help="JSON list of config overrides")
    parser.add_argument("--step", action="store_true", help="time forward+backward instead of the forward")
    args = parser.parse_args()
    B, T = args.shape
    configs = json.loads(args.configs) if args.configs else CONFIGS
    for decay in args.decays.split(","):
        module, name = bench_module(decay, "explore_fwd")
        fn = getattr(module, name)
        q, k, v, extra = bench_inputs(decay, B, T, args.heads, args.dim, torch.bfloat16, "cuda")
        inputs = [q, k, v] + ([] if extra is None else [extra])
        if args.step:  # gradients for q, k, v and a data-dependent decay (the per-head slope stays constant)
            for x in inputs[:3] + inputs[3:] * (decay != "per_head"):
                x.requires_grad_()
        leaves = [x for x in inputs if x.requires_grad]
        grad_out = torch.randn_like(q)
        defaults = getattr(module, f"_{name}_config")(args.dim, args.dim)
        with torch.no_grad():
            reference = fn(*inputs, scale=args.dim**-0.5)[0].float()
        for overrides in configs:
            module.TUNED_CONFIGS[(name, args.dim, args.dim)] = dict(defaults, **overrides)
            label = json.dumps(overrides) if overrides else "defaults"
            try:
                with torch.no_grad():
                    o = fn(*inputs, scale=args.dim**-0.5)[0].float()
                    diff = ((o - reference).norm() / reference.norm()).item()

                def forward(fn=fn, inputs=inputs, leaves=leaves, grad_out=grad_out):
                    if args.step:
                        torch.autograd.grad(fn(*inputs, scale=args.dim**-0.5)[0], leaves, grad_out)
                    else:
                        with torch.no_grad():
                            fn(*inputs, scale=args.dim**-0.5)

                eager = triton.testing.do_bench(forward, warmup=25, rep=200, return_mode="median")
                graph = triton.testing.do_bench_cudagraph(forward, rep=200, return_mode="median")
                print(f"{decay:12s} ({B},{T}) {label:55s} eager {eager:7.3f}  graph {graph:7.3f} ms  vs defaults {diff:.1e}",
                      flush=True)
            except Exception as error:
                print(f"{decay:12s} ({B},{T}) {label:55s} failed: {type(error).__name__}: {str(error)[:100]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
