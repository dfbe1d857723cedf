"""BaseModel: FlagAI's from_pretrain / init_from_json / load_weights / save contract, made strict.

A zoo model is a torch.nn.Module whose first constructor argument is its family's config dataclass
(flagc.models.config.ModelConfig subclass). It declares, as class attributes:

- `config_class`: the config dataclass it is built from;
- `weight_map`: a WeightMap turning checkpoint tensor names (HF or FlagAI spellings) into this
  module's parameter names, with per-tensor transforms (GPT-2's Conv1D transpose);
- `head_prefixes`: parameter-name prefixes of task heads, which `allow_missing_heads=True` may
  leave randomly initialised (fine-tuning a pretrained backbone on a new task).

forward(**kw) returns a dict with `logits` (and `hidden_states`), plus `loss` when `labels` are
given; unknown keyword arguments are ignored, as in FlagAI.

Loading never half-succeeds: every missing, unexpected or mis-shaped tensor is collected first and
reported in one CheckpointError before any parameter is written.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from flagc.checkpoints.stores import open_weight_store
from flagc.errors import CheckpointError, ConfigError
from flagc.models.config import ModelConfig, read_config_json

__all__ = [
    "BaseModel",
    "Transform",
    "TRANSPOSE",
    "WeightRule",
    "WeightMap",
    "resolve_local_dir",
    "cross_entropy_loss",
    "shifted_lm_loss",
    "CausalLMModel",
]

M = TypeVar("M", bound="BaseModel")


# ---------------------------------------------------------------------------------------------
# Weight-name mapping
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """A checkpoint -> module tensor transform, and its effect on the shape (checked first)."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]


