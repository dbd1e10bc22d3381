"""Host time per call of two generated modules of the bench specs on a GPU machine (tiny
inputs, where the host is all the time there is): forward under no_grad and fwd+bwd,
medians of 7 rounds of calls, two interleaved rounds per version.

    python benchmarks/ab_host.py DIR   # DIR holds {old,new}_{per_head,per_token}.py
"""

from __future__ import annotations

import sys

import torch
from ab_modules import FUNCTIONS, load
from compile_bench import host_us


def compare(folder: str, decay: str) -> None:
    B, T, H, D = 1, 64, 2, 64
    mods = {tag: getattr(load(f"{folder}/{tag}_{decay}.py", f"host_{tag}_{decay}"), FUNCTIONS[decay])
            for tag in ("old", "new")}
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    x = torch.rand(H, device="cuda") if decay == "per_head" else -torch.rand(B, T, H, device="cuda")
    qg, kg, vg = (y.clone().requires_grad_() for y in (q, k, v))
    results: dict[str, list[float]] = {}
    for _ in range(2):
        for tag, fn in mods.items():
            def forward_backward(fn=fn):
                o, _ = fn(qg, kg, vg, x)
                torch.autograd.grad(o, (qg, kg, vg), o)

            with torch.no_grad():
                results.setdefault(f"{tag} fwd no_grad", []).append(round(host_us(lambda fn=fn: fn(q, k, v, x), rounds=7, warmup=300), 1))
            results.setdefault(f"{tag} fwd+bwd", []).append(round(host_us(forward_backward, 500, rounds=7, warmup=300), 1))
    print(decay, f"host µs per call, (B, T, H, D) = {(B, T, H, D)} bf16:", results, flush=True)


if __name__ == "__main__":
    for kind in FUNCTIONS:
        compare(sys.argv[1], kind)
