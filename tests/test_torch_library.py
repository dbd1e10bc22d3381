"""The compile contract: every generated function runs its kernels in torch.library
operators, so torch.compile traces it whole (no graph break, fullgraph=True), dynamic
shapes do not recompile per length, packed batches need no host sync when traced,
torch.library.opcheck passes, meta tensors give shapes, and operator names never clash.

On the CPU these use the aot_eager backend (AOTAutograd traces the same joint graph
Inductor compiles; Inductor itself is exercised on the GPU by the tests marked below)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from kernelkit import DEVICE, assert_compiled_matches_eager

from attncc.compiler import compile_source
from attncc.loader import import_path

SPECS = {
    "none": "attention plain {\n    decay = none\n    chunk = 16\n}\n",
    "per_head": "attention head {\n    decay = per_head\n    chunk = 16\n}\n",
    "per_token": "attention token {\n    decay = per_token\n    gate = logsigmoid(x)\n    chunk = 16\n}\n",
    "per_channel": "attention channel {\n    decay = per_channel\n    chunk = 16\n}\n",
    "normalized": "attention normed {\n    feature_map = elu(x) + 1\n    normalize = true\n    chunk = 16\n}\n",
    "noncausal": "attention bidir {\n    causal = false\n    feature_map = relu(x)\n    chunk = 16\n}\n",
}
_DIR = Path(tempfile.mkdtemp(prefix="attncc-library-"))
_LOADED: dict[str, object] = {}


def module(kind: str, tag: str = ""):
    """The compiled module of SPECS[kind] (one import per (kind, tag))."""
    key = kind + tag
    if key not in _LOADED:
        path = _DIR / f"lib_{key}.py"
        path.write_text(compile_source(SPECS[kind], f"{kind}.attn"))
        _LOADED[key] = import_path(path, f"attncc_lib_{key}")
    return _LOADED[key]


def _function(kind: str):
    mod = module(kind)
    name = SPECS[kind].split()[1]
    return getattr(mod, name), getattr(mod, f"{name}_step", None), mod


def _inputs(kind: str, B: int, T: int, H: int = 2, D: int = 16, E: int = 12, seed: int = 0):
    """q, k, v and the decay input (or None), fresh and random, needing gradients."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, E, generator=gen)
    decay = None
    if kind == "per_head":
        decay = torch.rand(H, generator=gen) * 0.5 + 0.05
    elif kind == "per_token":
        decay = torch.randn(B, T, H, generator=gen)
    elif kind == "per_channel":
        decay = -torch.rand(B, T, H, D, generator=gen) * 0.3
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    decay = None if decay is None else decay.to(DEVICE)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    if decay is not None and kind != "per_head":
        decay.requires_grad_()
        leaves.append(decay)
    return q, k, v, decay, leaves


def _run(fn, kind, q, k, v, decay, **kwargs):
    """Outputs and the gradients of a fixed random projection of them."""
    args = (q, k, v) if decay is None else (q, k, v, decay)
    o, state = fn(*args, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen).to(o.device, o.dtype)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    return o, state, loss


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_close(actual, expected, name):
    assert actual is not None and expected is not None, name
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
    assert err < 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["none", "per_head", "per_token", "per_channel", "normalized", "noncausal"])
def test_fullgraph_aot_eager_equals_eager(kind):
    """fullgraph=True (any graph break is an error), forward and backward, with an initial
    state, the final state and a packed batch, against the eager call."""
    fn, _, _ = _function(kind)
    causal = kind != "noncausal"
    q, k, v, decay, leaves = _inputs(kind, 1, 29)
    cu = torch.tensor([0, 7, 7, 29], dtype=torch.int32, device=DEVICE)
    kwargs = dict(output_final_state=True, cu_seqlens=cu)
    if causal:
        E_state = v.shape[-1] + (1 if kind == "normalized" else 0)
        init = torch.randn(3, q.shape[2], q.shape[3], E_state, device=DEVICE).requires_grad_()
        kwargs["initial_state"] = init
        leaves = [*leaves, init]
    o, state, loss = _run(fn, kind, q, k, v, decay, **kwargs)
    expected = (o, state, *_grads(loss, leaves))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    o, state, loss = _run(compiled, kind, q, k, v, decay, **kwargs)
    actual = (o, state, *_grads(loss, leaves))
    assert counter.frame_count == 1
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        _assert_close(a, e, f"output {i}")


