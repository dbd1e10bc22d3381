"""The delta rule's call contract off the happy path, as the additive family guarantees it
(test_layouts, test_edge_shapes, test_call_contract, test_torch_library): any memory layout
of any argument, empty batches and sequences, odd and unequal head dims, grouped heads,
bad calls refused with ValueError before a launch, first-order gradients only, torch.compile
and torch.library.opcheck, meta tensors, no host reads when traced, bf16 on the CPU.

Shapes stay tiny: the kernels run through Triton's interpreter (the per-channel decay's
backward is the slowest there, so it appears only where the brief needs it)."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch._dynamo.testing

from attncc.ir import AttentionSpec, Decay, RowMap, RowMapKind, UpdateRule, X
from tests.kernelkit import DEVICE, TOLERANCE, assert_compiled_matches_eager, module_for, rel_error
from tests.test_delta_kernels import check_against_reference

L2 = RowMap(RowMapKind.L2NORM)


def spec_of(decay: Decay, *, name: str | None = None, beta=None, chunk: int = 16) -> AttentionSpec:
    return AttentionSpec(name=name or f"dc_{decay.value}", decay=decay, update=UpdateRule.DELTA, beta=beta,
                         q_map=L2, k_map=L2, chunk=chunk)


SPECS = {decay.value: spec_of(decay) for decay in Decay}


def functions(kind: str):
    """(NAME, NAME_step, NAME_reference, module) of SPECS[kind]."""
    spec = SPECS[kind]
    module = module_for(spec)
    module.TUNED_CONFIGS.clear()
    return (getattr(module, spec.name), getattr(module, spec.name + "_step"),
            getattr(module, spec.name + "_reference"), module)


def decay_values(kind: str, shape: tuple[int, ...], gen) -> torch.Tensor:
    """Decay input values of `shape`: per-head slopes in (0.01, 0.51), log decays in (-1, 0)."""
    if kind == "per_head":
        return torch.rand(shape, generator=gen) * 0.5 + 0.01
    return -torch.rand(shape, generator=gen)


def decay_shape(kind: str, B: int, T: int, H: int, H_kv: int, D: int) -> tuple[int, ...] | None:
    return {"none": None, "per_head": (H,), "per_token": (B, T, H_kv), "per_channel": (B, T, H_kv, D)}[kind]


def call_inputs(kind: str, B: int, T: int, H: int, H_kv: int, D: int, E: int, *, seed: int = 0,
                dtype=torch.float32):
    """Fresh leaves needing gradients: [q, k, v, (decay), beta], β in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=gen).to(dtype)
    v = torch.randn(B, T, H_kv, E, generator=gen).to(dtype)
    shape = decay_shape(kind, B, T, H, H_kv, D)
    extra = [] if shape is None else [decay_values(kind, shape, gen)]
    beta = torch.rand(B, T, H_kv, generator=gen)
    return [x.to(DEVICE).requires_grad_() for x in (q, k, v, *extra, beta)]


def assert_same(name: str, actual, expected) -> None:
    """Same shape, dtype and values (the same kernels on the same values: a tiny tolerance
    guards only against reordered sums)."""
    assert (actual is None) == (expected is None), f"{name}: one call returned None"
    if actual is None:
        return
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Memory layouts

LAYOUTS = ["cache_slice", "step_slice", "transposed", "expanded", "offset"]


