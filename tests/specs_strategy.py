"""Hypothesis strategies over the whole language, as IR."""

from __future__ import annotations

import sympy
from hypothesis import strategies as st

from attncc import expr as ex
from attncc.ir import (
    AttentionSpec,
    Decay,
    ElementwiseMap,
    IdentityMap,
    RowMap,
    RowMapKind,
    UpdateRule,
    X,
)

# Maps whose output is positive: the only ones a normalized spec may use.
POSITIVE_MAPS = [
    ElementwiseMap(ex.elu(X) + 1),
    ElementwiseMap(sympy.exp(X)),
    ElementwiseMap(ex.sigmoid(X)),
    ElementwiseMap(ex.softplus(X) + sympy.Rational(1, 10)),
    RowMap(RowMapKind.SOFTMAX),
]
OTHER_MAPS = [
    IdentityMap(),
    ElementwiseMap(ex.relu(X)),
    ElementwiseMap(ex.silu(X)),
    ElementwiseMap(ex.relu(X) ** 2),
    ElementwiseMap(sympy.tanh(X) + X / 2),
    ElementwiseMap(X**3 / 4 - X),
    ElementwiseMap(sympy.Abs(X)),
    ElementwiseMap(sympy.Abs(ex.relu(X) - 1) * X),  # abs of an argument sympy cannot prove real
    RowMap(RowMapKind.L2NORM),
]
GATES = [None, ex.logsigmoid(X) / 16, -ex.softplus(X), ex.logsigmoid(X), -sympy.Abs(X) / 4]


@st.composite
def attention_specs(draw, name="spec"):
    causal = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else True
    decay = draw(st.sampled_from(list(Decay))) if causal else Decay.NONE
    normalize = draw(st.integers(0, 4)) == 0
    pool = POSITIVE_MAPS if normalize else POSITIVE_MAPS + OTHER_MAPS
    q_map = draw(st.sampled_from(pool))
    k_map = q_map if draw(st.booleans()) else draw(st.sampled_from(pool))
    gate = draw(st.sampled_from(GATES)) if decay.data_dependent else None
    scale = draw(st.sampled_from([None, sympy.Rational(1, 2), sympy.Integer(1)]))
    chunk = draw(st.sampled_from([16, 32]))
    return AttentionSpec(
        name=name, q_map=q_map, k_map=k_map, decay=decay, gate=gate, causal=causal,
        chunk=chunk, scale=scale, normalize=normalize,
    )


@st.composite
def delta_specs(draw, name="delta_spec"):
    """Specs of the delta rule (causal, not normalized): any maps, decays, gates, β transforms."""
    pool = POSITIVE_MAPS + OTHER_MAPS
    decay = draw(st.sampled_from(list(Decay)))
    return AttentionSpec(
        name=name, q_map=draw(st.sampled_from(pool)), k_map=draw(st.sampled_from(pool)), decay=decay,
        gate=draw(st.sampled_from(GATES)) if decay.data_dependent else None,
        chunk=draw(st.sampled_from([16, 32])), scale=draw(st.sampled_from([None, sympy.Rational(1, 2)])),
        update=UpdateRule.DELTA, beta=draw(st.sampled_from([None, ex.sigmoid(X)])),
    )


@st.composite
def shapes(draw):
    """(B, T, H, H_kv, D, E): odd T, T = 1, grouped heads, dims that are not powers of two."""
    B = draw(st.integers(1, 2))
    T = draw(st.one_of(st.just(1), st.integers(1, 70)))
    H_kv = draw(st.sampled_from([1, 2]))
    H = H_kv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 20, 32, 40]))
    E = draw(st.sampled_from([16, 24, 33]))
    return B, T, H, H_kv, D, E
