"""GLM (General Language Model) as FlagAI 1.8.4 implements it (`flagai/model/glm_model.py`).

Layer -> block -> model with FlagAI's own tensor names (`word_embeddings.weight`,
`transformer.layers.0.attention.query_key_value.weight`, ...), so FlagAI checkpoints load as they
are (a leading `model.` is stripped, as FlagAI's `load_weights_glm` does).

GLM in one paragraph: a pre-LN transformer (LayerNorm eps 1e-5, fused QKV with biases, tanh-GELU
4h MLP, final LayerNorm, output projection tied to the word embeddings). Positions are 2-D:
`position_ids[:, 0]` is the token position in part A (the [MASK] position for every token of the
span being filled in part B) and `position_ids[:, 1]` counts tokens inside a B span (0 in A). The
attention is "prefix LM": `attention_mask` is not a padding mask but, per sequence, the index
`sep` where part B starts; keys before `sep` are visible to every query (bidirectional part A),
keys from `sep` on are causal. With a past (FlagAI's `mems`, here past K/V) every cached key is
visible.

The math matches FlagAI's for fp32 within float rounding: FlagAI multiplies scores by the 0/1 mask
and adds -65504 at masked keys, we add dtype-min (same softmax); `attention_scale` > 1 only
rescales scores before FlagAI subtracts the row max, which softmax cancels, so it is accepted and
recorded but needs no extra graph ops (a golden test covers it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flagc.errors import RuntimeInputError
from flagc.models.base import BaseModel, WeightMap, WeightRule, cross_entropy_loss
from flagc.models.config import ModelConfig
from flagc.models.layers import KV, activation, additive_bias

__all__ = [
    "GLMConfig",
    "GLMModel",
    "GLMForSeq2Seq",
    "GLMForSequenceClassification",
    "glm_prefix_allowed",
    "glm_generate_blank",
]


@dataclass
class GLMConfig(ModelConfig):
    """FlagAI's GLM config.json keys (FlagAI reads them by name; so do we)."""

    model_type: ClassVar[str] = "glm"
    hf_aliases = {"num_labels": "class_num"}

    num_layers: int = 24
    vocab_size: int = 50048
    hidden_size: int = 1024
    num_attention_heads: int = 16
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    max_sequence_length: int = 1024
    # FlagAI keeps this many past hidden states as `mems` when return_memory is False.
    max_memory_length: int = 0
    checkpoint_num_layers: int = 1
    parallel_output: bool = True
    relative_encoding: bool = False
    block_position_encoding: bool = True
    # GLMModel projects onto the vocabulary (True) or returns hidden states as `logits` (False).
    output_predict: bool = True
    spell_length: int | None = None
    spell_func: str = "lstm"
    attention_scale: float = 1.0
    # FlagAI's GLMStack never passes an epsilon: its LayerNorms always use 1e-5.
    layernorm_epsilon: float = 1e-5
    # GLMForSequenceClassification's number of classes (FlagAI's `class_num`).
    class_num: int = 2

    def __post_init__(self) -> None:
        self._positive(
            "num_layers",
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "max_sequence_length",
            "class_num",
        )
        self._divides("hidden_size", "num_attention_heads")
        self._probability("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob")
        self._check(self.max_memory_length >= 0, "max_memory_length", ">= 0")
        # Transformer-XL relative encoding and P-tuning prompt spells are FlagAI research
        # options no released GLM checkpoint uses; refuse them rather than run different math.
        self._check(
            not self.relative_encoding,
            "relative_encoding",
            "false (Transformer-XL relative encoding is not supported)",
        )
        self._check(
            self.spell_length is None,
            "spell_length",
            "null (P-tuning prompt spells are not supported)",
        )
        self._check(self.attention_scale >= 1.0, "attention_scale", ">= 1.0")
        self._check(self.layernorm_epsilon > 0, "layernorm_epsilon", "> 0")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def glm_prefix_allowed(sep: torch.Tensor, q_len: int, past_len: int) -> torch.Tensor:
    """Bool [batch|1, 1, q, past+q]: GLM's prefix-LM visibility, as FlagAI's build_mask_matrix.

    Within the current chunk, query i sees key j when j <= i or j < sep; every past key is seen.
    `sep` is a scalar or [batch] tensor (FlagAI accepts both).
    """
    device = sep.device
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(q_len, device=device)[None, :]
    current = (j <= i)[None] | (j[None] < sep.reshape(-1, 1, 1))  # [b|1, q, q]
    past = torch.ones((current.shape[0], q_len, past_len), dtype=torch.bool, device=device)
    return torch.cat((past, current), dim=2)[:, None]


