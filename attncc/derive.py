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
    Decay,
    ElementwiseMap,
    FeatureMap,
    IdentityMap,
    RowMap,
    RowMapKind,
    UpdateRule,
    X,
)

L2NORM_EPS = 1e-6  # inside the square root of l2norm, as fla does
NORMALIZER_EPS = 1e-6  # o = num / (den + eps) with normalize = true
# Log decays below this are raised to it: e^-100 (4e-44) is under float32's smallest normal
# number, so the state is wiped (a reset, as g = -inf means), while cumulative sums of log
# decays stay finite and precise (-inf - -inf would be NaN; -1e30 would swamp a sum).
LOG_DECAY_FLOOR = -100.0


@dataclass(frozen=True)
class LaunchDefaults:
    """Launch parameters of one decay when the spec says `chunk = auto` and nothing is
    tuned (`attncc tune` overrides them per head dims)."""

    chunk: int  # tokens per chunk of the forward kernels
    bwd_chunk: int  # of the backward kernels (they need not match the forward's)
    block_e: int  # widest value block one forward program takes
    # Whether the forward may halve its value block to get enough programs without cutting
    # sequences into segments. Per-token decays would recompute their in-chunk decay factors
    # in every value block: segments serve them better.
    narrow_block_e: bool
    num_warps: int
    bwd_num_warps: int  # the backward kernels hold a whole D x E fp32 state: 4 warps spill
    num_stages: int  # software-pipeline depth of the chunk loops (Triton's num_stages)
    bwd_num_stages: int
    wide_key_chunk: int | None = None  # the chunk where D > 128 (None: `chunk`)


# Picked from sweeps on an H100 at (B, T) = (2, 4096) and (1, 16384), H = 16, D = E = 128
# (benchmarks/NOTES.md).
LAUNCH_DEFAULTS = {
    Decay.NONE: LaunchDefaults(chunk=64, bwd_chunk=32, block_e=64, narrow_block_e=True, num_warps=4,
                               bwd_num_warps=8, num_stages=3, bwd_num_stages=3),
    Decay.PER_HEAD: LaunchDefaults(chunk=64, bwd_chunk=64, block_e=64, narrow_block_e=True, num_warps=4,
                                   bwd_num_warps=8, num_stages=3, bwd_num_stages=3),
    Decay.PER_TOKEN: LaunchDefaults(chunk=64, bwd_chunk=64, block_e=64, narrow_block_e=False, num_warps=4,
                                    bwd_num_warps=8, num_stages=3, bwd_num_stages=3),
    Decay.PER_CHANNEL: LaunchDefaults(chunk=64, bwd_chunk=64, block_e=128, narrow_block_e=False, num_warps=8,
                                      bwd_num_warps=8, num_stages=2, bwd_num_stages=2),
}


# The delta rule's kernels (any decay): 8 warps, since its chunk kernels hold several
# [chunk, D] fp32 tiles and the [chunk, chunk] UT transform (ptxas reports for sm_90a:
# 4 warps spill); one pipeline stage. Not tuned on a GPU yet.
# The delta rule's chunk-parallel forward kernels (UT transform, outputs) ran faster on 4 warps
# than on 8 at (2, 4096, 16, 128) bf16 on an H200 (0.37 vs 0.46 ms and 0.30 vs 0.35 ms), its
# sweeps and backward kernels slower (templates/delta/launch.py.j2 keeps 8 for the sweeps);
# per channel, with more live per-channel factors, the 4-warp case was not measured: 8.
# At D > 128 the backward's chunk kernel holds [chunk, D] fp32 tiles (dW, dQ, dK̄ and their
# inputs) in shared memory: at chunk 64 it asked for 254-360 KB at D = 192 and 256 on an H200
# (227 KB there); at chunk 32 it fits (ptxas for sm_90a: 135 KB, per channel 98 KB).
DELTA_LAUNCH_DEFAULTS = {
    decay: LaunchDefaults(chunk=64, bwd_chunk=64, block_e=64, narrow_block_e=False,
                          num_warps=8 if decay is Decay.PER_CHANNEL else 4, bwd_num_warps=8, num_stages=1,
                          bwd_num_stages=1, wide_key_chunk=32)
    for decay in Decay
}


@dataclass(frozen=True)
class DecayArgument:
    """The call-time argument that carries the decay: what the generated checks,
    docstrings and error messages say about it."""

    name: str  # slope, g or gate_input
    per_token: bool  # one value per token ([B, T, ...]) rather than per head ([H])
    trailing: tuple[str, ...]  # its dims after (B, T) in a call, after (B,) in a step
    dtypes: tuple[str, ...]  # torch dtypes it may have
    meaning: str  # what its values are

    @property
    def call_layout(self) -> str:
        """e.g. "[B, T, H_kv, D]"."""
        return "[" + ", ".join((("B", "T") if self.per_token else ()) + self.trailing) + "]"

    @property
    def step_layout(self) -> str:
        return "[" + ", ".join((("B",) if self.per_token else ()) + self.trailing) + "]"

    @property
    def described(self) -> str:
        """e.g. "g [B, T, H_kv], the log decay of every token"."""
        return f"{self.name} {self.call_layout}, {self.meaning}"

    # The same facts as Python source, for the generated checks.
    @property
    def trailing_names_source(self) -> str:  # "H_kv", "D"
        return ", ".join(f'"{dim}"' for dim in self.trailing)

    @property
    def trailing_sizes_source(self) -> str:  # H_kv, D (the generated checks' variables)
        return ", ".join(self.trailing)

    @property
    def dtypes_source(self) -> str:  # (torch.float16, torch.bfloat16, torch.float32)
        return "(" + ", ".join(f"torch.{name}" for name in self.dtypes) + ")"