def laid_out(values: torch.Tensor, layout: str, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view): a view holding `values` (or, for "expanded", `values` narrowed to size 1 in
    `axis` and broadcast back) in `layout`, made by differentiable ops from the leaf."""
    dims = values.dim()
    axis %= dims
    if layout == "expanded":
        if values.shape[axis] == 1:  # nothing to broadcast along this axis: take the widest
            axis = max(range(dims), key=lambda a: values.shape[a])
        leaf = values.narrow(axis, 0, 1).clone().requires_grad_()
        return leaf, leaf.expand(values.shape)
    leaf = values.clone().requires_grad_()
    if layout == "cache_slice":  # cache[:, i] of a cache with junk on either side
        junk = torch.full_like(leaf, 7.0)
        return leaf, torch.stack([junk, leaf, junk], dim=axis).select(axis, 1)
    if layout == "step_slice":  # x[..., ::2] of a tensor twice as wide in one dimension
        wide = torch.stack([leaf, torch.full_like(leaf, -5.0)], dim=axis + 1).flatten(axis, axis + 1)
        index = [slice(None)] * dims
        index[axis] = slice(0, None, 2)
        return leaf, wide[tuple(index)]
    if layout == "transposed":  # stored in a rotated dimension order, viewed in the expected one
        perm = [(axis + i) % dims for i in range(dims)][::-1]
        inverse = [perm.index(a) for a in range(dims)]
        return leaf, leaf.permute(perm).contiguous().permute(inverse)
    assert layout == "offset"  # contiguous strides, not at the start of its storage
    flat = torch.cat([torch.full((3,), 9.0, dtype=leaf.dtype, device=leaf.device), leaf.reshape(-1)])
    return leaf, flat[3:].view(leaf.shape)


def packed_bounds(layout: str, bounds: list[int]) -> torch.Tensor:
    """cu_seqlens in a layout of its own: int64, strided, or offset into a bigger buffer."""
    cu = torch.tensor(bounds, dtype=torch.int64 if layout == "int64" else torch.int32, device=DEVICE)
    if layout == "step_slice":
        return torch.stack([cu, torch.full_like(cu, -1)], dim=1).flatten()[::2]
    if layout == "offset":
        return torch.cat([torch.full_like(cu[:2], 99), cu])[2:]
    return cu


# Which (kind, rotation) cases run: rotation r gives argument j the layout LAYOUTS[(r + j) % 5]
# and the axis r + j, so the five per-token rotations cover every (argument, layout) pair.
# (The per-channel decay input goes through the per-token one's host code, and its backward
# is slow in the interpreter: it is left out here.)
LAYOUT_CASES = [("per_token", r) for r in range(5)] + [("per_head", 0), ("per_head", 3), ("none", 1)]


@pytest.mark.parametrize("kind, rotation", LAYOUT_CASES, ids=str)
def test_every_argument_layout_matches_the_contiguous_call(kind, rotation):
    fn, _, _, _ = functions(kind)
    packed = rotation % 2 == 1
    B, H, H_kv, D, E = (1 if packed else 2), 2, 1, 5, 3
    # One chunk suffices: what a layout could break is on the host side, before the kernels.
    T = 9
    bounds = [0, 2, 2, T]
    num_seqs = 3 if packed else B
    gen = torch.Generator().manual_seed(rotation)
    values = [x.detach() for x in call_inputs(kind, B, T, H, H_kv, D, E, seed=rotation)]
    values.append(torch.randn(num_seqs, H, D, E, generator=gen).to(DEVICE))  # initial_state
    leaves, views = [], []
    for j, x in enumerate(values):
        leaf, view = laid_out(x, LAYOUTS[(rotation + j) % len(LAYOUTS)], rotation + j)
        leaves.append(leaf)
        views.append(view)
    assert any(not v.is_contiguous() for v in views)
    cu = packed_bounds(["int64", "step_slice", "offset"][rotation % 3], bounds) if packed else None

    *args, initial = views
    o, final = fn(*args, initial_state=initial, output_final_state=True, cu_seqlens=cu)
    do, dfinal = torch.randn(o.shape, generator=gen).to(DEVICE), torch.randn(final.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), views)

    plain = [v.detach().contiguous().requires_grad_() for v in views]
    plain_cu = None if cu is None else torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    o_ref, final_ref = fn(*plain[:-1], initial_state=plain[-1], output_final_state=True, cu_seqlens=plain_cu)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (final_ref * dfinal).sum(), plain)

    assert_same("o", o, o_ref)
    assert_same("final_state", final, final_ref)
    assert o.is_contiguous() and final.is_contiguous()
    names = ["q", "k", "v", *(["decay"] if kind != "none" else []), "beta", "initial_state"]
    for name, view, grad, grad_ref in zip(names, views, grads, grads_ref, strict=True):
        assert grad.shape == view.shape, f"d{name} has shape {list(grad.shape)}, input {list(view.shape)}"
        assert_same(f"d{name}", grad, grad_ref)


def step_values(kind: str, B: int, H: int, H_kv: int, D: int, E: int, seed: int, dtype=torch.float32):
    """[q_t, k_t, v_t, state, (decay of the token), beta_t] in NAME_step's argument order."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k = torch.randn(B, H_kv, D, generator=gen).to(dtype)
    v = torch.randn(B, H_kv, E, generator=gen).to(dtype)
    state = torch.randn(B, H, D, E, generator=gen)
    shape = {"none": None, "per_head": (H,), "per_token": (B, H_kv), "per_channel": (B, H_kv, D)}[kind]
    extra = [] if shape is None else [decay_values(kind, shape, gen)]
    beta = torch.rand(B, H_kv, generator=gen)
    return [x.to(DEVICE) for x in (q, k, v, state, *extra, beta)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", list(SPECS))
def test_step_argument_layouts_match_the_contiguous_step(kind, layout):
    """Every step argument (the state included) in `layout`, axes varying per argument: the
    same o_t and new state as the dense step, and the new state comes back contiguous."""
    _, step, _, _ = functions(kind)
    values = step_values(kind, 3, 4, 2, 5, 3, seed=LAYOUTS.index(layout))
    views = [laid_out(x, layout, j)[1].detach() for j, x in enumerate(values)]
    assert not views[3].is_contiguous() or views[3].storage_offset() > 0
    o_t, new_state = step(*views)
    o_ref, new_state_ref = step(*(x.contiguous() for x in views))
    assert_same("o_t", o_t, o_ref)
    assert_same("new state", new_state, new_state_ref)
    assert new_state.is_contiguous(), f"new state has strides {new_state.stride()}"


def test_step_with_a_transposed_state_against_the_reference():
    """A state stored [B, E, D, H]-major, viewed as [B, H, D, E]: the step continues the
    float64 reference from that state, and its new state is dense."""
    _, step, reference, _ = functions("per_token")
    q, k, v, state, g, beta = step_values("per_token", 2, 2, 1, 5, 3, seed=11)
    transposed = state.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    o_t, new_state = step(q, k, v, transposed, g, beta)
    o_ref, state_ref = reference(*(x[:, None].double() for x in (q, k, v, g, beta)), initial_state=state.double(),
                                 output_final_state=True)
    assert new_state.is_contiguous() and new_state.dtype == torch.float32
    assert rel_error(o_t, o_ref[:, 0]) < TOLERANCE[torch.float32]
    assert rel_error(new_state, state_ref) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------
# Edge shapes

@pytest.mark.parametrize("with_initial", [False, True], ids=["zeros", "initial"])
@pytest.mark.parametrize("B, T", [(0, 7), (3, 0), (0, 0)])
@pytest.mark.parametrize("kind", ["none", "per_head", "per_token", "per_channel"])
def test_no_tokens(kind, B, T, with_initial):
    """No tokens: no output values, the final state is the initial one (or zeros), every
    gradient is zero but dL/d(initial state) = dL/d(final state)."""
    fn, _, _, _ = functions(kind)
    H, H_kv, D, E = 4, 2, 5, 3
    inputs = call_inputs(kind, B, T, H, H_kv, D, E)
    initial = torch.randn(B, H, D, E).to(DEVICE).requires_grad_() if with_initial else None
    o, state = fn(*inputs, initial_state=initial, output_final_state=True)
    assert o.shape == (B, T, H, E) and o.dtype == torch.float32
    assert state.shape == (B, H, D, E) and state.dtype == torch.float32
    assert torch.equal(state.detach(), initial.detach() if with_initial else torch.zeros_like(state))
    assert fn(*inputs)[1] is None
    dstate = torch.randn(state.shape).to(DEVICE)
    leaves = inputs + ([initial] if with_initial else [])
    grads = torch.autograd.grad(o.sum() + (state * dstate).sum(), leaves)
    for x, grad in zip(leaves, grads, strict=True):
        assert grad.shape == x.shape and grad.dtype == x.dtype
    for grad in grads[: len(inputs)]:
        assert torch.equal(grad, torch.zeros_like(grad))
    if with_initial:
        assert torch.equal(grads[-1], dstate)


@pytest.mark.parametrize("kind", ["none", "per_head", "per_channel"])
def test_step_with_an_empty_batch(kind):
    _, step, _, _ = functions(kind)
    values = step_values(kind, 0, 4, 2, 5, 3, seed=0)
    o_t, new_state = step(*values)
    assert o_t.shape == (0, 4, 3) and o_t.dtype == torch.float32
    assert new_state.shape == (0, 4, 5, 3) and new_state.dtype == torch.float32


@pytest.mark.parametrize("bounds", [[0, 0, 5, 5, 12, 12], [0, 0], [0, 0, 0]], ids=str)
def test_empty_sequences_in_cu_seqlens(bounds):
    """Empty sequences anywhere (and a batch of nothing but empty ones): every output,
    final state and gradient against the float64 reference, and each empty sequence hands
    its initial state on unchanged, so dL/d(its initial state) = dL/d(its final state)."""
    fn, _, reference, _ = functions("per_token")
    T, H, H_kv, D, E = bounds[-1], 2, 1, 5, 3
    num_seqs = len(bounds) - 1
    gen = torch.Generator().manual_seed(len(bounds))
    leaves = call_inputs("per_token", 1, T, H, H_kv, D, E, seed=1)
    initial = torch.randn(num_seqs, H, D, E, generator=gen).to(DEVICE).requires_grad_()
    leaves.append(initial)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    o, final = fn(*leaves[:-1], initial_state=initial, output_final_state=True, cu_seqlens=cu)
    theirs = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, final_ref = reference(*theirs[:-1], initial_state=theirs[-1], output_final_state=True, cu_seqlens=cu)
    do, dfinal = torch.randn(o.shape, generator=gen).to(DEVICE), torch.randn(final.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), leaves)
    # (With no tokens at all the reference never touches q, k, v, g, beta: zero gradients.)
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * dfinal.double()).sum(), theirs,
                                    allow_unused=True, materialize_grads=True)
    bound = TOLERANCE[torch.float32]
    assert o.shape == (1, T, H, E) and final.shape == (num_seqs, H, D, E)
    if T:
        assert rel_error(o, o_ref) < bound
    assert rel_error(final, final_ref) < bound
    for name, grad, grad_ref in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref, strict=True):
        assert grad.shape == grad_ref.shape, name
        assert grad.numel() == 0 or rel_error(grad, grad_ref) < bound, name
    empty = [i for i in range(num_seqs) if bounds[i + 1] == bounds[i]]
    assert torch.equal(final.detach()[empty], initial.detach()[empty])
    assert torch.equal(grads[-1][empty], dfinal[empty])


