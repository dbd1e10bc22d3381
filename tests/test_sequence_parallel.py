"""`<name>_sp` across processes (gloo on CPU, the real kernels through Triton's
interpreter) equals one process running the whole sequence, forward and backward."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from attncc import expr as ex
from attncc.ir import AttentionSpec, Decay, ElementwiseMap, RowMap, RowMapKind, UpdateRule, X
from attncc.loader import import_path
from attncc.render import render_module

SPECS = {
    "per_head": AttentionSpec("sp_head", decay=Decay.PER_HEAD, chunk=16),
    "per_channel": AttentionSpec("sp_channel", decay=Decay.PER_CHANNEL, gate=ex.logsigmoid(X) / 16, chunk=16),
    "per_token": AttentionSpec("sp_token", decay=Decay.PER_TOKEN, gate=-ex.softplus(X), chunk=16,
                               k_map=RowMap(RowMapKind.L2NORM)),
    "normalized": AttentionSpec("sp_norm", q_map=ElementwiseMap(ex.elu(X) + 1),
                                k_map=ElementwiseMap(ex.elu(X) + 1), normalize=True, chunk=16),
    # The delta rule: each rank's D x D transition is gathered with its state.
    "delta_per_token": AttentionSpec("sp_delta_token", decay=Decay.PER_TOKEN, gate=-ex.softplus(X), chunk=16,
                                     q_map=RowMap(RowMapKind.L2NORM), k_map=RowMap(RowMapKind.L2NORM),
                                     update=UpdateRule.DELTA, beta=ex.sigmoid(X)),
    "delta_per_channel": AttentionSpec("sp_delta_channel", decay=Decay.PER_CHANNEL, gate=ex.logsigmoid(X) / 16,
                                       chunk=16, k_map=RowMap(RowMapKind.L2NORM), update=UpdateRule.DELTA),
}
B, T, H, H_KV, D, E = 1, 37, 2, 1, 16, 16


def _inputs(kind: str):
    """The whole problem, identical in every process."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H_KV, D, generator=gen)
    v = torch.randn(B, T, H_KV, E, generator=gen)
    decay = None
    if kind == "per_head":
        decay = torch.rand(H, generator=gen)
    elif kind == "per_token":
        decay = torch.randn(B, T, H_KV, generator=gen)
    elif kind == "per_channel":
        decay = torch.randn(B, T, H_KV, D, generator=gen)
    elif kind == "delta_per_token":
        decay = torch.randn(B, T, H_KV, generator=gen)
    elif kind == "delta_per_channel":
        decay = torch.randn(B, T, H_KV, D, generator=gen)
    e_state = E + 1 if kind == "normalized" else E
    initial = torch.randn(B, H, D, e_state, generator=gen)
    do = torch.randn(B, T, H, E, generator=gen)
    dstate = torch.randn(B, H, D, e_state, generator=gen)
    beta = None
    if kind.startswith("delta"):  # a raw input for a sigmoid, or β in (0, 1) as given
        beta = torch.randn(B, T, H_KV, generator=gen) if SPECS[kind].beta is not None else torch.rand(B, T, H_KV, generator=gen)
    return q, k, v, decay, beta, initial, do, dstate


def _bounds(world: int) -> list[int]:
    """Uneven contiguous slices of the sequence, one per rank."""
    cuts = [round(T * (r + 1) ** 1.3 / world**1.3) for r in range(world)]
    return [0] + cuts


def _worker(rank, world, init_file, module_path, kind, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        spec = SPECS[kind]
        module = import_path(module_path, f"sp_worker_{kind}")
        q, k, v, decay, beta, initial, do, dstate = _inputs(kind)
        lo, hi = _bounds(world)[rank], _bounds(world)[rank + 1]
        local = [x[:, lo:hi].clone().requires_grad_() for x in (q, k, v)]
        if decay is not None:
            local.append((decay.clone() if decay.dim() == 1 else decay[:, lo:hi].clone()).requires_grad_())
        if beta is not None:
            local.append(beta[:, lo:hi].clone().requires_grad_())
        init = initial.clone().requires_grad_()
        # Count the full local backward passes (the host function that launches them).
        backward_name = f"_{spec.name}_backward"
        full_backward, passes = getattr(module, backward_name), []
        setattr(module, backward_name, lambda *args, **kwargs: passes.append(1) or full_backward(*args, **kwargs))
        # Only rank 0 asks for the final state (it is replicated: its loss counts once);
        # the other ranks' graphs then reach just part of the gathered states.
        o, state = getattr(module, f"{spec.name}_sp")(*local, initial_state=init, output_final_state=rank == 0)
        loss = (o * do[:, lo:hi]).sum()
        if rank == 0:
            loss = loss + (state * dstate).sum()
        loss.backward()
        torch.save({"o": o.detach(), "state": None if state is None else state.detach(), "grads": [x.grad for x in local],
                    "d_init": init.grad, "backward_passes": len(passes)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _context():
    """Fresh worker processes as spawn gives them, made by a fork server that has imported
    torch, triton and attncc once: each rank then starts without re-importing them (~3 s of
    CPU per process, most of the cost of a rank on these small problems). The server is
    started from a clean interpreter, not forked from pytest, and preloads only modules."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:  # no fork server on this platform (Windows)
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(["torch", "torch.distributed", "triton", "attncc.loader"])
    return context


@pytest.mark.parametrize(
    "kind, world",
    [("per_head", 2), ("per_channel", 2), ("per_token", 2), ("normalized", 2), ("per_head", 4), ("per_channel", 4),
     ("delta_per_token", 2), ("delta_per_channel", 2), ("delta_per_token", 4)],
)
def test_sequence_parallel_equals_one_process(kind, world, tmp_path):
    spec = SPECS[kind]
    path = tmp_path / f"{spec.name}.py"
    path.write_text(render_module([spec], f"# {kind}\n", f"{spec.name}.attn"))
    context = _context()
    workers = [context.Process(target=_worker, args=(r, world, str(tmp_path / "rendezvous"), str(path), kind,
                                                     str(tmp_path))) for r in range(world)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0, f"worker exited with {w.exitcode}"
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    module = import_path(path, f"sp_single_{kind}_{world}")
    q, k, v, decay, beta, initial, do, dstate = _inputs(kind)
    whole = [x.clone().requires_grad_() for x in (q, k, v, decay, beta) if x is not None]
    init = initial.clone().requires_grad_()
    o, state = getattr(module, spec.name)(*whole, initial_state=init, output_final_state=True)
    ((o * do).sum() + (state * dstate).sum()).backward()

    def close(a, b):
        assert ((a - b).norm() / b.norm()).item() < 1e-5

    close(torch.cat([r["o"] for r in results], dim=1), o)
    close(results[0]["state"], state)
    for i, leaf in enumerate(whole):
        parts = [r["grads"][i] for r in results]
        merged = sum(parts) if leaf.dim() == 1 else torch.cat(parts, dim=1)
        close(merged, leaf.grad)
    close(sum(r["d_init"] for r in results), init.grad)
    if kind != "normalized":
        # One full local backward per rank (before: one for the state-only pass as well).
        assert [r["backward_passes"] for r in results] == [1] * world
