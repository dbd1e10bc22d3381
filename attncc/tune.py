"""`attncc tune`: measure launch parameters on the GPU and keep the fastest.

The sweep is coordinate-wise (chunk size, then value-block width, warps,
pipeline stages, and tokens per segment), each step keeping the best so far,
so a full sweep costs one timed configuration per value listed in SEARCH_SPACE
(fewer where a value repeats the best so far) rather than the product of all
choices. It starts from the generated module's defaults. Each configuration is
timed forward+backward (the training step) with `triton.testing.do_bench` medians on fresh random inputs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from attncc.compiler import read_tuned_configs, tuning_path
from attncc.ir import AttentionSpec, Decay

SEARCH_SPACE = {
    "chunk": [16, 32, 64, 128],
    "bwd_chunk": [16, 32, 64],
    "block_e": [32, 64, 128],
    "narrow_block_e": [True, False],
    "num_warps": [4, 8],
    "bwd_num_warps": [4, 8],
    "num_stages": [1, 2, 3, 4],
    "bwd_num_stages": [1, 2, 3],
    "segment": [None, 256, 512, 1024, 2048],
    "bwd_segment": [None, 256, 512, 1024],
}


def _inputs(spec: AttentionSpec, B: int, T: int, H: int, D: int, E: int, dtype: torch.dtype):
    device = "cuda"
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = (k / k.float().norm(dim=-1, keepdim=True).to(dtype)).detach().requires_grad_()
    v = torch.randn(B, T, H, E, device=device, dtype=dtype, requires_grad=True)
    extra = []
    if spec.decay is Decay.PER_HEAD:
        extra = [torch.linspace(0.01, 0.2, H, device=device)]
    elif spec.decay.data_dependent:
        shape = (B, T, H, D) if spec.decay is Decay.PER_CHANNEL else (B, T, H)
        raw = torch.randn(shape, device=device)
        g = raw if spec.gate is not None else torch.nn.functional.logsigmoid(raw) / 16
        extra = [g.requires_grad_()]
    return [q, k, v] + extra


def time_config(module, spec: AttentionSpec, inputs, config: dict, D: int, E: int) -> float:
    """Median ms of one forward+backward with `config` installed in the module."""
    import triton.testing

    module.TUNED_CONFIGS[(spec.name, D, E)] = dict(config)
    fn = getattr(module, spec.name)
    leaves = [x for x in inputs if x.requires_grad]
    grad_out = torch.randn_like(fn(*inputs)[0])

    def step():
        o = fn(*inputs)[0]
        torch.autograd.grad(o, leaves, grad_out)

    return float(triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median"))


def sweep(
    module,
    spec: AttentionSpec,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    progress: Callable[[int, int, dict, float | None], None] = lambda *a: None,
) -> list[tuple[float, dict]]:
    """Coordinate-wise search; returns every (ms, config) tried, fastest first."""
    B, T, H, D = shape[:4]
    E = shape[4] if len(shape) > 4 else D
    inputs = _inputs(spec, B, T, H, D, E, dtype)
    module.TUNED_CONFIGS.pop((spec.name, D, E), None)
    best = getattr(module, f"_{spec.name}_config")(D, E)  # the defaults the module would launch with
    if spec.chunk is not None:
        space = {key: values for key, values in SEARCH_SPACE.items() if key != "chunk"}
    else:
        space = SEARCH_SPACE
    total = sum(len(v) for v in space.values())
    tried: dict[str, tuple[float, dict]] = {}
    done = 0
    for key, values in space.items():
        for value in values:
            config = dict(best, **{key: value})
            label = json.dumps(config, sort_keys=True)
            if label not in tried:
                try:
                    ms = time_config(module, spec, inputs, config, D, E)
                except Exception:  # a configuration the GPU cannot run (e.g. out of shared memory)
                    ms = float("inf")
                tried[label] = (ms, config)
            done += 1
            progress(done, total, config, tried[label][0])
        best = min(tried.values(), key=lambda item: item[0])[1]
    module.TUNED_CONFIGS.pop((spec.name, D, E), None)
    return sorted(tried.values(), key=lambda item: item[0])


def store(spec_path: str | Path, name: str, D: int, E: int, config: dict) -> Path:
    """Record the best config beside the spec, where compile and load pick it up."""
    configs = read_tuned_configs(spec_path)
    configs[(name, D, E)] = config
    entries = [{"name": n, "D": d, "E": e, "config": c} for (n, d, e), c in sorted(configs.items(), key=str)]
    path = tuning_path(spec_path)
    path.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return path


def progress_bar(done: int, total: int, config: dict, ms: float | None) -> None:
    width = 30
    filled = int(width * done / total)
    shown = ", ".join(f"{k}={v}" for k, v in config.items())
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {ms:8.3f} ms  {shown}   ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
