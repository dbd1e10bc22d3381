"""`attncc tune`: measure launch parameters on the GPU and keep the fastest.

The sweep is coordinate-wise (chunk size, then value-block width, warps,
pipeline stages, and tokens per segment), each step keeping the best so far,
so a full sweep costs one timed configuration per value listed in SEARCH_SPACE
(fewer where a value repeats the best so far) rather than the product of all
choices. It starts from the generated module's defaults and sweeps only the keys those
defaults have: a delta-rule module (`update = delta`) launches with chunk, block_e,
sweep_block_e and bwd_block_e, and warps and stages for each of its three kernel groups (chunk-parallel
forward, sequential sweeps, chunk-parallel backward; its backward reuses the forward's
chunk; it has no narrow blocks or sequence segments). Each configuration is timed
forward+backward (the training step) with `triton.testing.do_bench` medians on fresh random
inputs (`attncc.bench.spec_inputs`, those `attncc bench` times).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from attncc.compiler import read_tuned_configs, tuning_path
from attncc.errors import AttnccError, Diagnostic
from attncc.ir import AttentionSpec

SEARCH_SPACE = {
    "chunk": [16, 32, 64, 128],
    "bwd_chunk": [16, 32, 64],
    "block_e": [32, 64, 128],
    "sweep_block_e": [32, 64],  # 16 crashed on the H200 (attncc.compiler.LAUNCH_KEYS)
    "bwd_block_e": [32, 64],
    "narrow_block_e": [True, False],
    "num_warps": [4, 8],
    "bwd_num_warps": [4, 8],
    "sweep_num_warps": [4, 8],
    "num_stages": [1, 2, 3, 4],
    "sweep_num_stages": [1, 2, 3],
    "bwd_num_stages": [1, 2, 3],
    "segment": [None, 256, 512, 1024, 2048],
    "bwd_segment": [None, 256, 512, 1024],
}


def _inputs(spec: AttentionSpec, B: int, T: int, H: int, D: int, E: int, dtype: torch.dtype,
            device: str = "cuda") -> list[torch.Tensor]:
    """The positional arguments of `spec`'s function (a delta spec's beta included)."""
    from attncc.bench import spec_inputs

    return spec_inputs(spec, B, T, H, D, E, dtype, device)[0]


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
    *,
    device: str = "cuda",
) -> list[tuple[float, dict]]:
    """Coordinate-wise search; returns every (ms, config) tried, fastest first. Raises
    AttnccError when no configuration runs (the first failure says why). (`device` is for
    tests, with a stand-in for do_bench.)"""
    B, T, H, D = shape[:4]
    E = shape[4] if len(shape) > 4 else D
    inputs = _inputs(spec, B, T, H, D, E, dtype, device)
    module.TUNED_CONFIGS.pop((spec.name, D, E), None)
    best = getattr(module, f"_{spec.name}_config")(D, E)  # the defaults the module would launch with
    # Only the keys this module's config has (a key it lacks would be timed, stored and ignored),
    # and not the chunk where the spec fixes it.
    space = {key: values for key, values in SEARCH_SPACE.items()
             if key in best and not (key == "chunk" and spec.chunk is not None)}
    total = sum(len(v) for v in space.values())
    tried: dict[str, tuple[float, dict]] = {}
    first_failure: str | None = None
    done = 0
    try:
        for key, values in space.items():
            for value in values:
                config = dict(best, **{key: value})
                label = json.dumps(config, sort_keys=True)
                if label not in tried:
                    try:
                        ms = time_config(module, spec, inputs, config, D, E)
                    except Exception as error:  # a configuration the GPU cannot run (e.g. out of shared memory)
                        ms = float("inf")
                        first_failure = first_failure or f"{type(error).__name__}: {str(error).strip()[:300]}"
                    tried[label] = (ms, config)
                done += 1
                progress(done, total, config, tried[label][0])
            best = min(tried.values(), key=lambda item: item[0])[1]
    finally:
        module.TUNED_CONFIGS.pop((spec.name, D, E), None)
    results = sorted(tried.values(), key=lambda item: item[0])
    if not results or results[0][0] == float("inf"):
        shown = "x".join(map(str, shape))
        raise AttnccError(Diagnostic(
            f"tuning `{spec.name}` at {shown}: every configuration failed"
            + (f" (the first: {first_failure})" if first_failure else " (none was tried)"),
            hint="check that the shape and dtype run with `attncc bench SPEC --shape ...`; nothing was stored",
        ))
    return results


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
