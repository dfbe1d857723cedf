"""Task heads shared by the families: sequence / token classification, BERT's LM head, pooling.

Heads are plain nn.Modules over a backbone's hidden states; a task model (BaseModel) owns a
backbone as `self.model` and one head, so a new family gets every task by wiring, not copying.
Parameter names follow the Hugging Face layouts (`classifier`, `classifier.dense` /
`classifier.out_proj`, `pooler.dense`) so HF checkpoints load by identity where possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flagc.models.base import cross_entropy_loss
from flagc.models.layers import activation

__all__ = [
    "Pooler",
    "PooledClassifierHead",
    "DenseClassifierHead",
    "TokenClassifierHead",
    "LMPredictionHead",
    "SEQUENCE_CLASSIFIER_HEADS",
    "mean_pool",
    "classification_loss",
]


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden of the first token))."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class PooledClassifierHead(nn.Module):
    """BERT sequence classification: classifier(dropout(pooler(h))). Names: pooler.*, classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.pooler = Pooler(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(hidden)))


class _DenseOutProj(nn.Module):
    # RoBERTa's classifier: out_proj(dropout(tanh(dense(dropout(h[:, 0]))))).
    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))
        return self.out_proj(self.dropout(x))


class DenseClassifierHead(nn.Module):
    """RoBERTa sequence classification (no pooler). Names: classifier.dense, classifier.out_proj."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.classifier = _DenseOutProj(hidden_size, num_labels, dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


# Config's `sequence_head` -> head class; a family picks its layout through its config type.
SEQUENCE_CLASSIFIER_HEADS: dict[str, type[nn.Module]] = {
    "pooled": PooledClassifierHead,
    "dense": DenseClassifierHead,
}


class TokenClassifierHead(nn.Module):
    """Per-token labels (NER, sequence labeling): classifier(dropout(h)). Name: classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class LMPredictionHead(nn.Module):
    """BERT's masked-LM / UniLM head: decoder(norm(act(dense(h)))) + bias, decoder tied to the
    word embeddings (the owner assigns `decoder.weight`)."""

    def __init__(self, hidden_size: int, vocab_size: int, act: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = activation(act)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden)))) + self.bias


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real tokens (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype)[..., None]
    # clamp: an all-padding row divides by 1e-9 instead of 0 (sentence-transformers does the same).
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's rule: one label -> regression (MSE), several -> cross-entropy (-100 ignored)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return cross_entropy_loss(logits, labels)
