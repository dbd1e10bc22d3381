"""Random valid IR → canonical text → parse_spec → the same IR."""

from __future__ import annotations

import builtins
import keyword

import pytest
import sympy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attncc.canonical import to_canonical
from attncc.check import CHUNKS, RESERVED_NAMES, generated_names, parse_spec
from attncc.expr import FUNCTIONS, to_text
from attncc.ir import (
    AttentionSpec,
    Decay,
    ElementwiseMap,
    IdentityMap,
    RowMap,
    RowMapKind,
    SpecFile,
    UpdateRule,
    X,
)
from attncc.rules import namespaces_meet

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# -- constants ----------------------------------------------------------------

rationals = st.builds(sympy.Rational, st.integers(-40, 40), st.integers(1, 12))
positive_rationals = st.builds(sympy.Rational, st.integers(1, 300), st.integers(1, 300))
constants = st.one_of(
    rationals,
    positive_rationals.map(sympy.sqrt),
    rationals.map(sympy.exp),  # includes exp(1) == E
    st.builds(lambda d: sympy.Rational(d, 10**3), st.integers(-5000, 5000)),  # decimals
)

# -- elementwise expressions in x --------------------------------------------
# Functions only ever get an argument that depends on x, and powers only an
# x-dependent base or a positive constant base, so that every constant stays
# real and finite by construction.


def _apply(name_and_arg):
    name, arg = name_and_arg
    assume(arg.has(X))
    return FUNCTIONS[name](arg)


def _power(base_and_exponent):
    base, exponent = base_and_exponent
    assume(base.has(X))
    return base**exponent


def _exponential(base_and_exponent):
    base, exponent = base_and_exponent
    assume(exponent.has(X))  # constant ** constant could overflow a float on the way
    return base**exponent


def _extend(children):
    return st.one_of(
        st.tuples(children, children).map(lambda ab: ab[0] + ab[1]),
        st.tuples(children, children).map(lambda ab: ab[0] - ab[1]),
        st.tuples(children, children).map(lambda ab: ab[0] * ab[1]),
        st.tuples(children, children).map(lambda ab: ab[0] / ab[1]),
        children.map(lambda a: -a),
        st.tuples(st.sampled_from(sorted(FUNCTIONS)), children).map(_apply),
        st.tuples(
            children,
            st.sampled_from(
                [sympy.Integer(n) for n in range(-8, 9)]
                + [sympy.Rational(1, 2), sympy.Rational(-3, 2), sympy.Rational(1, 3)]
            ),
        ).map(_power),
        st.tuples(positive_rationals, children).map(_exponential),
    )


raw_expressions = st.recursive(st.one_of(st.just(X), constants), _extend, max_leaves=6)


def _rebuild(e: sympy.Expr) -> sympy.Expr:
    """e re-evaluated bottom-up: the same tree iff sympy left e fully simplified."""
    if not e.args:
        return e
    return e.func(*(_rebuild(a) for a in e.args))


def _valid_elementwise(e: sympy.Expr) -> bool:
    if not isinstance(e, sympy.Expr) or not e.has(X) or e == X:
        return False
    if _rebuild(e) != e:  # e.g. 2*abs(abs(x)) from abs(abs(2*x)): not in settled form
        return False
    if e.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan, sympy.I):
        return False
    if any(not sub.has(X) and sub.is_real is False for sub in sympy.preorder_traversal(e)):
        return False  # e.g. (-1)**(1/3) from a root of a negative sub-expression
    for p in e.atoms(sympy.Pow):
        base, exponent = p.args
        if base.has(X) and exponent.has(X):
            return False
        if base.has(X) and exponent.is_Number and abs(exponent) > 8:
            return False
        if exponent.is_Rational and exponent.q > 100:
            return False
    # The language's float32 rule and kernel-size bound (tested in test_frontend_limits.py).
    from attncc.check import MAX_PRINTED_SIZE, _float32_problem
    from attncc.expr import derivative, printed_size

    for f in (e, derivative(e)):
        if _float32_problem(f) is not None or printed_size(f) > MAX_PRINTED_SIZE:
            return False
    return True


elementwise = raw_expressions.filter(_valid_elementwise)

feature_maps = st.one_of(
    st.just(IdentityMap()),
    st.sampled_from([RowMap(k) for k in RowMapKind]),
    elementwise.map(ElementwiseMap),
)

scales = st.one_of(
    st.none(),
    positive_rationals,
    st.builds(lambda r, s: r / sympy.sqrt(s), positive_rationals, positive_rationals),
    st.builds(lambda r, e: r * sympy.exp(e), positive_rationals, rationals),
)

# -- names ----------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True).filter(
    lambda n: (
        not keyword.iskeyword(n)
        and not hasattr(builtins, n)
        and not set(generated_names(n)) & RESERVED_NAMES
    )
)


