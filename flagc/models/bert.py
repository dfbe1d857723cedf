"""BERT / RoBERTa: embeddings -> post-LN blocks -> encoder, and the task models FlagAI ships.

Task models: BertModel (hidden states + pooler), BertForSequenceClassification (classification
and semantic matching on sentence pairs via token_type_ids), BertForTokenClassification (NER,
sequence labeling), BertForSeq2seq (FlagAI's UniLM title generation) and BertForEmbedding
(mean pooling). RoBERTa uses the same classes with a RobertaConfig (positions after the pad id,
dense classifier head); the Roberta* names are aliases for readability.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flagc.models.base import BaseModel, WeightMap, WeightRule, cross_entropy_loss
from flagc.models.config import BertConfig
from flagc.models.heads import (
    SEQUENCE_CLASSIFIER_HEADS,
    LMPredictionHead,
    Pooler,
    TokenClassifierHead,
    classification_loss,
    mean_pool,
)
from flagc.models.layers import (
    KV,
    MLP,
    Attention,
    additive_bias,
    causal_allowed,
    padding_allowed,
)

__all__ = [
    "BERT_BACKBONE_RULES",
    "BertEncoder",
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForSeq2seq",
    "BertForEmbedding",
    "RobertaModel",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
]


# ---------------------------------------------------------------------------------------------
# Layers and block
# ---------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pad_token_id = config.pad_token_id
        self.position_offset = config.position_offset

    def positions(self, input_ids: torch.Tensor, past_len: int) -> torch.Tensor:
        """BERT numbers positions 0.. regardless of padding (right padding is its convention);
        RoBERTa numbers real tokens from pad_id + 1 and gives pads pad_id, as HF does."""
        batch, seq = input_ids.shape
        if self.position_offset == 0:
            return torch.arange(past_len, past_len + seq, device=input_ids.device)[None].expand(
                batch, seq
            )
        real = input_ids.ne(self.pad_token_id).long()
        return (real.cumsum(-1) + past_len) * real + self.pad_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_len: int,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.positions(input_ids, past_len)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        return self.dropout(self.norm(x))


class BertBlock(nn.Module):
    """Post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            dropout=config.attention_probs_dropout_prob,
        )
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(x, bias, past)
        x = self.attn_norm(x + self.dropout(a))
        x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x, present


