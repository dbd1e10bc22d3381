"""Train a tiny gated linear-attention layer on the CPU, then decode with `_step`.

    python examples/train_tiny.py

`attncc.load` compiles examples/simple_gla.attn on first use and caches the module.
The layer learns to imitate a fixed random "teacher" layer; then it decodes a
sequence token by token and checks that it matches one call on the whole sequence.
"""

from pathlib import Path

import torch

import attncc

kernels = attncc.load(Path(__file__).with_name("simple_gla.attn"))


class TinyGatedLayer(torch.nn.Module):
    def __init__(self, width: int = 32, heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(width, 3 * heads * head_dim, bias=False)
        self.gate = torch.nn.Linear(width, heads)
        self.out = torch.nn.Linear(heads * head_dim, width, bias=False)

    def split(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        g = torch.nn.functional.logsigmoid(self.gate(x))  # log decay <= 0, [B, T, H]
        return q, k, v, g

    def forward(self, x):
        q, k, v, g = self.split(x)
        o, _ = kernels.simple_gla(q, k, v, g)
        return self.out(o.flatten(2))


def main() -> None:
    torch.manual_seed(0)
    teacher, student = TinyGatedLayer(), TinyGatedLayer()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for step in range(31):
        x = torch.randn(4, 24, 32)
        with torch.no_grad():
            target = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    # Decode: the prefix in one call, then one token at a time with the state.
    with torch.no_grad():
        x = torch.randn(1, 20, 32)
        q, k, v, g = student.split(x)
        o_full, _ = kernels.simple_gla(q, k, v, g)
        o_prefix, state = kernels.simple_gla(q[:, :12], k[:, :12], v[:, :12], g[:, :12], output_final_state=True)
        outputs = [o_prefix]
        for t in range(12, 20):
            o_t, state = kernels.simple_gla_step(q[:, t], k[:, t], v[:, t], state, g[:, t])
            outputs.append(o_t[:, None])
        gap = (torch.cat(outputs, dim=1) - o_full).abs().max().item()
    print(f"decoded 8 tokens with simple_gla_step; largest difference from one full call: {gap:.1e}")
    assert gap < 1e-4


if __name__ == "__main__":
    main()