def test_dynamic_lengths_do_not_recompile_per_length():
    """New T, new B and new packed lengths: at most the one dynamic recompile."""
    fn, _, _ = _function("per_token")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    # Dynamo makes a size symbolic when it first changes (and always specializes 0 and 1):
    # B and T change together here, so the second call is the one dynamic recompile.
    for B, T in ((2, 20), (3, 27), (4, 33), (5, 18)):
        q, k, v, g, leaves = _inputs("per_token", B, T)
        o, _, loss = _run(compiled, "per_token", q, k, v, g)
        ref_o, _, _ = _run(fn, "per_token", q, k, v, g)
        _assert_close(o, ref_o, f"o at B={B}, T={T}")
        _grads(loss, leaves)
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 shapes"
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    packed = torch.compile(fn, backend=counter, fullgraph=True)
    for bounds in ([0, 5, 30], [0, 12, 30], [0, 1, 2, 30], [0, 10, 20, 25, 30]):
        q, k, v, g, _ = _inputs("per_token", 1, 30)
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        o, _, _ = _run(packed, "per_token", q, k, v, g, cu_seqlens=cu)
        ref_o, _, _ = _run(fn, "per_token", q, k, v, g, cu_seqlens=cu)
        _assert_close(o, ref_o, f"o at cu_seqlens={bounds}")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 packings"


def test_traced_packed_call_reads_nothing_on_the_host(monkeypatch):
    """Under torch.compile cu_seqlens is never copied to the host: fullgraph=True would
    refuse a .tolist() or .item() in the traced code, and inside the operators nothing
    reads it either (Tensor.tolist / item are made to fail while the compiled call runs)."""
    fn, _, _ = _function("per_head")
    q, k, v, slope, leaves = _inputs("per_head", 1, 30)
    cu = torch.tensor([0, 9, 30], dtype=torch.int32, device=DEVICE)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(q, k, v, slope, cu_seqlens=cu)  # compile first (tracing may read shapes)

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor during a traced call")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "tolist", refuse)
        mp.setattr(torch.Tensor, "item", refuse)
        o, _, loss = _run(compiled, "per_head", q, k, v, slope, cu_seqlens=cu)
        _grads(loss, leaves)
    ref_o, _, _ = _run(fn, "per_head", q, k, v, slope, cu_seqlens=cu)
    _assert_close(o, ref_o, "o")


def test_eager_packed_call_still_checks_cu_seqlens():
    fn, _, _ = _function("none")
    q, k, v, _, _ = _inputs("none", 1, 10)
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE))


def test_traced_call_with_bad_cu_seqlens_stays_in_bounds():
    """Traced, cu_seqlens is not checked on the host; out-of-range or decreasing values
    are made into a non-decreasing run from 0 to T on the device, so the kernels stay
    inside the tensors and every token's output is written: the call equals the eager
    one on the repaired bounds."""
    fn, _, _ = _function("none")
    q, k, v, _, _ = _inputs("none", 1, 10)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for bad, repaired in (([0, 60, 4, 10], [0, 10, 10, 10]), ([5, 3, 1, 2], [0, 5, 5, 10])):
        o, _ = compiled(q.detach(), k.detach(), v.detach(), cu_seqlens=torch.tensor(bad, dtype=torch.int32,
                                                                                      device=DEVICE))
        expected, _ = fn(q.detach(), k.detach(), v.detach(), cu_seqlens=torch.tensor(repaired, dtype=torch.int32,
                                                                                      device=DEVICE))
        assert o.shape == (1, 10, 2, 12) and torch.isfinite(o).all()
        _assert_close(o, expected, f"o at cu_seqlens={bad}")


