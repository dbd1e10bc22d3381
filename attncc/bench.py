"""Timing of attncc's kernels beside fla's and FlashAttention (SDPA).

Two entry points, both behind `attncc bench`:

- `bench_spec` times the user's own spec (`attncc bench SPEC --shape B,T,H,D[,E]`):
  forward and forward+backward, eager calls and CUDA-graph replays, next to the fla
  op whose math matches the spec (`matching_fla_op`: for `update = delta`, fla's
  chunk_delta_rule, chunk_gated_delta_rule or chunk_kda) and causal SDPA; attncc's
  output is checked at the timed shape against the spec's generated `NAME_reference`.
- `run` / `builtin_table` print the built-in table of the four decays against fla
  (`attncc bench` without SPEC, `benchmarks/bench.py`; BENCHMARKS.md quotes it).

Every time is a median from `triton.testing.do_bench` (or `do_bench_cudagraph`) on
fresh random inputs. The memory floor of the built-in table is the time to read q, k,
v once and write o once at the copy bandwidth measured in the same run. The helpers
below are public for the scripts in benchmarks/.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from attncc.compiler import compile_source
from attncc.ir import AttentionSpec, Decay, IdentityMap, RowMap, RowMapKind, UpdateRule
from attncc.loader import import_path

# The four decays, each as the spec whose math matches the fla op it is timed against.
BENCH_SPECS = {
    "none": ("attention linear_none {\n    decay = none\n    scale = auto\n}\n", "chunk_linear_attn"),
    "per_head": ("attention lightning_head {\n    decay = per_head\n    scale = auto\n}\n", "chunk_simple_gla (g_gamma)"),
    "per_token": ("attention gla_token {\n    decay = per_token\n    scale = auto\n}\n", "chunk_simple_gla (g)"),
    "per_channel": ("attention gla_channel {\n    decay = per_channel\n    scale = auto\n}\n", "chunk_gla"),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEERS = ("fla", "sdpa")
SDPA_OP = "FlashAttention via SDPA, causal"
FLOOR_OP = "memory floor (q, k, v, o once)"

# A time is milliseconds, None where not measured, or the message of the failure.
Time = float | str | None


@dataclass
class Row:
    """One timed op at one shape: eager medians and (with CUDA graphs) graph replays."""

    shape: str
    op: str
    fwd_ms: Time
    fwdbwd_ms: Time
    note: str = ""
    graph_fwd_ms: Time = None
    graph_fwdbwd_ms: Time = None
    peer: str = ""  # "attncc", "fla" or "sdpa" (bench_spec's rows): the line it joins in a plot
    seq_len: int | None = None  # T, the plot's x-axis
    ok: bool | None = None  # the correctness check at this shape: passed, failed, or not made


def import_source(source: str, name: str) -> ModuleType:
    """Import generated module text `source` as module `name` (written to a fresh temp dir)."""
    path = Path(tempfile.mkdtemp(prefix="attncc-bench-")) / f"{name}.py"
    path.write_text(source)
    return import_path(path, name)


def bench_module(decay: str, tag: str) -> tuple[ModuleType, str]:
    """(generated module, function name) of the built-in bench spec for `decay`."""
    source = BENCH_SPECS[decay][0]
    return import_source(compile_source(source, f"{tag}_{decay}.attn"), f"{tag}_{decay}"), source.split()[1]


def attncc_call(decay: str, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                extra: torch.Tensor | None, scale: float | None = None) -> tuple[Callable, list[torch.Tensor]]:
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


def median_ms(fn: Callable[[], object], *, graph: bool = False) -> float:
    """Median milliseconds of `fn()`: eager calls, or (graph=True) replays of one captured
    CUDA graph, where Python and launch overhead drop out and the GPU's own time remains."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def time_call(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
              *, cuda_graphs: bool = False) -> list[Time]:
    """[forward ms, forward+backward ms] for forward(*inputs) -> o, eagerly, then (with
    cuda_graphs) the same two as graph replays; a failure becomes its message. The
    backward is `torch.autograd.grad` for the inputs that need gradients."""

    def step():
        o = forward(*inputs)
        torch.autograd.grad(o, [x for x in inputs if x.requires_grad], grad_out)

    def no_grad_forward():
        with torch.no_grad():
            forward(*inputs)

    times: list[Time] = []
    for graph in [False, True] if cuda_graphs else [False]:
        for fn in (no_grad_forward, step):
            try:
                times.append(median_ms(fn, graph=graph))
            except Exception as error:  # e.g. a peer without a backward for this case
                times.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
    return times


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes per second of a large device-to-device copy, counting reads and writes."""
    src = torch.randn(256 * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def bench_inputs(decay: str, B: int, T: int, H: int, D: int, dtype: torch.dtype,
                 device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, k, v, decay input) of a built-in bench spec, D = E: unit-norm keys (tame bf16
    values), per-head slopes in [0.01, 0.2], log decays from logsigmoid (per-channel / 16)."""
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    if decay == "per_head":
        extra = torch.linspace(0.01, 0.2, H, device=device)
    elif decay == "per_token":
        extra = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device)).float()
    elif decay == "per_channel":
        extra = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=device)).float() / 16
    else:
        extra = None
    return q, k, v, extra