@st.composite
def attention_specs(draw, name=None):
    name = name or draw(names)
    decay = draw(st.sampled_from(list(Decay)))
    update = draw(st.sampled_from(list(UpdateRule)))
    delta = update is UpdateRule.DELTA
    # The delta rule is causal and unnormalized; beta (a transform, or None) is its key only.
    causal = True if decay is not Decay.NONE or delta else draw(st.booleans())
    beta = draw(st.one_of(st.none(), elementwise)) if delta else None
    if draw(st.booleans()):
        q_map = k_map = draw(feature_maps)
    else:
        q_map, k_map = draw(feature_maps), draw(feature_maps)
    gate = draw(st.one_of(st.none(), elementwise)) if decay.data_dependent else None
    return AttentionSpec(
        name=name,
        q_map=q_map,
        k_map=k_map,
        decay=decay,
        gate=gate,
        causal=causal,
        chunk=draw(st.one_of(st.none(), st.sampled_from(CHUNKS))),
        scale=draw(scales),
        normalize=False if delta else draw(st.booleans()),
        update=update,
        beta=beta,
    )


@st.composite
def spec_files(draw):
    chosen: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(names)
        # A file's blocks are valid only when their generated namespaces stay apart.
        assume(not any(namespaces_meet(name, other) for other in chosen))
        chosen.append(name)
    return SpecFile(tuple(draw(attention_specs(name)) for name in chosen))


# -- properties ------------------------------------------------------------------


@SETTINGS
@given(spec_files())
def test_canonical_text_parses_back_to_the_same_ir(spec_file):
    text = to_canonical(spec_file)
    parsed = parse_spec(text, "roundtrip.attn")
    assert parsed == spec_file, text
    # ... and printing that again gives the same text: the canonical form is a fixed point.
    assert to_canonical(parsed) == text


@SETTINGS
@given(elementwise)
def test_every_expression_prints_to_text_that_parses_back(e):
    parsed = parse_spec(f"attention a {{ feature_map = {to_text(e)} }}")
    assert parsed.specs[0].q_map == ElementwiseMap(e)


@settings(max_examples=60, deadline=None)
@given(attention_specs())
def test_canonical_spells_out_every_key(spec):
    text = to_canonical(spec)
    keys = [line.split("=")[0].strip() for line in text.splitlines()[1:-1]]
    maps = ["feature_map"] if spec.q_map == spec.k_map else ["q_map", "k_map"]
    beta = ["beta"] if spec.update is UpdateRule.DELTA else []
    assert keys == [*maps, "decay", "gate", "causal", "chunk", "scale", "normalize", "update", *beta]


def test_defaults():
    spec = parse_spec("attention a {}").specs[0]
    assert spec == AttentionSpec(name="a")
    assert to_canonical(spec) == (
        "attention a {\n"
        "    feature_map = identity\n"
        "    decay       = none\n"
        "    gate        = none\n"
        "    causal      = true\n"
        "    chunk       = auto\n"
        "    scale       = auto\n"
        "    normalize   = false\n"
        "    update      = additive\n"
        "}\n"
    )


def test_normal_forms():
    spec = parse_spec(
        "attention a { q_map = x; k_map = identity; decay = per_token; gate = x; scale = 1/sqrt(128) }"
    ).specs[0]
    assert spec.q_map == spec.k_map == IdentityMap()
    assert spec.gate is None
    assert spec.scale == sympy.sqrt(2) / 16
    assert "scale       = sqrt(2)/16" in to_canonical(spec)
    decimal = parse_spec("attention a { scale = 0.125; feature_map = 2.5e-1 * x + .5 }").specs[0]
    assert decimal.scale == sympy.Rational(1, 8)
    assert decimal.q_map == ElementwiseMap(X / 4 + sympy.Rational(1, 2))
    e = parse_spec("attention a { feature_map = exp(1 + log(x)) }").specs[0]
    assert e.q_map == ElementwiseMap(sympy.E * X)
    assert "feature_map = exp(1)*x" in to_canonical(e)


@pytest.mark.parametrize("text", ["abs(2**(-elu(x)))", "abs(exp(sigmoid(x) - 1))", "abs(3**relu(x)) + x"])
def test_abs_of_a_power_of_a_language_function_compiles(text):
    """The language's functions are real for real x: sympy must not turn abs(2**f(x)) into
    2**re(f(x)), which no printer knows (compile raised KeyError: 're')."""
    from attncc.compiler import compile_source

    spec = parse_spec(f"attention a {{ feature_map = {text} }}")
    assert not spec.specs[0].q_map.expr.has(sympy.re, sympy.im)
    compile_source(f"attention a {{ feature_map = {text} }}", "a.attn")
