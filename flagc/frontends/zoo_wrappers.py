"""Export wrappers: a zoo model's forward(**kw) -> dict, seen as forward(*tensors) -> tuple.

Each wrapper fixes one graph signature (the names live in zoo_build's IO tables) and holds its
model as `inner`, so parameter names in the exported program are `inner.<module name>`.
The cache travels flat: past_key_values.{i}.key, .value for every layer, in layer order.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EncoderStep", "DecoderStep", "UniLMStep", "GLMStep", "GLMClassify", "T5Encode",
           "T5DecodeStep"]


def _pairs(flat) -> tuple:
    return tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))


def _flat(presents) -> tuple:
    return tuple(t for kv in presents for t in kv[:2])


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner


class EncoderStep(_Wrapper):
    """BERT / RoBERTa tasks: (input_ids, attention_mask, token_type_ids) -> (logits?, hidden)."""

    def __init__(self, inner: nn.Module, with_logits: bool):
        super().__init__(inner)
        self.with_logits = with_logits

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)
        hidden = out["hidden_states"]
        return (out["logits"], hidden) if self.with_logits else (hidden,)


class DecoderStep(_Wrapper):
    """GPT-2 / LLaMA / Qwen2: the DSL path's decoder signature, so the runtime loop is shared."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=_pairs(past))
        return (out["logits"],) + _flat(out["past_key_values"])


class UniLMStep(_Wrapper):
    """FlagAI's BERT seq2seq (title generation) with its KV cache; token types mark the target."""

    def forward(self, input_ids, token_type_ids, attention_mask, *past):
        out = self.inner(input_ids=input_ids, token_type_ids=token_type_ids,
                         attention_mask=attention_mask, past_key_values=_pairs(past))
        return (out["logits"],) + _flat(out["past_key_values"])


class GLMStep(_Wrapper):
    """GLM: 2-D position ids [batch, 2, seq] and the per-sequence separator as its mask."""

    def forward(self, input_ids, position_ids, attention_mask, *past):
        out = self.inner(input_ids=input_ids, position_ids=position_ids,
                         attention_mask=attention_mask, past_key_values=_pairs(past),
                         use_cache=True)
        return (out["logits"],) + _flat(out["past_key_values"])


class GLMClassify(_Wrapper):
    def forward(self, input_ids, position_ids, attention_mask):
        out = self.inner(input_ids=input_ids, position_ids=position_ids,
                         attention_mask=attention_mask)
        return (out["logits"],)


class T5Encode(_Wrapper):
    """T5 encoder: hidden states and, per decoder layer, the cross-attention K/V (computed once
    per source instead of at every decoder step)."""

    def forward(self, input_ids, attention_mask):
        hidden = self.inner.encode(input_ids, attention_mask)
        return (hidden,) + _flat(self.inner.cross_kv(hidden))


class T5DecodeStep(_Wrapper):
    """T5 decoder step: new tokens, source mask, self-attention past and cross K/V."""

    def __init__(self, inner: nn.Module, layers: int):
        super().__init__(inner)
        self.layers = layers

    def forward(self, decoder_input_ids, encoder_attention_mask, *cache):
        n = 2 * self.layers
        past, cross = _pairs(cache[:n]), _pairs(cache[n:])
        layer_past = tuple(p + c for p, c in zip(past, cross))
        out = self.inner(attention_mask=encoder_attention_mask,
                         decoder_input_ids=decoder_input_ids, past_key_values=layer_past)
        return (out["logits"],) + _flat(out["past_key_values"])


def flat_names(prefix: str, layers: int) -> list[str]:
    """`prefix.{i}.key`, `prefix.{i}.value` for every layer, in the wrappers' order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


__all__ += ["flat_names"]
del torch