def _decay_argument(spec: AttentionSpec) -> DecayArgument | None:
    name = decay_input(spec)
    if spec.decay is Decay.PER_HEAD:
        return DecayArgument(name, False, ("H",), ("float16", "bfloat16", "float32", "float64"),
                             "the per-head decay rates")
    if not spec.decay.data_dependent:
        return None
    per_channel = spec.decay is Decay.PER_CHANNEL
    if spec.gate is not None:
        meaning = "the raw gate input"
    else:
        meaning = "the log decay of every token" + (" and key channel" if per_channel else "")
    return DecayArgument(name, True, ("H_kv", "D") if per_channel else ("H_kv",),
                         ("float16", "bfloat16", "float32"), meaning)


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
    """An elementwise transform of a raw input (the gate, the delta rule's beta) as source."""

    triton_expr: str
    triton_grad: str
    torch_expr: str
    text: str


@dataclass(frozen=True)
class KernelPlan:
    """Every fact the templates print about one block, computed once."""

    name: str
    update: UpdateRule  # which template family renders the kernels
    decay: Decay
    causal: bool
    chunk: int
    # The chunk at keys wider than 128 (D > 128), where the delta rule's backward holds its
    # [chunk, D] fp32 tiles in shared memory: 32 unless the spec fixes the chunk.
    wide_key_chunk: int
    scale: float | None  # None: 1/sqrt(D) at call time
    normalize: bool
    q_map: MapPlan
    k_map: MapPlan
    gate: GatePlan | None
    beta: GatePlan | None  # the delta rule's beta transform (None: β is the input as given)
    helpers: tuple[str, ...]  # elementwise Triton helpers the module must define
    bwd_chunk: int  # the backward kernels' chunk (they need not match the forward's)
    block_e: int  # widest value block one forward program takes
    narrow_block_e: bool  # the forward may halve block_e rather than cut sequences
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    bwd_num_stages: int
    decay_input: str | None  # the call-time argument carrying the decay: slope, g, gate_input
    decay_arg: DecayArgument | None  # all about that argument

    # Facets of the decay, the switches the templates branch on.
    @property
    def has_decay(self) -> bool:
        return self.decay is not Decay.NONE

    @property
    def per_head(self) -> bool:  # one rate per head, exp(-slope_h) at every token
        return self.decay is Decay.PER_HEAD

    @property
    def per_token(self) -> bool:  # one log decay per token and head
        return self.decay is Decay.PER_TOKEN

    @property
    def per_channel(self) -> bool:  # one log decay per token, head and key channel
        return self.decay is Decay.PER_CHANNEL

    @property
    def scalar_decay(self) -> bool:  # one decay factor for the whole state at a token
        return self.per_head or self.per_token

    @property
    def data_dependent(self) -> bool:  # the decay is an input of every token
        return self.per_token or self.per_channel

    @property
    def delta(self) -> bool:  # the delta rule (S' = A S; S = S' + β k (v − S'ᵀ k)ᵀ)
        return self.update is UpdateRule.DELTA

    @property
    def decay_text(self) -> str:  # "per-head", as messages spell it
        return self.decay.value.replace("_", "-")


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
    beta = None
    if spec.beta is not None:
        body, used = ex.to_triton(spec.beta)
        grad, used_grad = ex.to_triton(ex.derivative(spec.beta))
        helpers |= used | used_grad
        beta = GatePlan(body, grad, ex.to_torch(spec.beta), ex.to_text(spec.beta))
    defaults = (DELTA_LAUNCH_DEFAULTS if spec.update is UpdateRule.DELTA else LAUNCH_DEFAULTS)[spec.decay]
    return KernelPlan(
        name=spec.name,
        update=spec.update,
        decay=spec.decay,
        causal=spec.causal,
        chunk=spec.chunk or defaults.chunk,
        wide_key_chunk=spec.chunk or defaults.wide_key_chunk or defaults.chunk,
        bwd_chunk=defaults.bwd_chunk,
        block_e=defaults.block_e,
        narrow_block_e=defaults.narrow_block_e,
        num_warps=defaults.num_warps,
        bwd_num_warps=defaults.bwd_num_warps,
        num_stages=defaults.num_stages,
        bwd_num_stages=defaults.bwd_num_stages,
        scale=None if spec.scale is None else float(sympy.N(spec.scale, 17)),
        normalize=spec.normalize,
        q_map=q_map,
        k_map=k_map,
        gate=gate,
        beta=beta,
        helpers=tuple(sorted(helpers)),
        decay_input=decay_input(spec),
        decay_arg=_decay_argument(spec),
    )
