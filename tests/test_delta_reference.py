"""The delta rule's plain-PyTorch forms (attncc/delta_reference.py, issue 16).

delta_recurrent is checked against `naive_delta`, a second float64 recurrence written here
from the other form of the update, S_t = (I − β_t k_t k_tᵀ) A_t S_{t-1} + β_t k_t v_tᵀ, with
explicit matrices and Python loops over batch, head and token. delta_chunked is checked
against delta_recurrent in float64, forward and through autograd.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attncc.delta_reference import (
    DECAY_KINDS,
    _chunk_output,
    _chunk_state,
    _chunk_wy,
    _decayed_scores,
    _unit_lower_inverse,
    delta_chunked,
    delta_chunked_backward,
    delta_recurrent,
)

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|; NaN or inf anywhere fails (returns inf)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_inputs(kind, B=2, T=23, H=2, D=6, E=4, seed=0, strong=False, dtype=F64):
    """l2-normalized keys, β in (0, 2), log decays <= 0; `strong`: about a third of the tokens
    (per channel: of the entries) decay with g = −30, per head a slope of 30."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, E, generator=gen, dtype=F64)
    beta = 0.02 + 1.96 * torch.rand(B, T, H, generator=gen, dtype=F64)
    shape = {"per_head": (H,), "per_token": (B, T, H), "per_channel": (B, T, H, D)}.get(kind)
    decay = None
    if kind == "per_head":
        decay = 30.0 * torch.ones(H, dtype=F64) if strong else torch.rand(H, generator=gen, dtype=F64)
    elif kind in ("per_token", "per_channel"):
        decay = -torch.rand(*shape, generator=gen, dtype=F64)
        if strong:
            decay = torch.where(torch.rand(*shape, generator=gen, dtype=F64) < 0.35, -30.0, decay)
    state = torch.randn(B, H, D, E, generator=gen, dtype=F64)
    cast = (lambda x: None if x is None else x.to(dtype))
    return tuple(cast(x) for x in (q, k, v, beta, decay, state))


