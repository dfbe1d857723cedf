"""Loading custom model files (`--custom file.py`) and running their build()."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from flagc.dsl.compute_graph import ComputeGraph
from flagc.errors import ConfigError, FlagcError, IRError
from flagc.ir.graph import Graph
from flagc.ir.verifier import verify

__all__ = ["load_custom_model", "build_custom_graph", "BUILTIN_GRAPHS"]

# model_type -> module holding `__model__`; the examples folder ships as flagc.examples.
BUILTIN_GRAPHS = {
    "llama": "flagc.examples.llama",
    "qwen2": "flagc.examples.llama",
    "mistral": "flagc.examples.llama",
}


def load_custom_model(path: str) -> type[ComputeGraph]:
    """Import a custom model file and return its `__model__` class."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"custom model file not found: {path}")
    name = f"flagc_custom_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except FlagcError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: error while importing the custom model: "
                          f"{type(exc).__name__}: {exc}") from exc
    return _model_class(module, path)


def _model_class(module: Any, where: str) -> type[ComputeGraph]:
    cls = getattr(module, "__model__", None)
    if cls is None:
        raise ConfigError(f"{where}: custom model file defines no __model__ "
                          "(end it with `__model__ = YourComputeGraphClass`)")
    if not (isinstance(cls, type) and issubclass(cls, ComputeGraph)):
        raise ConfigError(f"{where}: __model__ must be a flagc.ComputeGraph subclass, got {cls!r}")
    return cls


def builtin_model_class(model_type: str) -> type[ComputeGraph]:
    if model_type not in BUILTIN_GRAPHS:
        raise ConfigError(f"unknown model_type {model_type!r} for the graph DSL (built-in: "
                          f"{', '.join(sorted(BUILTIN_GRAPHS))}); pass --custom FILE.py")
    module = importlib.import_module(BUILTIN_GRAPHS[model_type])
    return _model_class(module, BUILTIN_GRAPHS[model_type])


def build_custom_graph(cls: type[ComputeGraph], config: dict[str, Any], weights,
                       name: str = "model") -> tuple[Graph, dict[str, Any]]:
    """Run build() and return the verified graph and the (possibly edited) config."""
    model = cls(config, weights, name=name)
    try:
        model.build()
    except FlagcError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise IRError(f"{cls.__name__}.build() failed: {type(exc).__name__}: {exc}") from exc
    graph = model.finish()
    graph.metadata["config"] = model.config
    verify(graph, context=f"{cls.__name__}.build()")
    return graph, model.config
