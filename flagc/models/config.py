"""Model config dataclasses: one validated type per family, built from a HF-style config.json dict.

`ModelConfig` is the shared base. A family config is a plain dataclass deriving from it; its
`__post_init__` validates values (so a bad config.json fails at load, naming the field) and
`hf_aliases` maps the key spellings found in the wild (GPT-2's `n_embd`, FlagAI's `class_num`)
onto the dataclass fields. No code downstream ever does `hasattr(config, ...)`.

Reading a file is lenient (HF configs carry dozens of keys we do not use: `architectures`,
`torch_dtype`, ...), overriding is strict: `override(**kw)` with a key that is neither a field
nor a documented pass-through raises ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from flagc.errors import ConfigError

__all__ = [
    "PASS_THROUGH_KEYS",
    "ModelConfig",
    "BertConfig",
    "GPT2Config",
    "LlamaConfig",
    "read_config_json",
]

# Keyword arguments FlagAI accepts at construction time that only matter for training or for
# FlagAI's own runtime (activation checkpointing, fp16 training, model parallelism). They are
# accepted and dropped so FlagAI call sites keep working; everything else unknown is an error.
PASS_THROUGH_KEYS = frozenset(
    {
        "checkpoint_activations",
        "fp16",
        "bf16",
        "cpu_offload",
        "model_parallel_size",
        "use_cache",
        "torch_dtype",
        "low_cpu_mem_usage",
    }
)

C = TypeVar("C", bound="ModelConfig")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read a config.json into a dict; ConfigError naming the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass
class ModelConfig:
    """Base of every family config. Subclasses add fields and validate them in __post_init__."""

    # The `model_type` written to config.json by save(); the registry keys families by it.
    model_type: ClassVar[str] = ""
    # Alternative spellings in config.json -> field name (first spelling present wins over the
    # alias only when the canonical key is absent).
    hf_aliases: ClassVar[Mapping[str, str]] = {}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        """Names of the dataclass fields (what `override` accepts)."""
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], **overrides: Any) -> C:
        """Build from a config.json dict (unknown keys ignored), then apply strict overrides."""
        names = cls.field_names()
        data = cls._normalize(dict(data))
        kwargs: dict[str, Any] = {}
        for alias, name in cls.hf_aliases.items():
            if alias in data and name not in data:
                kwargs[name] = data[alias]
        kwargs.update({k: v for k, v in data.items() if k in names})
        try:
            config = cls(**kwargs)
        except TypeError as exc:  # a required field is absent from the file
            raise ConfigError(f"{cls.__name__}: {exc}") from exc
        return config.override(**overrides) if overrides else config

    @classmethod
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook: derive fields a config.json only implies (HF stores labels as id2label)."""
        if "id2label" in data and "num_labels" not in data and "num_labels" in cls.field_names():
            data["num_labels"] = len(data["id2label"])
        return data

    @classmethod
    def from_json(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """Read config.json at `path` and build the config (see from_dict)."""
        return cls.from_dict(read_config_json(path), **overrides)

    def override(self: C, **overrides: Any) -> C:
        """Return a copy with fields replaced; unknown keys raise ConfigError naming them.

        Keys in PASS_THROUGH_KEYS are accepted and dropped (FlagAI training-only switches).
        """
        names = self.field_names()
        unknown = sorted(k for k in overrides if k not in names and k not in PASS_THROUGH_KEYS)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__}: unknown config key(s) {unknown}; valid keys are "
                f"{sorted(names)} (plus pass-through {sorted(PASS_THROUGH_KEYS)})"
            )
        kept = {k: v for k, v in overrides.items() if k in names}
        return dataclasses.replace(self, **kept)  # re-runs __post_init__ validation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with `model_type`, readable back by from_dict."""
        data = dataclasses.asdict(self)
        data["model_type"] = self.model_type
        return data

    # ---- validation helpers -------------------------------------------------------------
    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(
                f"{type(self).__name__}.{name} = {getattr(self, name)!r} is invalid: "
                f"expected {expected}"
            )

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                "a positive integer",
            )

    def _divides(self, numerator: str, denominator: str) -> None:
        self._check(
            getattr(self, numerator) % getattr(self, denominator) == 0,
            numerator,
            f"a multiple of {denominator} = {getattr(self, denominator)}",
        )

    def _probability(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._check(isinstance(value, (int, float)) and 0 <= value < 1, name, "in [0, 1)")


_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")


@dataclass
class BertConfig(ModelConfig):
    """BERT and RoBERTa (RoBERTa differs only in pad_token_id / position offset / type vocab)."""

    model_type: ClassVar[str] = "bert"
    hf_aliases: ClassVar[Mapping[str, str]] = {
        "class_num": "num_labels",
        "num_layers": "num_hidden_layers",
    }
    # Sequence-classification head layout (heads.SEQUENCE_CLASSIFIER_HEADS): BERT pools through
    # `pooler.dense`; RoBERTa has no pooler and a two-layer `classifier`.
    sequence_head: ClassVar[str] = "pooled"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Number of classes for classification / labels for token classification heads.
    num_labels: int = 2
    # RoBERTa numbers positions from pad_token_id + 1; BERT from 0. Set by RobertaConfig.
    position_offset: int = 0
    classifier_dropout: float | None = None
    # Token ids the UniLM-style seq2seq generator needs (BertForSeq2seq).
    sep_token_id: int | None = None

    def __post_init__(self) -> None:
        self._positive(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        )
        self._divides("hidden_size", "num_attention_heads")
        self._check(self.hidden_act in _ACTIVATIONS, "hidden_act", f"one of {_ACTIVATIONS}")
        self._probability("hidden_dropout_prob", "attention_probs_dropout_prob")
        self._check(self.layer_norm_eps > 0, "layer_norm_eps", "> 0")
        self._check(self.position_offset >= 0, "position_offset", ">= 0")


@dataclass
class RobertaConfig(BertConfig):
    """RoBERTa: BERT with positions starting after the pad id and (usually) one token type."""

    model_type: ClassVar[str] = "roberta"
    sequence_head: ClassVar[str] = "dense"

    pad_token_id: int = 1
    position_offset: int = -1  # -1: derive pad_token_id + 1 in __post_init__

    def __post_init__(self) -> None:
        if self.position_offset < 0:
            # HF's create_position_ids_from_input_ids numbers real tokens from padding_idx + 1.
            self.position_offset = self.pad_token_id + 1
        super().__post_init__()


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 (HF spells sizes n_embd / n_layer / n_head / n_positions; both spellings accepted)."""

    model_type: ClassVar[str] = "gpt2"
    hf_aliases: ClassVar[Mapping[str, str]] = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
        "n_inner": "intermediate_size",
        "activation_function": "hidden_act",
        "layer_norm_epsilon": "layer_norm_eps",
    }

    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    intermediate_size: int | None = None  # None: 4 * hidden_size
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self._positive(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "intermediate_size",
        )
        self._divides("hidden_size", "num_attention_heads")
        self._check(self.hidden_act in _ACTIVATIONS, "hidden_act", f"one of {_ACTIVATIONS}")


@dataclass
class LlamaConfig(ModelConfig):
    """LLaMA and Qwen2: RMSNorm, SwiGLU, rotary, grouped-query attention."""

    model_type: ClassVar[str] = "llama"

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (plain MHA)
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Qwen2 puts biases on q/k/v only; LLaMA on nothing (attention_bias puts them on all four).
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # transformers 5 nests rope_theta under rope_parameters; from_dict lifts it (see below).
    rope_parameters: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self._divides("hidden_size", "num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:
            rope_type = self.rope_parameters.get("rope_type", "default")
            self._check(
                rope_type == "default",
                "rope_parameters",
                "rope_type 'default' (scaled rope variants are not supported yet)",
            )
            self.rope_theta = float(self.rope_parameters.get("rope_theta", self.rope_theta))
        self._positive(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "head_dim",
        )
        self._divides("num_attention_heads", "num_key_value_heads")
        self._check(self.hidden_act in _ACTIVATIONS, "hidden_act", f"one of {_ACTIVATIONS}")
        self._check(self.rope_theta > 0, "rope_theta", "> 0")
        self._check(self.rms_norm_eps > 0, "rms_norm_eps", "> 0")


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2: LLaMA with q/k/v biases (always on) and usually tied embeddings on small sizes."""

    model_type: ClassVar[str] = "qwen2"

    qkv_bias: bool = True
    rope_theta: float = 1000000.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


__all__ += ["RobertaConfig", "Qwen2Config"]
