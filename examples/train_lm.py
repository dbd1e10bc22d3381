"""Train a tiny character-level language model whose token mixer is an attncc spec,
then generate text through the recurrent decode path.

    python examples/train_lm.py                        # CPU: about a minute
    python examples/train_lm.py --spec examples/gla.attn --steps 50
    python examples/train_lm.py --device cuda --dtype bf16 --compile

The model: character embedding, 2 blocks of (RMSNorm -> attncc.nn.LinearAttention ->
residual, RMSNorm -> MLP -> residual), RMSNorm, and an output layer tied to the
embedding; trained on examples/data/tiny_corpus.txt.

Generation prefills the prompt in one call with use_cache=True, which returns every
layer's recurrent state, then feeds one character at a time with those states (the
generated NAME_step kernel under torch.no_grad): constant memory and time per token.

Backends: on a GPU the layers run the generated Triton kernels. Without one, the same
kernels run through Triton's CPU interpreter, which is about a hundred times too slow to
train on, so `--backend auto` uses the module's plain-PyTorch reference there (the same
function); `--backend kernel --steps 3` or `--decode-backend kernel` run the kernels on
the CPU all the same (decoding: about 0.1-0.3 s per character through the interpreter).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attncc.nn

HERE = Path(__file__).resolve().parent


class Block(torch.nn.Module):
    def __init__(self, spec: str, hidden: int, heads: int, kv_heads: int | None, name: str | None,
                 backend: str):
        super().__init__()
        self.norm1 = torch.nn.RMSNorm(hidden)
        self.attn = attncc.nn.LinearAttention(
            spec, hidden, heads, num_kv_heads=kv_heads, name=name, backend=backend
        )
        self.norm2 = torch.nn.RMSNorm(hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x, state=None, use_cache=False):
        h, state = self.attn(self.norm1(x), state=state, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.norm2(x)), state


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, spec: str, hidden: int, layers: int, heads: int,
                 kv_heads: int | None = None, name: str | None = None, backend: str = "kernel"):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        torch.nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = torch.nn.ModuleList(
            Block(spec, hidden, heads, kv_heads, name, backend) for _ in range(layers)
        )
        self.norm = torch.nn.RMSNorm(hidden)

    def forward(self, tokens, states=None, use_cache=False):
        """tokens [B, T] -> (logits [B, T, vocab], per-layer states or None)."""
        x = self.embed(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if states is None else states[i], use_cache)
            new_states.append(s)
        logits = self.norm(x) @ self.embed.weight.T  # tied output layer
        return logits, (new_states if use_cache or states is not None else None)

    def set_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(HERE / "simple_gla.attn"), help="a .attn file")
    p.add_argument("--name", default=None, help="the attention block, if the file holds several")
    p.add_argument("--data", default=str(HERE / "data" / "tiny_corpus.txt"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast; auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--backend", choices=["auto", "kernel", "reference"], default="auto",
                   help="for training; auto: kernels on a GPU, the PyTorch reference on the CPU")
    p.add_argument("--decode-backend", choices=["auto", "kernel", "reference"], default="auto",
                   help="for generation; auto: the training backend")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (0: torch's default); ops this small gain little from more")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--prompt", default="The lighthouse ")
    p.add_argument("--generate", type=int, default=200, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = args.backend
    if backend == "auto":
        backend = "kernel" if device.type == "cuda" else "reference"
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")

    text = Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    model = TinyLM(len(chars), args.spec, args.hidden, args.layers, args.heads, args.kv_heads,
                   args.name, backend).to(device)
    print(f"{len(text)} characters, vocabulary {len(chars)}; "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print(model.blocks[0].attn)
    print(f"training on {device} with backend={backend}, {'bf16 autocast' if use_bf16 else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}")
    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, min(20, args.steps // 10))

    def lr_at(step: int) -> float:  # linear warmup, then cosine to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch(source: torch.Tensor):
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch,))
        window = torch.stack([source[s : s + args.seq_len + 1] for s in starts]).to(device)
        return window[:, :-1], window[:, 1:]

    def loss_of(tokens, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits, _ = step_fn(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    history = []
    started = last = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1)
        loss = loss_of(*batch(train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            done = (step - 1) % args.log_every + 1
            rate = done * args.batch * args.seq_len / (now - last)
            print(f"step {step:4d}  loss {loss.item():.3f}  {rate:8.0f} tokens/s")
            last = now
    train_time = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        val_loss = sum(loss_of(*batch(val)).item() for _ in range(4)) / 4
    print(f"trained {args.steps} steps in {train_time:.1f} s; validation loss {val_loss:.3f} "
          f"(uniform guess: {math.log(len(chars)):.3f})")

    # Decode: prefill the prompt in one call, then one character at a time with the states.
    decode_backend = backend if args.decode_backend == "auto" else args.decode_backend
    model.set_backend(decode_backend)
    prompt = [index[c] for c in args.prompt if c in index] or [0]
    tokens = torch.tensor([prompt], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits, states = model(tokens, use_cache=True)
        out = list(prompt)
        for _ in range(args.generate):
            probs = torch.softmax(logits[:, -1].float() / args.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt.item())
            logits, states = model(nxt, states=states)
        decode_time = time.perf_counter() - started
        # The recurrent path must agree with one causal pass over the whole text.
        full, _ = model(torch.tensor([out], device=device))
        gap = (full[:, -1].float() - logits[:, -1].float()).abs().max().item()
    sample = "".join(chars[i] for i in out)
    print(f"generated {args.generate} characters in {decode_time:.1f} s "
          f"(backend={decode_backend}); last logits vs one full pass: max diff {gap:.1e}")
    print("-" * 60)
    print(sample)
    print("-" * 60)
    return {"losses": history, "val_loss": val_loss, "sample": sample, "train_time": train_time,
            "decode_gap": gap}


if __name__ == "__main__":
    main()