def test_empty_sequences_without_an_initial_state_end_in_zeros():
    fn, _, _, _ = functions("per_head")
    q, k, v, slope, beta = call_inputs("per_head", 1, 9, 2, 1, 5, 3)
    cu = torch.tensor([0, 0, 9, 9], dtype=torch.int32, device=DEVICE)
    _, final = fn(q, k, v, slope, beta, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(final[[0, 2]], torch.zeros(2, 2, 5, 3, device=final.device))
    assert final[1].abs().sum() > 0


# (kind, B, T, H, H_kv, D, E): odd dims, D != E, D past a power of two, grouped heads, a
# single token, per-head slopes with grouped heads.
SHAPES = [
    ("none", 2, 1, 4, 2, 5, 3),
    ("per_head", 1, 1, 4, 2, 33, 17),
    ("per_token", 2, 19, 2, 2, 5, 3),
    ("per_token", 1, 21, 4, 2, 33, 17),
    ("per_head", 1, 20, 4, 2, 5, 3),
    ("none", 1, 18, 2, 1, 17, 33),
]


@pytest.mark.parametrize("kind, B, T, H, H_kv, D, E", SHAPES, ids=str)
def test_odd_shapes_match_the_reference(kind, B, T, H, H_kv, D, E):
    check_against_reference(SPECS[kind], B=B, T=T, H=H, H_kv=H_kv, D=D, E=E, seed=T + D)


def test_per_head_slope_with_grouped_heads_is_per_query_head():
    """Two query heads sharing one key/value head but with different slopes give different
    outputs, each the reference's; the slope's gradient is per query head (not summed)."""
    fn, _, reference, _ = functions("per_head")
    q, k, v, _, beta = call_inputs("per_head", 1, 17, 2, 1, 5, 3, seed=3)
    q = q.detach()[:, :, :1].expand(1, 17, 2, 5).contiguous().requires_grad_()  # one query for both heads
    slope = torch.tensor([0.02, 0.9], device=DEVICE, requires_grad=True)
    o, _ = fn(q, k, v, slope, beta)
    assert (o[:, :, 0] - o[:, :, 1]).abs().max() > 1e-3
    o_ref, _ = reference(q.double(), k.double(), v.double(), slope.double(), beta.double())
    assert rel_error(o, o_ref) < TOLERANCE[torch.float32]
    (dslope,) = torch.autograd.grad(o[:, :, 1].sum(), slope)
    slope_ref = slope.detach().double().requires_grad_()
    o_ref, _ = reference(q.double(), k.double(), v.double(), slope_ref, beta.double())
    (dslope_ref,) = torch.autograd.grad(o_ref[:, :, 1].sum(), slope_ref)
    assert dslope[0] == 0 and rel_error(dslope, dslope_ref) < TOLERANCE[torch.float32]


def test_zero_padding_rows_and_inputs_left_unwritten():
    """Zero rows (padding tokens: q, k and v all zero, so the L2 norms see 0 / sqrt(eps)) give
    finite outputs and gradients equal to the float64 reference's; and neither a call, its
    backward nor a decoding step writes into any input (the step's state included)."""
    fn, step, reference, _ = functions("per_token")
    leaves = call_inputs("per_token", 1, 9, 2, 1, 5, 3, seed=8)
    with torch.no_grad():
        leaves[0][0, 3] = 0
        leaves[1][0, 5] = 0
        leaves[2][0, 5] = 0
    initial = torch.randn(1, 2, 5, 3).to(DEVICE).requires_grad_()
    before = [x.detach().clone() for x in (*leaves, initial)]
    o, final = fn(*leaves, initial_state=initial, output_final_state=True)
    grads = torch.autograd.grad(o.sum() + final.square().sum(), [*leaves, initial])
    theirs = [x.detach().double().requires_grad_() for x in (*leaves, initial)]
    o_ref, final_ref = reference(*theirs[:-1], initial_state=theirs[-1], output_final_state=True)
    grads_ref = torch.autograd.grad(o_ref.sum() + final_ref.square().sum(), theirs)
    bound = TOLERANCE[torch.float32]
    assert rel_error(o, o_ref) < bound and rel_error(final, final_ref) < bound
    for name, grad, grad_ref in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref, strict=True):
        assert rel_error(grad, grad_ref) < bound, name
    for x, saved in zip((*leaves, initial), before, strict=True):
        assert torch.equal(x.detach(), saved)
    state = final.detach()
    state_before = state.clone()
    step_args = [x.detach()[:, 5] for x in leaves]
    _, new_state = step(*step_args[:3], state, *step_args[3:])
    assert torch.equal(state, state_before) and new_state.data_ptr() != state.data_ptr()


