"""The backward with its value dim split over programs (bwd_block_e < E).

dq, dk and the decay gradient's shares are sums over the value columns: each value block
writes its share to a float32 slice of its own and the host adds the slices up. Wide heads
need it (a D = E = 256 backward in one block asked for more shared memory than an H200
gives a block, and a normalized spec's E + 1 columns even at E = 256), and so does the
precise decay gradient there. Here a tuned bwd_block_e of 16 splits small heads into
three blocks, the last partial, on any machine.
"""

from __future__ import annotations

import pytest
import torch

from attncc.check import parse_spec
from tests.kernelkit import DEVICE, TOLERANCE, decay_input, module_for, rel_error

SPECS = {
    "none": "attention vb_none {\n}\n",
    "normalized": "attention vb_norm {\n    feature_map = elu(x) + 1\n    normalize = true\n}\n",
    "per_head": "attention vb_head {\n    decay = per_head\n}\n",
    "per_token": "attention vb_token {\n    decay = per_token\n    gate = logsigmoid(x)\n}\n",
    "per_channel": "attention vb_channel {\n    decay = per_channel\n    gate = logsigmoid(x) / 16\n}\n",
    "noncausal": "attention vb_full {\n    feature_map = elu(x) + 1\n    causal = false\n}\n",
}


def _spec(kind):
    return parse_spec(SPECS[kind], f"{kind}.attn").specs[0]


@pytest.mark.parametrize("kind", list(SPECS))
def test_split_value_blocks_give_the_gradients_against_float64(kind, monkeypatch):
    spec = _spec(kind)
    module = module_for(spec)
    fn, reference = getattr(module, spec.name), getattr(module, f"{spec.name}_reference")
    B, T, H, H_kv, D, E = 2, 45, 4, 2, 16, 40  # E (+ 1) = three value blocks of 16
    for e in (E, E + 1):  # a normalized spec's kernels see E + 1 value columns
        monkeypatch.setitem(module.TUNED_CONFIGS, (spec.name, D, e), {"bwd_block_e": 16, "bwd_chunk": 16})
    assert getattr(module, f"_{spec.name}_config")(D, E)["bwd_block_e"] == 16
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H_kv, D, generator=gen)
    v = torch.randn(B, T, H_kv, E, generator=gen)
    decay = decay_input(spec, B, T, H, H_kv, D, gen)
    inputs = [q, k, v] + ([] if decay is None else [decay])
    ours = [x.to(DEVICE).requires_grad_() for x in inputs]
    theirs = [x.detach().double().requires_grad_() for x in ours]
    kwargs, kwargs64 = {}, {}
    if spec.causal:
        columns = E + 1 if spec.normalize else E  # a normalized state carries z
        init = torch.randn(B, H, D, columns, generator=gen).abs().to(DEVICE)
        kwargs = {"initial_state": init.clone().requires_grad_(), "output_final_state": True}
        kwargs64 = {"initial_state": init.double().requires_grad_(), "output_final_state": True}
    o, s = fn(*ours, **kwargs)
    o64, s64 = reference(*theirs, **kwargs64)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    loss = (o * do).sum()
    loss64 = (o64 * do.double()).sum()
    if s is not None:
        ds = torch.randn(s.shape, generator=gen).to(DEVICE)
        loss, loss64 = loss + (s * ds).sum(), loss64 + (s64 * ds.double()).sum()
    loss.backward()
    loss64.backward()
    pairs = [(o, o64)] + [(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True)]
    if spec.causal:
        pairs.append((kwargs["initial_state"].grad, kwargs64["initial_state"].grad))
    for i, (a, b) in enumerate(pairs):
        err = rel_error(a, b, floor=1e-8 if i == 4 and kind == "per_head" else 1e-2)
        assert err < TOLERANCE[torch.float32] * 5, f"{kind}: result {i} off by {err:.1e}"


@pytest.mark.parametrize("kind", ["none", "normalized", "per_channel", "noncausal"])
def test_wide_heads_split_the_backward_value_dim(kind):
    """The defaults: the whole value dim in one block up to D x E = 128 x 128 (the bench
    cell keeps its one block), split above."""
    config = getattr(module_for(_spec(kind)), f"_{_spec(kind).name}_config")
    assert config(128, 128)["bwd_block_e"] == 128
    assert config(64, 256)["bwd_block_e"] == 256
    assert config(256, 256)["bwd_block_e"] == 64
    assert config(256, 257)["bwd_block_e"] == 64  # normalized: E + 1 columns
    assert config(16, 257)["bwd_block_e"] == 256


@pytest.mark.parametrize("kind", ["per_head", "per_token"])
def test_a_scalar_decay_narrows_the_value_blocks_for_its_precise_gradient(kind, monkeypatch):
    """A scalar decay keeps the whole value dim (up to 256) in one block, unless its
    gradient is needed: then the blocks narrow until the precise decay gradient fits."""
    spec = _spec(kind)
    module = module_for(spec)
    name = spec.name
    assert getattr(module, f"_{name}_config")(256, 256)["bwd_block_e"] == 256
    precise = getattr(module, f"_{name}_precise_decay_grad")
    assert precise(256, 64) and not precise(256, 128) and precise(128, 128)
    seen = []
    kernel = getattr(module, f"_{name}_bwd_dq_kernel")

    class Recorded:  # the dq kernel, recording its value block and decay-gradient path
        __name__ = kernel.__name__

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((meta["BLOCK_E"], meta["PRECISE_DB"]))
                return kernel[grid](*args, **meta)

            return launch

    monkeypatch.setattr(module, f"_{name}_bwd_dq_kernel", Recorded())
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 20, 1, 256
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    decay = decay_input(spec, B, T, H, H, D, gen)
    for needs in (False, True):
        x = decay.clone().requires_grad_(needs)
        o = getattr(module, name)(q.requires_grad_(), k, v, x)[0]
        o.sum().backward()
    assert seen == [(256, False), (64, True)], seen
