"""Helpers for the kernel tests: build modules from IR, draw inputs, compare."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from attncc.ir import AttentionSpec, Decay
from attncc.loader import import_path
from attncc.render import render_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OUT = Path(tempfile.mkdtemp(prefix="attncc-test-"))

# Relative error bounds against the float64 reference, per input dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@functools.cache
def module_for(spec: AttentionSpec):
    """Render `spec` into a module file and import it (cached per IR value)."""
    source = render_module([spec], f"# test spec {spec.name}\n", f"{spec.name}.attn")
    name = f"attncc_test_{spec.name}_{abs(hash(spec)):x}"
    path = _OUT / f"{name}.py"
    path.write_text(source)
    return import_path(path, name)


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-2) -> float:
    """||actual - expected|| / ||expected||, with a floor of 1e-2 per element under the norm,
    so that a gradient that is zero in exact arithmetic (e.g. dq of a normalized
    spec at T = 1) is judged by absolute error instead of dividing rounding by ~0."""
    assert actual is not None and expected is not None, "missing gradient"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(actual).any(), "NaN in result"
    floor = floor * actual.numel() ** 0.5
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()



def assert_compiled_matches_eager(actual, expected, bound: float = 2e-2) -> None:
    """Outputs and gradients of a compiled bf16 call against the eager call: each finite and
    within `bound` in relative norm (Inductor may fuse the loss's bf16 arithmetic in
    float32, so the two differ by bf16 rounding, not bitwise)."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a, e = a.double(), e.double()
        assert torch.isfinite(a).all(), f"output {i}: not finite"
        err = ((a - e).norm() / e.norm()).item()
        assert err < bound, f"output {i}: relative error {err:.2e}"

def decay_input(spec: AttentionSpec, B: int, T: int, H: int, H_kv: int, D: int, gen, extreme=False):
    """A fresh decay argument for spec, or None."""
    if spec.decay is Decay.PER_HEAD:
        return torch.rand(H, generator=gen) * 0.5 + 0.01
    if spec.decay in (Decay.PER_TOKEN, Decay.PER_CHANNEL):
        shape = (B, T, H_kv, D) if spec.decay is Decay.PER_CHANNEL else (B, T, H_kv)
        if extreme in ("mixed", "gentle"):
            # Gentle log decays; "mixed": a few channels of tokens 16..31 lose e^-3 each, so
            # with chunk 16 that chunk decays by e^-48 (per-channel forward: the exact path).
            g = -torch.rand(shape, generator=gen) * 0.1
            if extreme == "mixed":
                g[:, 16:32, ..., :3] = -3.0
            return g if spec.gate is None else g - torch.log(-torch.expm1(g))  # logsigmoid⁻¹
        if extreme:
            # A mix of "no decay" (g = 0, or a gate input of +40) and "state wiped"
            # (g or gate input -1e4): nothing may overflow or turn into NaN.
            choice = torch.randint(0, 3, shape, generator=gen)
            keep = 0.0 if spec.gate is None else 40.0
            ordinary = -torch.rand(shape, generator=gen)
            return torch.where(choice == 0, keep, torch.where(choice == 1, -1e4, ordinary))
        if spec.gate is None:
            return -torch.rand(shape, generator=gen) * 0.5  # log decay g <= 0
        return torch.randn(shape, generator=gen) * 2  # raw gate input
    return None


def call_args(module, spec):
    """The public function, its _step and reference, and whether it takes a decay argument."""
    fn = getattr(module, spec.name)
    return fn, getattr(module, f"{spec.name}_reference"), spec.decay is not Decay.NONE
