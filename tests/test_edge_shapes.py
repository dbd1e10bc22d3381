"""Empty batches, empty sequences, single tokens and single key/value heads.

Nothing in exact arithmetic is ambiguous here: no tokens give no outputs, and a
sequence without tokens hands its initial state (or zeros) on unchanged, so
dL/d(initial state) = dL/d(final state) and every other gradient is zero.
"""

from __future__ import annotations

import pytest
import torch
from kernelkit import DEVICE, TOLERANCE, decay_input, module_for, rel_error

from attncc import expr as ex
from attncc.ir import AttentionSpec, Decay, ElementwiseMap, X

SPECS = {
    "none": AttentionSpec("edge_none", chunk=16),
    "per_head": AttentionSpec("edge_head", decay=Decay.PER_HEAD, chunk=16),
    "per_token": AttentionSpec("edge_token", decay=Decay.PER_TOKEN, gate=ex.logsigmoid(X), chunk=16),
    "per_channel": AttentionSpec("edge_channel", decay=Decay.PER_CHANNEL, chunk=16),
    "normalized": AttentionSpec("edge_norm", q_map=ElementwiseMap(ex.elu(X) + 1), k_map=ElementwiseMap(ex.elu(X) + 1),
                                normalize=True, chunk=16),
    "noncausal": AttentionSpec("edge_nc", causal=False, chunk=16),
}
H, H_KV, D, E = 4, 2, 8, 5


def _inputs(spec, B, T, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H_KV, D, generator=gen)
    v = torch.randn(B, T, H_KV, E, generator=gen)
    decay = decay_input(spec, B, T, H, H_KV, D, gen)
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype)] + ([] if decay is None else [decay])
    return [x.to(DEVICE).requires_grad_() for x in inputs]


def _e_state(spec):
    return E + 1 if spec.normalize else E


@pytest.mark.parametrize(
    "kind, with_initial",
    [(kind, False) for kind in SPECS] + [(kind, True) for kind in SPECS if SPECS[kind].causal],
    ids=str,
)
@pytest.mark.parametrize("B, T", [(0, 7), (3, 0), (0, 0)])
def test_no_tokens(kind, B, T, with_initial):
    spec = SPECS[kind]
    fn = getattr(module_for(spec), spec.name)
    inputs = _inputs(spec, B, T)
    initial = torch.randn(B, H, D, _e_state(spec)).to(DEVICE).requires_grad_() if with_initial else None
    o, state = fn(*inputs, initial_state=initial, output_final_state=True)
    assert o.shape == (B, T, H, E) and o.dtype == inputs[0].dtype
    assert state.shape == (B, H, D, _e_state(spec)) and state.dtype == torch.float32
    expected = initial.detach() if with_initial else torch.zeros_like(state)
    assert torch.equal(state.detach(), expected)
    assert fn(*inputs)[1] is None  # no final state unless asked for

    dstate = torch.randn(state.shape).to(DEVICE)
    leaves = inputs + ([initial] if with_initial else [])
    grads = torch.autograd.grad((o.sum() + (state * dstate).sum()), leaves)
    for x, grad in zip(leaves, grads, strict=True):
        assert grad.shape == x.shape and grad.dtype == x.dtype
    for grad in grads[: len(inputs)]:
        assert torch.equal(grad, torch.zeros_like(grad))
    if with_initial:
        assert torch.equal(grads[-1], dstate)


