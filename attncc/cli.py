"""The `attncc` command line.

    attncc check spec.attn      parse, validate, print the normalized spec and its math

Every command reports problems with a spec as rendered diagnostics on stderr
and exits with status 1, without a traceback (see `_reporting_errors`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from attncc import __version__
from attncc.errors import AttnccError


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


if __name__ == "__main__":  # pragma: no cover
    main()
