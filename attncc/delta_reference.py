"""The delta rule (DeltaNet, Gated DeltaNet, KDA) in plain PyTorch: the math the kernels follow.

Issue 16. Feature maps are already applied to q and k. Per token t, per head:

    S'_t = A_t ⊙ S_{t-1}                                   (S is D×E, A_t scales its rows)
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ  =  (I − β_t k_t k_tᵀ) S'_t + β_t k_t v_tᵀ
    o_t  = scale · q_tᵀ S_t

with the decay A_t one of

    "none"         A_t = 1                       decay = None
    "per_head"     A_t = exp(−slope_h)           decay = slope [H]
    "per_token"    A_t = exp(g_t)                decay = g [B, T, H]      (log decay, ≤ 0)
    "per_channel"  A_t = diag(exp(g_t))          decay = g [B, T, H, D]   (log decay, ≤ 0)

Two functions compute the same thing:

- `delta_recurrent`: token by token, the definition.
- `delta_chunked`: the chunkwise WY / UT form (Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length"), written as the three phases the
  kernels will have: (1) per chunk, in parallel, the UT transform and W, U; (2) one pass over
  the chunks in order, carrying the state; (3) per chunk, in parallel, the outputs.

`delta_chunked_backward` is the hand-written backward the kernels will follow (dense batches).

docs/delta_rule.md derives the chunked equations and says why they stay bounded.
Both take any float dtype; they compute in at least float32 (the state is kept in the
compute dtype, as the kernels keep an fp32 state) and return o in q's dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DECAY_KINDS", "delta_chunked", "delta_chunked_backward", "delta_recurrent"]

DECAY_KINDS = ("none", "per_head", "per_token", "per_channel")


# ----------------------------------------------------------------------------------------------
# Argument checks and the common driver (sequences, dtypes, layout)
# ----------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_kind: str,
    decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> list[tuple[int, int, int]]:
    """Validate the arguments; return the sequences as (batch row, start, end)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got {_shape(q)}")
    B, T, H, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {_shape(q)}, got {_shape(k)} (no grouped heads here)")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, E] = [{B}, {T}, {H}, E], got {_shape(v)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {[B, T, H]}, got {_shape(beta)}")
    if decay_kind not in DECAY_KINDS:
        raise ValueError(f"decay_kind must be one of {', '.join(DECAY_KINDS)}; got {decay_kind!r}")
    expected = {"per_head": [H], "per_token": [B, T, H], "per_channel": [B, T, H, D]}
    if decay_kind == "none":
        if decay is not None:
            raise ValueError("decay must be None with decay_kind='none'")
    else:
        if not isinstance(decay, torch.Tensor) or not decay.is_floating_point():
            raise ValueError(f"decay_kind={decay_kind!r} needs a floating-point decay tensor")
        if _shape(decay) != expected[decay_kind]:
            raise ValueError(
                f"decay for {decay_kind!r} must have shape {expected[decay_kind]}, "
                f"got {_shape(decay)}"
            )
    if cu_seqlens is None:
        sequences = [(b, 0, T) for b in range(B)]
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (
            torch.int32,
            torch.int64,
        ):
            raise ValueError("cu_seqlens must be an int32 or int64 tensor of shape [N + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have shape [N + 1], N >= 1; got {_shape(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens, q must be [1, total_tokens, H, D]; got B = {B}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {bounds}")
        if any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        sequences = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    if initial_state is not None:
        E = v.shape[-1]
        if _shape(initial_state) != [len(sequences), H, D, E]:
            raise ValueError(
                f"initial_state must be [N, H, D, E] = {[len(sequences), H, D, E]} "
                f"(N = {'sequences in cu_seqlens' if cu_seqlens is not None else 'B'}), "
                f"got {_shape(initial_state)}"
            )
    return sequences


