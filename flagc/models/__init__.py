"""The from_pretrain model zoo: FlagAI-style BaseModel torch modules, configs, AutoLoader.

    from flagc.models import AutoLoader, GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrain("./checkpoints", "GPT2-base-ch")
    out = model(input_ids=ids, attention_mask=mask)          # {"logits", "hidden_states", ...}

Families and tasks are listed in `flagc.models.registry`; T5 and GLM classes live in
flagc.models.t5 / flagc.models.glm and are re-exported here lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

from flagc.models.auto_loader import AutoLoader
from flagc.models.base import (
    TRANSPOSE,
    BaseModel,
    Transform,
    WeightMap,
    WeightRule,
    cross_entropy_loss,
    resolve_local_dir,
    shifted_lm_loss,
)
from flagc.models.bert import (
    BertEncoder,
    BertForEmbedding,
    BertForSeq2seq,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from flagc.models.config import (
    PASS_THROUGH_KEYS,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    ModelConfig,
    Qwen2Config,
    RobertaConfig,
    read_config_json,
)
from flagc.models.gpt2 import GPT2LMHeadModel, GPT2Model
from flagc.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from flagc.models.registry import (
    Family,
    HubModel,
    get_family,
    hub_model,
    hub_model_names,
    model_class,
    normalize_task,
    register_family,
    register_hub_model,
    task_names,
)

# Classes owned by the T5 / GLM modules, imported on first access so this facade does not
# depend on their import order.
_LAZY = {
    "T5Config": "flagc.models.t5",
    "T5Model": "flagc.models.t5",
    "T5ForConditionalGeneration": "flagc.models.t5",
    "GLMConfig": "flagc.models.glm",
    "GLMModel": "flagc.models.glm",
    "GLMForSeq2Seq": "flagc.models.glm",
    "GLMForSequenceClassification": "flagc.models.glm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flagc.models' has no attribute {name!r}")


__all__ = [
    "AutoLoader",
    "BaseModel",
    "BertConfig",
    "BertEncoder",
    "BertForEmbedding",
    "BertForSeq2seq",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "Family",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "HubModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelConfig",
    "PASS_THROUGH_KEYS",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "RobertaConfig",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaModel",
    "TRANSPOSE",
    "Transform",
    "WeightMap",
    "WeightRule",
    "cross_entropy_loss",
    "get_family",
    "hub_model",
    "hub_model_names",
    "model_class",
    "normalize_task",
    "read_config_json",
    "register_family",
    "register_hub_model",
    "resolve_local_dir",
    "shifted_lm_loss",
    "task_names",
    *_LAZY,
]
