"""IR → kernel plan: everything the templates need, derived once in Python.

This pass takes derivatives with sympy and prints every expression to Triton
and PyTorch source, so the templates only read fields and never decide math.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attncc import expr as ex
from attncc.describe import decay_input  # the decay argument's name: one home
from attncc.ir import (
    AttentionSpec,
    ElementwiseMap,
    FeatureMap,
    IdentityMap,
    RowMap,
    RowMapKind,
    X,
)

L2NORM_EPS = 1e-6  # inside the square root of l2norm, as fla does
NORMALIZER_EPS = 1e-6  # o = num / (den + eps) with normalize = true
# Log decays below this are raised to it: e^-100 (4e-44) is under float32's smallest normal
# number, so the state is wiped (a reset, as g = -inf means), while cumulative sums of log
# decays stay finite and precise (-inf - -inf would be NaN; -1e30 would swamp a sum).
LOG_DECAY_FLOOR = -100.0
# Launch defaults when the spec says `chunk = auto` and nothing is tuned: picked from
# sweeps on an H100 at (B, T) = (2, 4096) and (1, 16384), H = 16, D = E = 128 (benchmarks/NOTES.md).
DEFAULT_CHUNK = {"none": 64, "per_head": 64, "per_token": 64, "per_channel": 64}
DEFAULT_BWD_CHUNK = {"none": 32, "per_head": 64, "per_token": 64, "per_channel": 64}
DEFAULT_BLOCK_E = {"none": 64, "per_head": 64, "per_token": 64, "per_channel": 128}
# Whether the forward may halve its value block to get enough programs without cutting
# sequences into segments. Per-token decays would recompute their in-chunk decay factors
# in every value block: segments serve them better.
DEFAULT_NARROW_BLOCK_E = {"none": True, "per_head": True, "per_token": False, "per_channel": False}
DEFAULT_WARPS = {"none": 4, "per_head": 4, "per_token": 4, "per_channel": 8}
# The backward kernels hold a whole D x E fp32 state: with 4 warps they spill (ptx_report.py).
DEFAULT_BWD_WARPS = {"none": 8, "per_head": 8, "per_token": 8, "per_channel": 8}
# Software-pipeline depth of the chunk loops (Triton's num_stages), forward and backward.
DEFAULT_STAGES = {"none": 3, "per_head": 3, "per_token": 3, "per_channel": 2}
DEFAULT_BWD_STAGES = {"none": 3, "per_head": 3, "per_token": 3, "per_channel": 2}


@dataclass(frozen=True)
class MapPlan:
    """One feature map, as source snippets over the names `x`, `feat`, `dfeat`."""

    kind: str  # "identity", "elementwise", "l2norm" or "softmax"
    triton_expr: str = "x"  # φ(x) elementwise, Triton
    triton_grad: str = "1.0"  # φ'(x) elementwise, Triton
    torch_expr: str = "x"  # φ(x) elementwise, PyTorch
    text: str = "identity"  # as the spec spells it
    zero_preserving: bool = True  # φ(0) == 0, so padded lanes need no masking


@dataclass(frozen=True)
class GatePlan:
    triton_expr: str
    triton_grad: str
    torch_expr: str
    text: str


@dataclass(frozen=True)
class KernelPlan:
    name: str
    decay: str  # Decay value: "none", "per_head", "per_token", "per_channel"
    causal: bool
    chunk: int
    scale: float | None  # None: 1/sqrt(D) at call time
    normalize: bool
    q_map: MapPlan
    k_map: MapPlan
    gate: GatePlan | None
    helpers: tuple[str, ...]  # elementwise Triton helpers the module must define
    bwd_chunk: int  # the backward kernels' chunk (they need not match the forward's)
    block_e: int  # widest value block one forward program takes
    narrow_block_e: bool  # the forward may halve block_e rather than cut sequences
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    bwd_num_stages: int
    decay_input: str | None  # the call-time argument carrying the decay: slope, g, gate_input

    @property
    def scalar_decay(self) -> bool:
        return self.decay in ("per_head", "per_token")

    @property
    def data_dependent(self) -> bool:
        return self.decay in ("per_token", "per_channel")

    @property
    def has_decay(self) -> bool:
        return self.decay != "none"


def _plan_map(feature_map: FeatureMap, helpers: set[str]) -> MapPlan:
    if isinstance(feature_map, IdentityMap):
        return MapPlan(kind="identity")
    if isinstance(feature_map, RowMap):
        name = feature_map.kind.value
        return MapPlan(kind=name, text=name, zero_preserving=feature_map.kind is RowMapKind.L2NORM)
    assert isinstance(feature_map, ElementwiseMap)
    body, used = ex.to_triton(feature_map.expr)
    grad, used_grad = ex.to_triton(ex.derivative(feature_map.expr))
    helpers |= used | used_grad
    return MapPlan(
        kind="elementwise",
        triton_expr=body,
        triton_grad=grad,
        torch_expr=ex.to_torch(feature_map.expr),
        text=ex.to_text(feature_map.expr),
        zero_preserving=feature_map.expr.subs(X, 0) == 0,
    )


def plan(spec: AttentionSpec) -> KernelPlan:
    """Derive the kernel plan of one checked spec."""
    helpers: set[str] = set()
    q_map = _plan_map(spec.q_map, helpers)
    k_map = _plan_map(spec.k_map, helpers)
    gate = None
    if spec.gate is not None:
        body, used = ex.to_triton(spec.gate)
        grad, used_grad = ex.to_triton(ex.derivative(spec.gate))
        helpers |= used | used_grad
        gate = GatePlan(body, grad, ex.to_torch(spec.gate), ex.to_text(spec.gate))
    return KernelPlan(
        name=spec.name,
        decay=spec.decay.value,
        causal=spec.causal,
        chunk=spec.chunk or DEFAULT_CHUNK[spec.decay.value],
        bwd_chunk=DEFAULT_BWD_CHUNK[spec.decay.value],
        block_e=DEFAULT_BLOCK_E[spec.decay.value],
        narrow_block_e=DEFAULT_NARROW_BLOCK_E[spec.decay.value],
        num_warps=DEFAULT_WARPS[spec.decay.value],
        bwd_num_warps=DEFAULT_BWD_WARPS[spec.decay.value],
        num_stages=DEFAULT_STAGES[spec.decay.value],
        bwd_num_stages=DEFAULT_BWD_STAGES[spec.decay.value],
        scale=None if spec.scale is None else float(sympy.N(spec.scale, 17)),
        normalize=spec.normalize,
        q_map=q_map,
        k_map=k_map,
        gate=gate,
        helpers=tuple(sorted(helpers)),
        decay_input=decay_input(spec),
    )
