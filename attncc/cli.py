"""The `attncc` command line.

    attncc check spec.attn                 parse, validate, print the normalized spec and its math
    attncc compile spec.attn -o kernel.py  generate the module (-o - for stdout)
    attncc tune spec.attn --shape B,T,H,D[,E] --dtype bf16
                                           sweep launch parameters on the GPU, keep the best
    attncc bench spec.attn --shape B,T,H,D[,E] --against fla,sdpa [--plot ms.png]
                                           time the spec on the GPU beside fla and SDPA
    attncc bench --shapes 2,4096 --against fla,sdpa
                                           the built-in table of the four decays

Every command reports problems with a spec as rendered diagnostics on stderr
and exits with status 1, without a traceback (see `_reporting_errors`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from attncc._version import __version__
from attncc.errors import AttnccError, Diagnostic, printable

if TYPE_CHECKING:
    from attncc.check import Checked


def _reporting_errors(command: Callable) -> Callable:
    """Turn AttnccError into its rendered diagnostics on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AttnccError as err:
            click.echo(err.render(), err=True)
            count = len(err.diagnostics)
            click.echo(f"attncc: {count} error{'s' if count != 1 else ''}", err=True)
            raise click.exceptions.Exit(1) from None

    return wrapper


def _echo_warnings(checked: Checked) -> None:
    """Print a checked file's warnings (advice; the spec stays valid) on stderr."""
    if checked.warnings:
        click.echo(checked.render_warnings(), err=True)
        count = len(checked.warnings)
        click.echo(f"attncc: {count} warning{'s' if count != 1 else ''}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attncc")
def main() -> None:
    """attncc: a compiler for linear-attention variants."""


@main.command()
@click.argument("spec", type=click.Path(path_type=str))
@_reporting_errors
def check(spec: str) -> None:
    """Parse and validate SPEC; print each block's normalized text, math and signature."""
    from attncc.check import check_spec_file
    from attncc.describe import describe

    checked = check_spec_file(spec)
    _echo_warnings(checked)
    spec_file = checked.spec_file
    click.echo("\n".join(describe(s) for s in spec_file.specs), nl=False)


@main.command(name="compile")
@click.argument("spec", type=click.Path(path_type=str))
@click.option("-o", "--output", default="-", show_default=True, help="Where to write the module; - for stdout.")
@_reporting_errors
def compile_command(spec: str, output: str) -> None:
    """Generate one self-contained Python module (Triton kernels, autograd, reference) from SPEC."""
    from attncc.check import check_spec_file
    from attncc.compiler import compile_file

    # A first, cheap check for the warnings (compile_file keeps none); errors raise here
    # exactly as compile_file would raise them.
    _echo_warnings(check_spec_file(spec))
    source = compile_file(spec)
    if output == "-":
        click.echo(source, nl=False)
    else:
        _write_output(spec, output, source)
        click.echo(f"attncc: wrote {printable(output)}", err=True)


def _write_output(spec: str, output: str, text: str) -> None:
    """Write the module to `output`; a path that cannot take it is a clean error."""
    import os

    shown = printable(output)
    try:
        if os.path.exists(output) and os.path.samefile(spec, output):
            raise AttnccError(
                Diagnostic(
                    f"`{shown}` is the spec itself; writing the module there would replace it",
                    hint="name another file with -o, e.g. `-o kernel.py`",
                )
            )
    except OSError:
        pass  # samefile could not stat one of them: the write below says what is wrong
    try:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as err:
        reason = err.strerror or str(err)
        hint = None
        if isinstance(err, FileNotFoundError):
            hint = "create the folder first, or pick a path in an existing one"
        elif isinstance(err, IsADirectoryError):
            hint = "name a file inside it, e.g. `-o " + os.path.join(output, "kernel.py") + "`"
        raise AttnccError(Diagnostic(f"cannot write `{shown}`: {reason}", hint=hint)) from None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected integers B,T,H,D[,E], got {text!r}") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise click.BadParameter(f"expected B,T,H,D[,E] with positive entries, got {text!r}")
    return shape