# ---------------------------------------------------------------------------------------------
# Layers and block (FlagAI names: attention.query_key_value / dense, mlp.dense_h_to_4h / 4h_to_h)
# ---------------------------------------------------------------------------------------------
class GLMSelfAttention(nn.Module):
    """Fused-QKV multi-head attention; K/V of past tokens are prepended when given."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout_prob
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def kv(self, normed: torch.Tensor) -> KV:
        """K, V [b, heads, len, head_dim] of already-normalised states (FlagAI's mems path)."""
        _, k, v = self.query_key_value(normed).chunk(3, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self, normed: torch.Tensor, bias: torch.Tensor, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        q, k, v = self.query_key_value(normed).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            scale=1.0 / math.sqrt(self.head_dim),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        batch, seq = normed.shape[0], normed.shape[1]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.output_dropout(self.dense(out)), (k, v)


class GLMMLP(nn.Module):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x))): FlagAI's MLPForward with OpenAI's gelu."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.act = activation("gelu_new")  # FlagAI's gelu_impl is the tanh approximation
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_4h_to_h(self.act(self.dense_h_to_4h(x))))


class GLMBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then + mlp(LN(.))."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMSelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = GLMMLP(config)

    def memory_kv(self, mem: torch.Tensor) -> KV:
        """K/V for FlagAI `mems` (this layer's past *inputs*): normalise then project."""
        return self.attention.kv(self.input_layernorm(mem))

    def forward(self, hidden, bias, past=None):
        attn, present = self.attention(self.input_layernorm(hidden), bias, past)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), present