def naive_delta(q, k, v, beta, kind, decay, scale, state):
    """Deliberately plain: loops over b, h, t; the transition as an explicit D×D matrix."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    o = torch.zeros(B, T, H, E, dtype=F64)
    final = torch.zeros(B, H, D, E, dtype=F64)
    eye = torch.eye(D, dtype=F64)
    for b in range(B):
        for h in range(H):
            S = state[b, h].clone()
            for t in range(T):
                if kind == "none":
                    A = eye
                elif kind == "per_head":
                    A = math.exp(-float(decay[h])) * eye
                elif kind == "per_token":
                    A = math.exp(float(decay[b, t, h])) * eye
                else:
                    A = torch.diag(torch.tensor([math.exp(float(x)) for x in decay[b, t, h]], dtype=F64))
                kk = k[b, t, h].reshape(D, 1)
                vv = v[b, t, h].reshape(E, 1)
                bt = float(beta[b, t, h])
                S = (eye - bt * (kk @ kk.T)) @ (A @ S) + bt * (kk @ vv.T)
                o[b, t, h] = scale * (S.T @ q[b, t, h].reshape(D, 1)).reshape(E)
            final[b, h] = S
    return o, final


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_recurrent_matches_naive_loop(kind, strong):
    q, k, v, beta, decay, state = make_inputs(kind, strong=strong)
    o, s = delta_recurrent(q, k, v, beta, kind, decay, scale=0.7, initial_state=state)
    o_ref, s_ref = naive_delta(q, k, v, beta, kind, decay, 0.7, state)
    assert rel_err(o, o_ref) <= 1e-12
    assert rel_err(s, s_ref) <= 1e-12


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_recurrent_varlen_and_defaults(kind):
    """cu_seqlens: each sequence is its own recurrence from its own initial state (an empty one
    returns its initial state); scale defaults to 1/sqrt(D); no initial state means zeros."""
    bounds = [0, 5, 5, 22, 30]
    q, k, v, beta, decay, _ = make_inputs(kind, B=1, T=30)
    state = torch.randn(4, 2, 6, 4, dtype=F64)
    cu = torch.tensor(bounds, dtype=torch.int32)
    o, s = delta_recurrent(q, k, v, beta, kind, decay, initial_state=state, cu_seqlens=cu)
    for i in range(4):
        p = slice(bounds[i], bounds[i + 1])
        d = decay[:, p] if kind in ("per_token", "per_channel") else decay
        o_ref, s_ref = naive_delta(
            q[:, p], k[:, p], v[:, p], beta[:, p], kind, d, 1 / math.sqrt(6), state[i : i + 1]
        )
        assert o[:, p].shape == o_ref.shape
        if bounds[i + 1] > bounds[i]:
            assert rel_err(o[:, p], o_ref) <= 1e-12
        assert rel_err(s[i : i + 1], s_ref) <= 1e-12
    o0, s0 = delta_recurrent(q, k, v, beta, kind, decay)
    o0_ref, s0_ref = naive_delta(q, k, v, beta, kind, decay, 1 / math.sqrt(6), torch.zeros(1, 2, 6, 4, dtype=F64))
    assert rel_err(o0, o0_ref) <= 1e-12 and rel_err(s0, s0_ref) <= 1e-12


@pytest.mark.parametrize("T", [1, 17, 70])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_chunked_matches_recurrent(kind, chunk, T):
    """D != E, an initial state, T not a multiple of the chunk (a partial last chunk)."""
    q, k, v, beta, decay, state = make_inputs(kind, B=2, T=T, H=2, D=8, E=5, seed=T + chunk)
    o, s = delta_recurrent(q, k, v, beta, kind, decay, scale=0.5, initial_state=state)
    o_c, s_c = delta_chunked(q, k, v, beta, kind, decay, scale=0.5, initial_state=state, chunk=chunk)
    assert rel_err(o_c, o) <= 1e-10
    assert rel_err(s_c, s) <= 1e-10


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_chunked_strong_decay_is_finite(kind):
    """g = −30 on many tokens: exp(−cumsum g) over a chunk is past float64's range (checked
    below), so a chunked form that divides decays out would give inf / NaN."""
    q, k, v, beta, decay, state = make_inputs(kind, B=1, T=70, D=8, E=5, seed=3, strong=True)
    if kind != "none":
        g = -decay.expand(1, 70, 2) if kind == "per_head" else decay
        assert torch.isinf((-g[:, :64].cumsum(1)).exp()).any()  # the regime is really reached
    o, s = delta_recurrent(q, k, v, beta, kind, decay, initial_state=state)
    for chunk in (16, 64):
        o_c, s_c = delta_chunked(q, k, v, beta, kind, decay, initial_state=state, chunk=chunk)
        assert rel_err(o_c, o) <= 1e-10
        assert rel_err(s_c, s) <= 1e-10


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_chunked_varlen_with_empty_sequence(kind):
    bounds = [0, 17, 17, 50, 53]
    q, k, v, beta, decay, _ = make_inputs(kind, B=1, T=53, D=5, E=7, seed=11)
    state = torch.randn(4, 2, 5, 7, dtype=F64)
    cu = torch.tensor(bounds, dtype=torch.int64)
    o, s = delta_recurrent(q, k, v, beta, kind, decay, initial_state=state, cu_seqlens=cu)
    o_c, s_c = delta_chunked(q, k, v, beta, kind, decay, initial_state=state, cu_seqlens=cu, chunk=16)
    assert rel_err(o_c, o) <= 1e-10
    assert rel_err(s_c, s) <= 1e-10
    assert torch.equal(s_c[1], state[1])  # the empty sequence keeps its initial state


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_gradients_agree(kind):
    """Autograd through the chunked form equals autograd through the recurrence, for every
    input including the decay and the initial state (float64)."""
    inputs = make_inputs(kind, B=1, T=37, H=2, D=5, E=3, seed=5)
    gen = torch.Generator().manual_seed(9)
    w_o = torch.randn(1, 37, 2, 3, generator=gen, dtype=F64)
    w_s = torch.randn(1, 2, 5, 3, generator=gen, dtype=F64)

    def grads(fn, **kw):
        leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
        q, k, v, beta, decay, state = leaves
        o, s = fn(q, k, v, beta, kind, decay, scale=0.8, initial_state=state, **kw)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        return [x.grad for x in leaves if x is not None]

    for g_r, g_c in zip(grads(delta_recurrent), grads(delta_chunked, chunk=16), strict=True):
        assert g_c is not None and rel_err(g_c, g_r) <= 1e-10


@pytest.mark.parametrize("kind", ["none", "per_token", "per_channel"])
def test_ut_transform_entries_bounded(kind):
    """With unit keys, β in (0, 2) and decays <= 1: T = (I + A)^{-1} satisfies
    |T_ij| <= β_i ‖k_i‖ ‖k_j‖ = β_i below the diagonal (docs/delta_rule.md), whatever L."""
    q, k, v, beta, decay, _ = make_inputs(kind, B=2, T=64, H=3, D=4, E=2, seed=2)
    k = k.transpose(1, 2)
    beta = beta.transpose(1, 2)
    if decay is None:
        gamma = torch.zeros(2, 3, 64, 1, dtype=F64)
    elif decay.dim() == 3:
        gamma = decay.transpose(1, 2)[..., None].cumsum(-2)
    else:
        gamma = decay.transpose(1, 2).cumsum(-2)
    A = beta[..., None] * _decayed_scores(k, k, gamma, strict=True, sub=16)
    T = _unit_lower_inverse(A)
    eye = torch.eye(64, dtype=F64)
    assert rel_err(T @ (eye + A), eye.expand_as(T)) <= 1e-12
    below = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    assert (T.abs() <= beta[..., None] * (1 + 1e-12))[..., below].all()
    assert torch.equal(torch.diagonal(T, dim1=-2, dim2=-1), torch.ones(2, 3, 64, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """Low-precision inputs: o in the input dtype, the state in float32, and float32 results
    within 1e-5 of float64 (bf16 inputs are rounded first, so compared on the same inputs)."""
    inputs = make_inputs("per_channel", B=1, T=40, D=8, E=8, seed=4, dtype=dtype)
    o, s = delta_chunked(*inputs[:4], "per_channel", inputs[4], initial_state=inputs[5], chunk=16)
    assert o.dtype == dtype and s.dtype == torch.float32
    wide = [x.to(F64) for x in inputs]
    o_ref, s_ref = delta_recurrent(*wide[:4], "per_channel", wide[4], initial_state=wide[5])
    assert rel_err(s.to(F64), s_ref) <= 1e-5
    assert rel_err(o.to(F64), o_ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


@settings(max_examples=8, deadline=None)
@given(
    kind=st.sampled_from(DECAY_KINDS),
    T=st.integers(0, 40),
    D=st.integers(1, 9),
    E=st.integers(1, 9),
    chunk=st.integers(1, 24),
    sub=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    strong=st.booleans(),
)
def test_chunked_property(kind, T, D, E, chunk, sub, seed, strong):
    """Any chunk and sub-chunk size (not dividing each other), T = 0 included."""
    q, k, v, beta, decay, state = make_inputs(kind, B=1, T=T, H=2, D=D, E=E, seed=seed, strong=strong)
    o, s = delta_recurrent(q, k, v, beta, kind, decay, initial_state=state)
    o_c, s_c = delta_chunked(
        q, k, v, beta, kind, decay, initial_state=state, chunk=chunk, sub_chunk=sub
    )
    assert o_c.shape == o.shape == (1, T, 2, E)
    if T:
        assert rel_err(o_c, o) <= 1e-10
    assert rel_err(s_c, s) <= 1e-10


def test_argument_errors():
    q, k, v, beta, decay, state = make_inputs("per_token", B=2, T=5)
    cases = [
        (dict(decay_kind="gated"), "decay_kind must be one of"),
        (dict(decay=decay[..., 0]), "decay for 'per_token' must have shape"),
        (dict(decay_kind="none"), "decay must be None"),
        (dict(decay=None), "needs a floating-point decay tensor"),
        (dict(initial_state=state[:1]), "initial_state must be"),
        (dict(beta=beta[..., None]), "beta must be"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "B = 2"),
        (dict(chunk=0), "chunk must be a positive int"),
    ]
    for change, message in cases:
        args = dict(decay_kind="per_token", decay=decay, beta=beta, initial_state=state)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            delta_chunked(q, k, v, **args)
    q1, k1, v1, beta1, decay1, _ = make_inputs("per_token", B=1, T=5)
    for bounds, message in (([0, 3, 2, 5], "non-decreasing"), ([0, 4], "end at T = 5")):
        with pytest.raises(ValueError, match=message):
            delta_recurrent(q1, k1, v1, beta1, "per_token", decay1, cu_seqlens=torch.tensor(bounds))


@pytest.mark.parametrize("kind", ["per_head", "per_token", "per_channel"])
def test_float32_strong_decay_accuracy(kind):
    """float32 with g = −30 tokens: every decay exponent must be a sum of the log decays it
    spans only. As a difference of chunk-wide cumulative sums (|γ| up to 64·30) it loses
    |γ|·eps ≈ 1e-4 in factors near 1, seen as ~3e-5 errors here; the recurrence is ~2e-7."""
    x = make_inputs(kind, B=1, T=128, H=2, D=16, E=16, seed=1, strong=True, dtype=torch.float32)
    wide = [t.to(F64) for t in x]
    o_ref, s_ref = delta_recurrent(*wide[:4], kind, wide[4], initial_state=wide[5])
    o, s = delta_chunked(*x[:4], kind, x[4], initial_state=x[5], chunk=64)
    assert rel_err(o.to(F64), o_ref) <= 2e-6
    assert rel_err(s.to(F64), s_ref) <= 2e-6


def test_backward_plan_formulas_one_chunk():
    """The backward equations of docs/delta_rule.md, written out for one per-channel chunk
    (L = 21 with sub-chunks of 8), against autograd through the module's three chunk phases."""
    gen = torch.Generator().manual_seed(7)
    L, D, E, scale = 21, 4, 3, 0.7
    q = torch.randn(L, D, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(L, D, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(L, E, generator=gen, dtype=F64)
    beta = 0.05 + 1.9 * torch.rand(L, generator=gen, dtype=F64)
    g = -torch.rand(L, D, generator=gen, dtype=F64)
    S0 = torch.randn(D, E, generator=gen, dtype=F64)
    dO = torch.randn(L, E, generator=gen, dtype=F64)
    dSL = torch.randn(D, E, generator=gen, dtype=F64)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, S0)]
    lq, lk, lv, lb, lg, lS = leaves
    W_, U_pre_ = _chunk_wy(lk, lv, lb, lg, 8)
    U_, SL_ = _chunk_state(lS, lk, lg, W_, U_pre_)
    O_ = _chunk_output(lq, lk, lg, lS, U_, scale, 8)
    ((O_ * dO).sum() + (SL_ * dSL).sum()).backward()

    # Forward quantities, recomputed the plain way: the full [L, L, D] factors e^{Γ_ij}.
    gam = g.cumsum(0)
    last = gam[-1]
    idx = torch.arange(L)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    fac = torch.where(incl[..., None], gam[:, None] - gam[None], -math.inf).exp()
    Ks = torch.einsum("id,jd,ijd->ij", k, k, fac) * strict
    A = beta[:, None] * Ks
    T = torch.linalg.inv(torch.eye(L, dtype=F64) + A)
    Kh, Qh, Kb = k * gam.exp(), q * gam.exp(), k * (last - gam).exp()
    XW, XU = beta[:, None] * Kh, beta[:, None] * v
    W = T @ XW
    U = T @ XU - W @ S0
    P = torch.einsum("id,jd,ijd->ij", q, k, fac)
    # The backward of the plan.
    dU = scale * P.T @ dO + Kb @ dSL
    dP = scale * (dO @ U.T) * incl
    dQh, dKb = scale * dO @ S0.T, U @ dSL.T
    dS0 = scale * Qh.T @ dO + last.exp()[:, None] * dSL - W.T @ dU
    dW = -dU @ S0.T
    dXW, dXU = T.T @ dW, T.T @ dU
    dT = dW @ XW.T + dU @ XU.T
    dA = -(T.T @ dT @ T.T) * strict
    dv = beta[:, None] * dXU
    dbeta = (dXU * v).sum(1) + (dXW * Kh).sum(1) + (dA * Ks).sum(1)
    dq = gam.exp() * dQh + torch.einsum("ij,jd,ijd->id", dP, k, fac)
    dk = (
        beta[:, None] * gam.exp() * dXW
        + (last - gam).exp() * dKb
        + torch.einsum("ij,id,ijd->jd", dP, q, fac)
        + torch.einsum("ij,i,id,ijd->jd", dA, beta, k, fac)
        + torch.einsum("jm,j,md,jmd->jd", dA, beta, k, fac)
    )
    c = torch.einsum("ij,id,jd,ijd->ijd", dP, q, k, fac) + torch.einsum(
        "ij,i,id,jd,ijd->ijd", dA, beta, k, k, fac
    )
    p = (q * dQh + beta[:, None] * k * dXW) * gam.exp()
    s = k * dKb * (last - gam).exp()
    z = (S0 * dSL * last.exp()[:, None]).sum(1)
    spans = (idx[None, None] > idx[None, :, None]) & (idx[None, None] <= idx[:, None, None])
    dg = (
        torch.einsum("ijd,ijm->md", c, spans.to(F64))  # segments: j < m <= i
        + p.flip(0).cumsum(0).flip(0)  # prefixes: m <= i
        + torch.cat([torch.zeros(1, D, dtype=F64), s.cumsum(0)[:-1]])  # suffixes: m > j
        + z  # the state's decay spans the whole chunk
    )
    dgam = c.sum(1) - c.sum(0) + p - s  # the row-minus-column form, then a reverse cumsum
    dgam[-1] += s.sum(0) + z
    dg_rows = dgam.flip(0).cumsum(0).flip(0)
    for mine, leaf in zip((dq, dk, dv, dbeta, dg, dS0), leaves, strict=True):
        assert rel_err(mine, leaf.grad) <= 1e-12
    assert rel_err(dg_rows, lg.grad) <= 1e-12


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_hand_written_backward_matches_autograd(kind, chunk):
    """delta_chunked_backward (the plan of docs/delta_rule.md as code) against autograd
    through delta_recurrent, float64, with initial and final states and a partial chunk."""
    inputs = make_inputs(kind, B=2, T=37, H=2, D=5, E=3, seed=chunk, strong=chunk == 64)
    gen = torch.Generator().manual_seed(1)
    d_o = torch.randn(2, 37, 2, 3, generator=gen, dtype=F64)
    d_s = torch.randn(2, 2, 5, 3, generator=gen, dtype=F64)
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    q, k, v, beta, decay, state = leaves
    o, s = delta_recurrent(q, k, v, beta, kind, decay, scale=0.8, initial_state=state)
    ((o * d_o).sum() + (s * d_s).sum()).backward()
    mine = delta_chunked_backward(
        *inputs[:4], kind, inputs[4], d_o, d_s, scale=0.8, initial_state=inputs[5], chunk=chunk
    )
    for name, got, leaf in zip(("q", "k", "v", "beta", "decay", "state"), mine, leaves, strict=True):
        if leaf is None:
            assert got is None
        else:
            assert got.shape == leaf.shape and rel_err(got, leaf.grad) <= 1e-10, name
