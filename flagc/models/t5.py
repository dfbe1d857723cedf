"""T5 / mT5 encoder-decoder (FlagAI's T5-base-ch / T5-base-en, HF t5 / t5 v1.1 / mt5 checkpoints).

Layer -> block -> model, with Hugging Face's module names
(`encoder.block.0.layer.0.SelfAttention.q`, `...layer.1.DenseReluDense.wi_0`, ...) so HF and
FlagAI checkpoints load without renaming.

T5 specifics worth knowing when reading the math:
- no absolute positions: a learned bias per (relative-distance bucket, head) is added to the
  attention scores; only the first block of each stack owns the table, every block reuses the bias
  it computes (encoder buckets are bidirectional, decoder buckets causal);
- attention scores are *not* scaled by 1/sqrt(d_kv) (the scale is folded into the init);
- norms are RMS norms without bias ("T5LayerNorm");
- with tied embeddings the decoder output is scaled by d_model**-0.5 before the LM head.

Everything stays `torch.export`-capturable: no Python branch depends on tensor values, only on
config fields and on which optional inputs were passed. Past KV per decoder layer is the tuple
(self_k, self_v, cross_k, cross_v), each `[batch, heads, len, d_kv]`; the cross-attention pair is
computed once from the encoder output and passed back unchanged on every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flagc.errors import RuntimeInputError
from flagc.models.base import BaseModel, WeightMap, WeightRule, cross_entropy_loss
from flagc.models.config import ModelConfig
from flagc.models.layers import RMSNorm, activation, additive_bias, causal_allowed, padding_allowed

__all__ = [
    "T5Config",
    "MT5Config",
    "T5Model",
    "T5ForConditionalGeneration",
    "relative_position_bucket",
]

# One decoder layer's cache: (self-attention K, V, cross-attention K, V).
LayerPast = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class T5Config(ModelConfig):
    """HF / FlagAI T5 config.json fields (both use HF's spelling)."""

    model_type: ClassVar[str] = "t5"

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    # "relu" (original T5), "gated-gelu" (t5 v1.1, mT5, T5-pegasus), "gated-<act>" generally.
    feed_forward_proj: str = "relu"
    # Untied (t5 v1.1 / mT5 as saved by transformers 4) means a separate lm_head.weight.
    tie_word_embeddings: bool = True
    # transformers 5 always ties and writes this flag instead; None: scale iff tied (T5 v1.0).
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None  # None: pad_token_id, as in every T5 checkpoint

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        self._positive(
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        self._check(
            self.relative_attention_num_buckets >= 4,
            "relative_attention_num_buckets",
            ">= 4 (half are split again into exact and log-spaced buckets)",
        )
        self._probability("dropout_rate")
        self._check(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "> 0")
        parts = self.feed_forward_proj.split("-")
        self._check(
            (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) and bool(parts[-1]),
            "feed_forward_proj",
            "'<act>' or 'gated-<act>', e.g. 'relu' or 'gated-gelu'",
        )
        activation(self.dense_act_fn)  # ConfigError naming the activation when unknown

    @property
    def is_gated_act(self) -> bool:
        """True for t5 v1.1 / mT5's gated feed-forward (wi_0, wi_1)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The activation; HF maps "gated-gelu" to the tanh approximation (gelu_new)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


@dataclass
class MT5Config(T5Config):
    """mT5: T5 v1.1 layout (gated-gelu, untied head) with a 250k vocabulary."""

    model_type: ClassVar[str] = "mt5"

    vocab_size: int = 250112
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Map key_pos - query_pos to a bucket id, as Mesh TensorFlow's T5 does.

    Half the buckets (all of them when causal) cover exact small distances; the rest are
    log-spaced up to max_distance, beyond which everything shares the last bucket. Bidirectional
    buckets spend the upper half on keys after the query.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        # Causal: future keys are masked anyway; they all land in bucket 0 like distance 0.
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) keeps log() finite for the small distances `where` discards anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5Attention(nn.Module):
    """Unscaled multi-head attention with q/k/v/o (no biases) and an optional bucket-bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

    def compute_bias(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Bucket bias [1, heads, q_len, k_len]; queries are the last q_len of k_len positions."""
        q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def project(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [batch, heads, len, d_kv] of `states` (cross-attention caches these once)."""
        return self._heads(self.k(states)), self._heads(self.v(states))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """hidden [b, q, d], bias [b|1, heads|1, q, k], kv the full keys / values -> [b, q, d]."""
        q = self._heads(self.q(hidden))
        out = F.scaled_dot_product_attention(
            q,
            kv[0],
            kv[1],
            attn_mask=bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0,
        )
        batch, q_len = hidden.shape[0], hidden.shape[1]
        return self.o(out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_kv))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention sublayer; K/V of past tokens are prepended when given."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, bidirectional)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, bias, past=None):
        normed = self.layer_norm(hidden)
        k, v = self.SelfAttention.project(normed)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = hidden + self.dropout(self.SelfAttention(normed, bias, (k, v)))
        return out, (k, v)


class T5LayerCrossAttention(nn.Module):
    """Pre-norm attention over the encoder output (K/V given, computed once per sequence)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, bidirectional=True)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, bias, kv):
        return hidden + self.dropout(self.EncDecAttention(self.layer_norm(hidden), bias, kv))


class T5LayerFF(nn.Module):
    """Pre-norm feed-forward: wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = _GatedDense(config) if config.is_gated_act else _Dense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden):
        return hidden + self.dropout(self.DenseReluDense(self.layer_norm(hidden)))


class _Dense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi(x))))


