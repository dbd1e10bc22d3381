"""The delta rule's front end: the keys `update` and `beta`, their conflicts, the warning about
keys that are not unit vectors, the canonical text and the descriptions of delta specs.

(The kernels of delta specs are templates/delta/; nothing here compiles one.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy
from click.testing import CliRunner

from attncc.canonical import to_canonical
from attncc.check import check_spec, check_spec_file, parse_spec
from attncc.cli import main
from attncc.describe import describe, signature, summary
from attncc.errors import AttnccError
from attncc.expr import FUNCTIONS
from attncc.ir import AttentionSpec, Decay, IdentityMap, RowMap, RowMapKind, UpdateRule, X

DELTA_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "delta"
L2 = RowMap(RowMapKind.L2NORM)
SIGMOID = FUNCTIONS["sigmoid"](X)

# The Gated DeltaNet block of SPEC.md section 2, as written there.
GATED_DELTANET = """\
attention gated_deltanet {        # Gated DeltaNet (Yang et al., 2025)
    update      = delta           # additive (default) or delta
    decay       = per_token
    gate        = -softplus(x)
    beta        = sigmoid(x)      # transform of the raw beta input
    q_map       = l2norm
    k_map       = l2norm
}
"""


def block(*lines: str) -> str:
    """A block named `a` whose entries start on line 2."""
    return "attention a {\n" + "\n".join(lines) + "\n}\n"


def only_error(source: str):
    with pytest.raises(AttnccError) as info:
        parse_spec(source, "t.attn")
    (d,) = info.value.diagnostics
    return d


# -- what a delta spec means -----------------------------------------------------------------


def test_the_gated_deltanet_example_of_the_spec():
    (spec,) = parse_spec(GATED_DELTANET).specs
    assert spec == AttentionSpec(
        name="gated_deltanet",
        q_map=L2,
        k_map=L2,
        decay=Decay.PER_TOKEN,
        gate=-FUNCTIONS["softplus"](X),
        update=UpdateRule.DELTA,
        beta=SIGMOID,
    )
    assert check_spec(GATED_DELTANET).warnings == ()  # l2norm keys: nothing to advise


def test_defaults():
    assert parse_spec("attention a {}").specs[0].update is UpdateRule.ADDITIVE
    assert parse_spec("attention a {}").specs[0].beta is None
    spec = parse_spec(block("    update = delta", "    feature_map = l2norm")).specs[0]
    assert (spec.update, spec.beta, spec.causal, spec.normalize) == (
        UpdateRule.DELTA,
        None,
        True,
        False,
    )
    explicit = parse_spec(block("    update = additive")).specs[0]
    assert explicit == AttentionSpec(name="a")


def test_beta_is_built_like_a_gate():
    def beta(text: str):
        return parse_spec(block("    update = delta", f"    beta = {text}")).specs[0].beta

    assert beta("x") is None  # β as given: no transform
    assert beta("1 * x") is None
    assert beta("sigmoid(x)") == SIGMOID
    assert beta("2 * sigmoid(x) / 4") == SIGMOID / 2  # simplified, as gates are
    assert beta("0.5 * x") == X / 2


def test_examples_of_the_delta_rule():
    specs = {p.stem: check_spec_file(p) for p in sorted(DELTA_EXAMPLES.glob("*.attn"))}
    assert set(specs) == {"deltanet", "gated_deltanet", "kda"}
    decays = {"deltanet": Decay.NONE, "gated_deltanet": Decay.PER_TOKEN, "kda": Decay.PER_CHANNEL}
    for name, checked in specs.items():
        (spec,) = checked.spec_file.specs
        assert spec.name == name and spec.decay is decays[name]
        assert spec.update is UpdateRule.DELTA and spec.beta == SIGMOID
        assert spec.q_map == spec.k_map == L2
        assert checked.warnings == ()
        canonical = to_canonical(checked.spec_file)
        assert parse_spec(canonical) == checked.spec_file
    assert specs["gated_deltanet"].spec_file.specs[0] == parse_spec(GATED_DELTANET).specs[0]


# -- errors ----------------------------------------------------------------------------------


def test_unknown_update_word():
    d = only_error(block("    update = detla"))
    assert d.message == "`update` must be `additive` or `delta`, not `detla`"
    assert (d.span.line, d.span.column) == (2, 14)
    assert d.hint == "did you mean `delta`?"


def test_delta_with_normalize():
    d = only_error(block("    update = delta", "    k_map = l2norm", "    normalize = true"))
    assert d.message == "`normalize = true` cannot be combined with `update = delta`"
    assert (d.span.line, d.span.column) == (4, 17)
    assert "drop `normalize = true`" in d.hint
    ((label,),) = [d.labels]
    assert label.message == "`update` is set here" and label.span.line == 2


def test_delta_with_non_causal():
    d = only_error(block("    update = delta", "    causal = false", "    k_map = l2norm"))
    assert d.message == "`causal = false` cannot be combined with `update = delta`"
    assert (d.span.line, d.span.column) == (3, 14)
    assert [(lb.message, lb.span.line) for lb in d.labels] == [("`update` is set here", 2)]


def test_non_causal_delta_with_a_decay_names_both_conflicts():
    with pytest.raises(AttnccError) as info:
        parse_spec(block("    update = delta", "    decay = per_token", "    causal = false"))
    messages = sorted(d.message for d in info.value.diagnostics)
    assert messages == [
        "`causal = false` cannot be combined with `decay = per_token`",
        "`causal = false` cannot be combined with `update = delta`",
    ]


@pytest.mark.parametrize("beta", ["sigmoid(x)", "x"])
def test_beta_without_delta(beta):
    d = only_error(block("    decay = per_token", f"    beta = {beta}"))
    assert d.message == "`beta` needs `update = delta`, but `update` is `additive` (the default)"
    assert (d.span.line, d.span.column) == (3, 5)
    assert d.hint == "add `update = delta`"


def test_beta_with_an_explicit_additive_update():
    d = only_error(block("    update = additive", "    beta = sigmoid(x)"))
    assert d.message == "`beta` needs `update = delta`, but `update` is `additive`"
    assert [(lb.message, lb.span.line) for lb in d.labels] == [("`update` is set here", 2)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("none", "`beta` must be an expression in `x`, not `none`"),
        ("sigmoid(2)", "the beta transform `sigmoid(2)` does not depend on `x`"),
        ("sigmoid(y)", "unknown name `y`"),
        ("x ** 9", "powers of expressions in `x` are limited to exponents from -8 to 8, not 9"),
        ("1e39 * x", "the beta transform `1e39 * x` computes the constant 1.0e+39, too large"),
    ],
)
def test_bad_beta_transforms(text, message):
    d = only_error(block("    update = delta", f"    beta = {text}", "    k_map = l2norm"))
    assert d.message.startswith(message), d.message
    assert d.span.line == 3


def test_an_unknown_update_does_not_also_refuse_beta():
    # `update` was refused: whether beta fits cannot be known, and is not guessed.
    d = only_error(block("    update = delat", "    beta = sigmoid(x)"))
    assert d.message.startswith("`update` must be")


# -- the warning -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, where",
    [
        (("    update = delta",), (2, 14)),  # the default identity keys: at `delta`
        (("    update = delta", "    feature_map = relu(x)"), (3, 19)),
        (("    update = delta", "    q_map = l2norm", "    k_map = softmax"), (4, 13)),
        (("    update = delta", "    k_map = identity", "    q_map = l2norm"), (3, 13)),
    ],
)
def test_delta_keys_that_are_not_unit_vectors_get_a_warning(lines, where):
    checked = check_spec(block(*lines), "t.attn")
    assert checked.spec_file.specs[0].update is UpdateRule.DELTA  # still valid
    (w,) = checked.warnings
    assert w.severity == "warning"
    assert "the state stays bounded only while β‖φ_k(k)‖² ≤ 2" in w.message
    assert (w.span.line, w.span.column) == where
    assert "l2norm" in w.hint
    assert w.render(checked.source).startswith(f"t.attn:{where[0]}:{where[1]}: warning: ")


@pytest.mark.parametrize(
    "lines",
    [
        ("    update = delta", "    k_map = l2norm"),  # q_map may be anything
        ("    update = delta", "    feature_map = l2norm"),
        ("    k_map = relu(x)",),  # additive: no advice
        (),
    ],
)
def test_no_warning(lines):
    assert check_spec(block(*lines)).warnings == ()


def test_warnings_never_refuse_a_spec():
    source = block("    update = delta")
    assert parse_spec(source).specs[0].update is UpdateRule.DELTA


def test_cli_check_prints_the_warning_and_succeeds(tmp_path):
    path = tmp_path / "d.attn"
    path.write_text(block("    update = delta", "    k_map = relu(x)"))
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}:3:13: warning: `update = delta` with `k_map = relu(x)`" in result.stderr
    assert result.stderr.endswith("attncc: 1 warning\n")
    assert "S'_t = S_{t-1}" in result.stdout


def test_cli_compile_prints_the_warning_and_succeeds(tmp_path, monkeypatch):
    # The delta templates are not this front end's: a stand-in compile_file shows that the
    # warning goes to stderr and the module still comes out, exit status 0.
    import attncc.compiler

    monkeypatch.setattr(attncc.compiler, "compile_file", lambda spec: "# the module\n")
    path = tmp_path / "d.attn"
    path.write_text(block("    update = delta"))
    result = CliRunner().invoke(main, ["compile", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "# the module\n"
    assert f"{path}:2:14: warning:" in result.stderr
    out = tmp_path / "k.py"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == "# the module\n" and "warning:" in result.stderr


def test_cli_compile_of_an_additive_spec_prints_no_warning(tmp_path):
    path = tmp_path / "a.attn"
    path.write_text(block("    decay = per_head"))
    result = CliRunner().invoke(main, ["compile", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# -- canonical text and descriptions ---------------------------------------------------------


def test_canonical_text_of_a_delta_spec():
    spec = parse_spec(GATED_DELTANET).specs[0]
    assert to_canonical(spec) == (
        "attention gated_deltanet {\n"
        "    feature_map = l2norm\n"
        "    decay       = per_token\n"
        "    gate        = -softplus(x)\n"
        "    causal      = true\n"
        "    chunk       = auto\n"
        "    scale       = auto\n"
        "    normalize   = false\n"
        "    update      = delta\n"
        "    beta        = sigmoid(x)\n"
        "}\n"
    )
    plain = parse_spec(block("    update = delta")).specs[0]
    assert "    beta        = x\n" in to_canonical(plain)
    assert parse_spec(to_canonical(plain)).specs[0] == plain


def test_summary_says_delta_rule():
    spec = parse_spec(GATED_DELTANET).specs[0]
    assert summary(spec) == (
        "causal, delta-rule linear attention, per-token decay exp(g_t), feature map l2norm, "
        "gate -softplus(x), beta sigmoid(x)."
    )
    plain = parse_spec(block("    update = delta")).specs[0]
    assert summary(plain).endswith("feature map identity, beta as given.")
    assert "delta" not in summary(AttentionSpec(name="a"))


def test_describe_shows_the_delta_recurrence_and_the_beta_argument():
    spec = parse_spec(GATED_DELTANET).specs[0]
    text = describe(spec)
    assert "    S'_t = exp(g_t) S_{t-1}\n" in text
    assert "    S_t  = S'_t + β_t φ_k(k_t) (v_t − S'_tᵀ φ_k(k_t))ᵀ\n" in text
    assert "    o_t  = scale · φ_q(q_t) S_t\n" in text
    assert "S_t = exp(g_t) S_{t-1} + φ_k(k_t)ᵀ v_t" not in text  # not the additive one
    assert "    β_t = f(beta[b, t, h]),  f(x) = sigmoid(x)\n" in text
    assert "    beta        [B, T, H_kv]      raw beta input, β = f(beta)\n" in text
    assert "k_t, v_t, g_t and β_t of head h come from kv head" in text
    assert signature(spec).startswith(
        "o, final_state = gated_deltanet(q, k, v, gate_input, beta, *"
    )
    kda = parse_spec(block("    update = delta", "    decay = per_channel")).specs[0]
    assert "    S'_t = diag(exp(g_t)) S_{t-1}\n" in describe(kda)
    assert signature(kda).startswith("o, final_state = a(q, k, v, g, beta, *")
    assert "    β_t = beta[b, t, h]   (one learning rate per token, as given)\n" in describe(kda)
    additive = describe(AttentionSpec(name="a", q_map=IdentityMap()))
    assert "β" not in additive and "beta" not in additive


def test_scale_of_a_delta_spec_is_kept():
    spec = parse_spec(block("    update = delta", "    scale = 1/sqrt(64)")).specs[0]
    assert spec.scale == sympy.Rational(1, 8)


def test_a_refused_beta_without_delta_is_one_error():
    d = only_error(block("    beta = sigmoid(y)"))
    assert d.message == "unknown name `y`"