class GLMStack(nn.Module):
    """Position embeddings (2-D when block_position_encoding), blocks, final LayerNorm."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.block_position_encoding = config.block_position_encoding
        # +1: GLM gives span-B tokens position sep-1..., and block positions up to the length.
        extra = 1 if config.block_position_encoding else 0
        self.position_embeddings = nn.Embedding(
            config.max_sequence_length + extra, config.hidden_size
        )
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(
                config.max_sequence_length + 1, config.hidden_size
            )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, embeds, position_ids, bias, past=None):
        """Returns (final hidden, per-layer inputs + last output (FlagAI mems), presents)."""
        if self.block_position_encoding:
            hidden = (
                embeds
                + self.position_embeddings(position_ids[:, 0])
                + self.block_position_embeddings(position_ids[:, 1])
            )
        else:
            hidden = embeds + self.position_embeddings(position_ids)
        hidden = self.embedding_dropout(hidden)
        layer_inputs, presents = [hidden], []
        for i, layer in enumerate(self.layers):
            hidden, present = layer(hidden, bias, past[i] if past is not None else None)
            layer_inputs.append(hidden)
            presents.append(present)
        return self.final_layernorm(hidden), layer_inputs, tuple(presents)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
# FlagAI's load_weights_glm strips a leading "model." (checkpoints saved from task wrappers).
GLM_WEIGHT_MAP = WeightMap([WeightRule(r"model\.((?:word_embeddings|transformer)\..*)", r"\1")])


class GLMModel(BaseModel):
    """FlagAI's GLMModel: forward(input_ids, position_ids, attention_mask, mems, ...) -> dict.

    - `position_ids`: [batch, 2, seq] (positions, block positions), or [batch, seq] without block
      position encoding;
    - `attention_mask`: per-sequence separator [batch] (or a scalar), or a full 0/1 visibility
      matrix [batch, 1, seq, past+seq];
    - `past_key_values`: per layer (K, V) [batch, heads, past, head_dim] (export path), or
      `mems`: FlagAI's per-layer past hidden states (eager compatibility path);
    - returns `logits` (vocab scores, or final hidden states when output_predict is False),
      `hidden_states` (FlagAI's mems: returned when return_memory or max_memory_length > 0),
      `past_key_values` when use_cache, and `loss` (mean CE, -100 ignored) given `labels`.
    """

    config_class: ClassVar[type[ModelConfig]] = GLMConfig
    weight_map: ClassVar[WeightMap] = GLM_WEIGHT_MAP

    def __init__(self, config: GLMConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.output_predict = config.output_predict
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)

    def attention_bias(self, attention_mask, q_len: int, past_len: int, dtype) -> torch.Tensor:
        """Additive bias from FlagAI's attention_mask (separator indices or a 0/1 matrix)."""
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.tensor(attention_mask, dtype=torch.long)
        if attention_mask.dim() == 4:  # FlagAI's explicit matrix, keep its last past+q keys
            allowed = attention_mask[..., attention_mask.shape[-1] - (past_len + q_len) :] > 0
        elif attention_mask.dim() <= 1:
            allowed = glm_prefix_allowed(
                attention_mask.to(self.word_embeddings.weight.device), q_len, past_len
            )
        else:
            raise RuntimeInputError(
                "GLM attention_mask must be the per-sequence separator index [batch] (or a scalar) "
                f"or a [batch, 1, seq, past+seq] 0/1 matrix; got shape {list(attention_mask.shape)}"
            )
        return additive_bias(allowed, dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mems: Sequence[torch.Tensor] | None = None,
        return_memory: bool = False,
        past_key_values: Sequence[KV] | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """See the class docstring."""
        if input_ids is None or position_ids is None or attention_mask is None:
            raise RuntimeInputError("GLM forward needs input_ids, position_ids and attention_mask")
        if mems is not None and len(mems) == 0:
            mems = None  # FlagAI's generation loop starts from mems=[]
        if mems is not None and past_key_values is not None:
            raise RuntimeInputError("pass either FlagAI `mems` or `past_key_values`, not both")
        layers = self.transformer.layers
        if mems is not None:
            past = tuple(layer.memory_kv(mem) for layer, mem in zip(layers, mems))
        else:
            past = past_key_values
        if past is not None and len(past) != len(layers):
            raise RuntimeInputError(
                f"GLM past holds {len(past)} layers; the model has {len(layers)}"
            )
        q_len = input_ids.shape[1]
        past_len = past[0][0].shape[2] if past is not None else 0
        embeds = self.word_embeddings(input_ids)
        bias = self.attention_bias(attention_mask, q_len, past_len, embeds.dtype)
        hidden, layer_inputs, presents = self.transformer(embeds, position_ids, bias, past)
        logits = F.linear(hidden, self.word_embeddings.weight) if self.output_predict else hidden
        out: dict[str, Any] = {"logits": logits}
        if return_memory or self.config.max_memory_length > 0:
            out["hidden_states"] = _update_mems(
                layer_inputs, mems, return_memory, self.config.max_memory_length
            )
        else:
            out["hidden_states"] = []
        if use_cache:
            out["past_key_values"] = presents
        if labels is not None and self.output_predict:
            out["loss"] = cross_entropy_loss(logits, labels)
        return out


def _update_mems(hiddens, mems, return_memory: bool, max_memory_length: int) -> list[torch.Tensor]:
    """FlagAI's GLMStack.update_mems: append the new hidden states, keep the last N."""
    memory_length = mems[0].shape[1] if mems else 0
    q_len = hiddens[0].shape[1]
    new_len = memory_length + q_len
    if not return_memory:
        new_len = min(max_memory_length, new_len)
    if new_len <= q_len:
        return [h[:, q_len - new_len :] for h in hiddens]
    keep = new_len - q_len
    return [torch.cat((m[:, m.shape[1] - keep :], h), dim=1) for m, h in zip(mems, hiddens)]


class GLMForSeq2Seq(GLMModel):
    """FlagAI's GLMForSeq2Seq (title / poetry generation): GLMModel plus its masked seq2seq loss.

    Parameters keep GLMModel's names, as FlagAI's wrapper exposes them (its state_dict delegates).
    Given `target_ids` and `loss_mask`, loss = sum(CE(ignore_index=0) * loss_mask) / sum(loss_mask).
    Unlike FlagAI, `logits` keep their [batch, seq, vocab] shape (FlagAI flattens them).
    """

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        target_ids=None,
        loss_mask=None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        out = super().forward(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs
        )
        if target_ids is not None:
            if loss_mask is None:
                raise RuntimeInputError("GLMForSeq2Seq: target_ids given without loss_mask")
            logits = out["logits"]
            losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                target_ids.reshape(-1).long(),
                ignore_index=0,
                reduction="none",
            )
            mask = loss_mask.reshape(-1).float()
            out["loss"] = (losses * mask).sum() / mask.sum()
        return out


class GLMForSequenceClassification(BaseModel):
    """FlagAI's GLMForSequenceClassification: hidden state at a pool token -> tanh dense -> classes.

    pool_token: 'cls' (position 0), 'start' (the separator position) or 'pad' (sep - 1).
    Parameter names match FlagAI's wrapper: `model.*`, `pool_layer`, `multichoice_head`.
    """

    config_class: ClassVar[type[ModelConfig]] = GLMConfig
    # Backbone-only checkpoints (GLM-large-ch) carry no "model." prefix: add it.
    weight_map: ClassVar[WeightMap] = WeightMap(
        [WeightRule(r"((?:word_embeddings|transformer)\..*)", r"model.\1")]
    )
    head_prefixes: ClassVar[tuple[str, ...]] = ("pool_layer.", "multichoice_head.")

    def __init__(
        self, config: GLMConfig, hidden_dropout: float = 0.1, pool_token: str = "cls", **kwargs: Any
    ) -> None:
        super().__init__(config, **kwargs)
        if pool_token not in ("cls", "start", "pad"):
            raise RuntimeInputError(
                f"pool_token must be 'cls', 'start' or 'pad', got {pool_token!r}"
            )
        self.pool_token = pool_token
        self.model = GLMModel(config)
        self.model.output_predict = False
        self.pool_layer = nn.Linear(config.hidden_size, config.hidden_size)
        self.multichoice_dropout = nn.Dropout(hidden_dropout)
        self.multichoice_head = nn.Linear(config.hidden_size, config.class_num)

    def forward(
        self, input_ids=None, position_ids=None, attention_mask=None, labels=None, **kwargs: Any
    ) -> dict[str, Any]:
        """[batch, seq] inputs (or [batch, choices, seq] with class_num == 1) -> class logits."""
        num_choices = None
        if input_ids is not None and input_ids.dim() == 3:
            if self.config.class_num != 1:
                raise RuntimeInputError(
                    "multiple-choice inputs [batch, choices, seq] need class_num == 1"
                )
            num_choices = input_ids.shape[1]
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
            attention_mask = attention_mask.reshape(-1, *attention_mask.shape[2:])
            position_ids = position_ids.reshape(-1, *position_ids.shape[2:])
        model_out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask
        )
        hidden = model_out["logits"]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pool_token == "cls":
            pooled = hidden[:, 0]
        elif self.pool_token == "start":
            pooled = hidden[rows, attention_mask.reshape(-1)]
        else:
            pooled = hidden[rows, attention_mask.reshape(-1) - 1]
        logits = self.multichoice_head(
            self.multichoice_dropout(torch.tanh(self.pool_layer(pooled)))
        )
        if num_choices is not None:
            logits = logits.reshape(-1, num_choices)
        out: dict[str, Any] = {"logits": logits, "hidden_states": model_out["hidden_states"]}
        if labels is not None:
            if logits.shape[1] == 1:
                logits = logits.squeeze(1)
                out["logits"] = logits
                out["loss"] = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                out["loss"] = F.cross_entropy(logits.float(), labels.long())
        return out


