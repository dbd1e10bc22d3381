"""Where the time of one forward+backward goes, kernel by kernel (GPU only).

    python benchmarks/kernel_breakdown.py --shape 2,4096 --decays none,per_channel

Runs a few warm-up steps, then profiles five steps with torch.profiler and
prints each CUDA kernel's mean time per step, largest first. Used to decide
which kernel to work on; the timings to quote come from bench.py.
"""

import argparse
import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from attncc.bench import attncc_call, bench_inputs, bench_module, shape_arguments

STEPS = 5


def main() -> int:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--host-profile", action="store_true", help="also print where the host's time goes (cProfile)")
    args = parser.parse_args()
    B, T = args.shape
    for decay in args.decays.split(","):
        module, name = bench_module(decay, "breakdown")
        q, k, v, extra = bench_inputs(decay, B, T, args.heads, args.dim, torch.bfloat16, "cuda")
        call, inputs = attncc_call(decay, getattr(module, name), q, k, v, extra)
        grad_out = torch.randn_like(q)

        def step(call=call, inputs=inputs, grad_out=grad_out):
            torch.autograd.grad(call(*inputs), inputs, grad_out)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        # Host time to issue one step: when it exceeds the kernels' time, the GPU waits on Python.
        started = time.perf_counter()
        for _ in range(20):
            step()
        host_ms = (time.perf_counter() - started) / 20 * 1e3
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) / 20 * 1e3
        if args.host_profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(20):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            print(f"\n{decay}: host profile of 20 steps (top 30 by own time, then by cumulative time)", flush=True)
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(30)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                step()
            torch.cuda.synchronize()
        rows = [
            (event.device_time_total / STEPS, event.count // STEPS, event.key)
            for event in prof.key_averages()
            if event.device_time_total > 0
        ]
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"\n{decay} (B, T) = ({B}, {T}): {total / 1e3:.3f} ms of kernels per forward+backward; "
              f"host issues a step in {host_ms:.3f} ms, {wall_ms:.3f} ms per step end to end", flush=True)
        for us, count, name in rows[:12]:
            print(f"  {us / 1e3:7.3f} ms  x{count:<3d} {name[:90]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
