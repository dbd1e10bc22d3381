"""Time one long sequence split over the GPUs of one host (NCCL) against one GPU.

    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --T 65536
    (CPU smoke test: torchrun --nproc-per-node 2 benchmarks/sp_bench.py --backend gloo --T 64 --heads 2 --dim 16)

Every rank holds T / world tokens; rank 0 also times the whole sequence on its
own GPU. Reports medians (forward, forward+backward): do_bench on one GPU, a fixed
number of CUDA-event-timed runs on every rank for the split sequence,
and the bytes each rank sends in the all-gather of states.
"""

import argparse
import os

import torch
import torch.distributed as dist

from attncc.bench import import_source
from attncc.compiler import compile_source

SOURCE = "attention sp_lightning {\n    decay = per_head\n    scale = auto\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default="nccl")
    args = parser.parse_args()
    cuda = args.backend == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group(args.backend, device_id=device)
    else:
        dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    module = import_source(compile_source(SOURCE, "sp_lightning.attn"), f"sp_bench_{rank}")
    H, D, T = args.heads, args.dim, args.T
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, generator=gen).to(device, dtype) for _ in range(3))
    k = (k.float() / k.float().norm(dim=-1, keepdim=True)).to(dtype)
    slope = torch.linspace(0.01, 0.2, H, device=device)
    lo, hi = rank * T // world, (rank + 1) * T // world
    local = [x[:, lo:hi].contiguous().requires_grad_() for x in (q, k, v)]
    grad = torch.randn(1, hi - lo, H, D, device=device, dtype=dtype)

    def sp_forward():
        return module.sp_lightning_sp(*local, slope)[0]

    def sp_step():
        o = sp_forward()
        torch.autograd.grad(o, local, grad)

    if cuda:
        import triton.testing

        cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

        def timed(fn, reps=50):
            """Median of a fixed number of runs, each with a cold L2, like do_bench.

            do_bench picks its repeat count from a first estimate, which can differ
            between ranks and leave one rank waiting in a collective forever."""
            for _ in range(5):
                fn()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for start, end in zip(starts, ends, strict=True):
                cache.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))[reps // 2]

        def timed_alone(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    else:
        import time

        def timed(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        timed_alone = timed

    def say(message):
        if rank == 0:
            print(message, flush=True)

    say(f"# {world} ranks up; compiling, checking and timing the split sequence")
    with torch.no_grad():  # the split result must equal this rank's slice of the whole
        mine = sp_forward().float()
        whole_slice = module.sp_lightning(q, k, v, slope)[0][:, lo:hi].float()
        error = torch.tensor([((mine - whole_slice).norm() / whole_slice.norm()).item()], device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    say(f"# split vs whole: max relative difference over ranks {error.item():.1e}")
    if not error.item() < 1e-2:
        raise SystemExit(f"split and whole sequence disagree: {error.item():.2e}")
    # Every rank runs the same timed loop, so the collectives inside pair up.
    dist.barrier()
    with torch.no_grad():
        fwd = timed(sp_forward)
    dist.barrier()
    fwd_bwd = timed(sp_step)
    dist.barrier()
    say(f"# split: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms; timing the whole sequence on rank 0")
    state_bytes = H * D * D * 4
    if rank == 0:
        whole = [x.detach().requires_grad_() for x in (q, k, v)]
        full_grad = torch.randn(1, T, H, D, device=device, dtype=dtype)
        with torch.no_grad():
            one_fwd = timed_alone(lambda: module.sp_lightning(*whole, slope)[0])

        def one_step():
            o = module.sp_lightning(*whole, slope)[0]
            torch.autograd.grad(o, whole, full_grad)

        one_fb = timed_alone(one_step)
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"# {world} x {name}, T = {T}, H = {H}, D = E = {D}, {dtype}")
        print("| setup | fwd ms | fwd+bwd ms |\n|---|---|---|")
        print(f"| 1 device, whole sequence | {one_fwd:.3f} | {one_fb:.3f} |")
        print(f"| {world} devices, T/{world} each (attncc _sp) | {fwd:.3f} | {fwd_bwd:.3f} |")
        print(f"all-gather per rank: sends its [1, H, D, E] float32 state = {state_bytes / 1e6:.2f} MB "
              f"(+ {H * 4} B of decay totals); receives {(world - 1) * state_bytes / 1e6:.2f} MB; "
              f"the backward's reduce-scatter moves the same again")
    # The other ranks wait here (no collectives run while rank 0 times alone).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
