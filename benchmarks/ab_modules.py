"""A/B of two generated modules of the bench specs on a GPU: outputs and gradients equal,
fwd+bwd CUDA-graph medians interleaved, and a torch.profiler table per kernel.

    python benchmarks/ab_modules.py DIR   # DIR holds {old,new}_{per_head,per_token}.py

Make the two versions with `compile_source(attncc.bench.BENCH_SPECS[decay][0], ...)` from
two checkouts (see BENCHMARKS.md, "torch.library operators").
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from attncc.bench import bench_inputs, median_ms

SHAPE = (2, 4096, 16, 128)
FUNCTIONS = {"per_token": "gla_token", "per_head": "lightning_head"}


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(folder: str, decay: str) -> None:
    mods = {tag: getattr(load(f"{folder}/{tag}_{decay}.py", f"{tag}_{decay}"), FUNCTIONS[decay])
            for tag in ("old", "new")}
    torch.manual_seed(0)
    q, k, v, extra = bench_inputs(decay, *SHAPE, torch.bfloat16, "cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    if decay != "per_head":
        leaves.append(extra.requires_grad_())
    do = torch.randn_like(q)

    def step(fn):
        o, _ = fn(q, k, v, extra)
        return (o.detach(), *torch.autograd.grad(o, leaves, do))

    outs = {tag: step(fn) for tag, fn in mods.items()}
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(outs["old"], outs["new"], strict=True)]
    print(decay, "max |old - new| of o and gradients:", diffs)
    del outs
    times: dict[str, list[float]] = {tag: [] for tag in mods}
    for _ in range(3):  # interleaved, against drift
        for tag, fn in mods.items():
            times[tag].append(round(median_ms(lambda fn=fn: step(fn), graph=True), 4))
    print(decay, "fwd+bwd graph ms", times)
    for tag, fn in mods.items():
        for _ in range(3):
            step(fn)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(fn)
            torch.cuda.synchronize()
        print(tag, decay)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    for kind in FUNCTIONS:
        compare(sys.argv[1], kind)
