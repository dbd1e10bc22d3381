"""A checked spec in words: its normalized text, the math it denotes, its call signature.

This is what `attncc check` prints for every block. The argument names are
the ones the generated function takes (`slope`, `g`, `gate_input`): `decay_input`
is their one home, which `derive` reads too; `summary` is the one-line account
the generated module prints for each block.
"""

from __future__ import annotations

from attncc.canonical import map_text, to_canonical
from attncc.expr import to_text
from attncc.ir import (
    AttentionSpec,
    Decay,
    ElementwiseMap,
    FeatureMap,
    IdentityMap,
    RowMap,
    UpdateRule,
)

_ROW_MAP_MATH = {
    "l2norm": "x / sqrt(Σ_i x_i² + eps)   (row-wise, over the D entries of one head)",
    "softmax": "exp(x_i − max x) / Σ_j exp(x_j − max x)   (row-wise, over the D entries of one head)",
}


def decay_input(spec: AttentionSpec) -> str | None:
    """The name of the call-time argument that carries the decay, if any."""
    if spec.decay is Decay.PER_HEAD:
        return "slope"
    if spec.decay.data_dependent:
        return "gate_input" if spec.gate is not None else "g"
    return None


_DECAY_SUMMARY = {
    Decay.NONE: "no decay",
    Decay.PER_HEAD: "per-head decay exp(-slope_h)",
    Decay.PER_TOKEN: "per-token decay exp(g_t)",
    Decay.PER_CHANNEL: "per-channel decay diag(exp(g_t))",
}


def summary(spec: AttentionSpec) -> str:
    """One line saying what the variant computes (the generated module's docstrings)."""
    if spec.q_map == spec.k_map:
        maps = map_text(spec.q_map)
    else:
        maps = f"q: {map_text(spec.q_map)}, k: {map_text(spec.k_map)}"
    delta = spec.update is UpdateRule.DELTA
    parts = [
        "causal" if spec.causal else "non-causal",
        f"{'delta-rule ' if delta else ''}linear attention, {_DECAY_SUMMARY[spec.decay]}",
        f"feature map {maps}",
    ]
    if spec.gate is not None:
        parts.append(f"gate {to_text(spec.gate)}")
    if delta:
        parts.append("beta as given" if spec.beta is None else f"beta {to_text(spec.beta)}")
    if spec.normalize:
        parts.append("normalized")
    return ", ".join(parts) + "."


def _map_math(feature_map: FeatureMap) -> str:
    if isinstance(feature_map, IdentityMap):
        return "x   (identity)"
    if isinstance(feature_map, RowMap):
        return _ROW_MAP_MATH[feature_map.kind.value]
    assert isinstance(feature_map, ElementwiseMap)
    return f"{map_text(feature_map)}   (elementwise)"


def _recurrence(spec: AttentionSpec) -> list[str]:
    phi_q, phi_k = "φ_q(q_t)", "φ_k(k_t)"
    if not spec.causal:
        lines = [
            f"    S   = Σ_t {phi_k}ᵀ v_t                      (the whole sequence, no order)",
        ]
        if spec.normalize:
            lines += [
                f"    z   = Σ_t {phi_k}",
                f"    o_t = scale · {phi_q} S / (scale · {phi_q} · z + eps)",
            ]
        else:
            lines.append(f"    o_t = scale · {phi_q} S")
        return lines
    factor = {
        Decay.NONE: "",
        Decay.PER_HEAD: "λ_h ",
        Decay.PER_TOKEN: "exp(g_t) ",
        Decay.PER_CHANNEL: "diag(exp(g_t)) ",
    }[spec.decay]
    z_factor = {
        Decay.NONE: "",
        Decay.PER_HEAD: "λ_h ",
        Decay.PER_TOKEN: "exp(g_t) ",
        Decay.PER_CHANNEL: "exp(g_t) ⊙ ",
    }[spec.decay]
    if spec.update is UpdateRule.DELTA:
        # The delta rule: decay first, then correct the state's prediction for k_t towards v_t.
        return [
            f"    S'_t = {factor}S_{{t-1}}",
            f"    S_t  = S'_t + β_t {phi_k} (v_t − S'_tᵀ {phi_k})ᵀ",
            f"    o_t  = scale · {phi_q} S_t",
        ]
    lines = [f"    S_t = {factor}S_{{t-1}} + {phi_k}ᵀ v_t"]
    if spec.normalize:
        lines += [
            f"    z_t = {z_factor}z_{{t-1}} + {phi_k}",
            f"    o_t = scale · {phi_q} S_t / (scale · {phi_q} · z_t + eps)",
        ]
    else:
        lines.append(f"    o_t = scale · {phi_q} S_t")
    return lines


