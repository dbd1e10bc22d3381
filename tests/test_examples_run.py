"""Every block of every example: compiled, imported, and equal to its own reference,
forward and backward (fp32 kernels against the float64 reference)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernelkit import DEVICE, rel_error

from attncc.check import load_spec_file
from attncc.compiler import compile_file
from attncc.ir import Decay, UpdateRule
from attncc.loader import import_path

REPO = Path(__file__).resolve().parent.parent
# examples/*.attn and the delta rule's examples/delta/*.attn
FILES = sorted((REPO / "examples").glob("*.attn")) + sorted((REPO / "examples" / "delta").glob("*.attn"))
BLOCKS = [(path, spec) for path in FILES for spec in load_spec_file(path).specs]


@pytest.mark.parametrize("path, spec", BLOCKS, ids=[f"{p.stem}:{s.name}" for p, s in BLOCKS])
def test_example_matches_its_reference(path, spec, tmp_path):
    out = tmp_path / f"example_{path.stem}.py"
    out.write_text(compile_file(path))
    module = import_path(out, f"example_{path.stem}_{spec.name}")
    fn, reference = getattr(module, spec.name), getattr(module, f"{spec.name}_reference")

    gen = torch.Generator().manual_seed(11)
    delta = spec.update is UpdateRule.DELTA
    B, T, H, D, E = (2, 20, 2, 16, 24) if delta else (2, 45, 2, 32, 24)  # the delta rule: slower in the interpreter
    inputs = [torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen),
              torch.randn(B, T, H, E, generator=gen)]
    if spec.decay is Decay.PER_HEAD:
        inputs.append(torch.rand(H, generator=gen))
    elif spec.decay is Decay.PER_TOKEN:
        inputs.append(torch.randn(B, T, H, generator=gen) if spec.gate else -torch.rand(B, T, H, generator=gen))
    elif spec.decay is Decay.PER_CHANNEL:
        raw = torch.randn(B, T, H, D, generator=gen)
        inputs.append(raw if spec.gate else -raw.abs())
    if delta:  # beta: a raw input for its transform, else β in (0, 1)
        inputs.append(torch.randn(B, T, H, generator=gen) if spec.beta is not None else torch.rand(B, T, H, generator=gen))
    ours = [x.to(DEVICE).requires_grad_() for x in inputs]
    theirs = [x.detach().double().requires_grad_() for x in ours]
    o, _ = fn(*ours)
    o_ref, _ = reference(*theirs)
    grad = torch.randn(o.shape, generator=gen).to(DEVICE)
    (o * grad).sum().backward()
    (o_ref * grad.double()).sum().backward()
    assert rel_error(o, o_ref) < 2e-5
    for a, b in zip(ours, theirs, strict=True):
        assert rel_error(a.grad, b.grad, floor=1.0 if a.dim() == 1 else 1e-2) < 2e-5 * (10 if a.dim() == 1 else 1)


@pytest.mark.parametrize("example", ["lightning.attn", "delta/gated_deltanet.attn"])
def test_demo_runs_a_compiled_example(example, tmp_path):
    """The README's first command: `attncc compile` an example, then examples/demo.py on the
    module (forward, backward, the float64 check, one decoding step); the delta rule's
    functions take beta as well."""
    module = tmp_path / "kernel.py"
    module.write_text(compile_file(REPO / "examples" / example))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), str(module)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "relative error vs float64 reference" in result.stdout and "decoded one more token" in result.stdout