# ---------------------------------------------------------------------------------------------
# Blank infilling generation (greedy), FlagAI's glm_generate_sample loop with a KV cache
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def glm_generate_blank(
    model: GLMModel,
    context_ids: torch.Tensor,
    mask_position: torch.Tensor | int,
    sop_id: int,
    eop_ids: Sequence[int],
    max_new_tokens: int,
) -> torch.Tensor:
    """Fill the blank at `mask_position` ([MASK] / [gMASK] in the context) greedily.

    The context [batch, L] is encoded bidirectionally (sep = L, positions 0..L-1, block 0); then
    starting from `sop`, each new token sits at position `mask_position` with block position
    1, 2, ... and attends to the whole context and the tokens generated so far (FlagAI's
    glm_sample_sequence, with temperature 0). Returns generated ids [batch, <= max_new_tokens];
    sequences that emitted an end token are padded with their first end token.
    """
    if max_new_tokens <= 0:
        raise RuntimeInputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not eop_ids:
        raise RuntimeInputError("glm_generate_blank needs at least one end token id (eop)")
    batch, ctx_len = context_ids.shape
    device = context_ids.device
    mask_position = torch.as_tensor(mask_position, device=device).reshape(-1).expand(batch)
    positions = torch.stack(
        (
            torch.arange(ctx_len, device=device).expand(batch, ctx_len),
            torch.zeros(batch, ctx_len, dtype=torch.long, device=device),
        ),
        dim=1,
    )
    sep = torch.full((batch,), ctx_len, dtype=torch.long, device=device)
    out = model(input_ids=context_ids, position_ids=positions, attention_mask=sep, use_cache=True)
    past = out["past_key_values"]
    token = torch.full((batch, 1), sop_id, dtype=torch.long, device=device)
    ends = torch.tensor(list(eop_ids), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    zero_sep = torch.zeros((batch,), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        pos = torch.stack(
            (mask_position[:, None], torch.full_like(mask_position[:, None], step + 1)), dim=1
        )
        out = model(
            input_ids=token,
            position_ids=pos,
            attention_mask=zero_sep,
            past_key_values=past,
            use_cache=True,
        )
        past = out["past_key_values"]
        nxt = out["logits"][:, -1].argmax(-1)
        nxt = torch.where(done, ends[0], nxt)
        done = done | torch.isin(nxt, ends)
        generated.append(nxt)
        if bool(done.all()):
            break
        token = nxt[:, None]
    return torch.stack(generated, dim=1)


def _families():
    # registry imports this module lazily (inside its first lookup), so importing Family here
    # creates no import cycle; FAMILIES is read by registry._ensure_loaded.
    from flagc.models.registry import Family  # noqa: PLC0415

    return (
        Family(
            "glm",
            (GLMConfig,),
            {
                # FlagAI's AutoLoader: glm_lm -> GLMModel, glm_seq2seq / glm_title-generation /
                # glm_poetry -> GLMForSeq2Seq, glm_classification -> GLMForSequenceClassification.
                "base": GLMModel,
                "lm": GLMModel,
                "seq2seq": GLMForSeq2Seq,
                "classification": GLMForSequenceClassification,
            },
            "FlagAI GLM (blank infilling, 2-D positions, prefix attention): GLM-large-ch/en, "
            "GLM-10b-ch",
        ),
    )


FAMILIES = _families()
