"""attncc.nn.LinearAttention: shapes, semantics against a float64 recurrence, decoding,
gradients, grouped heads, packed batches, errors, autocast and torch.compile (CPU, tiny)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.nn import LinearAttention

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Specs the examples do not cover, written to a temporary directory.
INLINE = {
    "plain.attn": "attention plain {\n    decay = none\n    scale = auto\n}\n",
    "channel.attn": "attention channel {\n    decay = per_channel\n    chunk = 16\n}\n",
}


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    """A private kernel cache for attncc.load, and the inline specs."""
    root = tmp_path_factory.mktemp("nn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNCC_CACHE_DIR", str(root / "cache"))
        for name, text in INLINE.items():
            (root / name).write_text(text)
        yield root


def _path(spec_dir: Path, file: str) -> Path:
    return spec_dir / file if file in INLINE else EXAMPLES / file


def _softplus(z):
    return F.softplus(z)


# (id, file, block name, float64 log decay from the decay projection's output, feature map,
#  normalize, scale). The log decays are written out here by hand from the specs: without a
# gate the layer must pass logsigmoid(z); with one, the kernel applies the gate to z.
CASES = {
    "none": ("plain.attn", None, None, lambda x: x, False, None),
    "per_head": ("lightning.attn", None, None, lambda x: x, False, 1.0),
    "per_token": ("simple_gla.attn", None, F.logsigmoid, lambda x: x, False, None),
    "per_token_gate": ("gated.attn", "mamba2", lambda z: -_softplus(z), lambda x: x, False, None),
    "per_channel": ("channel.attn", None, F.logsigmoid, lambda x: x, False, None),
    "per_channel_gate": ("gla.attn", None, lambda z: F.logsigmoid(z) / 16, lambda x: x, False, None),
    "normalize": ("linear_elu.attn", None, None, lambda x: F.elu(x) + 1, True, 1.0),
}
CAUSAL = list(CASES)

HIDDEN, H, H_KV, D, E = 12, 4, 2, 6, 5


def _layer(spec_dir, case, seed=0, **kwargs):
    file, name = CASES[case][0], CASES[case][1]
    torch.manual_seed(seed)
    sizes = dict(num_heads=H, num_kv_heads=H_KV, head_dim=D, value_dim=E)
    sizes.update(kwargs)
    return LinearAttention(_path(spec_dir, file), HIDDEN, name=name, **sizes)


def _recurrence(layer: LinearAttention, x: torch.Tensor, case: str) -> torch.Tensor:
    """The layer's output in float64, token by token, from its weights and the spec's math:
    S_t = A_t S_{t-1} + φ(k_t)ᵀ v_t,  o_t = scale φ(q_t) S_t  (/ (scale φ(q_t)·z_t + 1e-6))."""
    _, _, log_decay, phi, normalize, scale = CASES[case]
    Hq, Hkv, Dk, Ev = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.value_dim
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    x = x.double()
    B, T, _ = x.shape
    group = Hq // Hkv
    q = phi(x @ layer.q_proj.weight.double().T).view(B, T, Hq, Dk)
    k = phi(x @ layer.k_proj.weight.double().T).view(B, T, Hkv, Dk).repeat_interleave(group, 2)
    v = (x @ layer.v_proj.weight.double().T).view(B, T, Hkv, Ev).repeat_interleave(group, 2)
    if layer.log_slope is not None:
        g = (-layer.log_slope.double().exp()).expand(B, T, Hq)[..., None].expand(B, T, Hq, Dk)
    elif layer.decay_proj is not None:
        z = x @ layer.decay_proj.weight.double().T + layer.decay_proj.bias.double()
        g = log_decay(z).view(B, T, Hkv, -1).repeat_interleave(group, 2).expand(B, T, Hq, Dk)
    else:
        g = torch.zeros(B, T, Hq, Dk, dtype=torch.float64)
    S = torch.zeros(B, Hq, Dk, Ev, dtype=torch.float64)
    zsum = torch.zeros(B, Hq, Dk, dtype=torch.float64)
    outputs = []
    for t in range(T):
        a = g[:, t].exp()
        S = a[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        zsum = a * zsum + k[:, t]
        o = scale * torch.einsum("bhd,bhde->bhe", q[:, t], S)
        if normalize:
            o = o / (scale * (q[:, t] * zsum).sum(-1, keepdim=True) + 1e-6)
        outputs.append(o)
    o = torch.stack(outputs, 1).reshape(B, T, Hq * Ev)
    return o @ layer.o_proj.weight.double().T


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the tensor's largest entry; NaN never passes."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(expected.abs().max().item(), 1e-6), err


@pytest.mark.parametrize("case", CAUSAL)
def test_forward_matches_float64_recurrence(spec_dir, case):
    layer = _layer(spec_dir, case)
    x = torch.randn(2, 9, HIDDEN)
    y, state = layer(x)
    assert y.shape == (2, 9, HIDDEN) and state is None
    with torch.no_grad():
        _close(y, _recurrence(layer, x, case))


@pytest.mark.parametrize("case", CAUSAL)
def test_decode_token_by_token_matches_full_sequence(spec_dir, case):
    layer = _layer(spec_dir, case, seed=1)
    x = torch.randn(2, 9, HIDDEN)
    steps = []
    step = layer._step
    layer._step = lambda *args: steps.append(1) or step(*args)  # count fast-path calls
    with torch.no_grad():
        y_full, state_full = layer(x, use_cache=True)
        y, state = layer(x[:, :4], use_cache=True)
        extra = 1 if CASES[case][4] else 0
        assert state.shape == (2, H, D, E + extra) and state.dtype == torch.float32
        outputs = [y]
        for t in range(4, 9):
            y_t, state = layer(x[:, t : t + 1], state=state)
            outputs.append(y_t)
    assert len(steps) == 5, "decoding one token with a state under no_grad must use NAME_step"
    _close(torch.cat(outputs, 1), y_full)
    _close(state, state_full)


def test_one_token_with_gradients_uses_the_differentiable_kernel(spec_dir):
    layer = _layer(spec_dir, "per_token")
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        y_full, _ = layer(x)
        _, state = layer(x[:, :4], use_cache=True)
    y_t, new_state = layer(x[:, 4:], state=state)
    assert y_t.requires_grad and new_state.shape == state.shape
    _close(y_t.detach(), y_full[:, 4:])


@pytest.mark.parametrize("case", ["per_head", "per_token_gate", "per_channel", "normalize"])
def test_gradient_reaches_every_parameter(spec_dir, case):
    layer = _layer(spec_dir, case, bias=True)
    y, _ = layer(torch.randn(2, 7, HIDDEN))
    y.square().sum().backward()
    names = {name for name, _ in layer.named_parameters()}
    expected = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "o_proj.bias"}
    assert expected <= names
    if case == "per_head":
        assert "log_slope" in names
    elif case != "normalize":
        assert {"decay_proj.weight", "decay_proj.bias"} <= names
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_grouped_heads_shapes(spec_dir):
    layer = _layer(spec_dir, "per_channel_gate", num_heads=6, num_kv_heads=3, head_dim=4, value_dim=7)
    assert layer.q_proj.out_features == 24 and layer.k_proj.out_features == 12
    assert layer.v_proj.out_features == 21 and layer.o_proj.in_features == 42
    assert layer.decay_proj.out_features == 12
    y, state = layer(torch.randn(1, 5, HIDDEN), use_cache=True)
    assert y.shape == (1, 5, HIDDEN) and state.shape == (1, 6, 4, 7)


def test_default_sizes_and_slopes(spec_dir):
    layer = LinearAttention(EXAMPLES / "lightning.attn", hidden_size=16, num_heads=4)
    assert (layer.num_kv_heads, layer.head_dim, layer.value_dim) == (4, 4, 4)
    # Positive ALiBi / Lightning rates 2^(-8 i / H), i = 1..4.
    slopes = layer.decay_input(torch.zeros(1, 1, 16))
    torch.testing.assert_close(slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))


def test_decay_bias_without_gate_starts_at_the_alibi_rates(spec_dir):
    layer = _layer(spec_dir, "per_token")
    g = layer.decay_input(torch.zeros(1, 1, HIDDEN))  # x = 0: only the bias
    torch.testing.assert_close(g[0, 0], -torch.tensor([2.0**-4, 2.0**-8]))


def test_noncausal(spec_dir):
    layer = LinearAttention(EXAMPLES / "noncausal.attn", HIDDEN, 2)
    x = torch.randn(2, 6, HIDDEN)
    y, state = layer(x)
    assert y.shape == x.shape and state is None and layer.state_shape is None
    # Non-causal: the first output depends on the last token.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2)[0][:, 0] - y[:, 0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="not causal.*state="):
        layer(x, state=torch.zeros(2, 2, 6, 7))
    with pytest.raises(ValueError, match="not causal"):
        layer(x, use_cache=True)


def test_cu_seqlens_passes_through(spec_dir):
    layer = _layer(spec_dir, "per_token_gate")
    a, b = torch.randn(1, 3, HIDDEN), torch.randn(1, 6, HIDDEN)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    with torch.no_grad():
        y, state = layer(torch.cat([a, b], 1), cu_seqlens=cu, use_cache=True)
        ya, sa = layer(a, use_cache=True)
        yb, sb = layer(b, use_cache=True)
    assert state.shape == (2, H, D, E)
    _close(y, torch.cat([ya, yb], 1))
    _close(state, torch.cat([sa, sb]))


def test_reference_backend_agrees_with_kernels(spec_dir):
    kernel = _layer(spec_dir, "per_channel_gate")
    reference = _layer(spec_dir, "per_channel_gate", backend="reference")
    reference.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        yk, sk = kernel(x[:, :6], use_cache=True)
        yr, sr = reference(x[:, :6], use_cache=True)
        _close(yr, yk)
        _close(sr, sk)
        _close(reference(x[:, 6:], state=sr)[0], kernel(x[:, 6:], state=sk)[0])


def test_spec_given_as_module_and_by_name(spec_dir):
    module = attncc.load(EXAMPLES / "gated.attn")
    layer = LinearAttention(module, HIDDEN, 2, name="hgrn2")
    assert layer.spec.name == "hgrn2" and layer.decay_proj.out_features == 2 * 6
    assert layer(torch.randn(1, 4, HIDDEN))[0].shape == (1, 4, HIDDEN)
    with pytest.raises(ValueError, match=r"holds 2 attention blocks \(mamba2, hgrn2\).*name="):
        LinearAttention(module, HIDDEN, 2)
    with pytest.raises(ValueError, match="no attention block `hgrn`.*hgrn2"):
        LinearAttention(EXAMPLES / "gated.attn", HIDDEN, 2, name="hgrn")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=10, num_heads=4), "hidden_size = 10 is not a multiple of num_heads = 4"),
        (dict(hidden_size=8, num_heads=4, num_kv_heads=3), "num_kv_heads = 3 must divide"),
        (dict(hidden_size=8, num_heads=0), "num_heads must be a positive int"),
        (dict(hidden_size=8, num_heads=2, head_dim=300), "head_dim = 300 is above 256"),
        (dict(hidden_size=8, num_heads=2, value_dim=0), "value_dim must be a positive int"),
        (dict(hidden_size=8, num_heads=2, backend="fast"), "backend must be one of"),
    ],
)
def test_bad_sizes_are_value_errors(spec_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearAttention(EXAMPLES / "simple_gla.attn", **kwargs)


def test_bad_inputs_are_value_errors(spec_dir, tmp_path):
    with pytest.raises(ValueError, match="no such spec file"):
        LinearAttention(tmp_path / "missing.attn", 8, 2)
    with pytest.raises(ValueError, match="not an attncc-generated module"):
        LinearAttention(math, 8, 2)
    layer = _layer(spec_dir, "per_token")
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden_size = 12\]"):
        layer(torch.randn(2, 5, 8))


def test_bf16_autocast_on_cpu(spec_dir):
    """The CPU interpreter has no bf16: the layer must still give bf16-accurate results."""
    layer = _layer(spec_dir, "per_channel_gate")
    x = torch.randn(2, 6, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x, use_cache=True)
        with torch.no_grad():
            y_t, _ = layer(x[:, :1], state=state)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    with torch.no_grad():
        y32, s32 = layer(x, use_cache=True)
        _close(y.float(), y32, rtol=5e-2)
        _close(state, s32, rtol=5e-2)
        _close(y_t.float(), layer(x[:, :1], state=s32)[0], rtol=5e-2)


def test_torch_compile(spec_dir):
    """The whole layer in one graph (fullgraph: the kernels are torch.library operators)."""
    layer = _layer(spec_dir, "per_token_gate")
    x = torch.randn(2, 5, HIDDEN)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, state = compiled(x, use_cache=True)
    y.sum().backward()
    with torch.no_grad():
        y_eager, s_eager = layer(x, use_cache=True)
    _close(y.detach(), y_eager)
    _close(state, s_eager)


def test_extra_repr(spec_dir):
    text = repr(_layer(spec_dir, "per_channel_gate"))
    for word in ("spec=gla", "hidden_size=12", "num_heads=4", "num_kv_heads=2", "head_dim=6",
                 "value_dim=5", "decay=per_channel", "gate="):
        assert word in text, text


def test_train_lm_example_smoke(spec_dir, capsys):
    """Three training steps (reference backend), then decoding with the step kernel."""
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLES / "train_lm.py")
    train_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lm)
    train_lm.main(["--steps", "3", "--hidden", "16", "--heads", "2", "--seq-len", "16",
                   "--batch", "2", "--generate", "10", "--log-every", "1", "--device", "cpu",
                   "--backend", "reference", "--decode-backend", "kernel", "--threads", "0"])
    out = capsys.readouterr().out
    assert re.search(r"step +3 +loss [0-9.]+ +[0-9]+ tokens/s", out), out
    assert "generated 10 characters" in out and "backend=kernel" in out, out
    # The decode path (prefill + NAME_step) agreed with one full pass.
    gap = float(re.search(r"max diff ([0-9.e+-]+)", out).group(1))
    assert gap < 1e-4, out


def test_bf16_module_on_cpu(spec_dir):
    """A layer made in bf16 (no autocast) returns bf16, and agrees with its fp32 twin."""
    layer = _layer(spec_dir, "per_token_gate")
    half = _layer(spec_dir, "per_token_gate", dtype=torch.bfloat16)
    half.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        y, state = half(x.bfloat16(), use_cache=True)
        y_t, _ = half(x[:, :1].bfloat16(), state=state)
        y32, s32 = layer(x, use_cache=True)
    assert y.dtype == torch.bfloat16 and y_t.dtype == torch.bfloat16
    _close(y.float(), y32, rtol=5e-2)
    _close(state, s32, rtol=5e-2)


def test_delta_rule_layer_matches_float64_recurrence_and_decodes(spec_dir):
    """A Gated DeltaNet layer (examples/delta/gated_deltanet.attn: l2norm maps, gate
    -softplus, beta sigmoid): the output against the delta rule written out here in float64
    from the layer's weights; then decoding token by token continues the sequence; every
    parameter (beta_proj included) gets a gradient."""
    torch.manual_seed(3)
    layer = LinearAttention(EXAMPLES / "delta" / "gated_deltanet.attn", HIDDEN, num_heads=H, num_kv_heads=H_KV,
                            head_dim=D, value_dim=E)
    x = torch.randn(2, 9, HIDDEN)
    y, state = layer(x, use_cache=True)

    w = lambda proj: proj.weight.double().T  # noqa: E731
    xd = x.double()
    l2 = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    group = H // H_KV
    q = l2((xd @ w(layer.q_proj)).view(2, 9, H, D))
    k = l2((xd @ w(layer.k_proj)).view(2, 9, H_KV, D)).repeat_interleave(group, 2)
    v = (xd @ w(layer.v_proj)).view(2, 9, H_KV, E).repeat_interleave(group, 2)
    g = -F.softplus(xd @ w(layer.decay_proj) + layer.decay_proj.bias.double()).repeat_interleave(group, 2)
    beta = torch.sigmoid(xd @ w(layer.beta_proj) + layer.beta_proj.bias.double()).repeat_interleave(group, 2)
    S = torch.zeros(2, H, D, E, dtype=torch.float64)
    outputs = []
    for t in range(9):
        S = g[:, t].exp()[..., None, None] * S
        correction = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhd,bhde->bhe", k[:, t], S))
        S = S + k[:, t, :, :, None] * correction[..., None, :]
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, t], S) / math.sqrt(D))
    expected = torch.stack(outputs, 1).reshape(2, 9, H * E) @ w(layer.o_proj)
    _close(y, expected)
    _close(state, S)

    with torch.no_grad():
        _, prefix_state = layer(x[:, :6], use_cache=True)
        for t in range(6, 9):
            y_t, prefix_state = layer(x[:, t : t + 1], state=prefix_state)
            _close(y_t[:, 0], y[:, t])
    _close(prefix_state, state)

    y.square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
