"""Every tensor argument, in every memory layout, gives the contiguous call's results.

The kernels index flat [tokens, heads, dim] buffers, so whatever layout a caller
passes (a slice of a cache, transposed storage, a broadcast view, an offset into
a bigger buffer) must reach them as contiguous data of the same values, and the
results (outputs, states, gradients) must come back as if the call had been
contiguous. The same kernels run on the same values, so results agree to
rounding-free equality (a tiny tolerance only guards against reordered sums).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernelkit import DEVICE, decay_input, module_for
from specs_strategy import attention_specs

from attncc.ir import AttentionSpec, Decay

LAYOUTS = ["contiguous", "cache_slice", "step_slice", "transposed", "expanded", "offset"]
INDEX_LAYOUTS = ["contiguous", "int64", "step_slice", "offset"]


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse


def lay_out(base: torch.Tensor, layout: str, data) -> torch.Tensor:
    """A view of `base`'s values in `layout`, made by differentiable ops from `base`
    (so gradients with respect to the view can be asked for). "expanded" expects
    `base` to have been drawn with size 1 in the dimension it broadcasts (see draw_tensor)."""
    dims = base.dim()
    if layout == "cache_slice":  # cache[:, i] of a [B, layers, ...] cache
        axis = data.draw(st.integers(0, dims), label="cache axis")
        junk = torch.full_like(base, 7.0)
        return torch.stack([junk, base, junk], dim=axis).select(axis, 1)
    if layout == "step_slice":  # x[..., ::2] of a tensor twice as wide in one dimension
        axis = data.draw(st.integers(0, dims - 1), label="strided axis")
        wide = torch.stack([base, torch.full_like(base, -5.0)], dim=axis + 1).flatten(axis, axis + 1)
        index = [slice(None)] * dims
        index[axis] = slice(0, None, 2)
        return wide[tuple(index)]
    if layout == "transposed":  # stored in a permuted order, viewed in the expected one
        perm = data.draw(st.permutations(list(range(dims))), label="storage order")
        return base.permute(perm).contiguous().permute(_inverse(perm))
    if layout == "offset":  # contiguous strides, but not at the start of its storage
        flat = torch.cat([torch.full((3,), 9.0, dtype=base.dtype, device=base.device), base.reshape(-1)])
        return flat[3:].view(base.shape)
    return base  # "contiguous"; "expanded" is made by draw_tensor


def draw_tensor(data, label: str, shape: tuple[int, ...], fill, layouts=LAYOUTS):
    """(base leaf, view passed to the call): the view holds the values fill(...) drew,
    in a layout drawn from `layouts`."""
    layout = data.draw(st.sampled_from(layouts), label=f"{label} layout")
    if layout == "expanded":
        wide = [axis for axis, size in enumerate(shape) if size > 1]
        if not wide:
            layout = "contiguous"
        else:
            axes = data.draw(st.sets(st.sampled_from(wide), min_size=1), label=f"{label} broadcast axes")
            small = tuple(1 if axis in axes else size for axis, size in enumerate(shape))
            base = fill(small).to(DEVICE).requires_grad_()
            return base, base.expand(shape)
    base = fill(shape).to(DEVICE).requires_grad_()
    return base, lay_out(base, layout, data)


def draw_cu_seqlens(data, bounds: list[int]) -> torch.Tensor:
    layout = data.draw(st.sampled_from(INDEX_LAYOUTS), label="cu_seqlens layout")
    cu = torch.tensor(bounds, dtype=torch.int64 if layout == "int64" else torch.int32, device=DEVICE)
    if layout == "step_slice":
        return torch.stack([cu, torch.full_like(cu, -1)], dim=1).flatten()[::2]
    if layout == "offset":
        return torch.cat([torch.full_like(cu[:2], 99), cu])[2:]
    return cu


def assert_same(name: str, actual, expected) -> None:
    assert (actual is None) == (expected is None), f"{name}: one call returned None"
    if actual is None:
        return
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _fill(gen, kind: str = "normal", spec: AttentionSpec | None = None):
    def fill(shape):
        if kind == "decay":
            B, T, H_kv = shape[:3]
            D = shape[3] if len(shape) > 3 else 1
            values = decay_input(spec, B, T, H_kv, H_kv, D, gen)
            return values.reshape(shape)
        if kind == "slope":
            return torch.rand(shape, generator=gen) * 0.5 + 0.01
        return torch.randn(shape, generator=gen)

    return fill


def _sizes(data):
    H_kv = data.draw(st.sampled_from([1, 2]), label="H_kv")
    H = H_kv * data.draw(st.sampled_from([1, 2]), label="group")
    D = data.draw(st.sampled_from([3, 8]), label="D")
    E = data.draw(st.sampled_from([4, 5]), label="E")
    return H, H_kv, D, E


@settings(max_examples=12)
@given(spec=attention_specs(), data=st.data(), seed=st.integers(0, 2**16))
def test_every_argument_layout_matches_the_contiguous_call(spec, data, seed):
    module = module_for(spec)
    module.TUNED_CONFIGS.clear()
    fn = getattr(module, spec.name)
    gen = torch.Generator().manual_seed(seed)
    H, H_kv, D, E = _sizes(data)
    varlen = data.draw(st.booleans(), label="varlen")
    if varlen:
        lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), label="lengths")
        B, T, bounds = 1, sum(lengths), [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        num_seqs = len(lengths)
    else:
        B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 20), label="T")
        num_seqs = B
    E_state = E + 1 if spec.normalize else E

    leaves, views, names = [], [], []

    def add(name, shape, fill):
        base, view = draw_tensor(data, name, shape, fill)
        leaves.append(base)
        views.append(view)
        names.append(name)
        return view

    q = add("q", (B, T, H, D), _fill(gen))
    k = add("k", (B, T, H_kv, D), _fill(gen))
    v = add("v", (B, T, H_kv, E), _fill(gen))
    extra = []
    if spec.decay is Decay.PER_HEAD:
        extra = [add("slope", (H,), _fill(gen, "slope"))]
    elif spec.decay is Decay.PER_TOKEN:
        extra = [add("g", (B, T, H_kv), _fill(gen, "decay", spec))]
    elif spec.decay is Decay.PER_CHANNEL:
        extra = [add("g", (B, T, H_kv, D), _fill(gen, "decay", spec))]
    initial = None
    if spec.causal and data.draw(st.booleans(), label="initial_state"):
        initial = add("initial_state", (num_seqs, H, D, E_state), _fill(gen))
    cu_seqlens = draw_cu_seqlens(data, bounds) if varlen else None

    o, state = fn(q, k, v, *extra, initial_state=initial, output_final_state=True, cu_seqlens=cu_seqlens)
    do, dstate = torch.randn(o.shape, generator=gen).to(DEVICE), torch.randn(state.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), views)

    plain = [x.detach().contiguous().requires_grad_() for x in views]
    plain_cu = None if cu_seqlens is None else torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    count = 3 + len(extra)
    o_ref, state_ref = fn(
        *plain[:count], initial_state=plain[count] if initial is not None else None, output_final_state=True,
        cu_seqlens=plain_cu,
    )
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (state_ref * dstate).sum(), plain)

    assert_same("o", o, o_ref)
    assert_same("final_state", state, state_ref)
    assert state.is_contiguous() and o.is_contiguous()
    for name, view, grad, grad_ref in zip(names, views, grads, grads_ref, strict=True):
        assert grad.shape == view.shape, f"d{name} has shape {list(grad.shape)}, input {list(view.shape)}"
        assert_same(f"d{name}", grad, grad_ref)


@settings(max_examples=15)
@given(spec=attention_specs(), data=st.data(), seed=st.integers(0, 2**16))
def test_step_argument_layouts_match_the_contiguous_step(spec, data, seed):
    if not spec.causal:
        return  # no running state to step
    module = module_for(spec)
    step = getattr(module, f"{spec.name}_step")
    gen = torch.Generator().manual_seed(seed)
    H, H_kv, D, E = _sizes(data)
    B = data.draw(st.integers(1, 3), label="B")
    E_state = E + 1 if spec.normalize else E
    views = []

    def add(name, shape, fill):
        views.append(draw_tensor(data, name, shape, fill)[1].detach())

    add("q_t", (B, H, D), _fill(gen))
    add("k_t", (B, H_kv, D), _fill(gen))
    add("v_t", (B, H_kv, E), _fill(gen))
    add("state", (B, H, D, E_state), _fill(gen))
    if spec.decay is Decay.PER_HEAD:
        add("slope", (H,), _fill(gen, "slope"))
    elif spec.decay is Decay.PER_TOKEN:
        add("g", (B, 1, H_kv), _fill(gen, "decay", spec))
        views[-1] = views[-1][:, 0]
    elif spec.decay is Decay.PER_CHANNEL:
        add("g", (B, 1, H_kv, D), _fill(gen, "decay", spec))
        views[-1] = views[-1][:, 0]
    o_t, new_state = step(*views)
    o_ref, new_state_ref = step(*(x.contiguous() for x in views))
    assert_same("o_t", o_t, o_ref)
    assert_same("new state", new_state, new_state_ref)
    assert new_state.is_contiguous(), f"new state has strides {new_state.stride()}"


def _regression_spec(decay: Decay) -> AttentionSpec:
    return AttentionSpec(f"layout_{decay.value}", decay=decay, chunk=16)


def test_initial_state_slice_of_a_layer_cache():
    """initial_state = cache[:, i] once read the cache's memory as if it were contiguous."""
    spec = _regression_spec(Decay.PER_TOKEN)
    fn = getattr(module_for(spec), spec.name)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 19, 2, 8, generator=gen).to(DEVICE) for _ in range(3))
    g = (-torch.rand(2, 19, 2, generator=gen) * 0.5).to(DEVICE)
    cache = torch.randn(2, 3, 2, 8, 8, generator=gen).to(DEVICE).requires_grad_()
    o, state = fn(q, k, v, g, initial_state=cache[:, 1], output_final_state=True)
    o.sum().backward()
    plain = cache.detach()[:, 1].contiguous().requires_grad_()
    o_ref, state_ref = fn(q, k, v, g, initial_state=plain, output_final_state=True)
    o_ref.sum().backward()
    assert_same("o", o, o_ref)
    assert_same("final_state", state, state_ref)
    assert_same("d initial_state", cache.grad[:, 1], plain.grad)
    assert cache.grad[:, [0, 2]].abs().sum() == 0


def test_step_with_a_transposed_state_returns_a_contiguous_state():
    """The new state was empty_like(state): transposed storage, written as if contiguous."""
    spec = _regression_spec(Decay.PER_HEAD)
    step = getattr(module_for(spec), f"{spec.name}_step")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 8, generator=gen).to(DEVICE) for _ in range(3))
    slope = torch.tensor([0.1, 0.3], device=DEVICE)
    state = torch.randn(2, 8, 8, 2, generator=gen).to(DEVICE).permute(0, 3, 1, 2)  # [B, H, D, E] view
    o_t, new_state = step(q, k, v, state, slope)
    o_ref, new_state_ref = step(q, k, v, state.contiguous(), slope)
    assert_same("o_t", o_t, o_ref)
    assert_same("new state", new_state, new_state_ref)
