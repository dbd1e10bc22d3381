"""Diagnostics: every spec of tests/diagnostics/ beside the exact output `attncc check` gives it.

`NAME.attn` is a spec with a mistake; `NAME.stderr` is what `attncc check NAME.attn` prints on
stderr (message, file:line:col, the snippet with its caret and labels, the hint, the count),
as rustc's UI tests keep theirs. Rewrite the expected files with ATTNCC_UPDATE_GOLDEN=1 and
read the diff. What is not rendered text for a spec stays a Python test below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from attncc.check import load_spec_file, parse_spec
from attncc.cli import main
from attncc.errors import AttnccError

DIAGNOSTICS = Path(__file__).resolve().parent / "diagnostics"
SPECS = sorted(DIAGNOSTICS.glob("*.attn"))


def block(*lines: str) -> str:
    """A block named `a` whose entries start on line 2."""
    return "attention a {\n" + "\n".join(lines) + "\n}\n"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_diagnostic_matches_expected_output(spec, monkeypatch):
    """`attncc check` refuses the spec, without a traceback, printing exactly NAME.stderr;
    a `warning_NAME.attn` is valid: check succeeds, its advice on stderr."""
    monkeypatch.chdir(DIAGNOSTICS)  # the file is named as the user typed it: NAME.attn
    result = CliRunner().invoke(main, ["check", spec.name])
    warning_only = spec.stem.startswith("warning_")
    assert result.exit_code == (0 if warning_only else 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    if warning_only:
        assert result.stdout.startswith("attention ") and "error" not in result.stderr
    else:
        assert result.stdout == ""
    expected = spec.with_suffix(".stderr")
    if os.environ.get("ATTNCC_UPDATE_GOLDEN") == "1":
        expected.write_text(result.stderr, encoding="utf-8")
    assert result.stderr == expected.read_text(encoding="utf-8"), (
        f"diagnostics of {spec.name} changed; review and update {expected.name}"
    )


def test_every_expected_output_has_its_spec():
    stale = [p.name for p in DIAGNOSTICS.glob("*.stderr") if not p.with_suffix(".attn").exists()]
    assert not stale, f"expected outputs without a spec: {stale}"
    assert len(SPECS) >= 80  # the directory was found, and holds the converted cases


# -- what is not rendered text for a spec ------------------------------------------------------


def test_good_chunks():
    assert parse_spec(block("    chunk = 64.0")).specs[0].chunk == 64
    assert parse_spec(block("    chunk = auto")).specs[0].chunk is None


def test_every_whitelisted_function_can_be_evaluated_as_a_constant():
    # build_expr.py evaluates constant parts numerically; a new function needs an entry there.
    from attncc.build_expr import MP_FUNCTIONS
    from attncc.expr import FUNCTIONS

    assert set(MP_FUNCTIONS) == set(FUNCTIONS)
    for name in FUNCTIONS:
        parse_spec(block(f"    feature_map = x + {name}(1)"))


@pytest.mark.parametrize("first, second", [("a", "ab"), ("ab", "a_b"), ("ab_c", "a_bc")])
def test_names_that_only_look_alike_do_not_clash(first, second):
    parse_spec(f"attention {first} {{}}\nattention {second} {{}}\n")


def test_missing_file(tmp_path):
    path = tmp_path / "missing.attn"
    with pytest.raises(AttnccError) as info:
        load_spec_file(path)
    (d,) = info.value.diagnostics
    assert d.message == f"cannot read `{path}`: No such file or directory"
    assert d.span is None
    assert str(info.value) == f"error: cannot read `{path}`: No such file or directory"


def test_cli_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nope.attn")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "error: cannot read" in result.stderr


def test_cli_process_exit_status(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text(block("    decay = per_haed"))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "attncc.cli", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{path}:2:13: error:" in proc.stderr
    assert proc.stdout == ""
