"""The delta rule's generated kernels (forward, backward, decoding step, sequence-parallel
pieces) against float64: the generated reference, and attncc.delta_reference's own
recurrence (checked itself against a naive loop in test_delta_reference.py).

Shapes stay tiny: without a GPU the kernels run through Triton's interpreter."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attncc.delta_reference import delta_recurrent
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
from tests.kernelkit import DEVICE, TOLERANCE, module_for, rel_error
from tests.specs_strategy import delta_specs

L2 = RowMap(RowMapKind.L2NORM)
DECAYS = list(Decay)


def delta_spec(decay: Decay, *, name: str = "delta", chunk: int = 16, gate=None, beta=None, q_map=L2, k_map=L2,
               scale=None) -> AttentionSpec:
    return AttentionSpec(name=name, q_map=q_map, k_map=k_map, decay=decay, gate=gate, chunk=chunk,
                         update=UpdateRule.DELTA, beta=beta, scale=scale)


def inputs(spec, B, T, H, H_kv, D, E, gen, dtype=torch.float32, strong=False):
    """Fresh inputs: q, k, v, [decay], beta. β in (0, 1) (or its logit with a sigmoid
    transform) — over ‖φk(k)‖² where the key map is not l2norm, so that β‖φk(k)‖² < 2
    keeps the recurrence bounded; log decays in (-1, 0), or with strong=True a third of
    them at -30."""
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H_kv, D, generator=gen)
    v = torch.randn(B, T, H_kv, E, generator=gen)
    beta = torch.rand(B, T, H_kv, generator=gen)
    if spec.k_map != L2:
        features = getattr(module_for(spec), f"_{spec.name}_k_map_reference")(k.double())
        beta = (beta / (features * features).sum(-1).clamp_min(1.0)).float()
    if spec.beta is not None:
        beta = torch.logit(beta.clamp(1e-4, 0.95))
    extra = []
    if spec.decay is Decay.PER_HEAD:
        extra = [torch.rand(H, generator=gen) * 0.5 + 0.01]
    elif spec.decay.data_dependent:
        shape = (B, T, H_kv, D) if spec.decay is Decay.PER_CHANNEL else (B, T, H_kv)
        g = -torch.rand(shape, generator=gen)
        if strong:  # True: log decays of -30; "reset": -inf, a decay of exactly 0
            value = float("-inf") if strong == "reset" else -30.0
            g = torch.where(torch.rand(shape, generator=gen) < 0.35, torch.full_like(g, value), g)
        if spec.gate is not None:  # the gate below is logsigmoid: feed its inverse
            g = g - torch.log(-torch.expm1(g.clamp(max=-1e-4)))
        extra = [g]
    return [x.to(dtype).to(DEVICE) for x in (q, k, v, *extra, beta)]


def check_against_reference(spec, B, T, H, H_kv, D, E, *, seed=0, cu_seqlens=None, with_state=True,
                            dtype=torch.float32, strong=False):
    """o, the final state and every gradient of `spec`'s kernels against its float64 reference."""
    module = module_for(spec)
    gen = torch.Generator().manual_seed(seed)
    args = inputs(spec, B, T, H, H_kv, D, E, gen, dtype, strong)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    state = torch.randn(N, H, D, E, generator=gen).to(DEVICE) if with_state else None
    leaves = args + ([state] if with_state else [])
    for x in leaves:
        x.requires_grad_(True)
    fn, reference = getattr(module, spec.name), getattr(module, spec.name + "_reference")
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    o, final = fn(*args, initial_state=state, output_final_state=True, cu_seqlens=cu)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref_state = ref_leaves[-1] if with_state else None
    o_ref, final_ref = reference(*ref_leaves[: len(args)], initial_state=ref_state, output_final_state=True,
                                 cu_seqlens=cu)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum() + (final * dfinal).sum(), leaves)
    ref_grads = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * dfinal.double()).sum(), ref_leaves)
    bound = TOLERANCE[dtype]
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert rel_error(o, o_ref) < bound, ("o", rel_error(o, o_ref))
    assert rel_error(final, final_ref) < bound, ("final state", rel_error(final, final_ref))
    names = ["q", "k", "v", *(["decay"] if len(args) == 5 else []), "beta", *(["initial_state"] if with_state else [])]
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, leaves, strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert rel_error(grad, ref_grad) < bound, (name, rel_error(grad, ref_grad))
    return o_ref, final_ref, ref_leaves


@pytest.mark.parametrize("decay", DECAYS, ids=lambda d: d.value)
def test_kernels_match_the_reference(decay):
    # Grouped heads (H = 2 query heads per key/value head), D != E, full chunks of 16 and a
    # partial last one, an initial state, every gradient. (Per channel fewer tokens: its
    # pair terms loop over the chunk's columns, slow in the interpreter.)
    B, T = (1, 20) if decay is Decay.PER_CHANNEL else (2, 37)
    check_against_reference(delta_spec(decay), B=B, T=T, H=2, H_kv=1, D=16, E=24)