@main.command()
@click.argument("spec", type=click.Path(path_type=str))
@click.option("--shape", required=True, help="B,T,H,D[,E] to tune for.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--name", default=None, help="Which attention block (default: the only one).")
@_reporting_errors
def tune(spec: str, shape: str, dtype: str, name: str | None) -> None:
    """Sweep chunk sizes, warps, stages and sequence splits for SPEC on the GPU.

    Only the launch parameters SPEC's module has are swept (a delta-rule block, update =
    delta, has no separate backward chunk, narrow blocks or sequence splits). Prints a ranked table and stores the fastest config beside the spec
    (SPEC.tuned.json), where `attncc compile` and `attncc.load` pick it up."""
    dims = _parse_shape(shape)
    import torch

    if not torch.cuda.is_available():
        click.echo("attncc tune: no CUDA GPU found; tuning measures kernels on a GPU, so there is nothing to do here.",
                   err=True)
        raise click.exceptions.Exit(2)
    from attncc import tune as tuning
    from attncc.check import load_spec_file
    from attncc.compiler import compile_file
    from attncc.loader import load

    specs = load_spec_file(spec).specs
    if name is None and len(specs) > 1:
        raise click.BadParameter(f"{spec} holds {len(specs)} blocks; pick one with --name", param_hint="--name")
    chosen = next((s for s in specs if name in (None, s.name)), None)
    if chosen is None:
        raise click.BadParameter(f"no attention block named {name!r} in {spec}", param_hint="--name")
    compile_file(spec)
    module = load(spec)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    results = tuning.sweep(module, chosen, dims, torch_dtype, progress=tuning.progress_bar)
    click.echo("rank  fwd+bwd ms  config")
    for rank, (ms, config) in enumerate(results[:10], start=1):
        click.echo(f"{rank:>4}  {ms:10.3f}  {config}")
    D = dims[3]
    E = dims[4] if len(dims) > 4 else D
    path = tuning.store(spec, chosen.name, D, E, results[0][1])
    click.echo(f"attncc: best config stored in {path}", err=True)


def _shape_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[int, ...]]:
    return [_parse_shape(value) for value in values]


def _peers_option(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """'fla,sdpa' -> ('fla', 'sdpa'); 'none' -> (); an unknown peer is a usage error."""
    from attncc.bench import PEERS

    peers = tuple(p.strip() for p in value.split(",") if p.strip())
    if peers == ("none",):
        return ()
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        problem = f"unknown peer {unknown[0]!r}" if unknown else "no peer given"
        raise click.BadParameter(f"{problem}; choose from {', '.join(PEERS)} (comma-separated), or none")
    return peers


# Options of the built-in table (no SPEC): the four decays at B,T pairs, H and D = E.
_BUILTIN_ONLY = ("builtin_shapes", "heads", "dim", "decays")


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=str))
@click.option("--shape", "shapes", multiple=True, callback=_shape_option, metavar="B,T,H,D[,E]",
              help="Shape to time SPEC at (E defaults to D); repeat it for several, e.g. several T "
                   "for --plot. Needed with SPEC.")
@click.option("--name", default=None, help="Which attention block of SPEC (default: the only one).")
@click.option("--against", default="fla,sdpa", show_default=True, callback=_peers_option,
              help="Peers to time beside attncc, comma-separated: fla (the op whose math matches "
                   "the spec, if any; for update = delta, chunk_delta_rule, chunk_gated_delta_rule or "
                   "chunk_kda) and sdpa (causal FlashAttention through "
                   "torch.nn.functional.scaled_dot_product_attention), or none.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of q, k and v (decay inputs are float32).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Also time replays of captured CUDA graphs, where host overhead drops out.  "
                   "[default: on with SPEC, off for the built-in table]")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also draw ms against T for attncc, fla and SDPA into this image file (needs "
                   "matplotlib: pip install 'attncc[plot]').")
@click.option("--shapes", "builtin_shapes", default=None, metavar="B,T;B,T",
              help="Built-in table only (no SPEC): B,T pairs separated by ';'.  [default: 2,4096;1,16384]")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Built-in table only: number of heads H.  [default: 16]")
@click.option("--dim", type=click.IntRange(min=1), default=None,
              help="Built-in table only: head dimension D = E.  [default: 128]")
@click.option("--decays", default=None,
              help="Built-in table only: comma-separated decays to time.  "
                   "[default: none,per_head,per_token,per_channel]")
