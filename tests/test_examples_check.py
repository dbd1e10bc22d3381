"""Every example spec parses, checks, round-trips, and `attncc check` explains it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from attncc.canonical import to_canonical
from attncc.check import load_spec_file, parse_spec
from attncc.cli import main
from attncc.describe import describe
from attncc.expr import FUNCTIONS
from attncc.ir import Decay, ElementwiseMap, IdentityMap, RowMap, RowMapKind, X

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.glob("*.attn"))
MULTI_BLOCK = {"gated.attn"}


def test_the_expected_examples_exist():
    names = {f.name for f in FILES}
    expected = {
        "lightning.attn",
        "retnet.attn",
        "linear_elu.attn",
        "gla.attn",
        "simple_gla.attn",
        "hedgehog.attn",
        "noncausal.attn",
    } | MULTI_BLOCK
    assert expected <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_checks_and_round_trips(path):
    spec_file = load_spec_file(path)
    assert spec_file.path == str(path)
    assert spec_file.specs
    if path.name in MULTI_BLOCK:
        assert len(spec_file.specs) >= 2
    else:
        assert [s.name for s in spec_file.specs] == [path.stem]
    # Each example names the model or paper it comes from in a comment.
    assert path.read_text(encoding="utf-8").lstrip().startswith("#")
    canonical = to_canonical(spec_file)
    assert parse_spec(canonical) == spec_file
    assert to_canonical(parse_spec(canonical)) == canonical


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_cli_check_prints_the_math(path):
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    spec_file = load_spec_file(path)
    for spec in spec_file.specs:
        assert to_canonical(spec) in result.output
        assert describe(spec) in result.output
        assert f"o, final_state = {spec.name}(q, k, v" in result.output
    assert "o_t = scale · φ_q(q_t) S" in result.output
    assert "q           [B, T, H, D]" in result.output


def test_example_meanings():
    load = lambda name: load_spec_file(EXAMPLES / f"{name}.attn").specs[0]  # noqa: E731
    lightning = load("lightning")
    assert lightning.decay is Decay.PER_HEAD and lightning.chunk == 64
    assert lightning.scale == 1 and lightning.q_map == IdentityMap() == lightning.k_map
    retnet = load("retnet")
    assert retnet.decay is Decay.PER_HEAD and retnet.scale is None and retnet.chunk is None
    elu = load("linear_elu")
    assert elu.q_map == ElementwiseMap(FUNCTIONS["elu"](X) + 1)
    assert elu.normalize and elu.decay is Decay.NONE
    gla = load("gla")
    assert gla.decay is Decay.PER_CHANNEL
    assert gla.gate == FUNCTIONS["logsigmoid"](X) / 16
    simple = load("simple_gla")
    assert simple.decay is Decay.PER_TOKEN and simple.gate is None
    hedgehog = load("hedgehog")
    assert hedgehog.q_map == RowMap(RowMapKind.SOFTMAX)
    noncausal = load("noncausal")
    assert not noncausal.causal and noncausal.decay is Decay.NONE
    assert noncausal.q_map == ElementwiseMap(FUNCTIONS["relu"](X))
    gated = load_spec_file(EXAMPLES / "gated.attn")
    assert [s.name for s in gated.specs] == ["mamba2", "hgrn2"]
    assert gated.get("mamba2").gate == -FUNCTIONS["softplus"](X)


def test_describe_names_the_decay_inputs():
    cases = {
        "lightning": "    slope       [H]",
        "simple_gla": "    g           [B, T, H_kv]  ",
        "gla": "    gate_input  [B, T, H_kv, D]",
    }
    for name, line in cases.items():
        text = describe(load_spec_file(EXAMPLES / f"{name}.attn").specs[0])
        assert line in text, text
    gla = describe(load_spec_file(EXAMPLES / "gla.attn").specs[0])
    assert "o, final_state = gla(q, k, v, gate_input, *, scale=None" in gla
    assert "S_t = diag(exp(g_t)) S_{t-1} + φ_k(k_t)ᵀ v_t" in gla
    assert "f(x) = logsigmoid(x)/16" in gla
    elu = describe(load_spec_file(EXAMPLES / "linear_elu.attn").specs[0])
    assert "z_t = z_{t-1} + φ_k(k_t)" in elu
    assert "initial_state=None        [B, H, D, E+1]" in elu
    lightning = describe(load_spec_file(EXAMPLES / "lightning.attn").specs[0])
    assert "S_t = λ_h S_{t-1} + φ_k(k_t)ᵀ v_t" in lightning
    assert "λ_h = exp(−slope[h])" in lightning
    assert "o           [B, T, H, E]" in lightning
    assert "final_state [B, H, D, E]" in lightning


def test_multi_block_output_has_every_block():
    result = CliRunner().invoke(main, ["check", str(EXAMPLES / "gated.attn")])
    assert result.exit_code == 0
    assert result.output.count("attention ") == 2
    assert "gate        = -softplus(x)" in result.output