@pytest.mark.parametrize("decay", DECAYS, ids=lambda d: d.value)
def test_reference_is_the_recurrence(decay):
    """The generated reference against attncc.delta_reference.delta_recurrent (feature maps applied
    by hand, grouped heads expanded), so that the kernels' target is the delta rule itself."""
    spec = delta_spec(decay, q_map=IdentityMap(), k_map=IdentityMap())
    module = module_for(spec)
    gen = torch.Generator().manual_seed(1)
    args = [x.double().cpu() for x in inputs(spec, 2, 9, 2, 1, 5, 3, gen)]
    state = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64)
    o, final = getattr(module, spec.name + "_reference")(*args, initial_state=state, output_final_state=True)
    q, k, v, *extra, beta = args
    expand = lambda x: x.repeat_interleave(2, dim=2)  # noqa: E731
    decay_arg = None if not extra else (extra[0] if decay is Decay.PER_HEAD else expand(extra[0]))
    o_ref, final_ref = delta_recurrent(q, expand(k), expand(v), expand(beta), decay.value, decay_arg,
                                       initial_state=state)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)


def test_packed_sequences_with_an_empty_one():
    cu_seqlens = torch.tensor([0, 5, 5, 23, 40], dtype=torch.int32)
    check_against_reference(delta_spec(Decay.PER_TOKEN), B=1, T=40, H=2, H_kv=2, D=16, E=16, cu_seqlens=cu_seqlens)


def test_transforms_gate_and_beta_and_maps():
    logsigmoid = -sympy.log(1 + sympy.exp(-X))
    spec = delta_spec(Decay.PER_TOKEN, name="gated", gate=logsigmoid, beta=1 / (1 + sympy.exp(-X)),
                      q_map=ElementwiseMap(X * X / 4), k_map=L2, chunk=32)
    check_against_reference(spec, B=1, T=40, H=1, H_kv=1, D=16, E=16, with_state=False)


@pytest.mark.parametrize("decay", [Decay.PER_TOKEN, Decay.PER_CHANNEL], ids=lambda d: d.value)
def test_strong_decays_stay_accurate(decay):
    # A third of the log decays at -30: the pair factors underflow, nothing overflows, and the
    # exponents summed from their own tokens keep fp32 accuracy.
    check_against_reference(delta_spec(decay), B=1, T=33, H=1, H_kv=1, D=16, E=16, strong=True, seed=3)


@pytest.mark.parametrize("decay", [Decay.PER_TOKEN, Decay.PER_CHANNEL], ids=lambda d: d.value)
def test_a_zero_decay_resets_the_state(decay):
    # Log decays of -inf (raised to the floor, -100: the state is wiped) among ordinary ones:
    # outputs, states and gradients finite and equal to the float64 reference's; the outputs
    # also equal the IEEE recurrence, where exp(-inf) = 0 exactly.
    spec = delta_spec(decay, q_map=IdentityMap(), k_map=L2)
    o_ref, _, ref_leaves = check_against_reference(spec, B=1, T=33, H=1, H_kv=1, D=16, E=16, strong="reset",
                                                   seed=8, with_state=False)
    q, k, v, g, beta = (x.detach().cpu() for x in ref_leaves)
    l2 = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    o_hand, _ = ieee_recurrence(q, l2, v, beta, g, 1 / 4)
    assert torch.isfinite(o_ref).all() and rel_error(o_ref.cpu(), o_hand) < 1e-10


def test_head_dims_of_256():
    check_against_reference(delta_spec(Decay.PER_TOKEN), B=1, T=17, H=1, H_kv=1, D=256, E=256, with_state=True)


def test_fp16_inputs():
    check_against_reference(delta_spec(Decay.PER_CHANNEL), B=1, T=17, H=2, H_kv=1, D=16, E=16, dtype=torch.float16)


