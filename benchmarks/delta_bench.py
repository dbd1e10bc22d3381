"""Time attncc's delta-rule examples against fla's delta-rule ops on one GPU.

    python benchmarks/delta_bench.py                                 # SPEC's shapes, all variants
    python benchmarks/delta_bench.py --shapes "2,4096,16,128" --variants kda --json kda.json
    python benchmarks/delta_bench.py --dry-run                       # CPU smoke test (interpreter)

Variants: examples/delta/{deltanet,gated_deltanet,kda}.attn against fla's chunk_delta_rule,
chunk_gated_delta_rule and chunk_kda (`attncc.bench.fla_delta_op`). At each shape B,T,H,D[,E]
(H_kv = H) both run on the same q, k, v: attncc takes the raw gate and beta inputs its spec
transforms inside the kernel; fla takes the log decay g and β made from the same raw inputs
outside the timed call (with the module's own reference transforms), so fla's times leave the
two elementwise transforms out. Both l2-normalize q and k inside the kernel (fla:
use_qk_l2norm_in_kernel). Reported per op: forward and forward+backward medians, eager calls
and CUDA-graph replays (`attncc.bench.time_call`); the peak memory a forward and a
forward+backward step allocate beyond what is held before it; and, at the config that is timed,
the relative error of the output against the other op and against the float64 reference
(NAME_reference) on batch entry 0 and the first --check-tokens tokens (a causal prefix: an
exact check of those outputs). The exit status is 1 when attncc's output fails its check.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attncc import bench

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {name: ROOT / "examples" / "delta" / f"{name}.attn" for name in ("deltanet", "gated_deltanet", "kda")}
# SPEC §6's shapes for the delta rule (B, T, H, D, E): fla's benchmark set, then ours.
DEFAULT_SHAPES = "1,8192,96,128;2,16384,16,128;4,2048,16,128;8,2048,32,256;2,4096,16,128;1,16384,16,128"
DRY_RUN_SHAPE = (1, 32, 2, 16, 16)


@dataclass
class Result:
    """One op (attncc or fla) of one variant at one shape."""

    shape: tuple[int, ...]
    variant: str
    op: str
    times: dict[str, bench.Time] = field(default_factory=dict)  # fwd, fwdbwd, graph_fwd, graph_fwdbwd
    peak_mib: dict[str, float | str] = field(default_factory=dict)  # fwd, fwdbwd
    err_vs_reference: float | None = None
    err_vs_other: float | None = None
    ok: bool | None = None
    note: str = ""


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'2,4096,16,128;8,2048,32,256' -> [(2, 4096, 16, 128, 128), (8, 2048, 32, 256, 256)]."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(x) for x in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) not in (4, 5) or min(shape) < 1:
            raise ValueError(f"expected B,T,H,D[,E] of positive integers separated by ';', got {part!r}")
        shapes.append(shape if len(shape) == 5 else (*shape, shape[3]))
    return shapes


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        shown = repr(unknown[0]) if unknown else "none"
        raise ValueError(f"unknown variant {shown}; choose from {', '.join(VARIANTS)}")
    return names


def load_variant(name: str):
    """(module, spec) of one example, compiled through attncc's cache."""
    import attncc
    from attncc.check import load_spec_file

    return attncc.load(VARIANTS[name]), load_spec_file(VARIANTS[name]).specs[0]