class BertEncoder(nn.Module):
    """Embeddings and the stack of blocks; the masking policy is the caller's (`allowed`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertBlock(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        allowed: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple[KV, ...] | None = None,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        """allowed: bool [batch|1, 1, seq, past+seq] or None (everything visible)."""
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.embeddings(input_ids, token_type_ids, position_ids, past_len)
        bias = None if allowed is None else additive_bias(allowed, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, bias, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return x, tuple(presents)


# ---------------------------------------------------------------------------------------------
# Weight names: HF (bert./roberta. prefixed or bare) -> ours
# ---------------------------------------------------------------------------------------------
_P = r"(?:bert\.|roberta\.)?"
_L = _P + r"encoder\.layer\.(\d+)\."
BERT_BACKBONE_RULES = WeightMap(
    [
        WeightRule(_P + r"embeddings\.word_embeddings\.(weight)", r"model.embeddings.word.\1"),
        WeightRule(
            _P + r"embeddings\.position_embeddings\.(weight)", r"model.embeddings.position.\1"
        ),
        WeightRule(
            _P + r"embeddings\.token_type_embeddings\.(weight)", r"model.embeddings.token_type.\1"
        ),
        WeightRule(_P + r"embeddings\.LayerNorm\.(weight|bias)", r"model.embeddings.norm.\1"),
        WeightRule(_P + r"embeddings\.position_ids", None),  # a buffer in older checkpoints
        WeightRule(
            _L + r"attention\.self\.query\.(weight|bias)", r"model.layers.\1.attn.q_proj.\2"
        ),
        WeightRule(_L + r"attention\.self\.key\.(weight|bias)", r"model.layers.\1.attn.k_proj.\2"),
        WeightRule(
            _L + r"attention\.self\.value\.(weight|bias)", r"model.layers.\1.attn.v_proj.\2"
        ),
        WeightRule(
            _L + r"attention\.output\.dense\.(weight|bias)", r"model.layers.\1.attn.o_proj.\2"
        ),
        WeightRule(
            _L + r"attention\.output\.LayerNorm\.(weight|bias)", r"model.layers.\1.attn_norm.\2"
        ),
        WeightRule(_L + r"intermediate\.dense\.(weight|bias)", r"model.layers.\1.mlp.fc_in.\2"),
        WeightRule(_L + r"output\.dense\.(weight|bias)", r"model.layers.\1.mlp.fc_out.\2"),
        WeightRule(_L + r"output\.LayerNorm\.(weight|bias)", r"model.layers.\1.mlp_norm.\2"),
    ]
)
# HF nests the pooler under the backbone prefix; ours sits beside the backbone.
_POOLER = WeightMap([WeightRule(_P + r"pooler\.(dense\.(?:weight|bias))", r"pooler.\1")])
# Heads of *other* tasks found in pretraining / fine-tuned checkpoints: a model that has no use
# for them skips them (as FlagAI and HF do) instead of calling them unexpected.
_FOREIGN_HEADS = WeightMap(
    [WeightRule(r"(?:cls|lm_head|classifier|qa_outputs|" + _P + r"pooler)\..*", None)]
)
_MLM_HEAD = WeightMap(
    [
        WeightRule(r"cls\.predictions\.transform\.dense\.(weight|bias)", r"lm_head.dense.\1"),
        WeightRule(r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"lm_head.norm.\1"),
        WeightRule(r"cls\.predictions\.bias", r"lm_head.bias"),
        WeightRule(r"lm_head\.layer_norm\.(weight|bias)", r"lm_head.norm.\1"),
        # decoder.weight is tied to the word embeddings; decoder.bias duplicates `bias`.
        WeightRule(r"(?:cls\.predictions|lm_head)\.decoder\.weight", r"lm_head.decoder.weight"),
        WeightRule(r"(?:cls\.predictions|lm_head)\.decoder\.bias", None),
        WeightRule(r"lm_head\.(dense\.(?:weight|bias)|bias)", r"lm_head.\1"),
        # Our own names (save() -> load round trip); listed so _FOREIGN_HEADS does not skip them.
        WeightRule(r"lm_head\.(norm\.(?:weight|bias))", r"lm_head.\1"),
    ]
)


# ---------------------------------------------------------------------------------------------
# Task models
# ---------------------------------------------------------------------------------------------
class _BertTask(BaseModel):
    """Shared plumbing: owns `self.model` (BertEncoder) and runs it bidirectionally."""

    config_class = BertConfig
    weight_map = BERT_BACKBONE_RULES + _FOREIGN_HEADS

    def __init__(self, config: BertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.model = BertEncoder(config)

    @property
    def _dropout(self) -> float:
        c = self.config
        return c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        allowed = None if attention_mask is None else padding_allowed(attention_mask)
        hidden, _ = self.model(input_ids, allowed, token_type_ids, position_ids)
        return hidden


class BertModel(_BertTask):
    """The bare encoder: logits = hidden_states = last hidden state, plus `pooler_output`."""

    weight_map = _POOLER + BERT_BACKBONE_RULES + _FOREIGN_HEADS
    # Checkpoints saved without a pooler (e.g. from a masked-LM) may leave it random.
    head_prefixes = ("pooler.",)

    def __init__(self, config: BertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.pooler = Pooler(config.hidden_size)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        return {
            "logits": hidden,
            "hidden_states": hidden,
            "last_hidden_state": hidden,
            "pooler_output": self.pooler(hidden),
        }


class _BertHeadTask(_BertTask):
    """An encoder plus `self.head`; `head_loss(logits, labels)` gives the loss with labels."""

    head_loss: Any = staticmethod(cross_entropy_loss)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.head(hidden)
        out = {"logits": logits, "hidden_states": hidden}
        if labels is not None:
            out["loss"] = self.head_loss(logits, labels)
        return out


class BertForSequenceClassification(_BertHeadTask):
    """Classification / semantic matching (sentence pairs separated by token_type_ids)."""

    head_loss = staticmethod(classification_loss)

    weight_map = (
        WeightMap(
            [
                WeightRule(_P + r"pooler\.(.*)", r"head.pooler.\1"),
                WeightRule(r"classifier\.(.*)", r"head.classifier.\1"),
            ]
        )
        + BERT_BACKBONE_RULES
        + _FOREIGN_HEADS
    )
    head_prefixes = ("head.",)

    def __init__(self, config: BertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        head_cls = SEQUENCE_CLASSIFIER_HEADS[config.sequence_head]
        self.head = head_cls(config.hidden_size, config.num_labels, self._dropout)


class BertForTokenClassification(_BertHeadTask):
    """Per-token labels: NER and sequence labeling."""

    weight_map = (
        WeightMap([WeightRule(r"classifier\.(.*)", r"head.classifier.\1")])
        + BERT_BACKBONE_RULES
        + _FOREIGN_HEADS
    )
    head_prefixes = ("head.",)

    def __init__(self, config: BertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.head = TokenClassifierHead(config.hidden_size, config.num_labels, self._dropout)


class BertForEmbedding(_BertTask):
    """Sentence embeddings by mean pooling over real tokens (sentence-transformers style)."""

    def __init__(self, config: BertConfig, normalize: bool = False, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.normalize = normalize

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = mean_pool(hidden, attention_mask)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return {"logits": pooled, "hidden_states": hidden}


class BertForSeq2seq(_BertTask):
    """FlagAI's UniLM seq2seq (title generation): one encoder, a mask that lets source tokens
    (token_type 0) see the whole source and target tokens (type 1) see the source and earlier
    targets. Because no key ever depends on a later token, decoding with past KV is exact.

    forward(input_ids, token_type_ids, attention_mask=None, past_key_values=None, labels=None)
    returns logits [batch, seq, vocab] and `past_key_values`; labels give the shifted LM loss
    over target positions only (source positions are ignored, as in FlagAI).
    """

    weight_map = _MLM_HEAD + BERT_BACKBONE_RULES + _FOREIGN_HEADS

    def __init__(self, config: BertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.lm_head = LMPredictionHead(
            config.hidden_size, config.vocab_size, config.hidden_act, config.layer_norm_eps
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.decoder.weight = self.model.embeddings.word.weight

    def forward(
        self,
        input_ids=None,
        token_type_ids=None,
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
        labels=None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        batch, q_len = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        q_src = token_type_ids.eq(0)
        # Past keys count as source for source queries: a source query only occurs while the
        # source is still being prefilled, when everything in the past is source too.
        k_src = torch.cat(
            (torch.ones(batch, past_len, dtype=torch.bool, device=input_ids.device), q_src), 1
        )
        allowed = causal_allowed(q_len, past_len + q_len, input_ids.device) | (
            q_src[:, None, :, None] & k_src[:, None, None, :]
        )
        if attention_mask is not None:
            allowed = allowed & padding_allowed(attention_mask)
        hidden, presents = self.model(
            input_ids, allowed, token_type_ids, position_ids, past_key_values
        )
        logits = self.lm_head(hidden)
        out: dict[str, Any] = {
            "logits": logits,
            "hidden_states": hidden,
            "past_key_values": presents,
        }
        if labels is not None:
            # Predict token t+1 from t, counting only target tokens (FlagAI's target_mask).
            target = labels[:, 1:].masked_fill(token_type_ids[:, 1:].eq(0), -100)
            out["loss"] = cross_entropy_loss(logits[:, :-1], target)
        return out


# RoBERTa shares the classes; a RobertaConfig (from config.json's model_type) switches positions
# and the classifier layout.
RobertaModel = BertModel
RobertaForSequenceClassification = BertForSequenceClassification
RobertaForTokenClassification = BertForTokenClassification