def test_bf16_inputs():
    check_against_reference(delta_spec(Decay.PER_HEAD), B=1, T=20, H=2, H_kv=1, D=16, E=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("decay", DECAYS, ids=lambda d: d.value)
def test_decoding_steps_continue_the_sequence(decay):
    """NAME over a prompt, then NAME_step token by token, equals NAME over the whole sequence."""
    spec = delta_spec(decay)
    module = module_for(spec)
    gen = torch.Generator().manual_seed(4)
    B, T, H, H_kv, D, E, prompt = 2, 20, 2, 1, 16, 20, 17
    q, k, v, *extra, beta = inputs(spec, B, T, H, H_kv, D, E, gen)
    fn, step = getattr(module, spec.name), getattr(module, spec.name + "_step")
    o_all, final_all = fn(q, k, v, *extra, beta, output_final_state=True)
    token_decay = lambda t: [] if not extra else ([extra[0]] if decay is Decay.PER_HEAD else [extra[0][:, t]])  # noqa: E731
    _, state = fn(q[:, :prompt], k[:, :prompt], v[:, :prompt], *[x[:, :prompt] for x in extra if x.dim() > 1],
                  *[x for x in extra if x.dim() == 1], beta[:, :prompt], output_final_state=True)
    for t in range(prompt, T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, *token_decay(t), beta[:, t])
        torch.testing.assert_close(o_t, o_all[:, t], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(state, final_all, rtol=2e-5, atol=2e-5)


def test_no_tokens_and_missing_beta():
    spec = delta_spec(Decay.PER_TOKEN)
    module = module_for(spec)
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta = inputs(spec, 2, 0, 2, 2, 16, 16, gen)
    state = torch.randn(2, 2, 16, 16, generator=gen).to(DEVICE)
    o, final = module.delta(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(final, state)
    with pytest.raises(ValueError, match="needs beta"):
        module.delta(q, k, v, g)
    with pytest.raises(ValueError, match="beta must have shape"):
        module.delta(q, k, v, g, beta[:, :, :1])


def ieee_recurrence(q, k, v, beta, g, scale):
    """The delta rule token by token in float64 IEEE arithmetic, written here (feature maps
    applied by the caller; one head per key/value head): NaN and inf propagate as they do."""
    B, T, H, D = q.shape
    state = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64)
    outputs = []
    for t in range(T):
        if g is not None:
            state = state * (g[:, t].exp()[..., None] if g.dim() == 4 else g[:, t].exp()[..., None, None])
        correction = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhd,bhde->bhe", k[:, t], state))
        state = state + k[:, t, :, :, None] * correction[..., None, :]
        outputs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], state))
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("decay", [Decay.PER_TOKEN, Decay.PER_CHANNEL], ids=lambda d: d.value)
@pytest.mark.parametrize("where, value, token", [("k", float("nan"), 21), ("v", float("inf"), 17),
                                                 ("beta", float("nan"), 30), ("v", float("nan"), 0)])
def test_a_nonfinite_input_reaches_later_tokens_only(decay, where, value, token):
    """A NaN or inf in token t's key, value or β leaves every earlier output (and the other
    sequence) exact, and the outputs it reaches non-finite in the same places as the IEEE
    recurrence: all value columns for a key or β, its own column for a value."""
    spec = delta_spec(decay, q_map=IdentityMap(), k_map=IdentityMap(), scale=sympy.Rational(1, 2))
    module = module_for(spec)
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, beta = (x.double().cpu() for x in inputs(spec, 2, 33, 1, 1, 16, 16, gen))
    k, v = k / 4, v  # keys of norm ~1: β‖k‖² <= 2, a bounded recurrence
    target = {"k": k, "v": v, "beta": beta}[where]
    if where == "beta":
        target[1, token, 0] = value
    else:
        target[1, token, 0, 3] = value
    o_hand, _ = ieee_recurrence(q, k, v, beta, g, 0.5)
    o, _ = module.delta(*(x.float().to(DEVICE) for x in (q, k, v, g, beta)), output_final_state=True)
    o = o.double().cpu()
    assert torch.isfinite(o[0]).all() and torch.isfinite(o[1, :token]).all(), "reached earlier tokens"
    finite = torch.isfinite(o_hand)
    assert (torch.isfinite(o) == finite).all(), "non-finite in other places than the recurrence"
    assert rel_error(o[finite], o_hand[finite]) < 2e-5


# A few examples per run (the ci profile: 4; explore: 12; gpu: 30): each renders and runs a module.
@settings(max_examples=max(4, settings.default.max_examples // 5), deadline=None)
@given(spec=delta_specs(), seed=st.integers(0, 2**16), T=st.sampled_from([1, 7, 17, 33]),
       heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]), dims=st.sampled_from([(16, 16), (20, 33), (32, 24)]),
       with_state=st.booleans(), varlen=st.booleans())
def test_random_delta_spec_matches_reference(spec, seed, T, heads, dims, with_state, varlen):
    if spec.decay is Decay.PER_CHANNEL:  # slow in the interpreter: keep it short
        T = min(T, 17)
    cu_seqlens = torch.tensor([0, T // 3, T], dtype=torch.int32) if varlen else None
    check_against_reference(spec, B=1 if varlen else 2, T=T, H=heads[0], H_kv=heads[1], D=dims[0], E=dims[1],
                            seed=seed, cu_seqlens=cu_seqlens, with_state=with_state)