def fla_inputs(module, spec, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """fla's (q, k, v[, g], beta) from attncc's arguments: the same q, k, v; g and β made from
    the raw inputs by the module's own reference transforms, as new leaves (outside any timing)."""
    q, k, v, *rest = args
    raw_decay, raw_beta = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    with torch.no_grad():
        beta = raw_beta.detach().float()
        if spec.beta is not None:
            beta = getattr(module, f"_{spec.name}_beta_reference")(beta)
        extra = []
        if raw_decay is not None:
            g = raw_decay.detach().float()
            transform = getattr(module, f"_{spec.name}_log_decay_reference", None)
            extra = [transform(g) if transform is not None else g]
    return [q, k, v, *(x.contiguous().requires_grad_() for x in [*extra, beta])]


def reference_error(module, spec, args: Sequence[torch.Tensor], o: torch.Tensor, tokens: int) -> float:
    """Relative error of `o` against NAME_reference in float64 on b = 0, t < tokens."""
    piece = [x.detach()[:1, :tokens].double() for x in args]
    with torch.no_grad():
        expected = getattr(module, f"{spec.name}_reference")(*piece)[0]
    return bench.relative_error(o[:1, :tokens], expected)


def peak_mib(step: Callable[[], object]) -> float | str:
    """MiB that `step()` allocates at its peak beyond what is held before it (CUDA only)."""
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    except Exception as error:  # e.g. out of memory
        return f"failed: {type(error).__name__}"


def _steps(forward: Callable, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor):
    def fwd():
        with torch.no_grad():
            forward(*leaves)

    def fwdbwd():
        torch.autograd.grad(forward(*leaves), [x for x in leaves if x.requires_grad], grad_out)

    return fwd, fwdbwd


def run_variant(name: str, shape: tuple[int, ...], dtype: torch.dtype, check_tokens: int, *,
                cuda_graphs: bool = True, time: bool = True, device: str = "cuda") -> list[Result]:
    """attncc's and fla's Results for one variant at one shape (time=False: the check only)."""
    B, T, H, D, E = shape
    module, spec = load_variant(name)
    torch.manual_seed(0)
    args, _ = bench.spec_inputs(spec, B, T, H, D, E, dtype, device)
    fn = getattr(module, spec.name)
    forward = lambda *a: fn(*a)[0]  # noqa: E731
    grad_out = torch.randn(B, T, H, E, device=device, dtype=dtype)
    ours = Result(shape, name, f"attncc {spec.name}")
    results = [ours]
    try:
        with torch.no_grad():
            o_ours = forward(*args)
    except Exception as error:
        ours.ok, ours.note = False, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return results
    tokens = min(T, check_tokens)
    ours.err_vs_reference = reference_error(module, spec, args, o_ours, tokens)
    ours.ok = ours.err_vs_reference <= bench.tolerance(dtype)  # False for NaN
    ours.note = f"{'ok' if ours.ok else 'MISMATCH'} vs float64 reference on b=0, t<{tokens}"
    if time:
        _measure(ours, forward, args, grad_out, cuda_graphs)
    fla_name = bench.DELTA_FLA_OPS[spec.decay]
    theirs = Result(shape, name, f"fla {fla_name}")
    results.append(theirs)
    try:
        fla = bench.fla_delta_op(spec.decay.value, qk_l2norm=bool(bench.qk_l2norm(spec)))
    except ImportError as error:
        theirs.note = f"fla not importable ({error})"
        return results
    scale = float(spec.scale) if spec.scale is not None else D**-0.5
    fla_forward = lambda *a: fla(*a, scale)  # noqa: E731
    fla_args = fla_inputs(module, spec, args)
    try:
        with torch.no_grad():
            o_fla = fla_forward(*fla_args)
    except Exception as error:
        theirs.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return results
    theirs.err_vs_reference = reference_error(module, spec, args, o_fla, tokens)
    ours.err_vs_other = theirs.err_vs_other = bench.relative_error(o_ours, o_fla)
    theirs.ok = ours.err_vs_other <= bench.tolerance(dtype)
    theirs.note = f"attncc vs fla {'ok' if theirs.ok else 'MISMATCH'}"
    if time:
        _measure(theirs, fla_forward, fla_args, grad_out, cuda_graphs)
    return results


def _measure(result: Result, forward: Callable, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor,
             cuda_graphs: bool) -> None:
    times = bench.time_call(forward, leaves, grad_out, cuda_graphs=cuda_graphs)
    result.times = dict(zip(["fwd", "fwdbwd", "graph_fwd", "graph_fwdbwd"], times, strict=False))
    fwd, fwdbwd = _steps(forward, leaves, grad_out)
    result.peak_mib = {"fwd": peak_mib(fwd), "fwdbwd": peak_mib(fwdbwd)}


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if x < 1e4 else f"{x:.0f}"
    return "—" if x is None else str(x)


def format_row(r: Result) -> str:
    times = " | ".join(_cell(r.times.get(key)) for key in ("fwd", "fwdbwd", "graph_fwd", "graph_fwdbwd"))
    memory = " | ".join(_cell(r.peak_mib.get(key)) for key in ("fwd", "fwdbwd"))
    errors = " | ".join("—" if e is None else f"{e:.1e}" for e in (r.err_vs_reference, r.err_vs_other))
    return f"| {r.shape} | {r.op} | {times} | {memory} | {errors} | {r.note} |"


HEADER = ("| shape (B, T, H, D, E) | op | fwd ms | fwd+bwd ms | fwd ms (graph) | fwd+bwd ms (graph) | "
          "peak MiB fwd | peak MiB fwd+bwd | rel. err vs fp64 | attncc vs fla | note |")


def speedups(results: Sequence[Result]) -> str:
    """fla's time / attncc's for each shape and variant (>1: attncc is faster)."""
    keys = ("fwd", "fwdbwd", "graph_fwd", "graph_fwdbwd")
    lines = ["| shape | variant | fwd | fwd+bwd | fwd (graph) | fwd+bwd (graph) | peak memory fla / attncc |",
             "|---|---|---|---|---|---|---|"]
    pairs: dict[tuple, dict[str, Result]] = {}
    for r in results:
        pairs.setdefault((r.shape, r.variant), {})["attncc" if r.op.startswith("attncc") else "fla"] = r
    for (shape, variant), ops in pairs.items():
        ours, theirs = ops.get("attncc"), ops.get("fla")
        if ours is None or theirs is None:
            continue

        def ratio(a, b):
            return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "—"

        cells = [ratio(theirs.times.get(k), ours.times.get(k)) for k in keys]
        memory = ratio(theirs.peak_mib.get("fwdbwd"), ours.peak_mib.get("fwdbwd"))
        lines.append(f"| {shape} | {variant} | {' | '.join(cells)} | {memory} |")
    return "\n".join(lines)


def dry_run(variants: Sequence[str]) -> int:
    """Compile each variant, build its inputs and fla's at a tiny shape, run the forward and
    check it against the float64 reference: on the CPU through Triton's interpreter."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    failed = 0
    for name in variants:
        results = run_variant(name, DRY_RUN_SHAPE, torch.float32, DRY_RUN_SHAPE[1], time=False, device="cpu")
        ours = results[0]
        module, spec = load_variant(name)
        args, _ = bench.spec_inputs(spec, *DRY_RUN_SHAPE, torch.float32, "cpu")
        shapes = [tuple(x.shape) for x in fla_inputs(module, spec, args)]
        status = "ok" if ours.ok else "FAILED"
        failed += not ours.ok
        error = "—" if ours.err_vs_reference is None else f"{ours.err_vs_reference:.1e}"
        print(f"{name}: {status} (rel. err {error} vs float64 reference at "
              f"{DRY_RUN_SHAPE}; fla inputs {shapes}; {results[-1].note or 'fla ran'})")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time attncc's delta-rule examples against fla's chunk_delta_rule, "
                                                 "chunk_gated_delta_rule and chunk_kda (one GPU).")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="B,T,H,D[,E] shapes separated by ';' "
                        "(default: SPEC's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", default="bf16", choices=list(bench.DTYPES))
    parser.add_argument("--check-tokens", type=int, default=512,
                        help="tokens of batch entry 0 checked against the float64 reference")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="time eager calls only")
    parser.add_argument("--json", metavar="PATH", help="also write every result to this JSON file")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"no GPU, no timing: compile, build inputs and check the forward at {DRY_RUN_SHAPE} "
                             "on the CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    try:
        variants = parse_variants(args.variants)
    except ValueError as error:
        parser.error(f"--variants: {error}")
    if args.check_tokens < 1:
        parser.error("--check-tokens: must be at least 1")
    if args.dry_run:
        return dry_run(variants)
    if not torch.cuda.is_available():
        print("delta_bench: no CUDA GPU found (use --dry-run for the CPU smoke test)", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}; H_kv = H", flush=True)
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1), flush=True)
    results: list[Result] = []
    for shape in shapes:
        for name in variants:
            for result in run_variant(name, shape, bench.DTYPES[args.dtype], args.check_tokens,
                                      cuda_graphs=not args.no_cuda_graphs):
                results.append(result)
                print(format_row(result), flush=True)
            torch.cuda.empty_cache()
    print()
    print(speedups(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1, default=str) + "\n")
    return 1 if any(r.ok is False and r.op.startswith("attncc") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