@pytest.mark.parametrize("kind", [k for k in SPECS if SPECS[k].causal])
def test_step_with_an_empty_batch(kind):
    spec = SPECS[kind]
    step = getattr(module_for(spec), f"{spec.name}_step")
    q, k, v, *decay = (x.detach()[:, 0] if x.dim() > 1 else x.detach() for x in _inputs(spec, 0, 1))
    state = torch.zeros(0, H, D, _e_state(spec), device=DEVICE)
    o_t, new_state = step(q, k, v, state, *decay)
    assert o_t.shape == (0, H, E) and o_t.dtype == q.dtype
    assert new_state.shape == state.shape and new_state.dtype == torch.float32


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("bounds", [[0, 3, 3, 7], [0, 0, 5, 5], [0, 0], [0, 2, 2, 2, 9]], ids=str)
def test_empty_sequences_in_cu_seqlens(kind, bounds):
    """A packed batch with empty sequences equals the same batch without them, and each
    empty sequence's final state is its initial state (zeros without one)."""
    spec = SPECS[kind]
    fn = getattr(module_for(spec), spec.name)
    T = bounds[-1]
    inputs = _inputs(spec, 1, T, seed=len(bounds))
    num_seqs = len(bounds) - 1
    kept = [i for i in range(num_seqs) if bounds[i + 1] > bounds[i]]
    initial = None
    if spec.causal:
        initial = torch.randn(num_seqs, H, D, _e_state(spec)).to(DEVICE).requires_grad_()
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    o, state = fn(*inputs, initial_state=initial, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, T, H, E) and state.shape == (num_seqs, H, D, _e_state(spec))
    do, dstate = torch.randn(o.shape).to(DEVICE), torch.randn(state.shape).to(DEVICE)
    leaves = inputs + ([initial] if initial is not None else [])
    grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), leaves)

    kept_bounds = sorted(set(bounds))
    plain = [x.detach().clone().requires_grad_() for x in leaves]
    plain_initial = None if initial is None else plain[-1].detach()[kept].clone().requires_grad_()
    count = len(inputs)
    if kept:
        o_ref, state_ref = fn(
            *plain[:count], initial_state=plain_initial, output_final_state=True,
            cu_seqlens=torch.tensor(kept_bounds, dtype=torch.int32, device=DEVICE),
        )
        torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state[kept], state_ref, rtol=1e-6, atol=1e-6)
        targets = plain[:count] + ([plain_initial] if plain_initial is not None else [])
        grads_ref = torch.autograd.grad((o_ref * do).sum() + (state_ref * dstate[kept]).sum(), targets)
        for grad, grad_ref in zip(grads[:count], grads_ref[:count], strict=True):
            torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
        if initial is not None:
            torch.testing.assert_close(grads[-1][kept], grads_ref[-1], rtol=1e-6, atol=1e-6)
    else:
        for grad in grads[:count]:
            assert torch.equal(grad, torch.zeros_like(grad))
    empty = [i for i in range(num_seqs) if i not in kept]
    expected = initial.detach()[empty] if initial is not None else torch.zeros_like(state[empty])
    assert torch.equal(state.detach()[empty], expected)
    if initial is not None:
        assert torch.equal(grads[-1][empty], dstate[empty])


@pytest.mark.parametrize("kind", list(SPECS))
def test_one_token_and_one_key_value_head(kind):
    """T = 1 with H_kv = 1 serving every query head, against the float64 reference."""
    spec = SPECS[kind]
    module = module_for(spec)
    fn, reference = getattr(module, spec.name), getattr(module, f"{spec.name}_reference")
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 3, D, generator=gen)
    k, v = torch.randn(2, 1, 1, D, generator=gen), torch.randn(2, 1, 1, E, generator=gen)
    decay = decay_input(spec, 2, 1, 3, 1, D, gen)
    ours = [x.to(DEVICE).requires_grad_() for x in [q, k, v] + ([] if decay is None else [decay])]
    theirs = [x.detach().double().requires_grad_() for x in ours]
    initial = torch.randn(2, 3, D, _e_state(spec)).to(DEVICE) if spec.causal else None
    o, state = fn(*ours, initial_state=initial, output_final_state=True)
    o_ref, state_ref = reference(
        *theirs, initial_state=None if initial is None else initial.double(), output_final_state=True
    )
    (o.sum() + state.sum()).backward()
    (o_ref.sum() + state_ref.sum()).backward()
    tol = TOLERANCE[torch.float32]
    assert rel_error(o, o_ref) < tol and rel_error(state, state_ref) < tol
    for a, b in zip(ours, theirs, strict=True):
        assert rel_error(a.grad, b.grad, floor=1.0) < tol
