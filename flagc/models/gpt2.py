"""GPT-2: learned positions, pre-LN blocks with a fused QKV projection, tied LM head.

HF checkpoints store GPT-2's projections as Conv1D ([in, out]); the weight map transposes them
into nn.Linear layout on load, so the module itself is a plain Linear model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flagc.models.base import TRANSPOSE, BaseModel, CausalLMModel, WeightMap, WeightRule
from flagc.models.config import GPT2Config
from flagc.models.layers import KV, MLP, Attention, decoder_bias_and_positions

__all__ = ["GPT2_RULES", "GPT2Backbone", "GPT2Model", "GPT2LMHeadModel"]


class GPT2Block(nn.Module):
    """Pre-LN block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = Attention(config.hidden_size, config.num_attention_heads, fused_qkv=True)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.attn_norm(x), bias, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present


class GPT2Backbone(nn.Module):
    """Token + position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(GPT2Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[KV, ...] | None = None,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.wte(input_ids)
        bias, position_ids = decoder_bias_and_positions(
            input_ids, attention_mask, position_ids, past_len, x.dtype
        )
        x = x + self.wpe(position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, bias, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.norm(x), tuple(presents)


_G = r"(?:transformer\.)?"
_H = _G + r"h\.(\d+)\."
GPT2_RULES = WeightMap(
    [
        WeightRule(_G + r"wte\.weight", r"model.wte.weight"),
        WeightRule(_G + r"wpe\.weight", r"model.wpe.weight"),
        WeightRule(_G + r"ln_f\.(weight|bias)", r"model.norm.\1"),
        WeightRule(_H + r"ln_1\.(weight|bias)", r"model.layers.\1.attn_norm.\2"),
        WeightRule(_H + r"ln_2\.(weight|bias)", r"model.layers.\1.mlp_norm.\2"),
        WeightRule(
            _H + r"attn\.c_attn\.weight", r"model.layers.\1.attn.qkv_proj.weight", TRANSPOSE
        ),
        WeightRule(_H + r"attn\.c_attn\.bias", r"model.layers.\1.attn.qkv_proj.bias"),
        WeightRule(_H + r"attn\.c_proj\.weight", r"model.layers.\1.attn.o_proj.weight", TRANSPOSE),
        WeightRule(_H + r"attn\.c_proj\.bias", r"model.layers.\1.attn.o_proj.bias"),
        WeightRule(_H + r"mlp\.c_fc\.weight", r"model.layers.\1.mlp.fc_in.weight", TRANSPOSE),
        WeightRule(_H + r"mlp\.c_fc\.bias", r"model.layers.\1.mlp.fc_in.bias"),
        WeightRule(_H + r"mlp\.c_proj\.weight", r"model.layers.\1.mlp.fc_out.weight", TRANSPOSE),
        WeightRule(_H + r"mlp\.c_proj\.bias", r"model.layers.\1.mlp.fc_out.bias"),
        # Causal-mask buffers older checkpoints carry.
        WeightRule(_H + r"attn\.(?:bias|masked_bias)", None),
    ]
)


class GPT2Model(BaseModel):
    """The bare decoder (HF's GPT2Model): logits = hidden_states = final hidden state."""

    config_class = GPT2Config
    weight_map = GPT2_RULES + WeightMap([WeightRule(r"lm_head\..*", None)])

    def __init__(self, config: GPT2Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.model = GPT2Backbone(config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        return {"logits": hidden, "hidden_states": hidden, "past_key_values": presents}


class GPT2LMHeadModel(CausalLMModel):
    """GPT-2 language model (text / poetry generation); the LM head is tied to `wte`."""

    config_class = GPT2Config
    weight_map = GPT2_RULES
    backbone_class = GPT2Backbone
    embedding_attr = "wte"
