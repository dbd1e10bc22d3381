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
import types
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from attncc.derive import KernelPlan
from attncc.loader import import_path

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
        elif arg in ("segment_len", "num_tokens"):
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
    backward sweeps of a causal spec's module, as its wrapper launches them; `config`
    overrides keys of the module's defaults (`_NAME_config`)."""
    config = dict(getattr(module, f"_{plan.name}_config")(D, E), **config)
    common = {"H": 4, "HKV": 4, "D": D, "E": E, "BLOCK_D": module._block(D),
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    forward = dict(common, BLOCK_T=config["chunk"], BLOCK_E=config["block_e"])
    # The value block of a backward whose decay (if any) needs its gradient, as the module picks it.
    block_e = getattr(module, f"_{plan.name}_backward_block_e")(config, D, plan.has_decay)
    backward = dict(common, BLOCK_T=config["bwd_chunk"], BLOCK_E=block_e)
    if plan.per_channel:  # the split products' dtype by the module's own rule, as on a GPU
        gpu_input = types.SimpleNamespace(dtype=TORCH_DTYPES[dtype], is_cuda=True)
        split_dtype = getattr(module, f"_{plan.name}_split_dtype")
        for tiles in (forward, backward):
            tiles.update(SUB=16, SPLIT_DTYPE=split_dtype(gpu_input, D, tiles["BLOCK_E"]), FAST_PATH=False)
    precise_db = getattr(module, f"_{plan.name}_precise_decay_grad")(D, block_e)  # as the backward decides
    kernels = [
        ("fwd (output)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=False, STORE_OUTPUT=True,
                                             STORE_SEGMENT_STATES=True)),
        ("fwd (state only)", "fwd_kernel", dict(forward, HAS_INITIAL_STATE=False, STORE_FINAL_STATE=True,
                                                 STORE_OUTPUT=False, STORE_SEGMENT_STATES=False)),
        ("bwd dq", "bwd_dq_kernel", dict(backward, HAS_INITIAL_STATE=True, STORE_DB=plan.has_decay,
                                         PRECISE_DB=precise_db)),
        ("bwd dk dv", "bwd_dkv_kernel", dict(backward, HAS_DFINAL_STATE=True, STORE_DINITIAL_STATE=False,
                                             STORE_DB=plan.has_decay, PRECISE_DB=precise_db, STATE_ONLY=False)),
        ("bwd dk dv (state only)", "bwd_dkv_kernel", dict(backward, HAS_DFINAL_STATE=False, STORE_DINITIAL_STATE=True,
                                                          STORE_DB=False, PRECISE_DB=False, STATE_ONLY=True)),
    ]
    if precise_db:  # wider heads take the plain difference: compile that path too
        kernels += [(label + " (plain decay gradient)", name, dict(constexprs, PRECISE_DB=False))
                    for label, name, constexprs in kernels if constexprs.get("PRECISE_DB")]
    if plan.per_channel:  # each output kernel on both paths
        kernels += [(label + ", fast", name, dict(constexprs, FAST_PATH=True))
                    for label, name, constexprs in kernels if "state only" not in label]
    return [(label, getattr(module, f"_{plan.name}_{name}"), constexprs) for label, name, constexprs in kernels]


# The most shared memory one block may take on an H100 or H200 (227 KB, the opt-in limit
# Triton checks a launch against).
HOPPER_SHARED_MEMORY = 232448


def delta_kernels(module, plan: KernelPlan, D: int, E: int, dtype: str,
                  config: dict | None = None) -> list[tuple[str, object, dict, int, int]]:
    """(label, kernel, constexprs, num_warps, num_stages) for the delta rule's three forward
    kernels, its backward kernels and its decoding step, with the constexprs the module's
    own launch helper gives at these head dims (tensors on the meta device stand in for
    the inputs); `config` overrides keys of the module's defaults (`_NAME_config`)."""

    name = plan.name
    config = dict(getattr(module, f"_{name}_config")(D, E), **(config or {}))
    q = torch.empty(1, 4, D, dtype=TORCH_DTYPES[dtype], device="meta")
    v = torch.empty(1, 4, E, dtype=TORCH_DTYPES[dtype], device="meta")
    launch_args = getattr(module, f"_{name}_launch_args")

    def group(**kinds):
        args = launch_args(q, v, 4, config, **kinds)
        return args, args.pop("num_warps"), args.pop("num_stages")

    common, warps, stages = group()
    sweep, sweep_warps, sweep_stages = group(sweep=True)
    backward, bwd_warps, bwd_stages = group(backward=True)
    bwd_sweep, bwd_sweep_warps, bwd_sweep_stages = group(backward=True, sweep=True)
    step = {key: common[key] for key in ("H", "HKV", "D", "E", "BLOCK_D", "BLOCK_E")}
    kernels = [
        ("fwd wy", "wy_kernel", common, warps, stages),
        ("fwd state sweep", "state_kernel", dict(sweep, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=True),
         sweep_warps, sweep_stages),
        ("fwd output", "output_kernel", dict(common, STORE_SCORES=True), warps, stages),
        ("bwd local", "bwd_local_kernel", backward, bwd_warps, bwd_stages),
        ("bwd state sweep", "bwd_state_kernel", dict(bwd_sweep, HAS_DFINAL_STATE=True, STORE_DINITIAL_STATE=True),
         bwd_sweep_warps, bwd_sweep_stages),
        ("bwd chunks", "bwd_chunk_kernel", dict(backward, STORE_DDECAY=plan.has_decay), bwd_warps, bwd_stages),
        ("step", "step_kernel", dict(step, BLOCK_E=min(module._block(E), 64)), 4, 3),  # Triton's defaults
    ]
    return [(label, getattr(module, f"_{name}_{kernel}"), constexprs, num_warps, num_stages)
            for label, kernel, constexprs, num_warps, num_stages in kernels]
