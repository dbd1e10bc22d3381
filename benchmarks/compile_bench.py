"""torch.compile on a GPU: the host cost of the operator boundary, and a small block.

    python benchmarks/compile_bench.py --out compile.json

1. Host cost per call: the public function (checks, autograd Function, torch.library
   operator) against the launch code it ends in, called directly (`_NAME_forward`, the
   same kernels without the operator or the Function), on a tiny input where the host
   is all the time there is. Medians of wall-clock time per call, after warm-up.
2. A block (attncc.nn.LinearAttention: q/k/v/decay projections, the kernel, output
   projection) forward + backward in bf16: eager, torch.compile (Inductor, default)
   and torch.compile(mode="reduce-overhead") (CUDA graphs); GPU time from CUDA events,
   medians; outputs of the compiled block checked against eager first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SPECS = {
    "per_head": "attention cb_head {\n    decay = per_head\n}\n",
    "per_token": "attention cb_token {\n    decay = per_token\n    gate = logsigmoid(x) / 16\n}\n",
    "per_channel": "attention cb_channel {\n    decay = per_channel\n    gate = logsigmoid(x) / 16\n}\n",
}


def _module(kind: str):
    from attncc.compiler import compile_source
    from attncc.loader import import_path

    path = Path(tempfile.mkdtemp(prefix="cb-")) / f"cb_{kind}.py"
    path.write_text(compile_source(SPECS[kind], f"cb_{kind}.attn"))
    return import_path(path, f"cb_{kind}"), SPECS[kind].split()[1]


def host_us(fn, calls: int = 2000, rounds: int = 5, warmup: int = 200) -> float:
    """Median over `rounds` of the wall-clock µs per call of `calls` calls of fn."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def host_cost(kind: str) -> dict:
    mod, name = _module(kind)
    B, T, H, D = 1, 64, 2, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    decay = torch.rand(H, device="cuda") if kind == "per_head" else (
        torch.randn(B, T, H, device="cuda") if kind == "per_token" else torch.randn(B, T, H, D, device="cuda"))
    fn = getattr(mod, name)
    public = lambda: fn(q, k, v, decay)  # noqa: E731
    cu = mod._equal_sequence_starts(B, T, q.device)
    flat = [x.reshape(B * T, H, D).contiguous() for x in (q, k, v)]
    g = decay if kind == "per_head" else decay.reshape(B * T, *decay.shape[2:]).contiguous()
    launch = getattr(mod, f"_{name}_forward")
    extra = {}
    if kind == "per_channel":
        extra["exact_path"] = getattr(mod, f"_{name}_exact_path_flag")(g, 64)
    direct = lambda: launch(*flat, g, None, cu, T, 0.125, False, True, False, **extra)  # noqa: E731
    with torch.no_grad():
        public_us, direct_us = host_us(public), host_us(direct)
    return {"kind": kind, "public_call_us": public_us, "launch_code_us": direct_us, "boundary_us": public_us - direct_us}


def _gpu_ms(fn, iters: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def block(kind: str, B: int, T: int, hidden: int, heads: int) -> dict:
    from attncc.nn import LinearAttention

    mod, _ = _module(kind)
    torch.manual_seed(0)
    layer = LinearAttention(mod, hidden_size=hidden, num_heads=heads, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, T, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, hidden, device="cuda", dtype=torch.bfloat16)

    def step(model, graphs):
        def run():
            if graphs:  # a new step of the CUDA-graph tree: earlier outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            y, _ = model(x)
            # Gradients returned, not accumulated into .grad: an accumulated .grad would be
            # an output of the previous replay, which the next one overwrites.
            torch.autograd.grad(y, [x, *layer.parameters()], dy)
        return run

    result = {"kind": kind, "shape": [B, T, hidden, heads]}
    y_eager = layer(x)[0].detach().float()
    for label, model in (("eager", layer), ("compile", torch.compile(layer, fullgraph=True)),
                         ("reduce_overhead", torch.compile(layer, fullgraph=True, mode="reduce-overhead"))):
        start = time.perf_counter()
        for _ in range(3):
            if label == "reduce_overhead":
                torch.compiler.cudagraph_mark_step_begin()
            y = model(x)[0]
        torch.cuda.synchronize()
        result[f"{label}_first_calls_s"] = time.perf_counter() - start
        err = ((y.detach().float() - y_eager).norm() / y_eager.norm()).item()
        result[f"{label}_rel_err_vs_eager"] = err
        result[f"{label}_fwd_bwd_ms"] = _gpu_ms(step(model, label == "reduce_overhead"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(SPECS))
    parser.add_argument("--block", default="2,4096,2048,16", help="B,T,hidden,heads")
    parser.add_argument("--out", default="compile.json")
    args = parser.parse_args()
    results = []
    for kind in args.kinds.split(","):
        row = host_cost(kind)
        print(json.dumps(row), flush=True)
        results.append(row)
    B, T, hidden, heads = map(int, args.block.split(","))
    for kind in args.kinds.split(","):
        row = block(kind, B, T, hidden, heads)
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