def test_decoding_step_compiles_fullgraph():
    fn, step, _ = _function("per_channel")
    gen = torch.Generator().manual_seed(3)
    B, H, D, E = 3, 2, 16, 12
    q, k = (torch.randn(B, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, H, E, generator=gen)
    state = torch.randn(B, H, D, E, generator=gen)
    g = -torch.rand(B, H, D, generator=gen)
    q, k, v, state, g = (x.to(DEVICE) for x in (q, k, v, state, g))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o, new_state = compiled(q, k, v, state, g)
    ref_o, ref_state = step(q, k, v, state, g)
    _assert_close(o, ref_o, "o_t")
    _assert_close(new_state, ref_state, "state")


def _op_cases(kind):
    """(operator, arguments) for every operator of SPECS[kind], on dense inputs as the
    generated functions pass them."""
    _, _, mod = _function(kind)
    name = SPECS[kind].split()[1]
    gen = torch.Generator().manual_seed(5)
    N, H, D, E = 21, 2, 16, 12
    E_state = E + 1 if kind == "normalized" else E
    q, k = (torch.randn(N, H, D, generator=gen) for _ in range(2))
    v = torch.randn(N, H, E_state, generator=gen)
    do = torch.randn(N, H, E_state, generator=gen)
    q, k, v, do = (x.to(DEVICE) for x in (q, k, v, do))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32, device=DEVICE)
    forward = getattr(mod, f"_{name}_forward_op")
    backward = getattr(mod, f"_{name}_backward_op")
    if kind == "noncausal":
        o, state = forward(q, k, v, cu, 2, 13, 0.25)
        return [
            (forward, (q, k, v, cu, 2, 13, 0.25)),
            (forward, (q, k, v, None, 3, 7, 0.25)),
            (backward, (q, k, v, cu, state, do, torch.randn(state.shape, generator=gen).to(DEVICE), 2, 13, 0.25)),
        ]
    decay = None
    if kind == "per_head":
        decay = torch.rand(H, generator=gen) + 0.1
    elif kind == "per_token":
        decay = torch.randn(N, H, generator=gen)
    elif kind == "per_channel":
        decay = -torch.rand(N, H, D, generator=gen)
    decay = None if decay is None else decay.to(DEVICE)
    init = torch.randn(2, H, D, E_state, generator=gen).to(DEVICE)
    fwd_args = (q, k, v, decay, init, cu, 2, 13, 0.25, True, True, True)
    o, final, entering, flag = forward(*fwd_args)
    dfinal = torch.randn(final.shape, generator=gen).to(DEVICE)
    step = getattr(mod, f"_{name}_step_op")
    B = 3
    step_args = (
        *(torch.randn(shape, generator=gen).to(DEVICE) for shape in ((B, H, D), (B, H, D), (B, H, E_state), (B, H, D, E_state))),
        None if decay is None else (decay if kind == "per_head" else decay[:B].contiguous()), 0.5,
    )
    return [
        (forward, fwd_args),
        (forward, (q, k, v, decay, None, None, 3, 7, 0.25, False, True, False)),
        (forward, (q, k, v, decay, None, None, 3, 7, 0.25, True, False, True)),  # state only
        (backward, (q, k, v, decay, init, cu, final, entering, flag, do, dfinal, 2, 13, 0.25, True, decay is not None)),
        (step, step_args),
    ]


@pytest.mark.parametrize("kind", ["none", "per_head", "per_token", "per_channel", "normalized", "noncausal"])
def test_opcheck(kind):
    """torch.library.opcheck: schema (no hidden mutation or aliasing), fake tensors
    (shapes, dtypes and strides as the real kernels give), AOT dispatch with dynamic
    shapes. The operators are not themselves differentiable (the generated autograd
    Function is), so they are checked with inputs that need no gradients."""
    for op, args in _op_cases(kind):
        torch.library.opcheck(op, args)


def test_meta_tensors_give_shapes():
    fn, step, _ = _function("per_channel")
    q, k = (torch.empty(2, 40, 4, 32, device="meta") for _ in range(2))
    v = torch.empty(2, 40, 2, 24, device="meta")
    g = torch.empty(2, 40, 2, 32, device="meta")
    o, state = fn(q, k[:, :, :2], v, g, output_final_state=True)
    assert o.shape == (2, 40, 4, 24) and o.device.type == "meta"
    assert state.shape == (2, 4, 32, 24)


