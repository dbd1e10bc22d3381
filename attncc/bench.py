"""Side-by-side timing of attncc's kernels, fla's and FlashAttention (SDPA), in one run.

Every row is a median from `triton.testing.do_bench` on fresh random inputs;
attncc's output is checked against fla's on the same inputs before timing.
The memory floor is the time to read q, k, v once and write o once at the
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from attncc.compiler import compile_source
from attncc.loader import import_path

# The four decays, each as the spec whose math matches the fla op it is timed against.
BENCH_SPECS = {
    "none": ("attention linear_none {\n    decay = none\n    scale = auto\n}\n", "chunk_linear_attn"),
    "per_head": ("attention lightning_head {\n    decay = per_head\n    scale = auto\n}\n", "chunk_simple_gla (g_gamma)"),
    "per_token": ("attention gla_token {\n    decay = per_token\n    scale = auto\n}\n", "chunk_simple_gla (g)"),
    "per_channel": ("attention gla_channel {\n    decay = per_channel\n    scale = auto\n}\n", "chunk_gla"),
}


@dataclass
class Row:
    shape: str
    op: str
    fwd_ms: float | None
    fwdbwd_ms: float | None
    note: str = ""
    graph_fwd_ms: float | str | None = None  # the same, replaying CUDA graphs (--cuda-graphs)
    graph_fwdbwd_ms: float | str | None = None


def _import_source(source: str, name: str):
    path = Path(tempfile.mkdtemp(prefix="attncc-bench-")) / f"{name}.py"
    path.write_text(source)
    return import_path(path, name)


# Also time replays of captured CUDA graphs: Python and kernel-launch overhead drop
# out and what remains is the GPU's own time (see BENCHMARKS.md).
USE_CUDA_GRAPHS = False


def bench_module(decay: str, tag: str):
    """(generated module, function name) of the bench spec for `decay`."""
    source = BENCH_SPECS[decay][0]
    return _import_source(compile_source(source, f"{tag}_{decay}.attn"), f"{tag}_{decay}"), source.split()[1]


def attncc_call(decay: str, fn, q, k, v, extra, scale=None):
    """(call returning o, its inputs) for a bench spec's function; the inputs are made
    leaves that need gradients, except the per-head slope, which stays a constant."""
    leaves = [x.requires_grad_() for x in (q, k, v)]
    if decay == "per_head":
        return (lambda q, k, v: fn(q, k, v, extra, scale=scale)[0]), leaves
    return (lambda *a: fn(*a, scale=scale)[0]), leaves + ([extra.requires_grad_()] if extra is not None else [])


def shape_arguments(parser, heads: int = 16) -> None:
    """Options the one-shape benchmark scripts share: --shape B,T (parsed to a tuple),
    --heads, --dim (D = E) and --decays."""
    parser.add_argument("--shape", default=(2, 4096), type=lambda s: tuple(int(x) for x in s.split(",")), help="B,T")
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--decays", default=",".join(BENCH_SPECS))


def _median_ms(fn, graph=False) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _time(forward, inputs, grad_out):
    """[forward ms, forward+backward ms] for forward(*inputs) -> o, eagerly, then (with
    USE_CUDA_GRAPHS) the same two as graph replays; a failure becomes its message."""

    def step():
        o = forward(*inputs)
        torch.autograd.grad(o, [x for x in inputs if x.requires_grad], grad_out)

    def no_grad_forward():
        with torch.no_grad():
            forward(*inputs)

    times = []
    for graph in [False, True] if USE_CUDA_GRAPHS else [False]:
        for fn in (no_grad_forward, step):
            try:
                times.append(_median_ms(fn, graph))
            except Exception as error:  # e.g. a peer without a backward for this case
                times.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
    return times


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes per second of a large device-to-device copy, counting reads and writes."""
    src = torch.randn(256 * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _inputs(decay, B, T, H, D, dtype, device):
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)  # keep bf16 values tame
    if decay == "per_head":
        extra = torch.linspace(0.01, 0.2, H, device=device)
    elif decay == "per_token":
        extra = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device)).float()
    elif decay == "per_channel":
        extra = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=device)).float() / 16
    else:
        extra = None
    return q, k, v, extra


def _fla_op(decay):
    if decay == "none":
        from fla.ops.linear_attn import chunk_linear_attn

        return lambda q, k, v, scale: chunk_linear_attn(q, k, v, scale=scale, normalize=False)[0]
    if decay == "per_head":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, slope, scale: chunk_simple_gla(q, k, v, g_gamma=-slope, scale=scale)[0]
    if decay == "per_token":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, g, scale: chunk_simple_gla(q, k, v, g=g, scale=scale)[0]
    from fla.ops.gla import chunk_gla

    return lambda q, k, v, g, scale: chunk_gla(q, k, v, g=g, scale=scale)[0]


