"""Non-finite values and resets, kernels and reference against the IEEE recurrence.

The semantics (README, "Guarantees"): token t's inputs reach only the outputs of
tokens >= t of its own sequence, so a NaN or inf in a key or value leaves every
earlier output exact; a decay of 0 (log decay -inf, or anything below
LOG_DECAY_FLOOR = -100) wipes the state. The expected values come from the
token-by-token recurrence of tests/test_reference.py evaluated in float64 IEEE
arithmetic (exp(-inf) = 0, 0 * inf = NaN), not from the code under test.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernelkit import DEVICE, module_for
from test_reference import HAND_GATES, HAND_MAPS, IR_GATES, IR_MAPS, recurrence

from attncc.ir import AttentionSpec, Decay

CASES = {
    # name: (decay, q map, k map, gate, normalize)
    "lightning": (Decay.PER_HEAD, "identity", "identity", None, False),
    "simple_gla": (Decay.PER_TOKEN, "identity", "identity", None, False),
    "mamba2": (Decay.PER_TOKEN, "identity", "l2norm", "-softplus", False),
    "gla": (Decay.PER_CHANNEL, "identity", "identity", "logsigmoid/16", False),
    "gla_raw": (Decay.PER_CHANNEL, "relu", "elu1", None, False),
    "katharopoulos": (Decay.NONE, "elu1", "elu1", None, True),
    "plain": (Decay.NONE, "identity", "identity", None, False),
}
B, T, H, H_KV, D, E = 2, 40, 2, 1, 8, 6  # chunk 16: three chunks, the last one partial


def spec_for(name: str) -> AttentionSpec:
    decay, q_map, k_map, gate, normalize = CASES[name]
    return AttentionSpec(
        name=f"nonfinite_{name}", q_map=IR_MAPS[q_map], k_map=IR_MAPS[k_map], decay=decay,
        gate=IR_GATES[gate], chunk=16, normalize=normalize, scale=sympy.Rational(1, 2),
    )


def inputs(name: str, gen: torch.Generator):
    """q, k, v and the decay argument (raw, as the call takes it) plus the log decay the
    recurrence applies, per query head; ordinary values, all finite."""
    decay, _, _, gate, _ = CASES[name]
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H_KV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H_KV, E, generator=gen, dtype=torch.float64)
    if decay is Decay.PER_HEAD:
        raw = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    elif decay is Decay.NONE:
        raw = None
    else:
        shape = (B, T, H_KV, D) if decay is Decay.PER_CHANNEL else (B, T, H_KV)
        raw = torch.randn(shape, generator=gen, dtype=torch.float64)
        raw = raw if gate else -raw.abs() * 0.3
    return q, k, v, raw


def hand_log_decay(name: str, raw):
    """The log decay per query head, written by hand; IEEE: exp of it may be exactly 0."""
    decay, _, _, gate, _ = CASES[name]
    if decay is Decay.NONE:
        return None
    g = (-raw).expand(B, T, H) if decay is Decay.PER_HEAD else HAND_GATES[gate](raw) if gate else raw
    g = torch.where(g < -100, float("-inf"), g)  # below the floor: a decay of exactly 0
    return g if decay is Decay.PER_HEAD else g.repeat_interleave(H // H_KV, dim=2)


def expected(name: str, q, k, v, raw):
    _, q_map, k_map, _, normalize = CASES[name]
    kk, vv = (x.repeat_interleave(H // H_KV, dim=2) for x in (k, v))
    return recurrence(q, kk, vv, hand_log_decay(name, raw), 0.5, None, normalize, True,
                      HAND_MAPS[q_map], HAND_MAPS[k_map])


def run(module, name: str, q, k, v, raw):
    """The kernels on float32 copies (on the test device), and the generated reference."""
    fn = getattr(module, f"nonfinite_{name}")
    reference = getattr(module, f"nonfinite_{name}_reference")
    args = [raw] if raw is not None else []
    ours = [x.float().to(DEVICE) for x in (q, k, v, *args)]
    o, state = fn(*ours, output_final_state=True)
    o_ref, state_ref = reference(q, k, v, *args, output_final_state=True)
    return o.double().cpu(), state.double().cpu(), o_ref, state_ref


def assert_same_values(actual, wanted, what, tol=2e-5):
    """Non-finite in exactly the same places; the finite entries within tol (relative)."""
    finite = torch.isfinite(wanted)
    mismatch = (torch.isfinite(actual) != finite).nonzero()
    assert mismatch.numel() == 0, f"{what}: finiteness differs first at {mismatch[0].tolist()}"
    error = (actual[finite] - wanted[finite]).norm() / wanted[finite].norm().clamp_min(1e-3)
    assert error < tol, f"{what}: relative error {error:.2e} on the finite entries"


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=3)
@given(
    seed=st.integers(0, 2**16),
    where=st.sampled_from(["k", "v"]),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    token=st.integers(0, T - 1),
)
def test_a_nonfinite_key_or_value_reaches_later_tokens_only(name, seed, where, value, token):
    module = module_for(spec_for(name))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, raw = inputs(name, gen)
    channel = int(torch.randint(0, D if where == "k" else E, (1,), generator=gen))
    (k if where == "k" else v)[1, token, 0, channel] = value  # second sequence only
    o_hand, _ = expected(name, q, k, v, raw)
    o, state, o_ref, state_ref = run(module, name, q, k, v, raw)
    assert torch.isfinite(o[0]).all() and torch.isfinite(o[1, :token]).all(), "reached earlier tokens"
    if value != value:  # NaN survives every feature map (±inf may not: elu(-inf) + 1 = 0)
        assert not torch.isfinite(o[1, token:]).all(), "the NaN vanished"
    assert_same_values(o, o_hand, "kernel o")
    assert_same_values(o_ref, o_hand, "reference o", tol=1e-10)
    assert torch.isfinite(state[0]).all() and torch.isfinite(state_ref[0]).all()


DECAYED = [n for n in CASES if CASES[n][0] is not Decay.NONE]


@pytest.mark.parametrize("name", DECAYED)
@pytest.mark.parametrize("reset", ["-inf", "-1e30", "-150"][: 3 if DEVICE == "cuda" else 2])
def test_a_zero_decay_resets_the_state(name, reset):
    """Resets (decay 0) among ordinary decays: exact, finite, and the gradients finite."""
    decay, _, _, gate, _ = CASES[name]
    module = module_for(spec_for(name))
    gen = torch.Generator().manual_seed(len(name) + len(reset))
    q, k, v, raw = inputs(name, gen)
    value = float(reset)
    # The raw input that gives log decay `value`: slope -value; the gate's inverse.
    target = {None: value, "logsigmoid/16": 16 * value, "-softplus": -value}[gate]
    if decay is Decay.PER_HEAD:
        raw[1] = -target  # slope +inf / 1e30 / 150: every token of head 1 starts afresh
    else:
        raw = torch.where(torch.rand(raw.shape, generator=gen) < 0.2, target, raw)
    o_hand, state_hand = expected(name, q, k, v, raw)
    assert torch.isfinite(o_hand).all()
    o, state, o_ref, state_ref = run(module, name, q, k, v, raw)
    assert_same_values(o, o_hand, "kernel o")
    assert_same_values(state, state_hand, "kernel final state")
    assert_same_values(o_ref, o_hand, "reference o", tol=1e-10)

    # Gradients: finite, and equal to the float64 reference's.
    fn = getattr(module, f"nonfinite_{name}")
    reference = getattr(module, f"nonfinite_{name}_reference")
    ours = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, raw)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v, raw)]
    do = torch.randn(B, T, H, E, generator=gen, dtype=torch.float64)
    (fn(*ours)[0].double().cpu() * do).sum().backward()
    (reference(*theirs)[0] * do).sum().backward()
    for label, a, b in zip(["dq", "dk", "dv", "d_decay"], ours, theirs, strict=True):
        assert torch.isfinite(a.grad).all(), f"{label} not finite"
        assert_same_values(a.grad.double().cpu(), b.grad, label, tol=1e-4)


def test_feature_map_helpers_keep_nan_on_the_gpu():
    """On the GPU a plain tl.maximum / tl.minimum returns the other operand for a NaN
    (fmax), so relu(NaN) or elu(NaN) would come out finite there: seen on the H200 for
    the elu(x) + 1 specs above. The interpreter's numpy keeps NaN, so this checks the
    generated helpers themselves: every max/min in them propagates NaN."""
    import re

    from attncc.render import render_module

    source = render_module([spec_for("gla_raw"), spec_for("katharopoulos")], "# probe\n", "probe.attn")
    helpers = re.findall(r"@triton\.jit\ndef (_\w+)\(x\):\n    return (.*)\n", source)
    assert {"_relu", "_elu", "_elu_grad"} <= {name for name, _ in helpers}
    for name, body in helpers:
        if name in ("_logsigmoid", "_softplus"):  # their log(1 + exp(-|x|)) term carries NaN
            continue
        for call in re.findall(r"tl\.(?:maximum|minimum)\([^()]*\)", body):
            assert "propagate_nan=tl.PropagateNan.ALL" in call, f"{name}: {call}"


def test_slope_gradient_of_fast_decaying_heads_is_not_rounding_noise():
    """Heads with slope >= 20 forget everything but the current token, so dL/dslope is
    ~e^-slope. The decay gradient is a difference of q ⊙ dq and k ⊙ dk whose diagonal
    terms (s = t) cancel exactly in the math; formed with them it came out as fp32
    noise of 1e-4 (item 9 of the trust issue)."""
    spec = AttentionSpec(name="fast_heads", decay=Decay.PER_HEAD, chunk=16)
    module = module_for(spec)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 40, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    slope = torch.tensor([0.1, 25.0, 40.0, 0.5], dtype=torch.float64)
    do = torch.randn(1, 40, 4, 8, generator=gen, dtype=torch.float64)
    ours = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, slope)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v, slope)]
    (module.fast_heads(*ours)[0].double().cpu() * do).sum().backward()
    (module.fast_heads_reference(*theirs)[0] * do).sum().backward()
    got, want = ours[3].grad.double().cpu(), theirs[3].grad
    assert (got[1:3] - want[1:3]).abs().max() < 1e-6, (got, want)
    assert ((got[[0, 3]] - want[[0, 3]]).abs() / want[[0, 3]].abs()).max() < 1e-4, (got, want)