def _where(spec: AttentionSpec) -> list[str]:
    lines = []
    if spec.q_map == spec.k_map:
        lines.append(f"    φ_q(x) = φ_k(x) = {_map_math(spec.q_map)}")
    else:
        lines.append(f"    φ_q(x) = {_map_math(spec.q_map)}")
        lines.append(f"    φ_k(x) = {_map_math(spec.k_map)}")
    if spec.decay is Decay.NONE:
        lines.append("    decay: none (A_t = 1)")
    elif spec.decay is Decay.PER_HEAD:
        lines.append("    λ_h = exp(−slope[h])   (one fixed decay per head)")
    else:
        per_channel = spec.decay is Decay.PER_CHANNEL
        index = "[b, t, h, :]" if per_channel else "[b, t, h]"
        what = "one log decay per key channel" if per_channel else "one log decay per token"
        if spec.gate is None:
            lines.append(f"    g_t = g{index}   ({what}, g ≤ 0)")
        else:
            lines.append(f"    g_t = f(gate_input{index}),  f(x) = {to_text(spec.gate)}")
            lines.append(
                f"          ({what}; f is applied elementwise inside the kernel, g ≤ 0 expected)"
            )
    if spec.update is UpdateRule.DELTA:
        if spec.beta is None:
            lines.append("    β_t = beta[b, t, h]   (one learning rate per token, as given)")
        else:
            lines.append(f"    β_t = f(beta[b, t, h]),  f(x) = {to_text(spec.beta)}")
            lines.append("          (one learning rate per token; f is applied inside the kernel)")
    if spec.scale is None:
        lines.append("    scale = 1/sqrt(D)   (auto; the `scale=` argument overrides it)")
    else:
        lines.append(f"    scale = {to_text(spec.scale)}   (the `scale=` argument overrides it)")
    if spec.normalize:
        lines.append("    eps: a small constant that keeps the division finite")
    per_kv_head = ["k_t", "v_t"]
    if spec.decay.data_dependent:
        per_kv_head.append("g_t")
    if spec.update is UpdateRule.DELTA:
        per_kv_head.append("β_t")
    shared = ", ".join(per_kv_head[:-1]) + " and " + per_kv_head[-1]
    lines.append(f"    {shared} of head h come from kv head h // (H / H_kv)   (grouped heads)")
    return lines


def _inputs(spec: AttentionSpec) -> list[str]:
    state_e = "E+1" if spec.normalize else "E"
    rows = [
        ("q", "[B, T, H, D]", "queries"),
        ("k", "[B, T, H_kv, D]", "keys (H a multiple of H_kv)"),
        ("v", "[B, T, H_kv, E]", "values"),
    ]
    name = decay_input(spec)
    if spec.decay is Decay.PER_HEAD:
        rows.append((name, "[H]", "decay rate per head, λ_h = exp(−slope[h])"))
    elif spec.decay is Decay.PER_TOKEN:
        what = "raw gate input, g = f(gate_input)" if spec.gate is not None else "log decay, ≤ 0"
        rows.append((name, "[B, T, H_kv]", what))
    elif spec.decay is Decay.PER_CHANNEL:
        what = "raw gate input, g = f(gate_input)" if spec.gate is not None else "log decay, ≤ 0"
        rows.append((name, "[B, T, H_kv, D]", what))
    if spec.update is UpdateRule.DELTA:
        what = "raw beta input, β = f(beta)" if spec.beta is not None else "β, the learning rate"
        rows.append(("beta", "[B, T, H_kv]", what))
    lines = [f"    {n:<12}{shape:<18}{what}" for n, shape, what in rows]
    lines.append("  keyword arguments:")
    kw = [
        ("scale=None", "a float overriding the spec's scale"),
    ]
    if spec.causal:
        extra = "; the last column is the normalizer z" if spec.normalize else ""
        kw.append(
            ("initial_state=None", f"[B, H, D, {state_e}] float32 state to start from{extra}")
        )
    else:
        kw.append(
            ("initial_state=None", "must stay None: non-causal attention has no running state")
        )
    kw += [
        ("output_final_state=False", "also return the state after the last token"),
        ("cu_seqlens=None", "[N+1] int offsets of N sequences packed along T (B = 1);"),
        ("", f"states are then [N, H, D, {state_e}]"),
    ]
    lines += [f"    {n:<26}{what}" for n, what in kw]
    return lines


def _outputs(spec: AttentionSpec) -> list[str]:
    state_e = "E+1" if spec.normalize else "E"
    return [
        f"    {'o':<12}{'[B, T, H, E]':<18}same dtype as q",
        f"    {'final_state':<12}{f'[B, H, D, {state_e}]':<18}None unless output_final_state=True",
    ]


def signature(spec: AttentionSpec) -> str:
    """The generated function's call, as Python."""
    args = ["q", "k", "v"]
    if decay_input(spec):
        args.append(decay_input(spec))
    if spec.update is UpdateRule.DELTA:
        args.append("beta")
    args.append("*, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None")
    return f"o, final_state = {spec.name}({', '.join(args)})"


def describe(spec: AttentionSpec) -> str:
    """The normalized spec, its recurrence in plain math, its inputs and outputs."""
    chunk = "auto (picked by tuning or the default)" if spec.chunk is None else str(spec.chunk)
    title = "causal" if spec.causal else "non-causal"
    normalizer = ", normalizer z: D" if spec.normalize else ""
    parts = [
        to_canonical(spec).rstrip("\n"),
        "",
        f"math ({title}; for each batch b and head h, state S: D × E{normalizer}):",
        *_recurrence(spec),
        "  where",
        *_where(spec),
        f"  chunk size: {chunk}",
        "",
        "call:",
        f"    {signature(spec)}",
        "inputs:",
        *_inputs(spec),
        "outputs:",
        *_outputs(spec),
    ]
    return "\n".join(parts) + "\n"
