"""AutoLoader: FlagAI's `AutoLoader(task, model_name, model_dir)` over the family registry.

    loader = AutoLoader("title-generation", model_name="RoBERTa-base-ch", model_dir="./checkpoints")
    model = loader.get_model()
    tokenizer = loader.get_tokenizer()

The family comes from the folder's config.json `model_type` when the folder exists locally,
else from the hub table (registry.hub_model). Task and model are validated at construction,
so a typo fails before any download; weights load on the first get_model().
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flagc.errors import ConfigError
from flagc.models import registry
from flagc.models.base import BaseModel, resolve_local_dir
from flagc.models.config import read_config_json

__all__ = ["AutoLoader"]


class AutoLoader:
    """Pick the model class for (task, model) and load it with from_pretrain.

    Args:
        task: a task name from `registry.task_names()` ("lm", "title-generation", "ner", ...).
        model_name: a hub name (`registry.hub_model_names()`) or a folder name under model_dir
            (or a folder path) holding config.json + weights.
        model_dir: where models live / are downloaded to.
        allow_missing_heads: leave task-head weights missing from a pretrained checkpoint at
            their random init (FlagAI's fine-tuning start); defaults to True for every task but
            "base" and "lm", whose checkpoints always carry their heads.
        **kwargs: config overrides and constructor extras passed on to from_pretrain.
    """

    def __init__(
        self,
        task: str,
        model_name: str,
        model_dir: str | Path = "./checkpoints",
        allow_missing_heads: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.task = registry.normalize_task(task)
        self.model_name = model_name
        self.model_dir = Path(model_dir)
        self.kwargs = kwargs
        self.family = self._find_family()
        self.model_class: type[BaseModel] = registry.model_class(self.family, task)
        if allow_missing_heads is None:
            allow_missing_heads = self.task not in ("base", "lm")
        self.allow_missing_heads = allow_missing_heads
        self._model: BaseModel | None = None
        self._folder: Path | None = resolve_local_dir(self.model_dir, model_name)

    def _find_family(self) -> registry.Family:
        folder = resolve_local_dir(self.model_dir, self.model_name)
        hub = registry.hub_model(self.model_name)
        if folder is not None:
            model_type = read_config_json(folder / "config.json").get("model_type")
            if model_type:
                return registry.family_for_model_type(model_type)
            if hub is None:
                raise ConfigError(
                    f"{folder / 'config.json'} has no model_type and {self.model_name!r} is not a "
                    f"hub model; add model_type (one of the registered families "
                    f"{registry.family_names()}) to config.json"
                )
        if hub is None:
            raise ConfigError(
                f"unknown model {self.model_name!r}: no folder with config.json at "
                f"{self.model_dir / self.model_name} and not a hub model; hub models are "
                f"{registry.hub_model_names()}"
            )
        return registry.get_family(hub.family)

    def folder(self) -> Path:
        """The local model folder, downloading from the hub when it is not there yet."""
        if self._folder is None:
            from flagc.models.hub import resolve_model_dir  # noqa: PLC0415 - optional, lazy

            self._folder = Path(resolve_model_dir(self.model_name, self.model_dir))
        return self._folder

    def get_model(self) -> BaseModel:
        """The loaded model (built once, then cached), in eval mode."""
        if self._model is None:
            self._model = self.model_class.from_pretrain(
                self.folder(), allow_missing_heads=self.allow_missing_heads, **self.kwargs
            )
        return self._model

    def get_tokenizer(self) -> Any:
        """The model folder's tokenizer (flagc.runtimes.tokenizer.Tokenizer)."""
        from flagc.runtimes.tokenizer import Tokenizer  # noqa: PLC0415 - runtime layer, lazy

        return Tokenizer.from_pretrained(self.folder())
