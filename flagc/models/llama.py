"""LLaMA / Qwen2: RMSNorm pre-norm blocks, rotary positions, grouped-query attention, SwiGLU.

Qwen2 is the same module with a Qwen2Config (q/k/v biases, larger rope_theta, usually tied
embeddings); `Qwen2ForCausalLM` is an alias kept for readability.
"""

from __future__ import annotations


import torch
from torch import nn

from flagc.models.base import CausalLMModel, WeightMap, WeightRule
from flagc.models.config import LlamaConfig
from flagc.models.layers import (
    KV,
    Attention,
    GatedMLP,
    RMSNorm,
    decoder_bias_and_positions,
    rotary_cos_sin,
)

__all__ = ["LLAMA_RULES", "LlamaBackbone", "LlamaForCausalLM", "Qwen2ForCausalLM"]


class LlamaBlock(nn.Module):
    """x += attn(RMSNorm(x)); x += mlp(RMSNorm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            qkv_bias=config.qkv_bias or config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        )

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        past: KV | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.attn_norm(x), bias, past, rotary)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present


class LlamaBackbone(nn.Module):
    """Token embeddings, blocks, final RMSNorm. Rotary tables are computed per call from the
    position ids (no buffers), so a meta-device build needs no re-initialisation."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[KV, ...] | None = None,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.embed(input_ids)
        bias, position_ids = decoder_bias_and_positions(
            input_ids, attention_mask, position_ids, past_len, x.dtype
        )
        rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present = layer(x, bias, past, rotary)
            presents.append(present)
        return self.norm(x), tuple(presents)


_M = r"(?:model\.)?"
_L = _M + r"layers\.(\d+)\."
LLAMA_RULES = WeightMap(
    [
        WeightRule(_M + r"embed_tokens\.weight", r"model.embed.weight"),
        WeightRule(_M + r"norm\.weight", r"model.norm.weight"),
        WeightRule(
            _L + r"self_attn\.([qkvo])_proj\.(weight|bias)", r"model.layers.\1.attn.\2_proj.\3"
        ),
        WeightRule(_L + r"self_attn\.rotary_emb\.inv_freq", None),
        WeightRule(
            _L + r"mlp\.(gate|up|down)_proj\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"
        ),
        WeightRule(_L + r"input_layernorm\.weight", r"model.layers.\1.attn_norm.weight"),
        WeightRule(_L + r"post_attention_layernorm\.weight", r"model.layers.\1.mlp_norm.weight"),
    ]
)


class LlamaForCausalLM(CausalLMModel):
    """LLaMA / Qwen2 language model with past-KV decoding."""

    config_class = LlamaConfig
    weight_map = LLAMA_RULES
    backbone_class = LlamaBackbone
    embedding_attr = "embed"


Qwen2ForCausalLM = LlamaForCausalLM
