"""`attncc.nn`: a linear-attention layer around a compiled spec.

    import attncc.nn
    attn = attncc.nn.LinearAttention("examples/gla.attn", hidden_size=256, num_heads=4)
    y, _ = attn(x)                                     # training: x [B, T, hidden]
    y, state = attn(prompt, use_cache=True)            # prefill
    y_t, state = attn(x_t, state=state)                # decode one token (x_t [B, 1, hidden])

The layer reads the spec's IR to decide which inputs its kernel needs (a decay
input or none, a gate or a log decay, a normalizer column in the state, a state
at all) and holds the projections that produce them. It only calls the generated
module's public functions: `NAME`, `NAME_step` and, for `backend="reference"`,
`NAME_reference`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from attncc.errors import did_you_mean
from attncc.ir import AttentionSpec, Decay, UpdateRule

__all__ = ["LinearAttention", "alibi_slopes"]

MAX_HEAD_DIM = 256  # what the generated kernels accept for D and E
BACKENDS = ("kernel", "reference")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head decay rates of ALiBi and Lightning Attention: 2^(-8 i / H), i = 1..H."""
    i = torch.arange(1, num_heads + 1, dtype=torch.float64)
    return torch.exp2(-8.0 * i / num_heads)


def _resolve_spec(
    spec: str | os.PathLike | ModuleType, name: str | None
) -> tuple[AttentionSpec, ModuleType, str]:
    """(the chosen block's IR, its generated module, where it came from)."""
    from attncc.check import parse_spec

    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"spec: no such spec file `{path}` (expected a path to a .attn file)")
        import attncc

        module = attncc.load(path)
        origin = str(path)
    elif isinstance(spec, ModuleType):
        if not isinstance(getattr(spec, "SPEC_SOURCE", None), str):
            raise ValueError(
                f"spec: module `{spec.__name__}` is not an attncc-generated module (no SPEC_SOURCE); "
                "pass a .attn path or the module returned by attncc.load"
            )
        module = spec
        origin = f"module {spec.__name__}"
    else:
        raise TypeError(
            f"spec must be a path to a .attn file or a module from attncc.load, "
            f"got {type(spec).__name__}"
        )
    # The IR of the source the module was compiled from, so the two cannot disagree.
    spec_file = parse_spec(module.SPEC_SOURCE, origin)
    names = [s.name for s in spec_file.specs]
    if name is None:
        if len(names) != 1:
            raise ValueError(
                f"spec: {origin} holds {len(names)} attention blocks "
                f"({', '.join(names)}); pass name= to pick one"
            )
        return spec_file.specs[0], module, origin
    if name not in names:
        raise ValueError(
            f"name: {origin} has no attention block `{name}`; {did_you_mean(name, names)}"
        )
    return spec_file.get(name), module, origin


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


