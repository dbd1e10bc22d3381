"""The `attncc` command line.

    attncc check spec.attn                 parse, validate, print the normalized spec and its math
    attncc compile spec.attn -o kernel.py  generate the module (-o - for stdout)
    attncc tune spec.attn --shape B,T,H,D[,E] --dtype bf16
                                           sweep launch parameters on the GPU, keep the best
    attncc bench --shapes 2,4096 --against fla,sdpa
                                           time attncc against fla and FlashAttention

Every command reports problems with a spec as rendered diagnostics on stderr
and exits with status 1, without a traceback (see `_reporting_errors`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from attncc._version import __version__
from attncc.errors import AttnccError, Diagnostic, printable


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attncc")
def main() -> None:
    """attncc: a compiler for linear-attention variants."""


@main.command()
@click.argument("spec", type=click.Path(path_type=str))
@_reporting_errors
def check(spec: str) -> None:
    """Parse and validate SPEC; print each block's normalized text, math and signature."""
    from attncc.check import load_spec_file
    from attncc.describe import describe

    spec_file = load_spec_file(spec)
    click.echo("\n".join(describe(s) for s in spec_file.specs), nl=False)


@main.command(name="compile")
@click.argument("spec", type=click.Path(path_type=str))
@click.option("-o", "--output", default="-", show_default=True, help="Where to write the module; - for stdout.")
@_reporting_errors
def compile_command(spec: str, output: str) -> None:
    """Generate one self-contained Python module (Triton kernels, autograd, reference) from SPEC."""
    from attncc.compiler import compile_file

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

    Prints a ranked table and stores the fastest config beside the spec
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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Time attncc's kernels against fla and FlashAttention (options: see --help of benchmarks/bench.py)."""
    from attncc.bench import main as bench_main

    raise click.exceptions.Exit(bench_main(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    main()
