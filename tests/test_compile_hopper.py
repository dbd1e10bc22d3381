"""Every kernel the wrappers launch compiles for the H100 (sm_90a), on any machine.

The rest of the suite runs the kernels through Triton's interpreter, which accepts
code the compiler rejects (for one, Triton's `if` needs the same tile types in both
branches). This compiles the real thing with Triton's own ptxas; no GPU needed.
"""

from __future__ import annotations

import pytest

from attncc.bench import BENCH_SPECS
from attncc.check import parse_spec
from attncc.compiler import compile_source
from attncc.derive import plan

GATED = """attention gated_channel {
    q_map = elu(x) + 1
    k_map = elu(x) + 1
    decay = per_channel
    gate = logsigmoid(x) / 16
    normalize = true
}
"""

SOURCES = [source for source, _ in BENCH_SPECS.values()] + [GATED]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.split()[1])
def test_kernels_compile_for_sm90(source, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when @triton.jit runs: build real kernels
    from attncc.hopper import causal_kernels, compile_kernel, load_compiled_mode

    kernel_plan = plan(parse_spec(source).specs[0])
    module = load_compiled_mode(compile_source(source, "x.attn"), f"hopper_{kernel_plan.name}")
    D, E = 64, 64 + int(kernel_plan.normalize)
    config = {"chunk": kernel_plan.chunk, "bwd_chunk": kernel_plan.bwd_chunk, "block_e": 64}
    for label, kernel, constexprs in causal_kernels(module, kernel_plan, D, E, "bf16", config):
        compiled = compile_kernel(kernel, constexprs, "bf16", kernel_plan.num_warps, 2)
        assert compiled.asm["cubin"], label