def fla_op(decay: str) -> Callable[..., torch.Tensor]:
    """fla's op for `decay` as a call (q, k, v[, decay input], scale) -> o, taking the
    decay input as attncc does (the per-head slope is fla's -g_gamma). Raises
    ImportError where fla is not installed."""
    if decay == "none":
        from fla.ops.linear_attn import chunk_linear_attn

        return lambda q, k, v, scale: chunk_linear_attn(q, k, v, scale=scale, normalize=False)[0]
    if decay == "per_head":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, slope, scale: chunk_simple_gla(q, k, v, g_gamma=-slope, scale=scale)[0]
    if decay == "per_token":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, g, scale: chunk_simple_gla(q, k, v, g=g, scale=scale)[0]
    if decay == "per_channel":
        from fla.ops.gla import chunk_gla

        return lambda q, k, v, g, scale: chunk_gla(q, k, v, g=g, scale=scale)[0]
    raise ValueError(f"decay must be one of {', '.join(BENCH_SPECS)}, not {decay!r}")


def _l2norm_flags(op: Callable, qk_l2norm: bool) -> dict[str, bool]:
    """The keyword arguments that make fla's delta-rule `op` l2-normalize q and k in its kernel
    (attncc's `l2norm` map on both): fla's releases spell the switch differently."""
    if not qk_l2norm:
        return {}  # fla's default: q and k as given
    import inspect

    try:
        parameters = inspect.signature(op).parameters
    except (TypeError, ValueError):  # no signature to read: the older releases' spelling
        return {"use_qk_l2norm_in_kernel": True}
    if "use_qk_l2norm_in_kernel" in parameters:
        return {"use_qk_l2norm_in_kernel": True}
    if "use_q_l2norm_in_kernel" in parameters and "use_k_l2norm_in_kernel" in parameters:
        return {"use_q_l2norm_in_kernel": True, "use_k_l2norm_in_kernel": True}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {"use_qk_l2norm_in_kernel": True}
    raise ImportError(f"this fla's {getattr(op, '__name__', 'op')} has no switch for l2norm in the kernel")


