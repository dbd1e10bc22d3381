"""Head-dimension sweep on a GPU: every decay × dtype × (D, E), forward and backward
against the float64 reference; reports launch failures and the worst error per dtype.

    python benchmarks/sweep_dims.py --workers 8 --out sweep.json

Cases are spread over worker processes (Triton compiles on the host, one process
per core pays), each on the one GPU. Inputs: B = 2, T = 333 (several chunks and a
partial one), H = 4 query heads over H_kv = 2, an initial state, fresh random values.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path

SPECS = {
    "none": "attention sweep_none {\n    decay = none\n}\n",
    "per_head": "attention sweep_head {\n    decay = per_head\n}\n",
    "per_token": "attention sweep_token {\n    decay = per_token\n    gate = logsigmoid(x)\n}\n",
    "per_channel": "attention sweep_channel {\n    decay = per_channel\n    gate = logsigmoid(x) / 16\n}\n",
    "normalized": "attention sweep_norm {\n    feature_map = elu(x) + 1\n    normalize = true\n    scale = 1.0\n}\n",
    # The delta rule (update = delta): DeltaNet, Gated DeltaNet and KDA forms.
    "delta_none": "attention sweep_dnone {\n    update = delta\n    feature_map = l2norm\n    beta = sigmoid(x)\n}\n",
    "delta_token": "attention sweep_dtoken {\n    update = delta\n    decay = per_token\n"
    "    gate = -softplus(x)\n    feature_map = l2norm\n    beta = sigmoid(x)\n}\n",
    "delta_channel": "attention sweep_dchannel {\n    update = delta\n    decay = per_channel\n"
    "    gate = -softplus(x)\n    feature_map = l2norm\n    beta = sigmoid(x)\n}\n",
}
DIMS = [16, 32, 64, 100, 128, 192, 256]
PAIRS = [(d, d) for d in DIMS] + [(16, 256), (256, 16), (128, 64), (64, 128), (100, 192), (192, 100), (256, 128)]


def _module(kind: str):
    from attncc.compiler import compile_source
    from attncc.loader import import_path

    path = Path(tempfile.mkdtemp(prefix="sweep-")) / f"sweep_{kind}.py"
    path.write_text(compile_source(SPECS[kind], f"sweep_{kind}.attn"))
    return import_path(path, f"sweep_{kind}_{id(path)}")


def run_case(kind: str, dtype_name: str, D: int, E: int, shape=(2, 333, 4, 2), seed=0) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    B, T, H, H_kv = shape
    module = _module(kind)
    name = SPECS[kind].split()[1]
    fn, reference = getattr(module, name), getattr(module, f"{name}_reference")
    gen = torch.Generator().manual_seed(seed + D * 1000 + E)
    q, k, v = (torch.randn(B, T, h, d, generator=gen) for h, d in ((H, D), (H_kv, D), (H_kv, E)))
    extra, labels = [], ["dq", "dk", "dv"]  # the inputs after q, k, v, and their gradients' names
    if kind == "per_head":
        extra = [torch.rand(H, generator=gen) * 0.5 + 0.01]
    elif kind.endswith("token"):
        extra = [torch.randn(B, T, H_kv, generator=gen) * 2]
    elif kind.endswith("channel"):
        extra = [torch.randn(B, T, H_kv, D, generator=gen) * 2]
    labels += ["d_decay"] * len(extra)
    if kind.startswith("delta"):
        extra.append(torch.randn(B, T, H_kv, generator=gen))  # beta's raw input
        labels.append("d_beta")
    E_state = E + 1 if kind == "normalized" else E
    init = torch.randn(B, H, D, E_state, generator=gen)
    ours = [x.to(dev).to(dtype).requires_grad_() for x in (q, k, v)] + [x.to(dev).requires_grad_() for x in extra]
    if kind == "per_head":
        ours[3].requires_grad_(True)
    theirs = [x.detach().double().requires_grad_() for x in ours]
    init_ours = init.clone().to(dev).requires_grad_()
    init_theirs = init.to(dev).double().requires_grad_()
    result = {"kind": kind, "dtype": dtype_name, "D": D, "E": E}
    try:
        t0 = time.perf_counter()
        o, s = fn(*ours, initial_state=init_ours, output_final_state=True)
        do = torch.randn(o.shape, generator=gen).to(dev)
        ds = torch.randn(s.shape, generator=gen).to(dev)
        ((o.float() * do).sum() + (s * ds).sum()).backward()
        torch.cuda.synchronize() if dev == "cuda" else None
        result["first_call_s"] = time.perf_counter() - t0
        o_r, s_r = reference(*theirs, initial_state=init_theirs, output_final_state=True)
        ((o_r * do.double()).sum() + (s_r * ds.double()).sum()).backward()
        pairs = {"o": (o, o_r), "state": (s, s_r)}
        for label, a, b in zip(labels, ours, theirs, strict=True):
            pairs[label] = (a.grad, b.grad)
        pairs["d_init"] = (init_ours.grad, init_theirs.grad)
        errors = {}
        for label, (a, b) in pairs.items():
            a, b = a.double(), b.double()
            if not torch.isfinite(a).all():
                errors[label] = float("nan")
                continue
            errors[label] = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()
        result["errors"] = errors
    except Exception as error:  # noqa: BLE001 - a launch failure is a result here
        result["failure"] = f"{type(error).__name__}: {error}"[:300]
        result["trace"] = traceback.format_exc()[-1500:]
    return result


def _run_packed(case):
    return run_case(*case)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(SPECS))
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--pairs", default=None, help="D:E,D:E,... (default: the sweep's)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()
    pairs = PAIRS if args.pairs is None else [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    cases = [(kind, dt, D, E) for kind, dt, (D, E) in itertools.product(args.kinds.split(","), args.dtypes.split(","), pairs)]
    # One fresh process per case: a launch that faults (an illegal memory access) leaves
    # its CUDA context unusable, and must not fail the cases after it.
    ctx = mp.get_context("spawn")
    results = []
    lines = open(args.out + "l", "w")  # one JSON object per case as it finishes (JSON lines)
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        for item in pool.imap_unordered(_run_packed, cases):
            results.append(item)
            lines.write(json.dumps(item) + "\n")
            lines.flush()
            errors = item.get("errors", {})
            worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"), default=None)
            print(f"{item['kind']:13} {item['dtype']} D={item['D']:3} E={item['E']:3} "
                  + (f"FAIL {item['failure'][:120]}" if "failure" in item
                     else f"worst {worst} {errors[worst]:.1e} first {item['first_call_s']:.1f}s"),
                  flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\nworst relative error per dtype and output (failures counted apart):")
    for dt in args.dtypes.split(","):
        rows = [r for r in results if r["dtype"] == dt and "errors" in r]
        fails = [r for r in results if r["dtype"] == dt and "failure" in r]
        worst = {}
        for r in rows:
            for label, e in r["errors"].items():
                key = (r["kind"], label)
                worst[key] = max(worst.get(key, 0.0), e if e == e else float("inf"))
        print(f"{dt}: {len(rows)} ran, {len(fails)} failed; "
              + ", ".join(f"{kind}/{label} {e:.1e}" for (kind, label), e in sorted(worst.items(), key=lambda x: -x[1])[:8]))
        for r in fails:
            print(f"   FAIL {r['kind']} D={r['D']} E={r['E']}: {r['failure'][:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