def run(shapes, heads=16, dim=128, dtype=torch.bfloat16, decays=tuple(BENCH_SPECS), against=("fla", "sdpa")):
    device = "cuda"
    bandwidth = copy_bandwidth(device)
    print(f"# device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows: list[Row] = []
    for B, T in shapes:
        shape = f"({B}, {T})"
        bytes_moved = 4 * B * T * heads * dim * torch.tensor([], dtype=dtype).element_size()
        rows.append(Row(shape, "memory floor (q, k, v, o once)", bytes_moved / bandwidth * 1e3, None))
        print(_format([rows[-1]]), flush=True)
        for decay in decays:
            fla_name = BENCH_SPECS[decay][1]
            module, name = bench_module(decay, "attncc_bench")
            q, k, v, extra = _inputs(decay, B, T, heads, dim, dtype, device)
            scale = dim**-0.5
            ours, ours_args = attncc_call(decay, getattr(module, name), q, k, v, extra, scale)
            call_extra = [] if extra is None else [extra]
            grad_out = torch.randn(B, T, heads, dim, device=device, dtype=dtype)
            rows.append(Row(shape, f"attncc, {decay}", *_pair(_time(ours, ours_args, grad_out))))
            print(_format([rows[-1]]), flush=True)
            if "fla" in against:
                try:
                    fla = _fla_op(decay)
                except ImportError:
                    rows[-1].note = "fla not installed"
                    continue
                with torch.no_grad():
                    o_fla = fla(q, k, v, *call_extra, scale).float()
                    o_ours = ours(*ours_args).float()
                err = ((o_ours - o_fla).norm() / o_fla.norm()).item()
                if not err < 2e-2:
                    raise AssertionError(f"attncc and fla disagree on {decay}: {err:.2e}")
                if decay == "per_head":
                    times = _time(lambda q, k, v: fla(q, k, v, extra, scale), ours_args, grad_out)
                else:
                    times = _time(lambda *a: fla(*a, scale), ours_args, grad_out)
                rows.append(Row(shape, f"fla {fla_name}, {decay}", *_pair(times, f"attncc vs fla output: rel. diff {err:.1e}")))
                print(_format([rows[-1]]), flush=True)
        if "sdpa" in against:
            qs, ks, vs = (torch.randn(B, heads, T, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            times = _time(sdpa, [qs, ks, vs], torch.randn(B, heads, T, dim, device=device, dtype=dtype))
            rows.append(Row(shape, "FlashAttention via SDPA, causal", *_pair(times)))
            print(_format([rows[-1]]), flush=True)
    return rows


def _pair(times, note=""):
    """Row fields from _time's list: eager (fwd, fwd+bwd), note, graph (fwd, fwd+bwd)."""
    graph = times[2:] or [None, None]
    return times[0], times[1], note, graph[0], graph[1]


def _cell(x):
    return f"{x:.3f}" if isinstance(x, float) else ("—" if x is None else str(x))


def _format(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        graph = f" {_cell(r.graph_fwd_ms)} | {_cell(r.graph_fwdbwd_ms)} |" if USE_CUDA_GRAPHS else ""
        lines.append(f"| {r.shape} | {r.op} | {_cell(r.fwd_ms)} | {_cell(r.fwdbwd_ms)} |{graph} {r.note} |")
    return "\n".join(lines)


def ratio_table(rows: list[Row]) -> str:
    """attncc's speedup over the matching fla op and SDPA, per shape and decay (eager
    calls; with --cuda-graphs, graph replays too)."""
    modes = [("", "fwd_ms", "fwdbwd_ms")] + ([(" (graphs)", "graph_fwd_ms", "graph_fwdbwd_ms")] if USE_CUDA_GRAPHS else [])
    header = "| shape | decay | fwd / floor |"
    for label, _, _ in modes:
        header += f" fwd vs fla{label} | fwd+bwd vs fla{label} | fwd+bwd vs SDPA{label} |"
    out = [header, "|" + "---|" * (header.count("|") - 1)]
    by_shape: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_shape.setdefault(r.shape, {})[r.op] = r

    def ratio(a, b):
        return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "—"

    for shape, ops in by_shape.items():
        floor = ops.get("memory floor (q, k, v, o once)")
        sdpa = ops.get("FlashAttention via SDPA, causal")
        for decay in BENCH_SPECS:
            ours = ops.get(f"attncc, {decay}")
            if ours is None:
                continue
            fla = next((r for op, r in ops.items() if op.startswith("fla") and op.endswith(f", {decay}")), None)
            line = f"| {shape} | {decay} | {ratio(ours.fwd_ms, floor.fwd_ms) if floor else '—'} |"
            for _, fwd, fwdbwd in modes:
                line += (
                    f" {ratio(getattr(fla, fwd), getattr(ours, fwd)) if fla else '—'} |"
                    f" {ratio(getattr(fla, fwdbwd), getattr(ours, fwdbwd)) if fla else '—'} |"
                    f" {ratio(getattr(sdpa, fwdbwd), getattr(ours, fwdbwd)) if sdpa else '—'} |"
                )
            out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2,4096;1,16384", help="B,T pairs separated by ';'")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--decays", default=",".join(BENCH_SPECS))
    parser.add_argument("--against", default="fla,sdpa")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time replays of captured CUDA graphs (no host overhead), for every op alike")
    args = parser.parse_args(argv)
    global USE_CUDA_GRAPHS
    USE_CUDA_GRAPHS = args.cuda_graphs
    if not torch.cuda.is_available():
        print("attncc bench: no CUDA GPU here; timings need one.", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    rows = run(shapes, args.heads, args.dim, dtype, args.decays.split(","), args.against.split(","))
    graph_columns = " fwd ms (graph) | fwd+bwd ms (graph) |" if USE_CUDA_GRAPHS else ""
    header = f"| shape (B, T) | op | fwd ms | fwd+bwd ms |{graph_columns} note |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    print(_format(rows))
    print()
    print(ratio_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