# ---------------------------------------------------------------------------------------------
# Bad calls

def _bad_call_cases():
    """(name, kind, function to call, match): every one a user mistake NAME or NAME_step must
    refuse with ValueError naming the argument."""
    B, T, H, H_kv, D, E = 1, 5, 4, 2, 5, 3

    def call(kind, change):
        def run(fn, step):
            args = [x.detach() for x in call_inputs(kind, B, T, H, H_kv, D, E)]
            kwargs = {}
            change(args, kwargs)
            return fn(*args, **kwargs)
        return run

    def step_call(kind, change):
        def run(fn, step):
            args = step_values(kind, B, H, H_kv, D, E, seed=0)
            kwargs = {}
            change(args, kwargs)
            return step(*args, **kwargs)
        return run

    def set_beta(value):
        def change(args, kwargs):
            args[-1] = value(args[-1])
        return change

    cases = [
        ("beta per query head", "per_token", call("per_token", set_beta(lambda b: b.repeat_interleave(2, 2))),
         "beta must have shape"),
        ("beta with a trailing dim", "none", call("none", set_beta(lambda b: b[..., None])), "beta must have shape"),
        ("beta of too few tokens", "per_head", call("per_head", set_beta(lambda b: b[:, :-1])),
         "beta must have shape"),
        ("beta int", "per_token", call("per_token", set_beta(lambda b: (b * 10).to(torch.int32))), "beta has dtype"),
        ("beta bool", "none", call("none", set_beta(lambda b: b > 0.5)), "beta has dtype"),
        ("beta float64", "per_token", call("per_token", set_beta(lambda b: b.double())), "beta has dtype"),
        ("beta a float", "none", call("none", set_beta(lambda b: 0.5)), "beta must be a torch.Tensor"),
        ("beta on meta", "per_token", call("per_token", set_beta(lambda b: b.to("meta"))), "beta is on meta"),
        ("beta missing", "per_token", call("per_token", lambda a, kw: a.pop()), "needs beta"),
        ("beta missing (no decay)", "none", call("none", lambda a, kw: a.pop()), "needs beta"),
        ("decay missing, beta by keyword", "per_head",
         call("per_head", lambda a, kw: kw.update(beta=a.pop()) or a.pop()), "needs slope"),
        ("extra positional", "per_token", call("per_token", lambda a, kw: a.append(a[-1])), "positional"),
        ("initial_state as a positional", "none",
         call("none", lambda a, kw: a.append(torch.zeros(B, H, D, E, device=DEVICE))), "positional"),
        ("g per query head", "per_token", call("per_token", lambda a, kw: a.__setitem__(3, a[3].repeat(1, 1, 2))),
         "g must have shape"),
        ("initial_state transposed shape", "none",
         call("none", lambda a, kw: kw.update(initial_state=torch.zeros(B, H, E, D, device=DEVICE))), "initial_state must have"),
        ("initial_state bf16", "none",
         call("none", lambda a, kw: kw.update(initial_state=torch.zeros(B, H, D, E, dtype=torch.bfloat16, device=DEVICE))),
         "initial_state has dtype"),
        ("cu_seqlens with B = 2", "per_token",
         call("per_token", lambda a, kw: kw.update(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)) or a.__setitem__(
             slice(None), [torch.cat([x, x]) for x in a])), "B = 1"),
        ("scale NaN", "per_token", call("per_token", lambda a, kw: kw.update(scale=float("nan"))), "scale"),
        ("output_final_state a string", "none", call("none", lambda a, kw: kw.update(output_final_state="yes")),
         "output_final_state must be True or False"),
        ("cu_seqlens decreasing", "per_head",
         call("per_head", lambda a, kw: kw.update(cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32, device=DEVICE))),
         "non-decreasing"),
        ("step beta per query head", "per_token", step_call("per_token", set_beta(lambda b: b.repeat(1, 2))),
         "beta must have shape"),
        ("step beta [B, 1, H_kv]", "none", step_call("none", set_beta(lambda b: b[:, None])), "beta must have shape"),
        ("step beta int", "per_head", step_call("per_head", set_beta(lambda b: b.to(torch.int64))), "beta has dtype"),
        ("step beta on meta", "none", step_call("none", set_beta(lambda b: b.to("meta"))), "beta is on meta"),
        ("step beta missing", "per_token", step_call("per_token", lambda a, kw: a.pop()), "needs beta"),
        ("step extra positional", "none", step_call("none", lambda a, kw: a.append(a[-1])), "positional"),
        ("step state bf16", "none", step_call("none", lambda a, kw: a.__setitem__(3, a[3].bfloat16())),
         "state has dtype"),
    ]
    return cases