def test_operator_names_are_unique_per_loaded_module():
    """The same spec loaded twice, and two files with one block name: four namespaces,
    each module calling its own operators."""
    first = module("per_head", "a")
    second = module("per_head", "b")
    other = _DIR / "other.py"
    other.write_text(compile_source(SPECS["per_head"].replace("decay = per_head", "decay = per_head\n    scale = 0.5"), "x.attn"))
    third = import_path(other, "attncc_lib_other")
    names = {m._OPS.ns for m in (first, second, third, module("per_head"))}
    assert len(names) == 4
    q, k, v, slope, _ = _inputs("per_head", 1, 9)
    args = (q.detach(), k.detach(), v.detach(), slope)
    assert torch.equal(first.head(*args)[0], second.head(*args)[0])
    assert not torch.allclose(third.head(*args)[0], first.head(*args)[0])  # scale 0.5, not 1/4


def _cuda_graphs_and_inductor_cases():
    return ["none", "per_head", "per_token", "per_channel"]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor, CUDA graphs)")


@gpu
@pytest.mark.parametrize("kind", _cuda_graphs_and_inductor_cases())
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_fullgraph_on_gpu(kind, mode):
    """Inductor (default and CUDA graphs), fullgraph=True, bf16, forward and backward with
    an initial state, the final state and a packed batch, against the eager call."""
    fn, _, _ = _function(kind)
    q, k, v, decay, leaves = _inputs(kind, 1, 300, H=4, D=64, E=64)
    cast = [x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v)]
    decay = None if decay is None else decay.detach().cuda()
    leaves = list(cast)
    if decay is not None and kind != "per_head":
        decay.requires_grad_()
        leaves.append(decay)
    init = torch.randn(3, 4, 64, 64, device="cuda").requires_grad_()
    leaves.append(init)
    kwargs = dict(initial_state=init, output_final_state=True,
                  cu_seqlens=torch.tensor([0, 100, 100, 300], dtype=torch.int32, device="cuda"))
    o, state, loss = _run(fn, kind, *cast, decay, **kwargs)
    expected = (o, state, *_grads(loss, leaves))
    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records, then replays
        torch.compiler.cudagraph_mark_step_begin()
        o, state, loss = _run(compiled, kind, *cast, decay, **kwargs)
        actual = (o, state, *_grads(loss, leaves))
    assert_compiled_matches_eager(actual, expected)


def _captured(step):
    """A CUDA graph of step() (after a warm-up on a side stream, as torch documents) and
    what its first replay returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    graph.replay()
    torch.cuda.synchronize()
    return graph, result


@gpu
@pytest.mark.parametrize("kind", ["none", "per_head"])
def test_cuda_graphs_of_inference_then_training_at_a_training_shape(kind):
    """One process captures a forward-only graph, then a forward + backward graph, at a
    shape people train with: both replay and equal the eager call.

    The eager call runs in a function of its own so that its autograd graph is gone before
    the captures: a live one keeps the leaves' AccumulateGrad nodes, made on the default
    stream, and the captured backward then waits on that stream, which invalidates the
    capture (PyTorch warns "The AccumulateGrad node's stream does not match"). Seen failing
    so on the H200 with the eager `o` kept alive here; fresh processes that captured without
    an earlier eager backward passed at (2, 4096, 16, 128), so this is the likeliest cause of
    the sixth session's failed fwd + bwd captures in timing scripts."""
    fn, _, _ = _function(kind)
    q, k, v, decay, _ = _inputs(kind, 2, 4096, H=16, D=128, E=128)
    cast = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    leaves = list(cast)
    if decay is not None and kind != "per_head":
        decay = decay.detach().requires_grad_()
        leaves.append(decay)
    args = (*cast,) if decay is None else (*cast, decay)
    weights = torch.randn(2, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)  # made outside the captures

    def training():
        o = fn(*args)[0]
        return (o.detach(), *torch.autograd.grad(o, leaves, weights))

    expected = training()  # eager

    def inference():
        with torch.no_grad():
            return fn(*args)[0]

    _, o_inference = _captured(inference)
    _, actual = _captured(training)
    assert_compiled_matches_eager((o_inference,), expected[:1])
    assert_compiled_matches_eager(actual, expected)
