"""Every kernel the wrappers launch compiles for the H100 (sm_90a), on any machine.

The rest of the suite runs the kernels through Triton's interpreter, which accepts
code the compiler rejects (for one, Triton's `if` needs the same tile types in both
branches). This compiles the real thing with Triton's own ptxas; no GPU needed.
It runs in a child process: compiling in the process that interprets the other
tests' kernels leaves Triton's interpreter broken for them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attncc.bench import BENCH_SPECS

GATED = """attention gated_channel {
    q_map = elu(x) + 1
    k_map = elu(x) + 1
    decay = per_channel
    gate = logsigmoid(x) / 16
    normalize = true
}
"""

SOURCES = [source for source, _ in BENCH_SPECS.values()] + [GATED]

CHILD = """
import sys
from attncc.check import parse_spec
from attncc.compiler import compile_source
from attncc.derive import plan
from attncc.hopper import causal_kernels, compile_kernel, load_compiled_mode

source = sys.stdin.read()
kernel_plan = plan(parse_spec(source).specs[0])
module = load_compiled_mode(compile_source(source, "x.attn"), "hopper_" + kernel_plan.name)
D, E = 64, 64 + int(kernel_plan.normalize)
config = {"chunk": kernel_plan.chunk, "bwd_chunk": kernel_plan.bwd_chunk, "block_e": 64}
for label, kernel, constexprs in causal_kernels(module, kernel_plan, D, E, "bf16", config):
    backward = label.startswith("bwd")
    warps = kernel_plan.bwd_num_warps if backward else kernel_plan.num_warps
    stages = kernel_plan.bwd_num_stages if backward else kernel_plan.num_stages
    compiled = compile_kernel(kernel, constexprs, "bf16", warps, stages)
    assert compiled.asm["cubin"], label
    print("compiled", label)
"""


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.split()[1])
def test_kernels_compile_for_sm90(source):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHILD], input=source, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") >= 4, result.stdout


DELTA_CHILD = """
import sys
from attncc.hopper import HOPPER_SHARED_MEMORY, compile_kernel, delta_kernels, load_compiled_mode
from attncc.check import parse_spec
from attncc.compiler import compile_source
from attncc.derive import plan

decay, D, E, *labels = sys.argv[1:]
gate = "" if decay == "none" else "    gate = -softplus(x)\\n"
source = f"attention fit {{\\n    update = delta\\n    decay = {decay}\\n{gate}    beta = sigmoid(x)\\n}}\\n"
kernel_plan = plan(parse_spec(source).specs[0])
module = load_compiled_mode(compile_source(source, "fit.attn"), "fit_" + decay)
for label, kernel, constexprs, warps, stages in delta_kernels(module, kernel_plan, int(D), int(E), "bf16"):
    if label in labels:
        compiled = compile_kernel(kernel, constexprs, "bf16", warps, stages)
        print(label, compiled.metadata.shared, "fits" if compiled.metadata.shared <= HOPPER_SHARED_MEMORY else "too big")
"""


# The delta rule's widest tiles at its default launch: its backward chunk kernel holds several
# [chunk, D] fp32 tiles (at chunk 64 it asked for 262 KB at D = 128, E = 64 and 328 KB at
# D = 256, E = 16 on an H200, whose blocks get 227 KB), and a single value block (E = 64) is
# its worst case at D = 128.
DELTA_WIDE_CASES = [
    ("none", 128, 64, ["bwd chunks"]),
    ("per_token", 256, 16, ["bwd chunks", "fwd output"]),
    ("per_channel", 256, 128, ["bwd chunks"]),
]


@pytest.mark.parametrize("decay,D,E,labels", DELTA_WIDE_CASES, ids=lambda x: str(x).replace(" ", "_"))
def test_delta_kernels_fit_in_hopper_shared_memory(decay, D, E, labels):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", DELTA_CHILD, decay, str(D), str(E), *labels], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(labels), result.stdout
    assert all(line.endswith(" fits") for line in lines), result.stdout
