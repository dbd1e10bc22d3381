"""The generated module as a runtime: decoding, packed batches, bad calls, attncc.load."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch
from kernelkit import DEVICE, decay_input, module_for, rel_error

from attncc import expr as ex
from attncc.ir import AttentionSpec, Decay, ElementwiseMap, RowMap, RowMapKind, X

REPO = Path(__file__).resolve().parent.parent
SPECS = {
    "none": AttentionSpec("rt_none", q_map=ElementwiseMap(ex.elu(X) + 1), k_map=ElementwiseMap(ex.elu(X) + 1),
                          normalize=True, chunk=16),
    "per_head": AttentionSpec("rt_head", decay=Decay.PER_HEAD, chunk=16),
    "per_token": AttentionSpec("rt_token", decay=Decay.PER_TOKEN, gate=ex.logsigmoid(X) / 16, chunk=16,
                               k_map=RowMap(RowMapKind.L2NORM)),
    "per_channel": AttentionSpec("rt_channel", decay=Decay.PER_CHANNEL, chunk=16),
}


def _inputs(spec, B=2, T=29, H=4, H_kv=2, D=20, E=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen).to(DEVICE)
    k = torch.randn(B, T, H_kv, D, generator=gen).to(DEVICE)
    v = torch.randn(B, T, H_kv, E, generator=gen).to(DEVICE)
    decay = decay_input(spec, B, T, H, H_kv, D, gen)
    return q, k, v, (None if decay is None else decay.to(DEVICE))


@pytest.mark.parametrize("kind", list(SPECS))
def test_prefix_then_steps_equals_one_call(kind):
    spec = SPECS[kind]
    module = module_for(spec)
    fn, step = getattr(module, spec.name), getattr(module, f"{spec.name}_step")
    q, k, v, decay = _inputs(spec)
    extra = [] if decay is None else [decay]
    o_full, state_full = fn(q, k, v, *extra, output_final_state=True)
    prefix = 11
    per_token = decay is not None and decay.dim() > 1
    o_prefix, state = fn(q[:, :prefix], k[:, :prefix], v[:, :prefix],
                         *([decay[:, :prefix]] if per_token else extra), output_final_state=True)
    outputs = [o_prefix]
    for t in range(prefix, q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, *([decay[:, t]] if per_token else extra))
        outputs.append(o_t[:, None])
    assert rel_error(torch.cat(outputs, dim=1), o_full) < 2e-5
    assert rel_error(state, state_full) < 2e-5


@pytest.mark.parametrize("kind", list(SPECS))
def test_state_only_pass_matches_the_full_call(kind):
    """The first pass of NAME_sp: the final state without outputs, same value and gradients."""
    spec = SPECS[kind]
    module = module_for(spec)
    call = getattr(module, f"_{spec.name}_call")
    q, k, v, decay = _inputs(spec)
    extra = [] if decay is None else [decay.requires_grad_(decay.dim() > 1)]
    leaves = [x.requires_grad_() for x in (k, v)] + [x for x in extra if x.requires_grad]
    dstate = None
    grads = []
    for store_output in (True, False):
        o, state = call(q, k, v, *(extra or [None]), None, None, True, None, store_output=store_output)
        assert (o is None) == (not store_output)
        dstate = torch.randn_like(state) if dstate is None else dstate
        grads.append([state.detach()] + list(torch.autograd.grad((state * dstate).sum(), leaves)))
    for full, alone in zip(*grads, strict=True):
        assert rel_error(alone, full) < 1e-5


@pytest.mark.parametrize("kind", list(SPECS))
def test_packed_batch_equals_separate_calls(kind):
    spec = SPECS[kind]
    fn = getattr(module_for(spec), spec.name)
    q, k, v, decay = _inputs(spec, B=1, T=40)
    per_token = decay is not None and decay.dim() > 1
    cu_seqlens = torch.tensor([0, 7, 8, 33, 40], dtype=torch.int32, device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([decay.clone().requires_grad_()] if per_token else [])
    extra = [] if decay is None else ([] if per_token else [decay])
    o, state = fn(*leaves, *extra, cu_seqlens=cu_seqlens, output_final_state=True)
    grad_out = torch.randn_like(o)
    (o * grad_out).sum().backward()
    for i in range(4):
        a, b = cu_seqlens[i].item(), cu_seqlens[i + 1].item()
        pieces = [x.detach()[:, a:b].clone().requires_grad_() for x in leaves]
        o_i, state_i = fn(*pieces, *extra, output_final_state=True)
        (o_i * grad_out[:, a:b]).sum().backward()
        assert rel_error(o[:, a:b], o_i) < 1e-5
        assert rel_error(state[i], state_i[0]) < 1e-5
        for whole, piece in zip(leaves, pieces, strict=True):
            assert rel_error(whole.grad[:, a:b], piece.grad) < 1e-5


def _error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def test_bad_calls_raise_value_errors_naming_the_argument():
    spec = SPECS["per_token"]
    fn = getattr(module_for(spec), spec.name)
    q, k, v, g = _inputs(spec)
    assert "q must have shape [B, T, H, D]" in _error(lambda: fn(q[0], k, v, g))
    assert "k must have shape [B, T, H_kv, D]" in _error(lambda: fn(q, k[:, :5], v, g))
    assert "v must have shape [B, T, H_kv, E]" in _error(lambda: fn(q, k, v[:, :, :1], g))
    assert "share one dtype" in _error(lambda: fn(q, k.half(), v, g))
    assert "dtype torch.float64" in _error(lambda: fn(q.double(), k.double(), v.double(), g))
    assert "H_kv dividing H" in _error(lambda: fn(q[:, :, :3], k, v, g))
    assert "gate_input must have shape [B, T, H_kv]" in _error(lambda: fn(q, k, v, g[:, :, :1]))
    assert "needs gate_input" in _error(lambda: fn(q, k, v))
    assert "more positional argument" in _error(lambda: fn(q, k, v, g, g))
    assert "k is on meta" in _error(lambda: fn(q, k.to("meta"), v, g))
    assert "initial_state must have shape" in _error(
        lambda: fn(q, k, v, g, initial_state=torch.zeros(2, 4, 20, 23, device=DEVICE)))
    assert "initial_state has dtype" in _error(
        lambda: fn(q, k, v, g, initial_state=torch.zeros(2, 4, 20, 24, device=DEVICE, dtype=torch.bfloat16)))
    assert "scale must be a positive" in _error(lambda: fn(q, k, v, g, scale=-1.0))
    q1, k1, v1, g1 = (x[:1] for x in (q, k, v, g))
    cu = torch.tensor([0, 10, 29], device=DEVICE)
    assert "cu_seqlens must be an int32 or int64" in _error(lambda: fn(q1, k1, v1, g1, cu_seqlens=cu.float()))
    assert "must be non-decreasing" in _error(  # (repeated boundaries, empty sequences, are allowed)
        lambda: fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 10, 5, 29], device=DEVICE)))
    assert "end at T = 29" in _error(lambda: fn(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 10, 28], device=DEVICE)))
    assert "(B = 1)" in _error(lambda: fn(q, k, v, g, cu_seqlens=cu))
    step = getattr(module_for(spec), f"{spec.name}_step")
    state = torch.zeros(2, 4, 20, 24, device=DEVICE)
    assert "state must have shape" in _error(lambda: step(q[:, 0], k[:, 0], v[:, 0], state[:, :2], g[:, 0]))
    assert "gate_input must have shape [B, H_kv]" in _error(lambda: step(q[:, 0], k[:, 0], v[:, 0], state, g))


def test_noncausal_refuses_an_initial_state():
    spec = AttentionSpec("rt_nc", causal=False, chunk=16)
    fn = getattr(module_for(spec), spec.name)
    q, k, v, _ = _inputs(spec)
    assert "not causal" in _error(lambda: fn(q, k, v, initial_state=torch.zeros(2, 4, 20, 24, device=DEVICE)))


def _load_in_subprocess(spec_path: str, cache: str, queue) -> None:
    os.environ["ATTNCC_CACHE_DIR"] = cache
    import attncc

    module = attncc.load(spec_path)
    queue.put(module.__file__)


def test_load_compiles_caches_and_is_safe_across_processes(tmp_path, monkeypatch):
    import attncc

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    spec_path = tmp_path / "tiny.attn"
    spec_path.write_text("attention tiny {\n    decay = per_head\n    chunk = 16\n}\n")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_load_in_subprocess, args=(str(spec_path), str(tmp_path / "cache"), queue))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    paths = {queue.get(timeout=5) for _ in workers}
    assert len(paths) == 1
    module = attncc.load(spec_path)
    assert module.__file__ in paths
    assert attncc.load(spec_path) is module
    assert not list((tmp_path / "cache").glob("*.tmp"))
    q, k, v = (torch.randn(1, 5, 2, 16, device=DEVICE) for _ in range(3))
    slope = torch.rand(2, device=DEVICE)
    o, _ = module.tiny(q, k, v, slope)
    o_ref, _ = module.reference(q.double(), k.double(), v.double(), slope.double())
    assert o.shape == (1, 5, 2, 16) and rel_error(o, o_ref) < 1e-5
    # A changed spec is a different module.
    spec_path.write_text("attention tiny {\n    decay = none\n    chunk = 16\n}\n")
    assert attncc.load(spec_path) is not module


def test_launch_retries_with_fewer_stages_and_remembers():
    """A launch whose pipeline stages overflow shared memory (wide fp32 heads on the H100)
    is retried with fewer stages; the number that fits is kept for later calls."""
    import triton

    module = module_for(AttentionSpec(name="stages_probe", decay=Decay.NONE))
    tried = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, **meta):
                tried.append(meta["num_stages"])
                if meta["num_stages"] > self.fits:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return grid

            return run

    kernel, x = Kernel(fits=1), torch.randn(3)
    assert module._launch(kernel, (2, 5), x, num_stages=3, BLOCK=16) == (2, 5)
    assert tried == [3, 2, 1]
    assert module._launch(kernel, (2, 5), x, num_stages=3, BLOCK=16) == (2, 5)
    assert tried == [3, 2, 1, 1]  # remembered
    with pytest.raises(triton.runtime.errors.OutOfResources):
        module._launch(Kernel(fits=0), (1,), x, num_stages=2, BLOCK=32)


def test_launch_falls_back_to_smaller_chunks_when_one_stage_does_not_fit():
    """Per-channel decay at D = E = 256 overflows shared memory even at one pipeline
    stage (H200): the chunk (BLOCK_T) is halved, down to 16, and what fits remembered."""
    import triton

    module = module_for(AttentionSpec(name="chunks_probe", decay=Decay.NONE))
    tried = []

    def kernel_fitting_at(block_t):
        class Kernel:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    tried.append((meta["num_stages"], meta["BLOCK_T"]))
                    if meta["num_stages"] > 1 or meta["BLOCK_T"] > block_t:
                        raise triton.runtime.errors.OutOfResources(299008, 232448, "shared memory")
                    return grid

                return run

        return Kernel()

    kernel, x = kernel_fitting_at(32), torch.randn(3)
    assert module._launch(kernel, (4,), x, num_stages=2, BLOCK_T=128, D=256) == (4,)
    assert tried == [(2, 128), (1, 128), (1, 64), (1, 32)]
    module._launch(kernel, (4,), x, num_stages=2, BLOCK_T=128, D=256)
    assert tried[4:] == [(1, 32)]  # remembered
    with pytest.raises(triton.runtime.errors.OutOfResources) as raised:
        module._launch(kernel_fitting_at(8), (1,), x, num_stages=1, BLOCK_T=32, D=256)
    if sys.version_info >= (3, 11):  # the note says what was tried and what may fit
        (note,) = raised.value.__notes__
        assert "BLOCK_T = 16" in note and "num_stages = 1" in note and "chunk = auto" in note


def test_what_fits_is_remembered_whatever_the_runtime_arguments():
    """Launches pass runtime values by keyword too (scale, segment_len): what fits is keyed on
    the compile-time parameters only, so a new scale does not retry what did not fit."""
    import triton

    module = module_for(AttentionSpec(name="fits_key_probe", decay=Decay.NONE))
    tried = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **meta):
                tried.append(meta["num_stages"])
                if meta["num_stages"] > 1:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return grid

            return run

    kernel, x = Kernel(), torch.randn(3)
    module._launch(kernel, (1,), q_ptr=x, scale=0.25, segment_len=64, num_stages=3, BLOCK_T=64)
    assert tried == [3, 2, 1]
    module._launch(kernel, (1,), q_ptr=x, scale=0.5, segment_len=128, num_stages=3, BLOCK_T=64)
    assert tried == [3, 2, 1, 1]  # remembered for the new scale and segment length


def test_forward_stores_backward_segment_states_only_when_a_backward_can_follow(monkeypatch):
    """The forward pass stores the states entering the backward's segments (saving the
    backward a pass); under no_grad, or without inputs that need gradients, it must not
    (ctx.needs_input_grad reads True under no_grad, so the wrapper decides before apply)."""
    spec = AttentionSpec(name="segment_states_probe", decay=Decay.PER_HEAD, chunk=16)
    module = module_for(spec)
    monkeypatch.setitem(module.TUNED_CONFIGS, (spec.name, 20, 24), {"bwd_segment": 16, "bwd_chunk": 16})
    stored, extra_passes = [], []
    outputs, segment_states = module._segment_states_probe_outputs, module._segment_states_probe_segment_states
    # _outputs(q, k, v, o, decay, initial_state, final_state, entering, ...): entering is argument 7.
    monkeypatch.setattr(module, "_segment_states_probe_outputs",
                        lambda *args: stored.append(args[7] is not None) or outputs(*args))
    monkeypatch.setattr(module, "_segment_states_probe_segment_states",
                        lambda *args: extra_passes.append(1) or segment_states(*args))
    q, k, v, slope = _inputs(spec)
    fn = getattr(module, spec.name)
    fn(q, k, v, slope)
    with torch.no_grad():
        fn(*(x.requires_grad_() for x in (q, k, v)), slope)
    assert stored == [False, False]
    o, _ = fn(q, k, v, slope)
    assert stored == [False, False, True]
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert extra_passes == []  # the backward used the forward's segments: no state pass of its own
    expected = torch.autograd.grad(module.segment_states_probe_reference(q, k, v, slope)[0].sum(), (q, k, v))
    assert all(rel_error(a, b) < 1e-4 for a, b in zip(grads, expected, strict=True))
