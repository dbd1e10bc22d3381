"""bf16 gradients against float64, side by side with a bf16 eager PyTorch computation
and fla's matching op, on the same bf16 inputs (GPU).

    python benchmarks/bf16_grads.py [--shape 1,512,4,128] [--seeds 3]

For each spec: the relative error ||x - x64|| / ||x64|| of o and of every gradient,
where x64 is the generated reference in float64 on the bf16-rounded inputs; "bf16
eager" is that same reference run in bf16 throughout; fla where its op matches.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attncc.compiler import compile_source
from attncc.loader import import_path

SPECS = {
    "normalized elu(x)+1": ("attention b_norm {\n    feature_map = elu(x) + 1\n    normalize = true\n    scale = 1.0\n}\n", None),
    "per_head slope": ("attention b_head {\n    decay = per_head\n}\n", None),
    "per_token logsigmoid(x)": ("attention b_token {\n    decay = per_token\n    gate = logsigmoid(x)\n}\n", "chunk_simple_gla"),
    "per_channel logsigmoid(x)/16": ("attention b_channel {\n    decay = per_channel\n    gate = logsigmoid(x) / 16\n}\n", "chunk_gla"),
}


def _module(source: str):
    name = source.split()[1]
    path = Path(tempfile.mkdtemp(prefix="bf16g-")) / f"{name}.py"
    path.write_text(compile_source(source, f"{name}.attn"))
    return import_path(path, name), name


def _errors(got, want):
    return [((a.double() - b).norm() / b.norm()).item() if a is not None else float("nan") for a, b in zip(got, want, strict=True)]


def check(label: str, shape, seed: int, fla: bool = True):
    source, fla_name = SPECS[label]
    fla_name = fla_name if fla else None
    module, name = _module(source)
    fn, reference = getattr(module, name), getattr(module, f"{name}_reference")
    B, T, H, D = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
    extra = []
    if "per_head" in label:  # slopes in [0.01, 0.2], as the bench specs take them
        extra = [torch.rand(H, device="cuda", generator=gen) * 0.19 + 0.01]
    elif "per_token" in label:
        extra = [torch.randn(B, T, H, device="cuda", generator=gen) * 2]
    elif "per_channel" in label:
        extra = [torch.randn(B, T, H, D, device="cuda", generator=gen) * 2]
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)

    def grads(call, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o = call(*leaves)
        (o.double() * do.double()).sum().backward()
        return [o.detach()] + [x.grad for x in leaves]

    inputs = [q, k, v, *extra]
    want = grads(lambda *a: reference(*a)[0], [x.double() for x in inputs])
    rows = {"attncc (bf16)": grads(lambda *a: fn(*a)[0], inputs)}
    rows["bf16 eager (reference in bf16)"] = grads(lambda *a: reference(*a)[0], [x.bfloat16() for x in inputs])
    if fla_name == "chunk_gla":
        from fla.ops.gla import chunk_gla

        def fla_call(q, k, v, x):
            return chunk_gla(q, k, v, g=F.logsigmoid(x.float()) / 16, scale=D**-0.5)[0]

        rows["fla chunk_gla"] = grads(fla_call, inputs)
    elif fla_name == "chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_call(q, k, v, x):
            return chunk_simple_gla(q, k, v, g=F.logsigmoid(x.float()), scale=D**-0.5)[0]

        rows["fla chunk_simple_gla"] = grads(fla_call, inputs)
    names = ["o", "dq", "dk", "dv", "d_decay"][: len(inputs) + 1]
    for row, got in rows.items():
        errors = _errors(got, want)
        print(f"| {label} | seed {seed} | {row} | " + " | ".join(f"{n} {e:.1e}" for n, e in zip(names, errors, strict=True)) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,512,4,128")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default=None, help="run the specs whose label contains this")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's ops (each autotunes for minutes)")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    for label in (x for x in SPECS if args.only is None or args.only in x):
        for seed in range(args.seeds):
            try:
                check(label, shape, seed, fla=not args.no_fla)
            except Exception as error:  # report and go on to the next spec
                print(f"| {label} | seed {seed} | failed: {type(error).__name__}: {str(error)[:300]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
