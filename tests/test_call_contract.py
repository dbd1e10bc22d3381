"""What a call promises beyond its values: dtypes it runs in, what autograd may ask of it."""

from __future__ import annotations

import pytest
import torch
from kernelkit import DEVICE, TOLERANCE, decay_input, module_for, rel_error

from attncc import expr as ex
from attncc.ir import AttentionSpec, Decay, X

SPECS = {
    "none": AttentionSpec("contract_none", chunk=16),
    "per_head": AttentionSpec("contract_head", decay=Decay.PER_HEAD, chunk=16),
    "per_token": AttentionSpec("contract_token", decay=Decay.PER_TOKEN, gate=ex.logsigmoid(X) / 16, chunk=16),
    "per_channel": AttentionSpec("contract_channel", decay=Decay.PER_CHANNEL, chunk=16),
    "noncausal": AttentionSpec("contract_nc", causal=False, chunk=16),
}


def _inputs(spec, B=2, T=21, H=2, H_kv=1, D=8, E=12, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H_kv, D, generator=gen)
    v = torch.randn(B, T, H_kv, E, generator=gen)
    decay = decay_input(spec, B, T, H, H_kv, D, gen)
    if decay is not None and decay.dim() > 1:
        decay = decay.to(dtype)
    inputs = [x.to(dtype) for x in (q, k, v)] + ([] if decay is None else [decay])
    return [x.to(DEVICE).requires_grad_() for x in inputs]


@pytest.mark.parametrize("kind", list(SPECS))
def test_double_backward_is_refused(kind):
    """A gradient penalty through NAME once returned second-order gradients 100 % off, without
    an error: the backward kernels are not differentiable. create_graph=True must raise, both
    when the incoming gradient has a history (o.square()) and when it does not (o.sum(): the
    case @once_differentiable lets through silently); plain gradients still work."""
    spec = SPECS[kind]
    fn = getattr(module_for(spec), spec.name)
    q, k, v, *decay = _inputs(spec, T=5)
    for loss in (lambda o: o.square().sum(), lambda o: o.sum()):
        o, _ = fn(q, k, v, *decay)
        with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
            torch.autograd.grad(loss(o), q, create_graph=True)
    (dq,) = torch.autograd.grad(fn(q, k, v, *decay)[0].sum(), q)
    assert dq.shape == q.shape and torch.isfinite(dq).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(SPECS))