class LinearAttention(torch.nn.Module):
    """Multi-head linear attention whose token mixer is an attncc spec.

    Args:
        spec: path to a .attn file (compiled and cached by `attncc.load`) or a module
            returned by `attncc.load`.
        hidden_size: width of the input and output.
        num_heads: query heads H.
        num_kv_heads: key/value heads H_kv (must divide H); default H.
        head_dim: key/query head dim D; default hidden_size // num_heads.
        value_dim: value head dim E; default D.
        name: which `attention` block of the file to use (needed when it holds several).
        bias: biases on the q, k, v and output projections.
        backend: "kernel" (the generated Triton kernels) or "reference" (the module's
            plain-PyTorch reference: the same math, O(T^2) memory, no step kernel; on a
            CPU it is far faster than the kernels under Triton's interpreter).

    Parameters by decay kind of the spec:
        none: q, k, v and output projections only.
        per_head: `log_slope` [H]; the slopes passed to the kernel are exp(log_slope) > 0,
            initialised to the ALiBi / Lightning rates 2^(-8 i / H).
        per_token / per_channel: `decay_proj` (hidden -> H_kv, resp. H_kv * D, with bias).
            If the spec has a `gate`, its raw output goes to the kernel, which applies the
            gate. Without a gate the kernel wants a log decay g <= 0, so the layer passes
            g = logsigmoid(decay_proj(x)); its bias starts at per-head decays
            exp(g) = exp(-2^(-8 i / H_kv)) so that the heads remember over different ranges.
        The decay input is computed in float32, also under autocast.
    With `update = delta` also `beta_proj` (hidden -> H_kv, with bias): its raw output goes
    to the kernel if the spec has a `beta` transform, else β = sigmoid(beta_proj(x)) in
    (0, 1) (with l2norm keys the recurrence then stays bounded). Also float32.

    `forward(x, state=None, cu_seqlens=None, use_cache=False) -> (y, new_state)`, see there.
    """

    def __init__(
        self,
        spec: str | os.PathLike | ModuleType,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_dim: int | None = None,
        name: str | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "kernel",
    ) -> None:
        super().__init__()
        hidden_size = _positive_int(hidden_size, "hidden_size")
        num_heads = _positive_int(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads = {num_kv_heads} must divide num_heads = {num_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"hidden_size = {hidden_size} is not a multiple of num_heads = {num_heads}: "
                    "pass head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        head_dim = _positive_int(head_dim, "head_dim")
        value_dim = head_dim if value_dim is None else _positive_int(value_dim, "value_dim")
        for what, dim in (("head_dim", head_dim), ("value_dim", value_dim)):
            if dim > MAX_HEAD_DIM:
                raise ValueError(f"{what} = {dim} is above {MAX_HEAD_DIM}, the kernels' largest head dim")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

        ir, module, origin = _resolve_spec(spec, name)
        self.spec: AttentionSpec = ir
        self.spec_origin = origin
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.backend = backend
        # Functions, not the module: functions copy and deepcopy as themselves, modules do not.
        # torch.compile traces them whole: their kernels run inside torch.library operators.
        self._attention = getattr(module, ir.name)
        self._step = getattr(module, f"{ir.name}_step", None) if ir.causal else None
        self._reference = getattr(module, f"{ir.name}_reference")

        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * value_dim, bias=bias, **factory)
        self.o_proj = torch.nn.Linear(num_heads * value_dim, hidden_size, bias=bias, **factory)
        self.log_slope: torch.nn.Parameter | None = None
        self.decay_proj: torch.nn.Linear | None = None
        if ir.decay is Decay.PER_HEAD:
            slopes = alibi_slopes(num_heads).log()
            self.log_slope = torch.nn.Parameter(slopes.to(device=device, dtype=dtype or torch.float32))
        elif ir.decay.data_dependent:
            width = num_kv_heads * (head_dim if ir.decay is Decay.PER_CHANNEL else 1)
            self.decay_proj = torch.nn.Linear(hidden_size, width, bias=True, **factory)
            self._init_decay_bias()
        self.beta_proj: torch.nn.Linear | None = None
        if ir.update is UpdateRule.DELTA:
            self.beta_proj = torch.nn.Linear(hidden_size, num_kv_heads, bias=True, **factory)

    @torch.no_grad()
    def _init_decay_bias(self) -> None:
        if self.spec.gate is not None:
            # The gate is an arbitrary expression: start from its value at 0.
            self.decay_proj.bias.zero_()
            return
        # logsigmoid(b) = -s  <=>  b = -log(expm1(s)): decay exp(-s) per token at x = 0.
        rates = alibi_slopes(self.num_kv_heads)
        bias = -torch.log(torch.expm1(rates))
        if self.spec.decay is Decay.PER_CHANNEL:
            bias = bias.repeat_interleave(self.head_dim)
        self.decay_proj.bias.copy_(bias.to(self.decay_proj.bias.dtype))

    @property
    def state_shape(self) -> tuple[int, int, int] | None:
        """(H, D, E or E + 1) of one sequence's state, None for non-causal specs."""
        if not self.spec.causal:
            return None
        return self.num_heads, self.head_dim, self.value_dim + (1 if self.spec.normalize else 0)

    def decay_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the kernel takes after q, k, v: None, slope [H], or the per-token /
        per-channel input [B, T, H_kv(, D)], in float32."""
        if self.log_slope is not None:
            return self.log_slope.float().exp()
        if self.decay_proj is None:
            return None
        B, T = x.shape[0], x.shape[1]
        # Float32 even under autocast: log decays are summed over the whole sequence.
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.linear(x.float(), self.decay_proj.weight.float(), self.decay_proj.bias.float())
        if self.spec.gate is None:
            z = F.logsigmoid(z)
        if self.spec.decay is Decay.PER_CHANNEL:
            return z.view(B, T, self.num_kv_heads, self.head_dim)
        return z

    def beta_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The delta rule's beta input [B, T, H_kv] (float32), or None for additive specs."""
        if self.beta_proj is None:
            return None
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.linear(x.float(), self.beta_proj.weight.float(), self.beta_proj.bias.float())
        return z if self.spec.beta is not None else torch.sigmoid(z)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] -> (y [B, T, hidden], new_state or None).

        state: float32 [N, H, D, E] (E + 1 with normalize) to start from, N = B, or the
            number of sequences of cu_seqlens. Causal specs only.
        cu_seqlens: int [N + 1] boundaries of sequences packed into B = 1.
        use_cache: return the state after the last token (prefill); a given state always
            gets its successor back. Otherwise new_state is None, and no state is kept.
        With T == 1, a state, no cu_seqlens and gradients off (torch.no_grad or
        inference_mode), the single-token decode kernel NAME_step runs; with gradients on,
        the differentiable kernel does the same step.
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must be [B, T, hidden_size = {self.hidden_size}], got {tuple(x.shape)}"
            )
        if not self.spec.causal and (state is not None or use_cache):
            raise ValueError(
                f"spec `{self.spec.name}` is not causal: it has no recurrent state, so "
                "state= and use_cache=True are not allowed"
            )
        B, T = x.shape[0], x.shape[1]
        H, H_kv, D, E = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        q = self.q_proj(x).view(B, T, H, D)
        # One dtype for the kernel: under autocast the projections agree already, but a
        # bias or a mixed-precision module could leave them apart.
        k = self.k_proj(x).view(B, T, H_kv, D).to(q.dtype)
        v = self.v_proj(x).view(B, T, H_kv, E).to(q.dtype)
        out_dtype = q.dtype
        if self.backend == "kernel" and x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # Triton's CPU interpreter has no bfloat16 (its results are garbage, not an
            # error): run the kernels in float32 there, and hand o back in bfloat16.
            q, k, v = q.float(), k.float(), v.float()
        decay = self.decay_input(x)
        beta = self.beta_input(x)
        keep_state = use_cache or state is not None

        if (
            self.backend == "kernel"
            and state is not None
            and T == 1
            and cu_seqlens is None
            and not torch.is_grad_enabled()
        ):
            extra = ()
            if decay is not None:
                extra = (decay,) if self.log_slope is not None else (decay[:, 0],)
            if beta is not None:
                extra += (beta[:, 0],)
            o_t, new_state = self._step(q[:, 0], k[:, 0], v[:, 0], state, *extra)
            o = o_t[:, None]
        else:
            attention = self._attention if self.backend == "kernel" else self._reference
            extra = tuple(x for x in (decay, beta) if x is not None)
            o, new_state = attention(
                q, k, v, *extra, initial_state=state, output_final_state=keep_state,
                cu_seqlens=cu_seqlens,
            )
        y = self.o_proj(o.reshape(B, T, H * E).to(out_dtype))
        if not keep_state:
            return y, None
        # The reference keeps its state in the inputs' dtype; the kernels' states are float32.
        return y, new_state.float()

    def extra_repr(self) -> str:
        s = self.spec
        parts = [
            f"spec={s.name}",
            f"hidden_size={self.hidden_size}",
            f"num_heads={self.num_heads}",
            f"num_kv_heads={self.num_kv_heads}",
            f"head_dim={self.head_dim}",
            f"value_dim={self.value_dim}",
            f"decay={s.decay.value}",
        ]
        if s.gate is not None:
            parts.append(f"gate={s.gate}")
        if s.update is UpdateRule.DELTA:
            parts.append("update=delta" + (f", beta={s.beta}" if s.beta is not None else ""))
        if s.normalize:
            parts.append("normalize=True")
        if not s.causal:
            parts.append("causal=False")
        if self.backend != "kernel":
            parts.append(f"backend={self.backend}")
        return ", ".join(parts)
