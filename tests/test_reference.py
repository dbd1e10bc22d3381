"""The generated PyTorch reference against a hand-written token-by-token recurrence.

The reference is written in the masked 'parallel form'; here the same math is
spelled out the slow way, one token at a time, with the feature maps and gates
written by hand (not printed from the IR), in float64.
"""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from kernelkit import module_for

from attncc import expr as ex
from attncc.ir import AttentionSpec, Decay, ElementwiseMap, IdentityMap, RowMap, RowMapKind, X

EPS = 1e-6
HAND_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,
    "relu": torch.relu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "l2norm": lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + EPS),
}
IR_MAPS = {
    "identity": IdentityMap(),
    "elu1": ElementwiseMap(ex.elu(X) + 1),
    "relu": ElementwiseMap(ex.relu(X)),
    "softmax": RowMap(RowMapKind.SOFTMAX),
    "l2norm": RowMap(RowMapKind.L2NORM),
}
HAND_GATES = {None: None, "logsigmoid/16": lambda x: F.logsigmoid(x) / 16, "-softplus": lambda x: -F.softplus(x)}
IR_GATES = {None: None, "logsigmoid/16": ex.logsigmoid(X) / 16, "-softplus": -ex.softplus(X)}

CASES = [
    # (name, decay, q map, k map, gate, causal, normalize, scale)
    ("lightning", Decay.PER_HEAD, "identity", "identity", None, True, False, 1.0),
    ("retnet", Decay.PER_HEAD, "identity", "identity", None, True, False, None),
    ("simple_gla", Decay.PER_TOKEN, "identity", "identity", None, True, False, None),
    ("mamba2", Decay.PER_TOKEN, "identity", "l2norm", "-softplus", True, False, None),
    ("gla", Decay.PER_CHANNEL, "identity", "identity", "logsigmoid/16", True, False, None),
    ("gla_raw", Decay.PER_CHANNEL, "relu", "elu1", None, True, False, 0.5),
    ("katharopoulos", Decay.NONE, "elu1", "elu1", None, True, True, 1.0),
    ("hedgehog", Decay.NONE, "softmax", "softmax", None, True, True, 1.0),
    ("decayed_norm", Decay.PER_TOKEN, "elu1", "elu1", "logsigmoid/16", True, True, 1.0),
    ("noncausal", Decay.NONE, "relu", "relu", None, False, True, 1.0),
    ("noncausal_plain", Decay.NONE, "identity", "l2norm", None, False, False, None),
]


def recurrence(q, k, v, log_decay, scale, initial, normalize, causal, q_map, k_map):
    """o_t = scale φq(q_t) S_t with S_t = A_t ⊙ S_{t-1} + φk(k_t)ᵀ v_t, one token at a time."""
    B, T, H, D = q.shape
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    E = v.shape[-1]
    q, k = q_map(q), k_map(k)
    if not causal:
        S = torch.einsum("bthd,bthe->bhde", k, v)
        o = scale * torch.einsum("bthd,bhde->bthe", q, S)
        steps = [o[:, t] for t in range(T)]
    else:
        S = initial.clone() if initial is not None else torch.zeros(B, H, D, E, dtype=q.dtype)
        steps = []
        for t in range(T):
            if log_decay is not None:
                a = log_decay[:, t].exp()
                S = S * (a[..., None] if a.dim() == 3 else a[..., None, None])
            S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
            steps.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], S))
    o = torch.stack(steps, dim=1)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + EPS)
    return o, S


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_equals_recurrence(case):
    name, decay, q_name, k_name, gate, causal, normalize, scale = case
    spec = AttentionSpec(
        name=f"ref_{name}", q_map=IR_MAPS[q_name], k_map=IR_MAPS[k_name], decay=decay, gate=IR_GATES[gate],
        causal=causal, chunk=16, normalize=normalize,
        scale=None if scale is None else sympy.nsimplify(scale),
    )
    module = module_for(spec)
    gen = torch.Generator().manual_seed(len(name))
    B, T, H, H_kv, D, E = 2, 13, 4, 2, 6, 5
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H_kv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H_kv, E, generator=gen, dtype=torch.float64)
    args, log_decay = [], None
    if decay is Decay.PER_HEAD:
        slope = torch.rand(H, generator=gen, dtype=torch.float64)
        args, log_decay = [slope], (-slope).expand(B, T, H)
    elif decay.data_dependent:
        shape = (B, T, H_kv, D) if decay is Decay.PER_CHANNEL else (B, T, H_kv)
        raw = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = HAND_GATES[gate](raw) if gate else -raw.abs()
        args, log_decay = [raw if gate else g], g.repeat_interleave(H // H_kv, dim=2)
    E_state = E + 1 if normalize else E
    initial = torch.randn(B, H, D, E_state, generator=gen, dtype=torch.float64) if causal else None

    o, state = module.reference(q, k, v, *args, initial_state=initial, output_final_state=True)
    expected_scale = scale if scale is not None else D**-0.5
    kk, vv = (x.repeat_interleave(H // H_kv, dim=2) for x in (k, v))
    o_hand, state_hand = recurrence(
        q, kk, vv, log_decay, expected_scale, initial, normalize, causal, HAND_MAPS[q_name], HAND_MAPS[k_name]
    )
    torch.testing.assert_close(o, o_hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_hand, rtol=1e-10, atol=1e-10)