def test_half_precision_matches_the_reference(kind, dtype):
    """bf16 through the CPU interpreter once gave |o| ~ 4e9 (its bf16 tl.dot); fp16 and bf16
    must both land within the bf16 bound of the float64 reference of the same rounded inputs."""
    spec = SPECS[kind]
    module = module_for(spec)
    fn, reference = getattr(module, spec.name), getattr(module, f"{spec.name}_reference")
    ours = _inputs(spec, dtype=dtype, seed=5)
    theirs = [x.detach().double().requires_grad_() for x in ours]
    initial = torch.randn(2, 2, 8, 12).to(DEVICE).requires_grad_() if spec.causal else None
    initial_ref = None if initial is None else initial.detach().double().requires_grad_()
    o, state = fn(*ours, initial_state=initial, output_final_state=True)
    o_ref, state_ref = reference(*theirs, initial_state=initial_ref, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32
    gen = torch.Generator().manual_seed(9)
    do, dstate = torch.randn(o.shape, generator=gen).to(DEVICE), torch.randn(state.shape, generator=gen).to(DEVICE)
    ((o.float() * do).sum() + (state * dstate).sum()).backward()
    ((o_ref * do.double()).sum() + (state_ref * dstate.double()).sum()).backward()
    tol = TOLERANCE[torch.bfloat16]
    assert rel_error(o, o_ref) < tol, "o"
    assert rel_error(state, state_ref) < tol, "final_state"
    for name, a, b in zip(["dq", "dk", "dv", "d_decay"], ours, theirs, strict=False):
        assert a.grad.dtype == a.dtype, f"{name} has dtype {a.grad.dtype}, input {a.dtype}"
        err = rel_error(a.grad, b.grad, floor=1.0 if name == "d_decay" else 1e-1)
        assert err < (10 * tol if name == "d_decay" else tol), f"{name}: {err:.2e}"
    if initial is not None:
        assert rel_error(initial.grad, initial_ref.grad) < tol, "d_initial_state"


@pytest.mark.parametrize("kind", ["per_head", "per_token"])
def test_half_precision_step_matches_the_reference(kind):
    spec = SPECS[kind]
    module = module_for(spec)
    step, reference = getattr(module, f"{spec.name}_step"), getattr(module, f"{spec.name}_reference")
    q, k, v, decay = (x.detach() for x in _inputs(spec, T=1, dtype=torch.bfloat16, seed=8))
    state = torch.randn(2, 2, 8, 12).to(DEVICE)
    step_decay = decay if decay.dim() == 1 else decay[:, 0]
    o_t, new_state = step(q[:, 0], k[:, 0], v[:, 0], state, step_decay)
    o_ref, state_ref = reference(*(x.double() for x in (q, k, v, decay)), initial_state=state.double(),
                                 output_final_state=True)
    assert o_t.dtype == torch.bfloat16
    assert rel_error(o_t, o_ref[:, 0]) < TOLERANCE[torch.bfloat16]
    assert rel_error(new_state, state_ref) < TOLERANCE[torch.bfloat16]


# Found by a red-team pass over the merged trust fixes.

def test_an_overflowing_product_of_a_dropped_pair_stays_out_of_earlier_tokens():
    """q_18 = 1e30 against a later k_21 = 1e10: their product overflows float32, but the
    pair (18, 21) is not causal. A product with the mask's zeros made o_18 NaN."""
    spec = AttentionSpec(name="overflow_pairs", decay=Decay.PER_TOKEN, chunk=16)
    module = module_for(spec)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 40, 1, 4, generator=gen), torch.randn(1, 40, 1, 4, generator=gen)
    v, g = torch.randn(1, 40, 1, 3, generator=gen), -torch.rand(1, 40, 1, generator=gen)
    q[0, 18] = 1e30
    k[0, 21] = 1e10
    o = module.overflow_pairs(*(x.to(DEVICE) for x in (q, k, v, g)))[0].cpu().double()
    expected = module.overflow_pairs_reference(q.double(), k.double(), v.double(), g.double())[0]
    assert torch.isfinite(o[0, :21]).all()
    assert rel_error(o[0, :21], expected[0, :21]) < TOLERANCE[torch.float32]


def test_reference_takes_no_tokens_and_empty_sequences():
    spec = AttentionSpec(name="ref_empty", decay=Decay.PER_TOKEN, chunk=16)
    module = module_for(spec)
    q, k, v = torch.randn(1, 0, 2, 4), torch.randn(1, 0, 2, 4), torch.randn(1, 0, 2, 3)
    initial = torch.randn(1, 2, 4, 3)
    o, state = module.ref_empty_reference(q, k, v, torch.zeros(1, 0, 2), initial_state=initial,
                                          output_final_state=True)
    assert o.shape == (1, 0, 2, 3) and torch.equal(state, initial)
    q, k, v, g = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 3), -torch.rand(1, 9, 2)
    cu = torch.tensor([0, 4, 4, 9])
    o, state = module.ref_empty_reference(q, k, v, g, cu_seqlens=cu, output_final_state=True)
    on_device = [x.to(DEVICE) for x in (q, k, v, g)]
    ours, our_state = module.ref_empty(*on_device, cu_seqlens=cu.to(DEVICE, torch.int32), output_final_state=True)
    assert rel_error(ours, o) < TOLERANCE[torch.float32] and torch.equal(state[1], torch.zeros(2, 4, 3))