# HF's GPT-2 stores its projections as Conv1D, i.e. [in, out]; nn.Linear wants [out, in].
TRANSPOSE = Transform("transpose", lambda t: t.t().contiguous(), lambda s: tuple(reversed(s)))


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint names fully matching `pattern` load into `re.sub(pattern, target, name)`.

    `target=None` marks tensors to skip silently (buffers old checkpoints carry, e.g. BERT's
    `embeddings.position_ids` or GPT-2's causal `attn.bias`).
    """

    pattern: str
    target: str | None
    transform: Transform | None = None


class WeightMap:
    """An ordered list of WeightRules; the first matching rule wins, no match means identity.

    Identity for unmatched names is what lets a model reload what `save()` wrote (its own names).
    Rules therefore must only match foreign spellings, so a transform never applies twice.
    """

    def __init__(self, rules: Sequence[WeightRule] = ()) -> None:
        self.rules = tuple(rules)
        self._compiled = [(re.compile(r.pattern), r) for r in self.rules]

    def __add__(self, other: WeightMap) -> WeightMap:
        return WeightMap(self.rules + other.rules)

    def map(self, name: str) -> tuple[str | None, Transform | None]:
        """Return (module name or None to skip, transform or None) for a checkpoint name."""
        for regex, rule in self._compiled:
            if regex.fullmatch(name):
                target = None if rule.target is None else regex.sub(rule.target, name)
                return target, rule.transform
        return name, None


# ---------------------------------------------------------------------------------------------
# Losses shared by the task heads (FlagAI returns `loss` whenever `labels` are passed)
# ---------------------------------------------------------------------------------------------
def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100, computed in float32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(), ignore_index=-100
    )


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss: the logits at t predict labels at t+1 (labels = input ids, -100 ignored)."""
    return cross_entropy_loss(logits[:, :-1, :], labels[:, 1:])


# ---------------------------------------------------------------------------------------------
# Folder resolution
# ---------------------------------------------------------------------------------------------
def resolve_local_dir(download_path: str | Path, model_name: str | None) -> Path | None:
    """The local model folder for (download_path, model_name), or None if none exists.

    Tried in order: `download_path/model_name/`, `model_name` as a folder path, and (when no
    model_name is given) `download_path` itself — FlagAI lets either argument name the folder.
    """
    candidates: list[Path] = []
    if model_name:
        candidates += [Path(download_path) / model_name, Path(model_name)]
    else:
        candidates.append(Path(download_path))
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    return None


# ---------------------------------------------------------------------------------------------
# BaseModel
# ---------------------------------------------------------------------------------------------
class BaseModel(nn.Module):
    """Base of every zoo model; see the module docstring for what subclasses declare."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    weight_map: ClassVar[WeightMap] = WeightMap()
    head_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def config_from_dict(cls, data: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Pick the config subclass named by `model_type` (e.g. roberta under BertConfig)."""
        config_cls = _config_subclass(cls.config_class, data.get("model_type"))
        return config_cls.from_dict(data, **overrides)

    @classmethod
    def _split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split user kwargs into (config overrides, constructor extras such as pool_token)."""
        params = inspect.signature(cls.__init__).parameters
        init_names = {
            n
            for n, p in params.items()
            if n not in ("self", "config") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        init_kw = {k: v for k, v in kwargs.items() if k in init_names}
        overrides = {k: v for k, v in kwargs.items() if k not in init_names}
        return overrides, init_kw

    @classmethod
    def init_from_json(cls: type[M], config_file: str | Path, **kwargs: Any) -> M:
        """Build a randomly initialised model from a config.json.

        kwargs override config fields or feed constructor extras; FlagAI training switches in
        PASS_THROUGH_KEYS are dropped; any other key raises ConfigError naming it.
        """
        overrides, init_kw = cls._split_kwargs(kwargs)
        config = cls.config_from_dict(read_config_json(config_file), **overrides)
        return cls(config, **init_kw)

    @classmethod
    def from_pretrain(
        cls: type[M],
        download_path: str | Path = "./checkpoints",
        model_name: str | None = None,
        only_download_config: bool = False,
        device: str | torch.device = "cpu",
        allow_missing_heads: bool = False,
        **kwargs: Any,
    ) -> M:
        """Load a model folder (config.json + weights), local first, the model hub otherwise.

        Args:
            download_path: folder holding `model_name/`, or the model folder itself.
            model_name: hub name (GLM-large-ch, ...) or folder name under download_path.
            only_download_config: build from config.json only; weights stay randomly initialised.
            device: where the module ends up. "meta" builds shapes only and loads no weights.
            allow_missing_heads: leave task-head weights absent from the checkpoint at their
                random init (with a warning) instead of failing; backbone tensors stay strict.
            **kwargs: config overrides / constructor extras, as for init_from_json.
        """
        folder = resolve_local_dir(download_path, model_name)
        if folder is None:
            if not model_name:
                raise ConfigError(f"{download_path} holds no config.json and no model_name given")
            # Imported lazily: the hub client is optional at runtime and owned by another module.
            from flagc.models.hub import resolve_model_dir  # noqa: PLC0415

            folder = Path(resolve_model_dir(model_name, download_path))
        overrides, init_kw = cls._split_kwargs(kwargs)
        config = cls.config_from_dict(read_config_json(folder / "config.json"), **overrides)
        device = torch.device(device)
        if device.type == "meta":
            with torch.device("meta"):
                return cls(config, **init_kw).eval()
        model = cls(config, **init_kw)
        if not only_download_config:
            model.load_weights(folder, allow_missing_heads=allow_missing_heads)
        return model.to(device).eval()

    # FlagAI spells it from_pretrain; HF users type from_pretrained.
    from_pretrained = from_pretrain

    # ---- weights ------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Re-tie shared parameters after loading; models with tied embeddings override this."""

    def load_weights(self, path: str | Path, allow_missing_heads: bool = False) -> None:
        """Load a checkpoint file or folder, all-or-nothing.

        Every checkpoint name goes through `weight_map`; then every missing, unexpected,
        mis-shaped or doubly-supplied tensor is reported in a single CheckpointError before
        any parameter is touched.
        """
        reader = open_weight_store(path)
        expected, aliases = self._expected_tensors()
        plan: dict[str, tuple[str, Transform | None]] = {}
        unexpected: list[str] = []
        misshaped: list[str] = []
        misshaped_targets: set[str] = set()
        duplicated: list[str] = []
        for ck_name, ck_shape in reader.shapes().items():
            target, transform = self.weight_map.map(ck_name)
            if target is None or target in aliases:
                continue  # skipped buffer, or the second name of a tied parameter
            if target not in expected:
                shown = ck_name if target == ck_name else f"{ck_name} (-> {target})"
                unexpected.append(f"{shown} {list(ck_shape)}")
                continue
            shape = transform.shape(ck_shape) if transform else ck_shape
            want = tuple(expected[target].shape)
            if shape != want:
                misshaped.append(f"{ck_name} -> {target}: expected {list(want)}, got {list(shape)}")
                misshaped_targets.add(target)
            elif target in plan:
                duplicated.append(f"{target} from both {plan[target][0]} and {ck_name}")
            else:
                plan[target] = (ck_name, transform)
        # A tensor reported as mis-shaped is not reported again as missing.
        missing = [n for n in expected if n not in plan and n not in misshaped_targets]
        if allow_missing_heads:
            heads = [n for n in missing if n.startswith(self.head_prefixes)]
            if heads:
                warnings.warn(
                    f"{reader.origin}: task-head tensors left randomly initialised: {heads}",
                    stacklevel=2,
                )
            missing = [n for n in missing if n not in heads]
        problems = []
        for title, items in (
            ("missing", [f"{n} {list(expected[n].shape)}" for n in missing]),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("supplied twice", duplicated),
        ):
            if items:
                problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(items))
        if problems:
            raise CheckpointError(
                f"checkpoint {reader.origin} does not fit {type(self).__name__}; "
                + "; ".join(problems)
            )
        for target, (ck_name, transform) in plan.items():
            tensor = reader.tensor(ck_name)
            if transform is not None:
                tensor = transform.apply(tensor)
            _write_tensor(self, target, tensor, expected[target])
        self.tie_weights()

    def _expected_tensors(self) -> tuple[dict[str, torch.Tensor], set[str]]:
        """(name -> tensor for every parameter/persistent buffer, names that alias a tied one)."""
        expected: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        aliases: set[str] = set()
        for name, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                aliases.add(name)
            else:
                seen.add(id(tensor))
                expected[name] = tensor
        return expected, aliases

    def save(self, path: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into folder `path` (created if needed)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, _ = self._expected_tensors()
        data = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        # Write to temporary names then rename, so a crash never leaves a half-written pair.
        tmp_weights = folder / "model.safetensors.tmp"
        tmp_config = folder / "config.json.tmp"
        save_file(data, str(tmp_weights), metadata={"format": "pt"})
        config = {**self.config.to_dict(), "architectures": [type(self).__name__]}
        tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp_weights, folder / "model.safetensors")
        os.replace(tmp_config, folder / "config.json")
        return folder

    # FlagAI / HF spellings of save.
    save_pretrained = save

    def forward(self, **kwargs: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward")


def _config_subclass(base: type[ModelConfig], model_type: str | None) -> type[ModelConfig]:
    """The subclass of `base` (or base itself) whose model_type matches; base when none does."""
    if not model_type:
        return base
    stack: list[type[ModelConfig]] = [base]
    while stack:
        cls = stack.pop()
        if cls.model_type == model_type:
            return cls
        stack.extend(cls.__subclasses__())
    return base


def _write_tensor(model: nn.Module, name: str, value: torch.Tensor, current: torch.Tensor) -> None:
    """Copy into the existing tensor, or assign when the module was built on the meta device."""
    value = value.to(current.dtype)
    if current.device.type != "meta":
        with torch.no_grad():
            current.copy_(value)
        return
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        owner.register_buffer(attr, value)


class CausalLMModel(BaseModel):
    """A decoder backbone `self.model` (returning hidden states and presents) plus an LM head
    tied to the backbone's token embedding (`embedding_attr`) when the config says so.

    Subclasses set `config_class`, `weight_map`, `backbone_class` and `embedding_attr`.
    """

    backbone_class: ClassVar[type]
    embedding_attr: ClassVar[str]

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = getattr(self.model, self.embedding_attr).weight

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        labels=None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Returns logits [batch, seq, vocab], hidden_states, past_key_values (+ loss)."""
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(hidden)
        out: dict[str, Any] = {
            "logits": logits,
            "hidden_states": hidden,
            "past_key_values": presents,
        }
        if labels is not None:
            out["loss"] = shifted_lm_loss(logits, labels)
        return out
