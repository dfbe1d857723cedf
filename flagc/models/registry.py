"""The zoo's one table: family -> config classes (by model_type), model class per task, weight map;
and hub model names -> family + config.

Families defined in this package are listed explicitly in `_builtin_families()`. Families that
live in other modules (T5, GLM) are found through `_EXTERNAL_FAMILY_MODULES`: each such module
exposes `FAMILIES` (a tuple of Family) and is imported lazily on the first lookup — no
registration by import side effect, no import cycle (those modules import base.py, never this
one). `register_family()` adds a family at run time (plugins, tests).

The CLI and AutoLoader read their choices from here (`task_names()`, `hub_model_names()`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from flagc.errors import ConfigError
from flagc.models.base import BaseModel, WeightMap
from flagc.models.config import ModelConfig

__all__ = [
    "Family",
    "HubModel",
    "TASK_ALIASES",
    "register_family",
    "register_hub_model",
    "get_family",
    "family_names",
    "family_for_model_type",
    "normalize_task",
    "task_names",
    "model_class",
    "hub_model",
    "hub_model_names",
]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: short family name ("bert", "gpt2", "llama", "t5", "glm").
        config_classes: config dataclasses of the family; their `model_type` values are the
            config.json `model_type` strings the family loads (bert and roberta, llama and qwen2).
        tasks: canonical task name (see TASK_ALIASES) -> BaseModel subclass.
        description: one line for listings.
    """

    name: str
    config_classes: tuple[type[ModelConfig], ...]
    tasks: Mapping[str, type[BaseModel]]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.config_classes:
            raise ConfigError(f"family {self.name!r} declares no config class")
        unknown = sorted(set(self.tasks) - set(_CANONICAL_TASKS))
        if unknown:
            raise ConfigError(
                f"family {self.name!r} declares unknown task(s) {unknown}; "
                f"valid: {sorted(_CANONICAL_TASKS)}"
            )
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(c.model_type for c in self.config_classes)

    @property
    def weight_maps(self) -> dict[str, WeightMap]:
        """Task -> the checkpoint-name mapping its model class applies."""
        return {task: cls.weight_map for task, cls in self.tasks.items()}

    def config_class(self, model_type: str | None) -> type[ModelConfig]:
        """The config class for a model_type (the first one when model_type is absent)."""
        for cls in self.config_classes:
            if cls.model_type == model_type:
                return cls
        return self.config_classes[0]


@dataclass(frozen=True)
class HubModel:
    """A model the hub serves by name, with its family and the sizes of its config.json."""

    name: str
    family: str
    config: Mapping[str, Any] = field(default_factory=dict)
    language: str = ""


# Canonical tasks and the names FlagAI and users spell them with ('-' is read as '_').
_CANONICAL_TASKS = ("base", "lm", "seq2seq", "classification", "sequence_labeling", "embedding")
TASK_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "base": "base",
        "backbone": "base",
        "lm": "lm",
        "text_generation": "lm",
        "poetry_generation": "lm",
        "seq2seq": "seq2seq",
        "title_generation": "seq2seq",
        "classification": "classification",
        "semantic_matching": "classification",
        "sequence_labeling": "sequence_labeling",
        "ner": "sequence_labeling",
        "embedding": "embedding",
    }
)

# Modules outside this file that define families (owned by other authors). Each exposes
# FAMILIES: tuple[Family, ...]. A module not written yet is skipped.
_EXTERNAL_FAMILY_MODULES = ("flagc.models.t5", "flagc.models.glm")

_families: dict[str, Family] = {}
_hub_models: dict[str, HubModel] = {}
_loaded = False


def _builtin_families() -> tuple[Family, ...]:
    from flagc.models import bert, gpt2, llama  # noqa: PLC0415 - they import base, not registry
    from flagc.models.config import (  # noqa: PLC0415
        BertConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        RobertaConfig,
    )

    return (
        Family(
            "bert",
            (BertConfig, RobertaConfig),
            {
                "base": bert.BertModel,
                "classification": bert.BertForSequenceClassification,
                "sequence_labeling": bert.BertForTokenClassification,
                "seq2seq": bert.BertForSeq2seq,
                "embedding": bert.BertForEmbedding,
            },
            "BERT / RoBERTa encoders (FlagAI BertModel family)",
        ),
        Family(
            "gpt2",
            (GPT2Config,),
            {"base": gpt2.GPT2Model, "lm": gpt2.GPT2LMHeadModel},
            "GPT-2 decoders",
        ),
        Family(
            "llama",
            (LlamaConfig, Qwen2Config),
            {"lm": llama.LlamaForCausalLM},
            "LLaMA / Qwen2 decoders (GQA, rotary)",
        ),
    )


