"""Spec file → generated module source: the whole pipeline in one call."""

from __future__ import annotations

import json
from pathlib import Path

from attncc.check import parse_spec
from attncc.render import render_module


def tuning_path(spec_path: str | Path) -> Path:
    """Where `attncc tune` stores measured launch parameters for a spec: beside it."""
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name + ".tuned.json")


def read_tuned_configs(spec_path: str | Path) -> dict:
    """{(name, D, E): {"chunk": ..., "block_e": ..., "num_warps": ..., "num_stages": ...}}."""
    path = tuning_path(spec_path)
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())
    return {(e["name"], e["D"], e["E"]): e["config"] for e in entries}


def compile_source(source: str, filename: str = "<string>", tuned_configs: dict | None = None) -> str:
    """The generated module for a spec's text (raises AttnccError for a bad spec)."""
    specs = parse_spec(source, filename)
    return render_module(specs, source, filename, tuned_configs)


def compile_file(path: str | Path) -> str:
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as error:
        from attncc.errors import AttnccError, Diagnostic

        raise AttnccError(Diagnostic(f"cannot read {path}: {error.strerror or error}")) from None
    return compile_source(source, path.name, read_tuned_configs(path))