@pytest.mark.parametrize("case", ["no kv heads", "wide", "mixed dtypes", "numpy state"])
def test_step_refuses_bad_shapes_clearly(case):
    spec = AttentionSpec(name="step_checks", decay=Decay.PER_TOKEN, chunk=16)
    step = module_for(spec).step_checks_step
    B, H, D, E = 2, 2, 4, 3
    q, k, v = torch.randn(B, H, D), torch.randn(B, H, D), torch.randn(B, H, E)
    state, g = torch.zeros(B, H, D, E), -torch.rand(B, H)
    if case == "no kv heads":
        k, v, g = k[:, :0], v[:, :0], g[:, :0]
    elif case == "wide":
        q, k, state = torch.randn(B, H, 300), torch.randn(B, H, 300), torch.zeros(B, H, 300, E)
    elif case == "mixed dtypes":
        q = q.half()
    else:
        state = state.numpy()
    with pytest.raises(ValueError):
        step(q, k, v, state, g)


@pytest.mark.parametrize("scale", [1e300, 1e-50, "0.5", True, 1j, [0.5], float("nan"),
                                   "tensor2", "tensor_grad"])
def test_a_bad_scale_is_refused(scale):
    spec = AttentionSpec(name="scale_checks", decay=Decay.NONE, chunk=16)
    fn = getattr(module_for(spec), spec.name)
    if scale == "tensor2":
        scale = torch.tensor([0.5, 0.5])
    elif scale == "tensor_grad":
        scale = torch.tensor(0.5, requires_grad=True)
    q = torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match="scale"):
        fn(q, q, q, scale=scale)


def test_wrong_types_are_named():
    spec = AttentionSpec(name="type_checks", decay=Decay.NONE, chunk=16)
    fn = getattr(module_for(spec), spec.name)
    q = torch.randn(1, 5, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="initial_state must be a torch.Tensor"):
        fn(q, q, q, initial_state=torch.zeros(1, 1, 4, 4).numpy())
    with pytest.raises(ValueError, match="output_final_state must be True or False"):
        fn(q, q, q, output_final_state="no")
    assert fn(q, q, q, scale=torch.tensor(0.5))[0].shape == (1, 5, 1, 4)


def test_overflowing_dropped_pairs_stay_out_of_the_per_channel_exact_path():
    """As above, on the per-channel sub-block path (a chunk decaying beyond e^40 takes it)."""
    spec = AttentionSpec(name="overflow_exact", decay=Decay.PER_CHANNEL, chunk=16)
    module = module_for(spec)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 32, 1, 4, generator=gen), torch.randn(1, 32, 1, 4, generator=gen)
    v, g = torch.randn(1, 32, 1, 3, generator=gen), -torch.rand(1, 32, 1, 4, generator=gen)
    g[0, 0:16, 0, 0] = -5.0  # the first chunk decays channel 0 by e^-80: the exact path
    q[0, 4] = 1e30
    k[0, 6] = 1e10
    args = [x.to(DEVICE).requires_grad_() for x in (q, k, v, g)]
    o = module.overflow_exact(*args)[0]
    expected = module.overflow_exact_reference(*(x.double() for x in (q, k, v, g)))[0]
    assert torch.isfinite(o[0, :6]).all()
    assert rel_error(o[0, :6].cpu(), expected[0, :6]) < TOLERANCE[torch.float32]
    o[0, :6].sum().backward()  # a loss on tokens before 6: dv of token 6 onwards is 0
    assert torch.equal(args[2].grad[0, 6:].cpu(), torch.zeros(26, 1, 3))


def test_cpu_tensors_on_a_machine_with_a_gpu_are_refused_clearly(monkeypatch):
    """Where a GPU is present the kernels are compiled for CUDA: CPU inputs get a clear
    ValueError before any launch, not Triton's "cannot be accessed from Triton"."""
    spec = AttentionSpec(name="cpu_on_gpu", decay=Decay.PER_TOKEN, chunk=16)
    module = module_for(spec)
    monkeypatch.setattr(module, "_INTERPRETED", False)  # as on a machine with a GPU
    q, k, v, g = torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 3), -torch.rand(1, 5, 1)
    with pytest.raises(ValueError, match="move them to a CUDA device"):
        module.cpu_on_gpu(q, k, v, g)
    with pytest.raises(ValueError, match="move them to a CUDA device"):
        module.cpu_on_gpu_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(1, 1, 4, 3), g[:, 0])