class _GatedDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


# ---------------------------------------------------------------------------------------------
# Blocks and stacks
# ---------------------------------------------------------------------------------------------
class T5Block(nn.Module):
    """layer[0] self-attention, (decoder) layer[1] cross-attention, layer[-1] feed-forward."""

    def __init__(self, config: T5Config, is_decoder: bool, first: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, first, not is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, hidden, self_bias, past=None, cross_bias=None, cross_kv=None):
        hidden, present = self.layer[0](hidden, self_bias, past)
        if cross_kv is not None:
            hidden = self.layer[1](hidden, cross_bias, cross_kv)
        return self.layer[-1](hidden), present


class T5Stack(nn.Module):
    """A stack of blocks plus the final norm; embeddings are looked up by the model (shared)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.is_decoder = is_decoder
        self.block = nn.ModuleList([T5Block(config, is_decoder, i == 0) for i in range(n)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def position_bias(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """The first block's bucket bias, shared by every block of the stack."""
        return self.block[0].layer[0].SelfAttention.compute_bias(q_len, k_len, device)

    def encode(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional encoder: [b, s, d] -> final hidden states [b, s, d]."""
        seq = embeds.shape[1]
        bias = self.position_bias(seq, seq, embeds.device)
        if attention_mask is not None:
            bias = bias + additive_bias(padding_allowed(attention_mask), bias.dtype)
        hidden = self.dropout(embeds)
        for block in self.block:
            hidden, _ = block(hidden, bias)
        return self.dropout(self.final_layer_norm(hidden))

    def decode(
        self,
        embeds: torch.Tensor,
        cross_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        encoder_attention_mask: torch.Tensor | None,
        past: Sequence[LayerPast] | None,
        decoder_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[LayerPast, ...]]:
        """Causal decoder over the new tokens; returns (hidden, presents per layer)."""
        q_len = embeds.shape[1]
        past_len = past[0][0].shape[2] if past is not None else 0
        k_len = past_len + q_len
        allowed = causal_allowed(q_len, k_len, embeds.device)
        if decoder_attention_mask is not None:  # covers past + current tokens (HF convention)
            allowed = allowed & padding_allowed(decoder_attention_mask)
        self_bias = self.position_bias(q_len, k_len, embeds.device)
        self_bias = self_bias + additive_bias(allowed, self_bias.dtype)
        cross_bias = torch.zeros((1, 1, 1, 1), dtype=embeds.dtype, device=embeds.device)
        if encoder_attention_mask is not None:
            cross_bias = additive_bias(padding_allowed(encoder_attention_mask), embeds.dtype)
        hidden = self.dropout(embeds)
        presents = []
        for i, block in enumerate(self.block):
            layer_past = (past[i][0], past[i][1]) if past is not None else None
            hidden, (k, v) = block(hidden, self_bias, layer_past, cross_bias, cross_kv[i])
            presents.append((k, v, cross_kv[i][0], cross_kv[i][1]))
        return self.dropout(self.final_layer_norm(hidden)), tuple(presents)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
T5_WEIGHT_MAP = WeightMap(
    [
        # Older HF checkpoints also store the shared table under each stack's name.
        WeightRule(r"(encoder|decoder)\.embed_tokens\.weight", None),
        # A never-used table some checkpoints carry (HF: _keys_to_ignore_on_load_unexpected).
        WeightRule(
            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight", None
        ),
    ]
)


class T5Model(BaseModel):
    """T5 encoder-decoder with its LM head, as FlagAI's `T5Model` (which also carries lm_head).

    forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
    encoder_outputs, past_key_values, use_cache) -> dict with `logits` [b, t, vocab],
    `hidden_states` (decoder output), `encoder_hidden_states`, `loss` when labels are given and
    `past_key_values` (per layer (self_k, self_v, cross_k, cross_v)) when use_cache or a past is
    given. Unknown keyword arguments are ignored (FlagAI's contract).
    """

    config_class: ClassVar[type[ModelConfig]] = T5Config
    weight_map: ClassVar[WeightMap] = T5_WEIGHT_MAP

    def __init__(self, config: T5Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding table with the LM head when the config says they are tied."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    # ---- pieces, also used as separately exported graphs (encoder, decoder step) ---------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Encoder output [batch, src, d_model]."""
        return self.encoder.encode(self.shared(input_ids), attention_mask)

    def cross_kv(self, encoder_hidden_states: torch.Tensor):
        """Per decoder layer, the cross-attention K/V of the encoder output (computed once)."""
        return tuple(
            block.layer[1].EncDecAttention.project(encoder_hidden_states)
            for block in self.decoder.block
        )

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: [start, labels[:-1]] with -100 replaced by pad."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat((start, labels[:, :-1]), dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: Sequence[LayerPast] | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """See the class docstring; encoder_outputs may be a tensor, a tuple or a dict."""
        encoder_hidden = _encoder_hidden(encoder_outputs)
        if encoder_hidden is None and past_key_values is None:
            if input_ids is None:
                raise RuntimeInputError(
                    f"{type(self).__name__}.forward needs input_ids, encoder_outputs or "
                    "past_key_values to attend over"
                )
            encoder_hidden = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise RuntimeInputError(
                    f"{type(self).__name__}.forward needs decoder_input_ids or labels"
                )
            decoder_input_ids = self.shift_right(labels)
        if past_key_values is not None:
            _check_past(past_key_values, len(self.decoder.block))
            cross = tuple((p[2], p[3]) for p in past_key_values)
        else:
            cross = self.cross_kv(encoder_hidden)
        hidden, presents = self.decoder.decode(
            self.shared(decoder_input_ids),
            cross,
            attention_mask,
            past_key_values,
            decoder_attention_mask,
        )
        scaled = (
            hidden * (self.config.d_model**-0.5) if self.config.scale_decoder_outputs else hidden
        )
        logits = self.lm_head(scaled)
        out: dict[str, Any] = {"logits": logits, "hidden_states": hidden}
        if encoder_hidden is not None:
            out["encoder_hidden_states"] = encoder_hidden
        if use_cache or past_key_values is not None:
            out["past_key_values"] = presents
        if labels is not None:
            out["loss"] = cross_entropy_loss(logits, labels)
        return out


class T5ForConditionalGeneration(T5Model):
    """Hugging Face's name for the same module (encoder-decoder + LM head)."""


def _encoder_hidden(encoder_outputs: Any) -> torch.Tensor | None:
    """Accept HF's / FlagAI's spellings of encoder outputs: tensor, (tensor, ...), or a dict."""
    if encoder_outputs is None or isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs
    if isinstance(encoder_outputs, Mapping):
        for key in ("last_hidden_state", "encoder_hidden_states", "hidden_states"):
            if isinstance(encoder_outputs.get(key), torch.Tensor):
                return encoder_outputs[key]
    elif isinstance(encoder_outputs, Sequence) and encoder_outputs:
        if isinstance(encoder_outputs[0], torch.Tensor):
            return encoder_outputs[0]
    raise RuntimeInputError(
        "encoder_outputs must be a [batch, src, d_model] tensor, a tuple starting with one, or a "
        f"dict with 'last_hidden_state'; got {type(encoder_outputs).__name__}"
    )


def _check_past(past: Sequence[LayerPast], layers: int) -> None:
    """Structure check only (lengths are Python ints); tensor shapes are not branched on."""
    if len(past) != layers or any(len(p) != 4 for p in past):
        raise RuntimeInputError(
            f"past_key_values must hold {layers} tuples (self_k, self_v, cross_k, cross_v); got "
            f"{len(past)} entries of lengths {[len(p) for p in past]}"
        )


def _families():
    # registry imports this module lazily (inside its first lookup), so importing Family here
    # creates no import cycle; FAMILIES is read by registry._ensure_loaded.
    from flagc.models.registry import Family  # noqa: PLC0415

    return (
        Family(
            "t5",
            (T5Config, MT5Config),
            {
                "base": T5Model,
                "lm": T5ForConditionalGeneration,
                "seq2seq": T5ForConditionalGeneration,
            },
            "T5 / mT5 encoder-decoders (FlagAI T5Model: T5-base-ch, T5-base-en)",
        ),
    )


FAMILIES = _families()
