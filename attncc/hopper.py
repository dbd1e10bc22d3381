"""Compile generated kernels for Hopper (sm_90a) without a GPU, with Triton's own ptxas.

The interpreter runs code the compiler may reject (Triton's `if` demands the same
tile types in both branches, for one); this catches that on any machine, and
ptxas's report shows registers and spills before any GPU time is spent. Kernel
arguments are typed by name: q, k, v, o, do, dq, dk, dv take the input dtype;
states, decays and decay gradients are float32.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from attncc.derive import KernelPlan
from attncc.loader import import_path

INPUT_DTYPE_ARGS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def load_compiled_mode(source: str, name: str):
    """Import a generated module without its no-GPU switch to the interpreter."""
    source = re.sub(r"if not torch\.cuda\.is_available\(\):[\s\S]*?\n(?=import triton)", "", source, count=1)
    path = Path(tempfile.mkdtemp(prefix="attncc-ptx-")) / f"{name}.py"
    path.write_text(source)
    return import_path(path, name)


def compile_kernel(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int):
    """triton.compile for sm_90a, with every non-constexpr argument typed by its name."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("cu_seqlens", "segment_starts", "exact_path_ptr", "first_slot_ptr"):
            signature[arg] = "*i32"
        elif arg == "segment_len":
            signature[arg] = "i32"
        else:
            signature[arg] = f"*{dtype}" if arg in INPUT_DTYPE_ARGS else "*fp32"
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_summary(compiled) -> str:
    """Registers, spills and shared memory of a compiled kernel, as ptxas reports them."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True)
    used = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return (f"{used.group(1) if used else '?'} registers, spill stores/loads {spills.group(1)}/{spills.group(2)} B, "
            f"shared {compiled.metadata.shared} B") if spills else result.stderr.strip()


def causal_kernels(module, plan: KernelPlan, D: int, E: int, dtype: str, config: dict) -> list[tuple[str, object, dict]]:
    """(label, kernel, constexprs) for the forward (output and state-only) and the two
    backward sweeps of a causal spec's module, as its wrapper launches them."""
    common = {"H": 4, "HKV": 4, "D": D, "E": E, "BLOCK_D": module._block(D),
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if plan.per_channel:
        common.update(SUB=16, SPLIT_IN_FP32=dtype == "fp16", FAST_PATH=False)
    forward = dict(common, BLOCK_T=config["chunk"], BLOCK_E=config["block_e"])
    backward = dict(common, BLOCK_T=config["bwd_chunk"], BLOCK_E=module._block(E))
    kernels = [
        ("fwd (output)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=False, STORE_OUTPUT=True,
                                             STORE_SEGMENT_STATES=True)),
        ("fwd (state only)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=False, STORE_FINAL_STATE=True,
                                                 STORE_OUTPUT=False, STORE_SEGMENT_STATES=False)),
        ("bwd dq", "bwd_dq_kernel", dict(backward, HAS_INITIAL_STATE=True, STORE_DB=plan.data_dependent)),
        ("bwd dk dv", "bwd_dkv_kernel", dict(backward, HAS_DFINAL_STATE=True, STORE_DINITIAL_STATE=False,
                                             STORE_DB=plan.data_dependent, STATE_ONLY=False)),
        ("bwd dk dv (state only)", "bwd_dkv_kernel", dict(backward, HAS_DFINAL_STATE=False, STORE_DINITIAL_STATE=True,
                                                          STORE_DB=False, STATE_ONLY=True)),
    ]
    if plan.per_channel:  # each output kernel on both paths
        kernels += [(label + ", fast", name, dict(constexprs, FAST_PATH=True))
                    for label, name, constexprs in kernels if "state only" not in label]
    return [(label, getattr(module, f"_{plan.name}_{name}"), constexprs) for label, name, constexprs in kernels]


def delta_kernels(module, plan: KernelPlan, D: int, E: int, dtype: str, config: dict) -> list[tuple[str, object, dict]]:
    """(label, kernel, constexprs) for the delta rule's three forward kernels, its three
    backward kernels and its decoding step (the two sweeps at their narrower value block)."""
    common = {"H": 4, "HKV": 4, "D": D, "E": E, "CHUNK": config["chunk"], "BLOCK_D": module._block(D),
              "BLOCK_E": min(module._block(E), config["block_e"]), "PER_CHANNEL": plan.per_channel,
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sweep = dict(common, BLOCK_E=min(module._block(E), config["sweep_block_e"]))
    kernels = [
        ("fwd wy", "wy_kernel", common),
        ("fwd state sweep", "state_kernel", dict(sweep, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=True)),
        ("fwd output", "output_kernel", dict(common, STORE_SCORES=True)),
        ("bwd local", "bwd_local_kernel", common),
        ("bwd state sweep", "bwd_state_kernel", dict(sweep, HAS_DFINAL_STATE=True, STORE_DINITIAL_STATE=True)),
        ("bwd chunks", "bwd_chunk_kernel", dict(common, STORE_DDECAY=plan.has_decay)),
        ("step", "step_kernel", {key: common[key] for key in ("H", "HKV", "D", "E", "BLOCK_D", "BLOCK_E")}),
    ]
    return [(label, getattr(module, f"_{plan.name}_{name}"), constexprs) for label, name, constexprs in kernels]
