"""Shared layers of the zoo: activations, masks, positions, rotary, attention, MLPs, RMSNorm.

Families assemble these into blocks (bert.py, gpt2.py, llama.py): layer -> block -> model.

Everything here must stay capturable by `torch.export` with dynamic batch / seq / past dims:
shapes are read from tensors (symbolic under export) and never branched on; tensor *values* are
never inspected in Python (no `.item()`, no `if mask.any()`). Python branches on config values
and on whether an optional input was passed are fine: they are fixed per exported graph.

Attention contract (matches the IR's Attention op, see DESIGN.md):
- past keys / values come in as `[batch, kv_heads, past, head_dim]`, presents go out as
  `[batch, kv_heads, past + seq, head_dim]`;
- masks are built as boolean "allowed" tensors and turned into one additive bias, so padding,
  causal, UniLM and prefix masks compose by `&` / `|`;
- the attention mask given by callers covers past + current tokens (1 = real token, 0 = padding),
  the Hugging Face convention, so left-padded batches stay valid across decode steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flagc.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "activation",
    "padding_allowed",
    "causal_allowed",
    "additive_bias",
    "positions_from_mask",
    "rotary_cos_sin",
    "apply_rotary",
    "Attention",
    "MLP",
    "GatedMLP",
    "RMSNorm",
    "KV",
]

KV = tuple[torch.Tensor, torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's "gelu_new": the tanh approximation, bit-compatible with HF's NewGELUActivation.
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    """The activation function for a config's `hidden_act`; ConfigError listing valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Masks and positions
# ---------------------------------------------------------------------------------------------
def padding_allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, k] (1 = token, 0 = pad) -> bool [batch, 1, 1, k]: which keys may be attended."""
    return attention_mask.bool()[:, None, None, :]


def causal_allowed(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool [1, 1, q, k]: query i (absolute position k-q+i) sees keys at positions <= its own."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive bias (0 where allowed, dtype min elsewhere).

    dtype-min instead of -inf: a fully masked row (a left-pad query) then softmaxes to a uniform
    distribution rather than NaN, and its output is ignored downstream anyway.
    """
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


def positions_from_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Position ids [batch, q_len] for the current chunk.

    With a mask (covering past + current tokens) a token's position is the number of real tokens
    before it, so a left-padded sequence gets the same positions as the unpadded one. Without a
    mask positions simply continue from `past_len`.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None].expand(batch, q_len)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, positions.shape[1] - q_len :]


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (LLaMA / Qwen2 "rotate half" convention, as in HF checkpoints)
# ---------------------------------------------------------------------------------------------
def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [batch, seq, head_dim] for the given positions (computed in float32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by cos/sin [batch, seq, head_dim]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional past KV and rotary positions.

    Parameters are `q_proj`, `k_proj`, `v_proj` (or one `qkv_proj` when `fused_qkv`, GPT-2's
    layout) and `o_proj`, all nn.Linear ([out, in] weights).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        o_bias: bool = True,
        fused_qkv: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.fused_qkv = fused_qkv
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        if fused_qkv:
            self.qkv_proj = nn.Linear(hidden_size, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden_size, bias=o_bias)
        self.dropout = dropout

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        return x.reshape(batch, seq, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        bias: torch.Tensor,
        past: KV | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """hidden [batch, seq, hidden], bias [batch|1, 1, seq, past+seq] -> (out, present KV)."""
        if self.fused_qkv:
            q_out = self.num_heads * self.head_dim
            kv_out = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(hidden).split([q_out, kv_out, kv_out], dim=-1)
        else:
            q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        q = self._split_heads(q, self.num_heads)
        k = self._split_heads(k, self.num_kv_heads)
        v = self._split_heads(v, self.num_kv_heads)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        if self.num_kv_heads != self.num_heads:
            # Grouped-query attention: each kv head serves num_heads / num_kv_heads query heads.
            rep = self.num_heads // self.num_kv_heads
            k, v = (_repeat_kv(t, rep) for t in (k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        batch, seq = hidden.shape[0], hidden.shape[1]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), present


def _repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, rep, seq, dim).reshape(batch, heads * rep, seq, dim)


# ---------------------------------------------------------------------------------------------
# Feed-forward and norms
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """fc_out(act(fc_in(x))): BERT's intermediate/output and GPT-2's c_fc/c_proj."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): LLaMA / Qwen2's SwiGLU."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the reduction in float32 (fp16 sums of squares overflow)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def decoder_bias_and_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_len: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (+ padding) additive bias [batch|1, 1, seq, past+seq] and position ids [batch, seq].

    Shared by every decoder-only family so they agree on padding and cache-offset semantics.
    """
    batch, q_len = input_ids.shape[0], input_ids.shape[1]
    allowed = causal_allowed(q_len, past_len + q_len, input_ids.device)
    if attention_mask is not None:
        allowed = allowed & padding_allowed(attention_mask)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask, batch, q_len, past_len, input_ids.device)
    return additive_bias(allowed, dtype), position_ids


__all__ += ["decoder_bias_and_positions"]