# Hub models FlagAI serves, with the sizes of their config.json (FlagAI's model cards).
_HUB_MODELS = (
    HubModel(
        "GLM-large-ch",
        "glm",
        {
            "model_type": "glm",
            "num_layers": 24,
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "vocab_size": 50048,
            "max_sequence_length": 1024,
            "max_memory_length": 0,
            "embedding_dropout_prob": 0.1,
            "attention_dropout_prob": 0.1,
            "output_dropout_prob": 0.1,
            "block_position_encoding": True,
            "relative_encoding": False,
        },
        "chinese",
    ),
    HubModel(
        "GLM-large-en",
        "glm",
        {
            "model_type": "glm",
            "num_layers": 24,
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "vocab_size": 30592,
            "max_sequence_length": 512,
            "max_memory_length": 0,
            "embedding_dropout_prob": 0.1,
            "attention_dropout_prob": 0.1,
            "output_dropout_prob": 0.1,
            "block_position_encoding": True,
            "relative_encoding": False,
        },
        "english",
    ),
    HubModel(
        "GLM-10b-ch",
        "glm",
        {
            "model_type": "glm",
            "num_layers": 48,
            "hidden_size": 4096,
            "num_attention_heads": 64,
            "vocab_size": 50048,
            "max_sequence_length": 1024,
            "max_memory_length": 0,
            "embedding_dropout_prob": 0.1,
            "attention_dropout_prob": 0.1,
            "output_dropout_prob": 0.1,
            "block_position_encoding": True,
            "relative_encoding": False,
        },
        "chinese",
    ),
    HubModel(
        "RoBERTa-base-ch",
        "bert",
        {
            # hfl/chinese-roberta-wwm-ext: a BERT architecture (positions from 0), Chinese vocab.
            "model_type": "bert",
            "vocab_size": 21128,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
        },
        "chinese",
    ),
    HubModel(
        "BERT-base-en",
        "bert",
        {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
        },
        "english",
    ),
    HubModel(
        "GPT2-base-ch",
        "gpt2",
        {
            "model_type": "gpt2",
            "vocab_size": 21128,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "n_positions": 1024,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
        },
        "chinese",
    ),
    HubModel(
        "T5-base-ch",
        "t5",
        {
            # t5-pegasus style mT5 base with a 50k Chinese vocab, gated-GELU feed-forward.
            "model_type": "t5",
            "vocab_size": 50000,
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 2048,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False,
        },
        "chinese",
    ),
    HubModel(
        "T5-base-en",
        "t5",
        {
            "model_type": "t5",
            "vocab_size": 32128,
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 3072,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "relu",
            "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": True,
        },
        "english",
    ),
)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in _builtin_families():
        register_family(family)
    for hub in _HUB_MODELS:
        _hub_models.setdefault(hub.name, hub)
    for module_name in _EXTERNAL_FAMILY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists but one of *its* imports is missing
                raise
            continue
        # A module may also call register_family() itself when imported; tolerate both.
        for family in getattr(module, "FAMILIES", ()):
            if family.name not in _families:
                register_family(family)


def register_family(family: Family, replace: bool = False) -> None:
    """Add a family to the table; ConfigError when its name or a model_type is already taken."""
    _ensure_loaded()
    if family.name in _families and not replace:
        if _families[family.name] is family:
            return
        raise ConfigError(f"family {family.name!r} is already registered")
    clash = {
        t for name, other in _families.items() if name != family.name for t in other.model_types
    } & set(family.model_types)
    if clash:
        raise ConfigError(f"family {family.name!r}: model_type(s) {sorted(clash)} already taken")
    _families[family.name] = family


def register_hub_model(hub: HubModel, replace: bool = False) -> None:
    """Add (or with replace=True, overwrite) a hub model row."""
    _ensure_loaded()
    if hub.name in _hub_models and not replace:
        raise ConfigError(f"hub model {hub.name!r} is already registered")
    _hub_models[hub.name] = hub


def family_names() -> list[str]:
    _ensure_loaded()
    return sorted(_families)


def get_family(name: str) -> Family:
    """The family named `name` (or owning model_type `name`); ConfigError listing valid ones."""
    _ensure_loaded()
    if name in _families:
        return _families[name]
    for family in _families.values():
        if name in family.model_types:
            return family
    raise ConfigError(
        f"unknown model family {name!r}; registered families: {family_names()} "
        f"(model_types: {sorted(t for f in _families.values() for t in f.model_types)})"
    )


def family_for_model_type(model_type: str) -> Family:
    """The family loading config.json files of this `model_type`."""
    return get_family(model_type)


def normalize_task(task: str) -> str:
    """Canonical task for a user spelling ("title-generation" -> "seq2seq"); ConfigError if not."""
    key = task.strip().lower().replace("-", "_")
    if key not in TASK_ALIASES:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {task_names()}")
    return TASK_ALIASES[key]


def task_names() -> list[str]:
    """Every task spelling accepted by AutoLoader and the CLI."""
    return sorted(TASK_ALIASES)


def model_class(family: str | Family, task: str) -> type[BaseModel]:
    """The BaseModel subclass serving `task` for `family`; ConfigError naming the valid tasks."""
    fam = family if isinstance(family, Family) else get_family(family)
    canonical = normalize_task(task)
    if canonical not in fam.tasks:
        valid = sorted(a for a, c in TASK_ALIASES.items() if c in fam.tasks)
        raise ConfigError(f"family {fam.name!r} has no model for task {task!r}; valid: {valid}")
    return fam.tasks[canonical]


def hub_model(name: str) -> HubModel | None:
    """The hub row for a model name, or None when the hub does not know it."""
    _ensure_loaded()
    return _hub_models.get(name)


def hub_model_names() -> list[str]:
    _ensure_loaded()
    return sorted(_hub_models)