@pytest.mark.parametrize("name, kind, run, match", _bad_call_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_calls_raise_before_any_launch(name, kind, run, match, monkeypatch):
    fn, step, _, module = functions(kind)
    spec_name = SPECS[kind].name

    def launched(*args, **kwargs):
        raise AssertionError(f"{name}: a kernel path was reached before the call was refused")

    # Everything past the checks: the autograd Function and the step's kernels and operator.
    monkeypatch.setattr(getattr(module, f"_{spec_name}_Function"), "apply", launched)
    monkeypatch.setattr(module, f"_{spec_name}_step_kernels", launched)
    monkeypatch.setattr(module, f"_{spec_name}_step_op", launched)
    monkeypatch.setattr(module, "_launch", launched)
    with pytest.raises(ValueError, match=match):
        run(fn, step)


def test_beta_may_have_its_own_float_dtype():
    """beta in float32 with bf16 q, k, v (a mixed-precision model's gate in float32): allowed,
    and its gradient comes back in float32."""
    fn, _, _, _ = functions("none")
    q, k, v, beta = call_inputs("none", 1, 6, 2, 1, 5, 3, dtype=torch.bfloat16)
    o, _ = fn(q, k, v, beta)
    assert o.dtype == torch.bfloat16
    o.float().sum().backward()
    assert beta.grad.dtype == torch.float32 and q.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Autograd

@pytest.mark.parametrize("kind", ["none", "per_token"])
def test_double_backward_is_refused(kind):
    fn, _, _, _ = functions(kind)
    inputs = call_inputs(kind, 1, 5, 2, 1, 5, 3)
    initial = torch.randn(1, 2, 5, 3).to(DEVICE).requires_grad_()
    for loss in (lambda o, s: o.square().sum() + s.sum(), lambda o, s: o.sum()):
        o, state = fn(*inputs, initial_state=initial, output_final_state=True)
        with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
            torch.autograd.grad(loss(o, state), inputs[0], create_graph=True)
    (dbeta,) = torch.autograd.grad(fn(*inputs)[0].sum(), inputs[-1])
    assert dbeta.shape == inputs[-1].shape and torch.isfinite(dbeta).all()


def test_gradients_of_only_some_inputs():
    """Only beta and the initial state need gradients (q, k, v, g frozen): their gradients
    equal those of the call where everything needs one."""
    fn, _, _, _ = functions("per_token")
    leaves = call_inputs("per_token", 1, 9, 2, 1, 5, 3, seed=2)
    initial = torch.randn(1, 2, 5, 3).to(DEVICE).requires_grad_()
    o, s = fn(*leaves, initial_state=initial, output_final_state=True)
    expected = torch.autograd.grad(o.sum() + s.square().sum(), [leaves[-1], initial])
    frozen = [x.detach() for x in leaves[:-1]]
    beta = leaves[-1].detach().requires_grad_()
    o, s = fn(*frozen, beta, initial_state=initial, output_final_state=True)
    actual = torch.autograd.grad(o.sum() + s.square().sum(), [beta, initial])
    assert_same("dbeta", actual[0], expected[0])
    assert_same("dinitial_state", actual[1], expected[1])


# ---------------------------------------------------------------------------------------------
# torch.compile, torch.library

def _close(actual, expected, name):
    assert actual is not None and expected is not None, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


def _run(fn, args, **kwargs):
    o, state = fn(*args, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen).to(o.device, o.dtype)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    return o, state, loss


@pytest.mark.parametrize("kind", ["none", "per_token", "per_channel"])
def test_fullgraph_aot_eager_equals_eager(kind):
    fn, _, _, _ = functions(kind)
    # (Per channel: one head and fewer tokens, its backward being slow in the interpreter.)
    T, H = (9, 1) if kind == "per_channel" else (21, 2)
    inputs = call_inputs(kind, 1, T, H, 1, 5, 3)
    init = torch.randn(3, H, 5, 3, device=DEVICE).requires_grad_()
    kwargs = dict(initial_state=init, output_final_state=True,
                  cu_seqlens=torch.tensor([0, 4, 4, T], dtype=torch.int32, device=DEVICE))
    leaves = [*inputs, init]
    o, state, loss = _run(fn, inputs, **kwargs)
    expected = (o, state, *torch.autograd.grad(loss, leaves))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    o, state, loss = _run(compiled, inputs, **kwargs)
    actual = (o, state, *torch.autograd.grad(loss, leaves))
    assert counter.frame_count == 1
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        _close(a, e, f"output {i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor, CUDA graphs)")
@pytest.mark.parametrize("kind", ["none", "per_token", "per_channel"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_fullgraph_on_gpu(kind, mode):
    """Inductor (default, and CUDA graphs), fullgraph=True, bf16 forward and backward with
    initial states, the final state and a packed batch, against the eager call."""
    fn, _, _, _ = functions(kind)
    T, H, D, E = 300, 4, 64, 64
    inputs = [x.detach().to(torch.bfloat16 if i < 3 else x.dtype).requires_grad_()
              for i, x in enumerate(call_inputs(kind, 1, T, H, 2, D, E, seed=11))]
    init = torch.randn(3, H, D, E, device=DEVICE).requires_grad_()
    kwargs = dict(initial_state=init, output_final_state=True,
                  cu_seqlens=torch.tensor([0, 100, 100, T], dtype=torch.int32, device=DEVICE))
    leaves = [*inputs, init]
    o, state, loss = _run(fn, inputs, **kwargs)
    expected = (o, state, *torch.autograd.grad(loss, leaves))
    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records, then replays
        torch.compiler.cudagraph_mark_step_begin()
        o, state, loss = _run(compiled, inputs, **kwargs)
        actual = (o, state, *torch.autograd.grad(loss, leaves))
    assert_compiled_matches_eager(actual, expected)


def test_step_compiles_fullgraph():
    _, step, _, _ = functions("per_token")
    values = step_values("per_token", 2, 2, 1, 5, 3, seed=4)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o, new_state = compiled(*values)
    ref_o, ref_state = step(*values)
    _close(o, ref_o, "o_t")
    _close(new_state, ref_state, "state")


def _op_cases(kind):
    """(operator, arguments) for every delta operator of SPECS[kind], on dense inputs as the
    generated functions pass them."""
    _, _, _, module = functions(kind)
    name = SPECS[kind].name
    gen = torch.Generator().manual_seed(5)
    N, H, H_kv, D, E = 9, 2, 1, 5, 3
    q = torch.randn(N, H, D, generator=gen).to(DEVICE)
    k = torch.randn(N, H_kv, D, generator=gen).to(DEVICE)
    v = torch.randn(N, H_kv, E, generator=gen).to(DEVICE)
    beta = torch.rand(N, H_kv, generator=gen).to(DEVICE)
    do = torch.randn(N, H, E, generator=gen).to(DEVICE)
    shape = {"none": None, "per_head": (H,), "per_token": (N, H_kv), "per_channel": (N, H_kv, D)}[kind]
    decay = None if shape is None else decay_values(kind, shape, gen).to(DEVICE)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    init = torch.randn(3, H, D, E, generator=gen).to(DEVICE)
    forward = getattr(module, f"_{name}_forward_op")
    backward = getattr(module, f"_{name}_backward_op")
    step = getattr(module, f"_{name}_step_op")
    fwd_args = (q, k, v, beta, decay, init, cu, 3, 5, 0.25, True, True)
    _, final, *saved = forward(*fwd_args)  # saved: chunk states, W, T, P, U
    dfinal = torch.randn(final.shape, generator=gen).to(DEVICE)
    B = 3
    step_decay = None if decay is None else (decay if kind == "per_head" else decay[:B].contiguous())
    step_args = (q[:B].contiguous(), k[:B].contiguous(), v[:B].contiguous(), beta[:B].contiguous(),
                 torch.randn(B, H, D, E, generator=gen).to(DEVICE), step_decay, 0.5)
    if kind == "per_head":  # what differs from per token: the slope [H] and its gradient's fake
        return [(forward, fwd_args), (backward, (q, k, v, beta, decay, init, cu, *saved, do, dfinal, 3, 5,
                                                 0.25, True)), (step, step_args)]
    return [
        (forward, fwd_args),
        (forward, (q, k, v, beta, decay, None, None, 1, 9, 0.25, False, False)),
        (forward, (q, k, v, beta, decay, None, None, 1, 9, 0.25, True, False)),  # state only
        (backward, (q, k, v, beta, decay, init, cu, *saved, do, dfinal, 3, 5, 0.25, decay is not None)),
        (backward, (q, k, v, beta, decay, None, cu, *saved, do, None, 3, 5, 0.25, False)),
        (step, step_args),
    ]


@pytest.mark.parametrize("kind", ["per_head", "per_token"])
def test_opcheck(kind):
    """Schema (no hidden mutation or aliasing), fakes (shapes, dtypes, strides as the real
    kernels give), AOT dispatch with dynamic shapes (the static-shape variant, a subset of
    it, is left out for time)."""
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in _op_cases(kind):
        torch.library.opcheck(op, args, test_utils=tests)


@pytest.mark.parametrize("kind", ["none", "per_head", "per_token", "per_channel"])
def test_meta_tensors_give_shapes(kind):
    fn, step, _, _ = functions(kind)
    B, T, H, H_kv, D, E = 2, 40, 4, 2, 33, 17
    q = torch.empty(B, T, H, D, device="meta")
    k = torch.empty(B, T, H_kv, D, device="meta")
    v = torch.empty(B, T, H_kv, E, device="meta")
    shape = decay_shape(kind, B, T, H, H_kv, D)
    extra = [] if shape is None else [torch.empty(shape, device="meta")]
    beta = torch.empty(B, T, H_kv, device="meta")
    o, state = fn(q, k, v, *extra, beta, initial_state=torch.empty(B, H, D, E, device="meta"),
                  output_final_state=True)
    assert o.shape == (B, T, H, E) and o.device.type == "meta" and o.dtype == torch.float32
    assert state.shape == (B, H, D, E) and state.dtype == torch.float32
    step_extra = [x if kind == "per_head" else x[:, 0] for x in extra]
    o_t, new_state = step(q[:, 0], k[:, 0], v[:, 0], torch.empty(B, H, D, E, device="meta"), *step_extra,
                          beta[:, 0])
    assert o_t.shape == (B, H, E) and new_state.shape == (B, H, D, E) and new_state.device.type == "meta"


def test_traced_packed_call_reads_nothing_on_the_host(monkeypatch):
    fn, _, _, _ = functions("per_token")
    inputs = call_inputs("per_token", 1, 18, 2, 1, 5, 3)
    init = torch.randn(2, 2, 5, 3, device=DEVICE).requires_grad_()
    cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    kwargs = dict(initial_state=init, output_final_state=True, cu_seqlens=cu)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(*inputs, **kwargs)  # compile first (tracing may read shapes)

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor during a traced call")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "tolist", refuse)
        mp.setattr(torch.Tensor, "item", refuse)
        o, _, loss = _run(compiled, inputs, **kwargs)
        grads = torch.autograd.grad(loss, [*inputs, init])
    ref_o, _, ref_loss = _run(fn, inputs, **kwargs)
    _close(o, ref_o, "o")
    for i, (a, e) in enumerate(zip(grads, torch.autograd.grad(ref_loss, [*inputs, init]), strict=True)):
        _close(a, e, f"grad {i}")


# ---------------------------------------------------------------------------------------------
# bf16 on the CPU

@pytest.mark.parametrize("kind, H, H_kv, D, E", [("none", 4, 2, 5, 3), ("per_token", 2, 1, 17, 9)], ids=str)
def test_bf16_inputs_match_float64(kind, H, H_kv, D, E):
    """bf16 q, k, v, decay and beta (the interpreter's bf16 tl.dot is wrong: the module runs it
    in float32): o, state and every gradient within 2e-2 of float64 on the same rounded inputs."""
    check_against_reference(SPECS[kind], B=1, T=20, H=H, H_kv=H_kv, D=D, E=E, dtype=torch.bfloat16, seed=2)


def test_bf16_transformed_beta_matches_float64():
    """A sigmoid beta transform on bf16 raw inputs."""
    spec = spec_of(Decay.PER_TOKEN, name="dc_sigmoid_beta", beta=1 / (1 + sympy.exp(-X)))
    check_against_reference(spec, B=1, T=17, H=2, H_kv=1, D=5, E=3, dtype=torch.bfloat16, seed=4)


@pytest.mark.parametrize("kind", ["per_head", "per_channel"])
def test_bf16_step_matches_float64(kind):
    _, step, reference, _ = functions(kind)
    q, k, v, state, *extra, beta = step_values(kind, 2, 4, 2, 5, 3, seed=6, dtype=torch.bfloat16)
    beta = beta.bfloat16()
    extra = [x.bfloat16() for x in extra]
    o_t, new_state = step(q, k, v, state, *extra, beta)
    assert o_t.dtype == torch.bfloat16 and new_state.dtype == torch.float32
    seq_extra = [x if kind == "per_head" else x[:, None] for x in extra]
    o_ref, state_ref = reference(*(x[:, None].double() for x in (q, k, v)), *(x.double() for x in seq_extra),
                                 beta[:, None].double(), initial_state=state.double(), output_final_state=True)
    assert torch.isfinite(o_t).all() and torch.isfinite(new_state).all()
    assert rel_error(o_t, o_ref[:, 0]) < TOLERANCE[torch.bfloat16]
    assert rel_error(new_state, state_ref) < TOLERANCE[torch.bfloat16]


def test_cpu_tensors_on_a_machine_with_a_gpu_are_refused_clearly(monkeypatch):
    """Where a GPU is present the kernels are compiled for CUDA: CPU inputs get a ValueError
    before any launch, in a call and in a decoding step."""
    fn, step, _, module = functions("per_token")
    monkeypatch.setattr(module, "_INTERPRETED", False)  # as on a machine with a GPU
    q, k, v, g, beta = (x.detach().cpu() for x in call_inputs("per_token", 1, 5, 2, 1, 5, 3))
    with pytest.raises(ValueError, match="move them to a CUDA device"):
        fn(q, k, v, g, beta)
    with pytest.raises(ValueError, match="move them to a CUDA device"):
        step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(1, 2, 5, 3), g[:, 0], beta[:, 0])
