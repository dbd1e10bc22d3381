"""Check the benchmark specs' kernels against their float64 reference on the bench's
own inputs (GPU), forward and backward, before trusting any timing of them.

    python benchmarks/check_bench_specs.py --shape 2,4096 --dtype bf16
    python benchmarks/check_bench_specs.py --config '{"segment": 1048576}'   # one launch config
"""

import argparse
import json
import sys

import torch

from attncc.bench import bench_inputs, bench_module, shape_arguments

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: the interpreter, fp32, small shapes


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    shape_arguments(parser, heads=4)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--config", default="{}", help="JSON dict of launch config overrides, e.g. for a config being timed")
    args = parser.parse_args()
    overrides = json.loads(args.config)
    B, T = args.shape
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    worst = 0.0
    for decay in args.decays.split(","):
        module, name = bench_module(decay, "check")
        defaults = getattr(module, f"_{name}_config")(args.dim, args.dim)
        module.TUNED_CONFIGS[(name, args.dim, args.dim)] = dict(defaults, **overrides)
        q, k, v, extra = bench_inputs(decay, B, T, args.heads, args.dim, dtype, DEVICE)
        inputs = [q, k, v] + ([extra] if extra is not None else [])
        ours = [x.detach().clone().requires_grad_(x.dim() > 1) for x in inputs]
        theirs = [x.detach().double().requires_grad_(x.dim() > 1) for x in inputs]
        o = getattr(module, name)(*ours)[0]
        o_ref = getattr(module, f"{name}_reference")(*theirs)[0]
        do = torch.randn_like(o_ref)
        (o.double() * do).sum().backward()
        (o_ref * do).sum().backward()
        errors = {"o": rel(o, o_ref)}
        for label, a, b in zip(["dq", "dk", "dv", "d_decay"], ours, theirs, strict=False):
            if a.grad is not None:
                errors[label] = rel(a.grad, b.grad)
        worst = max(worst, *errors.values())
        print(f"{decay:12s} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"worst relative error {worst:.1e} (bound {bound:.0e}): {'ok' if worst <= bound else 'FAILED'}")
    return 0 if worst <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