def _log_decay(
    decay_kind: str, decay: torch.Tensor | None, B: int, T: int, H: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The per-token log decay g: None, [B, T, H] (scalar kinds) or [B, T, H, D] (per channel)."""
    if decay_kind == "none":
        return None
    assert decay is not None
    if decay_kind == "per_head":
        return (-decay.to(dtype)).view(1, 1, H).expand(B, T, H)
    return decay.to(dtype)


def _run(
    sequence_fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_kind: str,
    decay: torch.Tensor | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared driver: checks, dtype, and one call of `sequence_fn` per batch (dense) or per
    sequence (cu_seqlens). sequence_fn(q, k, v, beta, g, state, scale) works on [B', L, H, ...]."""
    sequences = _check(q, k, v, beta, decay_kind, decay, initial_state, cu_seqlens)
    B, T, H, D = q.shape
    E = v.shape[-1]
    dtype = torch.float32
    for x in (q, k, v, beta, decay, initial_state):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    g = _log_decay(decay_kind, decay, B, T, H, dtype)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    N = len(sequences)
    if initial_state is None:
        initial_state = q.new_zeros(N, H, D, E)
    initial_state = initial_state.to(dtype)
    if cu_seqlens is None:
        # All batch rows have the same length: one call for the whole batch.
        o, state = sequence_fn(q, k, v, beta, g, initial_state, scale)
        return o, state
    outputs, states = [], []
    for i, (_, s, e) in enumerate(sequences):
        piece = slice(s, e)
        o_i, s_i = sequence_fn(
            q[:, piece],
            k[:, piece],
            v[:, piece],
            beta[:, piece],
            None if g is None else g[:, piece],
            initial_state[i : i + 1],
            scale,
        )
        outputs.append(o_i)
        states.append(s_i)
    return torch.cat(outputs, dim=1), torch.cat(states)


# ----------------------------------------------------------------------------------------------
# Token by token
# ----------------------------------------------------------------------------------------------


def _recurrent_sequence(q, k, v, beta, g, state, scale):
    """q, k [B, L, H, D], v [B, L, H, E], beta [B, L, H], g None / [B, L, H] / [B, L, H, D],
    state [B, H, D, E] -> (o [B, L, H, E], state)."""
    outputs = []
    for t in range(q.shape[1]):
        if g is not None:
            a = g[:, t].exp()  # the decay of token t: [B, H] or [B, H, D]
            # Per channel, a scales the rows (key dim) of S; a scalar scales all of S.
            state = state * (a[..., None] if a.dim() == 3 else a[..., None, None])
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t]
        prediction = torch.einsum("bhd,bhde->bhe", k_t, state)  # S'_tᵀ k_t
        correction = b_t[..., None] * (v_t - prediction)  # β_t (v_t − S'_tᵀ k_t)
        state = state + k_t[..., :, None] * correction[..., None, :]
        outputs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], state))
    if not outputs:
        return v.new_zeros(v.shape), state
    return torch.stack(outputs, dim=1), state


def delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_kind: str,
    decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token (the definition; O(T) sequential steps).

    q, k [B, T, H, D]; v [B, T, H, E]; beta [B, T, H]; decay per `decay_kind` (module doc);
    scale defaults to 1/sqrt(D); initial_state [N, H, D, E] (N = B, or the number of sequences
    with cu_seqlens, FlashAttention convention with B = 1). Returns (o [B, T, H, E] in q's dtype,
    final_state [N, H, D, E] in the compute dtype, at least float32).
    """
    o, state = _run(
        _recurrent_sequence, q, k, v, beta, decay_kind, decay, scale, initial_state, cu_seqlens
    )
    return o.to(q.dtype), state


# ----------------------------------------------------------------------------------------------
# Chunked: the WY / UT form
# ----------------------------------------------------------------------------------------------
#
# Inside a chunk of L tokens (positions i = 0..L-1), g [.., L, Dg] holds the chunk's log
# decays, Dg = 1 for scalar decays and D per channel (zeros for "none": a kernel drops those
# factors at compile time; here exp(0) = 1 is exact). Every decay factor is exp(x) with x the
# sum of the log decays of the tokens it spans:
#     prefix   γ_i             = Σ_{m <= i} g_m        from the chunk start through token i
#     suffix   γ_last − γ_j    = Σ_{m > j} g_m         after token j through the chunk's end
#     segment  γ_i − γ_j       = Σ_{j < m <= i} g_m    between tokens j < i
# With log decays <= 0 every x is <= 0, so no factor exceeds 1 (nothing overflows; what
# underflows is negligible). And x is summed from its own terms, never taken as a difference
# of two prefix sums: that difference carries the rounding error of |γ_i| ~ L·|g|, which in
# float32 with g = −30 is ~1e-4 relative on factors close to 1. Summed from its own terms,
# exp(x) is off by ~n·eps·|x|·exp(x) <= n·eps/e absolutely, whatever the rest of the chunk holds.


def _prefix(g: torch.Tensor) -> torch.Tensor:
    """γ_i = Σ_{m <= i} g_m along the token axis (-2)."""
    return g.cumsum(dim=-2)


def _suffix_after(g: torch.Tensor) -> torch.Tensor:
    """Σ_{m > j} g_m along the token axis (-2): 0 for the last token. Summed from the end
    (shifted by one), not as total − prefix, for the reason above."""
    from_end = g.flip(-2).cumsum(dim=-2).flip(-2)  # Σ_{m >= j}
    return torch.cat([from_end[..., 1:, :], torch.zeros_like(g[..., :1, :])], dim=-2)


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """[.., L, Dg] -> [.., L(i), L(j), Dg]: Σ_{j < m <= i} g_m for j <= i (0 on the diagonal);
    above the diagonal the values are meaningless and the callers mask them. Built as a
    cumulative sum over i of g_i kept only where i > j, so each entry adds only its own terms."""
    L = g.shape[-2]
    after_j = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)[..., None]  # m > j
    spread = torch.where(after_j, g[..., :, None, :], torch.zeros((), dtype=g.dtype))
    return spread.cumsum(dim=-3)


def _decayed_scores(
    a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, *, strict: bool, sub: int
) -> torch.Tensor:
    """M[i, j] = Σ_d a[i, d] b[j, d] exp(Σ_{j < m <= i} g[m, d]) for j < i (strict) or j <= i,
    0 above; a, b [.., L, D], g [.., L, Dg] -> [.., L, L].

    Scalar decay (Dg = 1): the factor does not depend on d, so it leaves the sum: one matrix
    product a bᵀ, times exp of the segment sums masked to −inf *before* the exp (above the
    diagonal nothing is exponentiated).

    Per channel the factor stays inside the sum. The tempting a·exp(γ_i) @ (b·exp(−γ_j))ᵀ
    takes exp(−γ_j) > 1, which overflows (g = −30 for 24 tokens is past float64's range), and
    the full [L, L, D] tensor of factors is too big for a kernel's registers. Instead rows are
    cut into sub-chunks of `sub` tokens; for row sub-chunk [r0, r1) the columns j < r0 go
    through the reference point r = r0 − 1 (the last token before it):
        exp(Σ_{j<m<=i} g_m) = exp(Σ_{r<m<=i} g_m) · exp(Σ_{j<m<=r} g_m),  both sums <= 0,
    the first a prefix inside the sub-chunk, the second a suffix of the tokens before it: one
    matrix product. The diagonal sub-block (j, i both in [r0, r1)) is done elementwise over
    [l, l, D] with masked segment sums, as the kernel's small-block loop will.
    """
    L = a.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1 if strict else 0)
    neg_inf = torch.tensor(float("-inf"), dtype=g.dtype, device=g.device)
    if g.shape[-1] == 1:
        seg = _segment_sums(g)[..., 0]  # [.., L(i), L(j)]
        return (a @ b.transpose(-1, -2)) * torch.where(keep, seg, neg_inf).exp()
    rows = []
    for r0 in range(0, L, sub):
        r1 = min(r0 + sub, L)
        a_blk, g_blk = a[..., r0:r1, :], g[..., r0:r1, :]
        parts = []
        if r0 > 0:
            left = a_blk * _prefix(g_blk).exp()  # Σ_{r < m <= i}, i in [r0, r1)
            right = b[..., :r0, :] * _suffix_after(g[..., :r0, :]).exp()  # Σ_{j < m <= r}
            parts.append(left @ right.transpose(-1, -2))
        seg = torch.where(keep[r0:r1, r0:r1, None], _segment_sums(g_blk), neg_inf)
        parts.append(torch.einsum("...id,...jd,...ijd->...ij", a_blk, b[..., r0:r1, :], seg.exp()))
        if r1 < L:
            parts.append(a.new_zeros(*a.shape[:-2], r1 - r0, L - r1))  # causal: nothing after
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """T = (I + A)^{-1} for a strictly lower-triangular A [.., L, L], by forward substitution:
    row i solves T_i + Σ_{j<i} A_ij T_j = e_i. Triangular substitution is backward stable, and
    with β‖k‖² <= 2 and decays <= 1 every |T_ij| <= β_i ‖k_i‖ ‖k_j‖ (docs/delta_rule.md), so
    nothing grows with L. (A kernel does the same arithmetic blockwise: 16×16 diagonal blocks by
    substitution, the blocks below them by matrix products.) Built from stacked rows rather than
    in place, so autograd can go through it."""
    L = A.shape[-1]
    eye = torch.eye(L, dtype=A.dtype, device=A.device).expand(A.shape)
    T = eye[..., :1, :]
    for i in range(1, L):
        row = eye[..., i : i + 1, :] - A[..., i : i + 1, :i] @ T  # T holds rows 0..i-1
        T = torch.cat([T, row], dim=-2)
    return T


def _chunk_wy(k, v, beta, g, sub):
    """Phase 1, independent per chunk (no state): the UT transform and the WY factors.

    The corrections u_i = β_i (v_i − S'_iᵀ k_i) of the chunk satisfy (docs/delta_rule.md)
        (I + A) U = diag(β) V − diag(β) (K ⊙ exp(γ)) S0,
        A_ij = β_i Σ_d k_id k_jd exp(γ_id − γ_jd)  for j < i, 0 otherwise,
    so with T = (I + A)^{-1}:  U = U_pre − W S0, where
        W = T diag(β) (K ⊙ exp(γ))   [L, D]     U_pre = T diag(β) V   [L, E].
    Neither depends on the state, so all chunks do this at once.
    """
    A = beta[..., :, None] * _decayed_scores(k, k, g, strict=True, sub=sub)
    T = _unit_lower_inverse(A)
    W = T @ (beta[..., None] * k * _prefix(g).exp())
    U_pre = T @ (beta[..., None] * v)
    return W, U_pre


def _chunk_state(state, k, g, W, U_pre):
    """Phase 2, sequential over chunks: the chunk's corrections U and the state after it.
        U = U_pre − W S0
        S_L = exp(γ_last) ⊙ S0 + (K ⊙ exp(γ_last − γ))ᵀ U      (row-wise decays, exponents <= 0)
    Only this phase carries S from chunk to chunk; it is two small products per chunk."""
    U = U_pre - W @ state
    total = g.sum(dim=-2, keepdim=True)  # γ_last, [.., 1, Dg]
    decayed_state = state * total.transpose(-1, -2).exp()  # scales rows (key dim) of S0
    return U, decayed_state + (k * _suffix_after(g).exp()).transpose(-1, -2) @ U


def _chunk_output(q, k, g, state, U, scale, sub):
    """Phase 3, independent per chunk given its incoming state S0 and its U:
        O = scale · ( (Q ⊙ exp(γ)) S0  +  P U ),
        P_ij = Σ_d q_id k_jd exp(γ_id − γ_jd)  for j <= i, 0 otherwise
    (inter-chunk through the state, intra-chunk through the masked q kᵀ)."""
    P = _decayed_scores(q, k, g, strict=False, sub=sub)
    return scale * ((q * _prefix(g).exp()) @ state + P @ U)


def _make_chunked_sequence(chunk: int, sub: int):
    def sequence(q, k, v, beta, g, state, scale):
        """Same contract as _recurrent_sequence, by chunks of `chunk` tokens (the last may be
        shorter: every function above works for any L, and a kernel padding it with tokens of
        β = 0, k = 0, g = 0 would get the same numbers, since such a token leaves S unchanged)."""
        B, T, H, D = q.shape
        # [B, H, T, ..]: a head's tokens are rows, as in the kernels' tiles.
        q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))
        if g is None:
            g = q.new_zeros(B, H, T, 1)
        elif g.dim() == 3:
            g = g.transpose(1, 2)[..., None]  # scalar decay: Dg = 1, broadcast over the key dim
        else:
            g = g.transpose(1, 2)
        pieces = [slice(s, min(s + chunk, T)) for s in range(0, T, chunk)]
        # Each chunk sees only its own log decays: every exponent stays inside one chunk.
        log_decays = [g[..., p, :] for p in pieces]
        wy = [
            _chunk_wy(k[..., p, :], v[..., p, :], beta[..., p], g_c, sub)
            for p, g_c in zip(pieces, log_decays, strict=True)
        ]
        incoming, corrections = [], []
        for p, g_c, (W, U_pre) in zip(pieces, log_decays, wy, strict=True):
            incoming.append(state)
            U, state = _chunk_state(state, k[..., p, :], g_c, W, U_pre)
            corrections.append(U)
        outputs = [
            _chunk_output(q[..., p, :], k[..., p, :], g_c, s0, U, scale, sub)
            for p, g_c, s0, U in zip(pieces, log_decays, incoming, corrections, strict=True)
        ]
        o = torch.cat(outputs, dim=-2) if outputs else v.new_zeros(v.shape)
        return o.transpose(1, 2), state

    return sequence


def delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_kind: str,
    decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk: int = 64,
    sub_chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule by chunks of `chunk` tokens (WY / UT form): the same function as
    `delta_recurrent` (same arguments and results), with O(T / chunk) sequential steps of
    matrix products. `sub_chunk` is the block size of the per-channel intra-chunk products
    (see `_decayed_scores`)."""
    for name, n in (("chunk", chunk), ("sub_chunk", sub_chunk)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    o, state = _run(
        _make_chunked_sequence(chunk, sub_chunk),
        q, k, v, beta, decay_kind, decay, scale, initial_state, cu_seqlens,
    )
    return o.to(q.dtype), state


# ----------------------------------------------------------------------------------------------
# Hand-written chunked backward (docs/delta_rule.md, "Backward pass plan")
# ----------------------------------------------------------------------------------------------
#
# Plain and unblocked: the pair factors e^{Γ_ij} are formed in full as [.., L, L, D] (the
# kernel will block them as `_decayed_scores` does). Dense batches only (no cu_seqlens).


def _pair_factors(g: torch.Tensor, D: int) -> torch.Tensor:
    """e^{Γ_ij} for j <= i, 0 above: [.., L, L, D] (a scalar decay is expanded over d)."""
    L = g.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()[..., None]
    neg_inf = torch.tensor(float("-inf"), dtype=g.dtype, device=g.device)
    return torch.where(keep, _segment_sums(g), neg_inf).exp().expand(*g.shape[:-2], L, L, D)


def _chunk_backward(q, k, v, beta, g, S0, dO, dSL, scale):
    """One chunk's gradients given dO [.., L, E] and dS_L [.., D, E]: (dq, dk, dv, dbeta,
    dg [.., L, D], dS0). Forward quantities are recomputed from the chunk's inputs and S0."""
    L, D = k.shape[-2:]
    fac = _pair_factors(g, D)
    strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    pre = _prefix(g).exp().expand_as(k)  # e^{γ_i}
    suf = _suffix_after(g).exp().expand_as(k)  # e^{γ_last − γ_j}
    last = g.sum(dim=-2).exp().expand(*k.shape[:-2], D)  # e^{γ_last}
    Ks = torch.einsum("...id,...jd,...ijd->...ij", k, k, fac) * strict
    T = _unit_lower_inverse(beta[..., :, None] * Ks)
    XW, XU = beta[..., None] * k * pre, beta[..., None] * v
    W = T @ XW
    U = T @ XU - W @ S0
    P = torch.einsum("...id,...jd,...ijd->...ij", q, k, fac)
    tr = lambda x: x.transpose(-1, -2)
    # Outputs and the state leaving the chunk.
    dU = scale * tr(P) @ dO + (k * suf) @ dSL
    dP = scale * (dO @ tr(U)) * incl
    dQh, dKb = scale * dO @ tr(S0), U @ tr(dSL)
    dS0 = scale * tr(q * pre) @ dO + last[..., None] * dSL - tr(W) @ dU
    # Through U = T X_U − T X_W S0 and T = (I + A)^{-1}.
    dW = -dU @ tr(S0)
    dXW, dXU = tr(T) @ dW, tr(T) @ dU
    dT = dW @ tr(XW) + dU @ tr(XU)
    dA = -(tr(T) @ dT @ tr(T)) * strict
    dAb = dA * beta[..., :, None]  # the gradient of the β-free Gram part K Kᵀ ⊙ e^{Γ}
    dv = beta[..., None] * dXU
    dbeta = (dXU * v).sum(-1) + (dXW * k * pre).sum(-1) + (dA * Ks).sum(-1)
    # Pair terms: Σ_j M_ij b_j ⊙ e^{Γ_ij} (rows) and Σ_i M_ij a_i ⊙ e^{Γ_ij} (columns).
    rows = lambda M, b: torch.einsum("...ij,...jd,...ijd->...id", M, b, fac)
    cols = lambda M, a: torch.einsum("...ij,...id,...ijd->...jd", M, a, fac)
    dq_pair, dk_pair = rows(dP, k), cols(dP, q)
    dk_gram_rows, dk_gram_cols = rows(dAb, k), cols(dAb, k)
    dq = pre * dQh + dq_pair
    dk = beta[..., None] * pre * dXW + suf * dKb + dk_pair + dk_gram_rows + dk_gram_cols
    # Log decays, row-minus-column form: with c_ij the pair terms' ∂L/∂Γ_ij,
    # Σ_j c_ij = q ⊙ rows(dP) + k ⊙ rows(dAb) and Σ_i c_ij = k ⊙ cols(dP) + k ⊙ cols(dAb);
    # then a reverse cumulative sum over the chunk. Terms whose factor does not depend on g
    # (the diagonal, Γ_ii = 0; the last token's suffix, e^0) are left out rather than added
    # and subtracted: their O(1) rounding would swamp a small true gradient (slope 30: ~1e-13).
    dP_below = dP * strict
    p = (q * dQh + beta[..., None] * k * dXW) * pre  # prefix factors e^{γ_i}
    s = k * dKb * suf  # suffix factors e^{γ_last − γ_j}
    s = torch.cat([s[..., :-1, :], torch.zeros_like(s[..., -1:, :])], dim=-2)
    z = (S0 * dSL).sum(-1) * last  # the state's decay e^{γ_last}
    rows_sum = q * rows(dP_below, k) + k * dk_gram_rows
    cols_sum = k * (cols(dP_below, q) + dk_gram_cols)
    dgam = rows_sum - cols_sum + p - s
    dgam = torch.cat([dgam[..., :-1, :], dgam[..., -1:, :] + (s.sum(-2) + z)[..., None, :]], -2)
    dg = dgam.flip(-2).cumsum(dim=-2).flip(-2)
    return dq, dk, dv, dbeta, dg, dS0


def delta_chunked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_kind: str,
    decay: torch.Tensor | None,
    do: torch.Tensor,
    d_final_state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of delta_chunked / delta_recurrent (dense batches, no cu_seqlens): given do
    [B, T, H, E] and d_final_state [B, H, D, E] (None: zeros), returns (dq, dk, dv, dbeta,
    ddecay or None, d_initial_state), in the compute dtype. A forward pass of states, then the
    reverse pass over chunks carrying dS."""
    _check(q, k, v, beta, decay_kind, decay, initial_state, None)
    B, T, H, D = q.shape
    E = v.shape[-1]
    dtype = torch.promote_types(torch.float32, q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = _log_decay(decay_kind, decay, B, T, H, dtype)
    q, k, v, beta, do = (x.to(dtype).transpose(1, 2) for x in (q, k, v, beta, do))
    g = q.new_zeros(B, H, T, 1) if g is None else g.transpose(1, 2)
    g = g[..., None] if g.dim() == 3 else g
    state = q.new_zeros(B, H, D, E) if initial_state is None else initial_state.to(dtype)
    dS = q.new_zeros(B, H, D, E) if d_final_state is None else d_final_state.to(dtype)
    pieces = [slice(s, min(s + chunk, T)) for s in range(0, T, chunk)]
    incoming = []
    for p in pieces:  # the states entering the chunks (a kernel stores or recomputes them)
        incoming.append(state)
        W, U_pre = _chunk_wy(k[..., p, :], v[..., p, :], beta[..., p], g[..., p, :], sub=chunk)
        _, state = _chunk_state(state, k[..., p, :], g[..., p, :], W, U_pre)
    grads = [torch.zeros_like(x) for x in (q, k, v, beta)] + [q.new_zeros(B, H, T, D)]
    for p, S0 in reversed(list(zip(pieces, incoming, strict=True))):
        *chunk_grads, dS = _chunk_backward(
            q[..., p, :], k[..., p, :], v[..., p, :], beta[..., p], g[..., p, :], S0,
            do[..., p, :], dS, scale,
        )
        for full, part in zip(grads, chunk_grads, strict=True):
            if full.dim() == 4:
                full[..., p, :] = part
            else:
                full[..., p] = part  # dbeta [B, H, T]
    dq, dk, dv, dbeta, dg = grads
    dq, dk, dv, dbeta, dg = (x.transpose(1, 2) for x in (dq, dk, dv, dbeta, dg))
    if decay_kind == "none":
        ddecay = None
    elif decay_kind == "per_head":
        ddecay = -dg.sum(dim=(0, 1, 3))
    elif decay_kind == "per_token":
        ddecay = dg.sum(dim=-1)
    else:
        ddecay = dg
    return dq, dk, dv, dbeta, ddecay, dS