def fla_delta_op(decay: str, *, qk_l2norm: bool = False) -> Callable[..., torch.Tensor]:
    """fla's delta-rule op for `decay` as a call (q, k, v[, g], beta, scale) -> o, with g the
    log decay ([B, T, H] per token, [B, T, H, D] per channel) and beta β itself; qk_l2norm:
    fla normalizes q and k in its kernel. Raises ImportError where fla is not installed."""
    if decay == "none":
        from fla.ops.delta_rule import chunk_delta_rule

        flags = _l2norm_flags(chunk_delta_rule, qk_l2norm)
        return lambda q, k, v, beta, scale: chunk_delta_rule(q, k, v, beta, scale=scale, **flags)[0]
    if decay == "per_token":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        flags = _l2norm_flags(chunk_gated_delta_rule, qk_l2norm)
        return lambda q, k, v, g, beta, scale: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, **flags)[0]
    if decay == "per_channel":
        from fla.ops.kda import chunk_kda

        flags = _l2norm_flags(chunk_kda, qk_l2norm)
        return lambda q, k, v, g, beta, scale: chunk_kda(q, k, v, g, beta, scale=scale, **flags)[0]
    raise ValueError(f"decay must be one of {', '.join(d.value for d in DELTA_FLA_OPS)}, not {decay!r}")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """‖ours − theirs‖ / ‖theirs‖ in float64 (NaN when either holds a NaN)."""
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of attncc's output accepted at `dtype` (bf16/fp16 round the
    inputs of the tensor-core products; fp32 runs them in full precision)."""
    return 1e-3 if dtype == torch.float32 else 2e-2


# ---------------------------------------------------------------------------
# The built-in table: the four decays against fla and SDPA
# ---------------------------------------------------------------------------
def run(shapes: Sequence[tuple[int, int]], heads: int = 16, dim: int = 128, dtype: torch.dtype = torch.bfloat16,
        decays: Sequence[str] = tuple(BENCH_SPECS), against: Sequence[str] = PEERS, *,
        cuda_graphs: bool = False) -> list[Row]:
    """Rows of the built-in table for each (B, T) of `shapes`, printed as they come."""
    device = "cuda"
    bandwidth = copy_bandwidth(device)
    print(f"# device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(format_rows([row], cuda_graphs=cuda_graphs), flush=True)

    for B, T in shapes:
        shape = f"({B}, {T})"
        bytes_moved = 4 * B * T * heads * dim * torch.tensor([], dtype=dtype).element_size()
        emit(Row(shape, FLOOR_OP, bytes_moved / bandwidth * 1e3, None))
        for decay in decays:
            fla_name = BENCH_SPECS[decay][1]
            module, name = bench_module(decay, "attncc_bench")
            q, k, v, extra = bench_inputs(decay, B, T, heads, dim, dtype, device)
            scale = dim**-0.5
            ours, ours_args = attncc_call(decay, getattr(module, name), q, k, v, extra, scale)
            call_extra = [] if extra is None else [extra]
            grad_out = torch.randn(B, T, heads, dim, device=device, dtype=dtype)
            emit(Row(shape, f"attncc, {decay}", *_pair(time_call(ours, ours_args, grad_out, cuda_graphs=cuda_graphs))))
            if "fla" in against:
                try:
                    fla = fla_op(decay)
                except ImportError:
                    rows[-1].note = "fla not installed"
                    continue
                with torch.no_grad():
                    o_fla = fla(q, k, v, *call_extra, scale).float()
                    o_ours = ours(*ours_args).float()
                err = relative_error(o_ours, o_fla)
                if not err < 2e-2:
                    raise AssertionError(f"attncc and fla disagree on {decay}: {err:.2e}")
                if decay == "per_head":
                    times = time_call(lambda q, k, v: fla(q, k, v, extra, scale), ours_args, grad_out,
                                      cuda_graphs=cuda_graphs)
                else:
                    times = time_call(lambda *a: fla(*a, scale), ours_args, grad_out, cuda_graphs=cuda_graphs)
                emit(Row(shape, f"fla {fla_name}, {decay}", *_pair(times, f"attncc vs fla output: rel. diff {err:.1e}")))
        if "sdpa" in against:
            qs, ks, vs = (torch.randn(B, heads, T, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            times = time_call(sdpa, [qs, ks, vs], torch.randn(B, heads, T, dim, device=device, dtype=dtype),
                              cuda_graphs=cuda_graphs)
            emit(Row(shape, SDPA_OP, *_pair(times)))
    return rows


def _pair(times: list[Time], note: str = "") -> tuple[Time, Time, str, Time, Time]:
    """Row fields from time_call's list: eager (fwd, fwd+bwd), note, graph (fwd, fwd+bwd)."""
    graph = times[2:] or [None, None]
    return times[0], times[1], note, graph[0], graph[1]


def _cell(x: Time) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("—" if x is None else str(x))


def format_rows(rows: Sequence[Row], *, cuda_graphs: bool = False) -> str:
    """The rows as markdown table lines (graph-replay columns with cuda_graphs)."""
    lines = []
    for r in rows:
        graph = f" {_cell(r.graph_fwd_ms)} | {_cell(r.graph_fwdbwd_ms)} |" if cuda_graphs else ""
        lines.append(f"| {r.shape} | {r.op} | {_cell(r.fwd_ms)} | {_cell(r.fwdbwd_ms)} |{graph} {r.note} |")
    return "\n".join(lines)