@_reporting_errors
def bench(spec: str | None, shapes: list[tuple[int, ...]], name: str | None, against: tuple[str, ...],
          dtype: str, cuda_graphs: bool | None, plot: str | None, **builtin: object) -> None:
    """Time SPEC's function (forward, forward+backward; eager and CUDA-graph replays) beside
    the fla op whose math matches it and causal SDPA, on the GPU.

    attncc's output is checked first at each timed shape, against the spec's generated
    NAME_reference in float32 (and against fla's where one matches); a mismatch makes the
    exit status 1. Without SPEC, prints the built-in table of the four decays against fla and
    SDPA (the one BENCHMARKS.md quotes; options --shapes, --heads, --dim, --decays).

    \b
    Example:
      attncc bench examples/gated.attn --name mamba2 --shape 2,1024,16,128 \\
          --shape 2,4096,16,128 --against fla,sdpa --plot mamba2.png
    """
    if spec is None:
        _builtin_bench(shapes, name, against, dtype, cuda_graphs, plot, builtin)
        return
    given = [f"--{key.replace('builtin_', '')}" for key in _BUILTIN_ONLY if builtin[key] is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} set the built-in table (no SPEC); with SPEC, give "
                               "--shape B,T,H,D[,E] once per shape")
    if not shapes:
        raise click.UsageError("give at least one --shape B,T,H,D[,E] to time SPEC at")
    if plot is not None:
        _require_matplotlib()
    from attncc.check import load_spec_file

    chosen = _choose_block(spec, load_spec_file(spec).specs, name)  # spec mistakes show even without a GPU
    import torch

    if not torch.cuda.is_available():
        click.echo("attncc bench: no CUDA GPU found; benchmarks time kernels on a GPU, so there is "
                   "nothing to do here.", err=True)
        raise click.exceptions.Exit(2)
    from rich.console import Console
    from rich.progress import Progress

    from attncc import bench as benching
    from attncc.loader import load

    module = load(spec)
    graphs = True if cuda_graphs is None else cuda_graphs
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("compiling", total=None)

        def report(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=f"timing {what}")

        rows = benching.bench_spec(module, chosen, shapes, benching.DTYPES[dtype], against,
                                   cuda_graphs=graphs, progress=report)
    title = f"{chosen.name} ({spec}), {dtype}, {torch.cuda.get_device_name()}"
    Console().print(benching.spec_table(rows, cuda_graphs=graphs, title=title))
    if plot is not None:
        benching.plot_rows(rows, plot, title=f"{chosen.name}, {dtype}")
        click.echo(f"attncc: plot written to {printable(plot)}", err=True)
    failed = [r for r in rows if r.ok is False]
    if failed:
        click.echo(f"attncc bench: attncc's output is off at {', '.join(r.shape for r in failed)} "
                   "(see the check column)", err=True)
        raise click.exceptions.Exit(1)


def _builtin_bench(shapes, name, against, dtype, cuda_graphs, plot, builtin) -> None:
    """`attncc bench` without SPEC: the built-in four-decay table (attncc.bench.builtin_table)."""
    given = [option for option, value in (("--shape", shapes), ("--name", name), ("--plot", plot)) if value]
    if given:
        raise click.UsageError(f"{', '.join(given)} need SPEC (the built-in table takes --shapes B,T;B,T)")
    from attncc import bench as benching

    try:
        pairs = benching.parse_pairs(builtin["builtin_shapes"] or "2,4096;1,16384")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--shapes") from None
    decays = (builtin["decays"] or ",".join(benching.BENCH_SPECS)).split(",")
    unknown = [d for d in decays if d not in benching.BENCH_SPECS]
    if unknown:
        raise click.BadParameter(f"unknown decay {unknown[0]!r}; choose from {', '.join(benching.BENCH_SPECS)}",
                                 param_hint="--decays")
    status = benching.builtin_table(pairs, builtin["heads"] or 16, builtin["dim"] or 128, benching.DTYPES[dtype],
                                    decays, against, cuda_graphs=bool(cuda_graphs))
    raise click.exceptions.Exit(status)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.UsageError("--plot needs matplotlib, which is not installed; "
                               "install it with: pip install 'attncc[plot]'") from None


def _choose_block(spec: str, specs, name: str | None):
    """The attention block of `spec` that --name picks (or the only one)."""
    if name is None and len(specs) > 1:
        names = ", ".join(s.name for s in specs)
        raise click.BadParameter(f"{spec} holds {len(specs)} blocks ({names}); pick one with --name",
                                 param_hint="--name")
    chosen = next((s for s in specs if name in (None, s.name)), None)
    if chosen is None:
        raise click.BadParameter(f"no attention block named {name!r} in {spec}", param_hint="--name")
    return chosen


if __name__ == "__main__":  # pragma: no cover
    main()
