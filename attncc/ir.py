"""The typed IR: what a checked spec means, independent of how it was written.

Everything here is a small frozen dataclass or an enum, so IR values can be
compared, hashed and used as cache keys. Source positions ride along in
`Span` fields that are excluded from equality: two specs that say the same
thing are equal wherever they were written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import sympy

# The one free symbol of every elementwise expression (feature maps, gates).
X = sympy.Symbol("x", real=True)


@dataclass(frozen=True)
class Span:
    """A place in a spec file: 1-based line and column, end exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int


class Decay(enum.Enum):
    """How the state decays between tokens (A_t in S_t = A_t ⊙ S_{t-1} + k_tᵀ v_t)."""

    NONE = "none"  # A_t = 1
    PER_HEAD = "per_head"  # A_t = exp(-slope_h), slope passed as [H]
    PER_TOKEN = "per_token"  # A_t = exp(g_{t,h}), g passed as [B, T, H]
    PER_CHANNEL = "per_channel"  # A_t = diag(exp(g_{t,h,:})), g passed as [B, T, H, D]

    @property
    def data_dependent(self) -> bool:
        return self in (Decay.PER_TOKEN, Decay.PER_CHANNEL)


class RowMapKind(enum.Enum):
    """Feature maps that act on a whole head vector at once."""

    L2NORM = "l2norm"  # x / sqrt(sum(x²) + eps)
    SOFTMAX = "softmax"  # exp(x - max) / sum(exp(x - max))  (Hedgehog-style)


@dataclass(frozen=True)
class IdentityMap:
    """φ(x) = x."""


@dataclass(frozen=True)
class ElementwiseMap:
    """φ(x) = expr(x), applied to every element; expr is a sympy expression in `X`."""

    expr: sympy.Expr


@dataclass(frozen=True)
class RowMap:
    """φ acts on the whole D-vector of one head at one position."""

    kind: RowMapKind


FeatureMap = IdentityMap | ElementwiseMap | RowMap


class UpdateRule(enum.Enum):
    """How a token's key and value enter the state: the recurrence's family. Each rule has
    its own template family (templates/<value>/)."""

    ADDITIVE = "additive"  # S_t = A_t ⊙ S_{t-1} + φk(k_t)ᵀ v_t
    # S'_t = A_t ⊙ S_{t-1};  S_t = S'_t + β_t φk(k_t) (v_t − S'_tᵀ φk(k_t))ᵀ  (DeltaNet family)
    DELTA = "delta"


@dataclass(frozen=True)
class AttentionSpec:
    """One `attention NAME { ... }` block, checked.

    chunk None means `auto` (the tuner or the default picks it); scale None
    means `auto` (1/sqrt(D) at call time).
    """

    name: str
    q_map: FeatureMap = IdentityMap()
    k_map: FeatureMap = IdentityMap()
    decay: Decay = Decay.NONE
    gate: sympy.Expr | None = None  # raw gate input x -> log decay g (data-dependent decays only)
    causal: bool = True
    chunk: int | None = None
    scale: sympy.Rational | sympy.Float | None = None
    normalize: bool = False
    update: UpdateRule = UpdateRule.ADDITIVE
    beta: sympy.Expr | None = None  # raw beta input x -> β (delta rule only; None: β = x)
    span: Span | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class SpecFile:
    """All attention blocks of one file, in source order."""

    specs: tuple[AttentionSpec, ...]
    path: str = field(default="<string>", compare=False, hash=False)

    def get(self, name: str) -> AttentionSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(name)