def ratio_table(rows: Sequence[Row], *, cuda_graphs: bool = False) -> str:
    """attncc's speedup over the matching fla op and SDPA, per shape and decay (eager
    calls; with cuda_graphs, graph replays too)."""
    modes = [("", "fwd_ms", "fwdbwd_ms")] + ([(" (graphs)", "graph_fwd_ms", "graph_fwdbwd_ms")] if cuda_graphs else [])
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
        floor = ops.get(FLOOR_OP)
        sdpa = ops.get(SDPA_OP)
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


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """'2,4096;1,16384' -> [(2, 4096), (1, 16384)]; ValueError naming the bad part."""
    pairs = []
    for part in text.split(";"):
        try:
            pair = tuple(int(x) for x in part.split(","))
        except ValueError:
            pair = ()
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"expected B,T pairs of positive integers separated by ';', got {part!r} in {text!r}")
        pairs.append(pair)
    return pairs


def builtin_table(shapes: Sequence[tuple[int, int]], heads: int = 16, dim: int = 128,
                  dtype: torch.dtype = torch.bfloat16, decays: Sequence[str] = tuple(BENCH_SPECS),
                  against: Sequence[str] = PEERS, *, cuda_graphs: bool = False) -> int:
    """Print the built-in table and attncc's speedups; the exit status (2: no GPU)."""
    if not torch.cuda.is_available():
        print("attncc bench: no CUDA GPU found; benchmarks time kernels on a GPU, so there is nothing to do here.",
              file=sys.stderr)
        return 2
    rows = run(shapes, heads, dim, dtype, decays, against, cuda_graphs=cuda_graphs)
    graph_columns = " fwd ms (graph) | fwd+bwd ms (graph) |" if cuda_graphs else ""
    header = f"| shape (B, T) | op | fwd ms | fwd+bwd ms |{graph_columns} note |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    print(format_rows(rows, cuda_graphs=cuda_graphs))
    print()
    print(ratio_table(rows, cuda_graphs=cuda_graphs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/bench.py`: the built-in table, with argparse options."""
    import argparse

    parser = argparse.ArgumentParser(description="Time attncc's four built-in decay specs against fla and SDPA.")
    parser.add_argument("--shapes", default="2,4096;1,16384", help="B,T pairs separated by ';'")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--decays", default=",".join(BENCH_SPECS))
    parser.add_argument("--against", default="fla,sdpa")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time replays of captured CUDA graphs (no host overhead), for every op alike")
    args = parser.parse_args(argv)
    try:
        shapes = parse_pairs(args.shapes)
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    return builtin_table(shapes, args.heads, args.dim, DTYPES[args.dtype], args.decays.split(","),
                         args.against.split(","), cuda_graphs=args.cuda_graphs)


# ---------------------------------------------------------------------------
# Any spec: `attncc bench SPEC --shape B,T,H,D[,E]`
# ---------------------------------------------------------------------------
# fla's op (as the table names it) for each decay, when the spec's math is that op's:
# o_t = scale · q_t S_t with S_t = A_t S_{t-1} + k_tᵀ v_t, raw q and k, no normalizer.
FLA_OPS = {
    Decay.NONE: "chunk_linear_attn",
    Decay.PER_HEAD: "chunk_simple_gla (g_gamma)",
    Decay.PER_TOKEN: "chunk_simple_gla (g)",
    Decay.PER_CHANNEL: "chunk_gla",
}


# For `update = delta`: fla's delta-rule op for each decay, when it computes the spec's math
# (S'_t = A_t S_{t-1}; S_t = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ with g the log decay and β
# given as they are, q and k raw or both l2-normalized in the kernel).
DELTA_FLA_OPS = {
    Decay.NONE: "chunk_delta_rule",
    Decay.PER_TOKEN: "chunk_gated_delta_rule",
    Decay.PER_CHANNEL: "chunk_kda",
}


def _is_l2norm(feature_map) -> bool:
    return isinstance(feature_map, RowMap) and feature_map.kind is RowMapKind.L2NORM


def qk_l2norm(spec: AttentionSpec) -> bool | None:
    """For fla's delta ops: True where both maps are l2norm (fla's in-kernel l2norm), False
    where both are identity, None for any other maps (none of fla's ops computes them)."""
    if _is_l2norm(spec.q_map) and _is_l2norm(spec.k_map):
        return True
    if isinstance(spec.q_map, IdentityMap) and isinstance(spec.k_map, IdentityMap):
        return False
    return None


def _delta_fla_mismatch(spec: AttentionSpec) -> str | None:
    if spec.decay not in DELTA_FLA_OPS:
        return "a per-head decay: fla's delta-rule ops take no decay, a per-token or a per-channel one"
    if qk_l2norm(spec) is None:
        return "a feature map other than identity or l2norm on both q and k"
    if spec.gate is not None:  # fla takes the log decay g itself, not a raw input and a gate
        return "a gate"
    if spec.beta is not None:
        return "a beta transform (fla takes β itself)"
    return None


def fla_mismatch(spec: AttentionSpec) -> str | None:
    """Why no fla op computes `spec`'s function, or None when one does (FLA_OPS[decay], or
    DELTA_FLA_OPS[decay] for the delta rule)."""
    if spec.update is UpdateRule.DELTA:
        return _delta_fla_mismatch(spec)
    if not spec.causal:
        return "non-causal"
    if not (isinstance(spec.q_map, IdentityMap) and isinstance(spec.k_map, IdentityMap)):
        return "a feature map other than identity"
    if spec.normalize:
        return "normalize = true"
    if spec.gate is not None:  # fla takes the log decay g itself, not a raw input and a gate
        return "a gate"
    return None


def matching_fla_op(spec: AttentionSpec) -> str | None:
    """The fla op whose math is `spec`'s (a name from FLA_OPS or DELTA_FLA_OPS), or None."""
    if fla_mismatch(spec) is not None:
        return None
    return (DELTA_FLA_OPS if spec.update is UpdateRule.DELTA else FLA_OPS)[spec.decay]


def fla_call(spec: AttentionSpec) -> Callable[..., torch.Tensor]:
    """fla's op for a spec that matching_fla_op matches, as a call (q, k, v[, decay input]
    [, beta], scale) -> o taking the spec's own inputs. ImportError without fla."""
    if spec.update is UpdateRule.DELTA:
        return fla_delta_op(spec.decay.value, qk_l2norm=bool(qk_l2norm(spec)))
    return fla_op(spec.decay.value)


def spec_inputs(spec: AttentionSpec, B: int, T: int, H: int, D: int, E: int, dtype: torch.dtype,
                device: str | torch.device = "cuda") -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(q, k, v[, decay input][, beta], the per-head slope or None) for `spec`'s function.

    The first list is what the function takes positionally; all of it but the per-head
    slope needs gradients. Keys are unit-norm (tame bf16 values); a per-head slope lies in
    [0.01, 0.2]; a data-dependent decay is a log decay (logsigmoid, / 16 per channel) or,
    with a gate, the raw gate input. A delta-rule spec's beta [B, T, H] is β in (0, 1)
    (a sigmoid of normal draws) or, with a beta transform, the raw normal draws."""
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device).float(), dim=-1).to(dtype)
    v = torch.randn(B, T, H, E, device=device, dtype=dtype)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    slope = None
    if spec.decay is Decay.PER_HEAD:
        slope = torch.linspace(0.01, 0.2, H, device=device)
        leaves.append(slope)
    elif spec.decay.data_dependent:
        shape = (B, T, H, D) if spec.decay is Decay.PER_CHANNEL else (B, T, H)
        raw = torch.randn(shape, device=device)
        if spec.gate is None:
            raw = torch.nn.functional.logsigmoid(raw) / (16 if spec.decay is Decay.PER_CHANNEL else 1)
        leaves.append(raw.requires_grad_())
    if spec.update is UpdateRule.DELTA:
        beta = torch.randn(B, T, H, device=device)
        leaves.append((beta if spec.beta is not None else torch.sigmoid(beta)).requires_grad_())
    return leaves, slope


# The spec's reference is O(T²) in memory (per channel O(T² · D)): it is checked on the first
# batch entry and, for causal specs, on the longest prefix that fits (a causal output at t
# depends only on tokens <= t, so a prefix is an exact check of those outputs).
REFERENCE_BYTES = 2 << 30
# The delta rule's reference steps through the tokens one at a time (small in memory, slow
# in time): it is checked on a causal prefix of at most this many tokens.
DELTA_REFERENCE_TOKENS = 2048


def _reference_tokens(spec: AttentionSpec, T: int, H: int, D: int) -> int:
    if spec.update is UpdateRule.DELTA:
        return min(T, DELTA_REFERENCE_TOKENS)
    width = H * (D if spec.decay is Decay.PER_CHANNEL else 1) * 4 * 4  # fp32, a few temporaries
    return min(T, max(1, math.isqrt(REFERENCE_BYTES // width)))


def check_reference(module: ModuleType, spec: AttentionSpec, args: Sequence[torch.Tensor],
                    o: torch.Tensor) -> tuple[bool | None, str]:
    """Compare attncc's output `o` of `args` with `NAME_reference` in float32 on the same
    (rounded) inputs: (passed, or None where not checked; a note for the table)."""
    B, T, H, D = args[0].shape
    tokens = _reference_tokens(spec, T, H, D)
    if tokens < T and not spec.causal:
        return None, f"not checked: the non-causal reference at T={T} needs too much memory"
    piece = [x if x.dim() == 1 else x[:1, :tokens] for x in args]  # a per-head slope is [H]
    with torch.no_grad():
        expected = getattr(module, f"{spec.name}_reference")(*(x.detach().float() for x in piece))[0]
    err = relative_error(o[:1, :tokens], expected)
    where = "" if tokens == T and B == 1 else f" on b=0, t<{tokens}"
    ok = err <= tolerance(args[0].dtype)  # False for NaN
    return ok, f"{'ok' if ok else 'MISMATCH'}: rel. err {err:.1e} vs {spec.name}_reference (fp32){where}"


def bench_spec(module: ModuleType, spec: AttentionSpec, shapes: Sequence[tuple[int, ...]],
               dtype: torch.dtype = torch.bfloat16, against: Sequence[str] = PEERS, *,
               cuda_graphs: bool = True,
               progress: Callable[[int, int, str], None] = lambda done, total, what: None,
               device: str = "cuda") -> list[Row]:
    """Time `spec`'s function of the generated `module` at each B,T,H,D[,E] of `shapes`,
    beside the matching fla op and SDPA (those of `against`), checking attncc's output
    first. progress(done, total, what) is called before each timed op and once at the end.
    (`device` is for tests: off the GPU the timings fail and say so in their cells.)"""
    fn = getattr(module, spec.name)
    fla_name = matching_fla_op(spec)
    steps = [(shape, peer) for shape in shapes for peer in ("attncc", *[p for p in PEERS if p in against])]
    rows: list[Row] = []
    for done, (shape, peer) in enumerate(steps):
        B, T, H, D = shape[:4]
        E = shape[4] if len(shape) > 4 else D
        label = f"({B}, {T}, {H}, {D}, {E})"
        progress(done, len(steps), f"{peer} at {label}")
        if peer == "attncc":
            args, slope = spec_inputs(spec, B, T, H, D, E, dtype, device)
            forward, leaves = leaf_call(fn, args, slope)
            grad_out = torch.randn(B, T, H, E, device=device, dtype=dtype)
            with torch.no_grad():
                o_ours = forward(*leaves)
            ok, note = check_reference(module, spec, args, o_ours)
            times = time_call(forward, leaves, grad_out, cuda_graphs=cuda_graphs)
            rows.append(Row(label, f"attncc {spec.name}", *_pair(times, note), peer="attncc", seq_len=T, ok=ok))
        elif peer == "fla":
            rows.append(_fla_row(spec, fla_name, label, T, D, args, slope, leaves, o_ours, grad_out, cuda_graphs))
        else:
            qs, ks = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            vs = torch.randn(B, H, T, E, device=device, dtype=dtype, requires_grad=True)
            sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            times = time_call(sdpa, [qs, ks, vs], torch.randn(B, H, T, E, device=device, dtype=dtype),
                              cuda_graphs=cuda_graphs)
            note = "softmax attention, as a yardstick" + ("" if dtype != torch.float32 else "; fp32 is not FlashAttention's")
            rows.append(Row(label, SDPA_OP, *_pair(times, note), peer="sdpa", seq_len=T))
    progress(len(steps), len(steps), "done")
    return rows


def leaf_call(fn: Callable, args: Sequence[torch.Tensor],
              slope: torch.Tensor | None) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """(call returning o, its inputs) for spec_inputs' args: the inputs are the leaves that
    need gradients; a per-head slope (args[3], before a delta spec's beta) stays a constant."""
    if slope is None:
        return (lambda *a: fn(*a)[0]), list(args)
    return (lambda q, k, v, *rest: fn(q, k, v, slope, *rest)[0]), [x for x in args if x is not slope]


def _fla_row(spec, fla_name, label, T, D, args, slope, leaves, o_ours, grad_out, cuda_graphs) -> Row:
    """fla's row at one shape, on attncc's own inputs: its output compared with attncc's."""
    if fla_name is None:
        return Row(label, "fla", None, None, f"no matching fla op ({fla_mismatch(spec)})", peer="fla", seq_len=T)
    try:
        fla = fla_call(spec)
    except ImportError as error:
        return Row(label, f"fla {fla_name}", None, None, f"fla not importable ({error})", peer="fla", seq_len=T)
    scale = float(spec.scale) if spec.scale is not None else D**-0.5
    if slope is not None:
        forward = lambda q, k, v: fla(q, k, v, slope, scale)  # noqa: E731
    else:
        forward = lambda *a: fla(*a, scale)  # noqa: E731
    with torch.no_grad():
        err = relative_error(o_ours, forward(*leaves))
    ok = err <= tolerance(o_ours.dtype)
    times = time_call(forward, leaves, grad_out, cuda_graphs=cuda_graphs)
    note = f"{'ok' if ok else 'MISMATCH'}: attncc vs fla output rel. diff {err:.1e}"
    return Row(label, f"fla {fla_name}", *_pair(times, note), peer="fla", seq_len=T, ok=ok)


def spec_table(rows: Sequence[Row], *, cuda_graphs: bool = True, title: str | None = None):
    """bench_spec's rows as a rich Table (eager and, with cuda_graphs, graph-replay columns)."""
    from rich.table import Table

    table = Table(title=title)
    # Narrow terminals wrap the cells (fold) rather than cut them short.
    table.add_column("shape (B, T, H, D, E)", overflow="fold")
    table.add_column("op", overflow="fold")
    columns = [("fwd ms", "fwd_ms"), ("fwd+bwd ms", "fwdbwd_ms")]
    if cuda_graphs:
        columns += [("fwd ms (graph)", "graph_fwd_ms"), ("fwd+bwd ms (graph)", "graph_fwdbwd_ms")]
    for header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("check / note", overflow="fold")
    for r in rows:
        style = "red" if r.ok is False else None
        table.add_row(r.shape, r.op, *(_cell(getattr(r, field)) for _, field in columns), r.note, style=style)
    return table


def plot_rows(rows: Sequence[Row], path: str | Path, *, title: str = "") -> None:
    """Draw ms against T for each peer of bench_spec's rows into the image `path`: forward
    and forward+backward panels, eager (solid) and graph replays (dashed) where timed. Rows
    of one op at other B, H, D, E are drawn as lines of their own."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    lines: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.seq_len is not None and r.peer:
            B, _, H, D, E = r.shape.strip("()").split(", ")  # T is the x-axis; the rest names the line
            lines.setdefault((r.op, f"(B, H, D, E = {B}, {H}, {D}, {E})"), []).append(r)
    several = len({dims for _, dims in lines}) > 1  # name the dims only where they differ
    for axis, (kind, eager, graph) in zip(axes, [("forward", "fwd_ms", "graph_fwd_ms"),
                                                  ("forward + backward", "fwdbwd_ms", "graph_fwdbwd_ms")], strict=True):
        for index, ((op, dims), group) in enumerate(lines.items()):
            group = sorted(group, key=lambda r: r.seq_len)
            color = f"C{index % 10}"  # one color per line in both panels, eager and graph alike
            for field, style, suffix in ((eager, "-", ""), (graph, "--", ", graph")):
                points = [(r.seq_len, getattr(r, field)) for r in group if isinstance(getattr(r, field), float)]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, style, color=color, marker="o", label=f"{op}{' ' + dims if several else ''}{suffix}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("T (tokens)")
        axis.set_ylabel("ms (median)")
        axis.set_title(kind)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    if title or not several:
        figure.suptitle(" ".join(filter(None, [title, "" if several else next(iter(lines), ("", ""))[1]])))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
