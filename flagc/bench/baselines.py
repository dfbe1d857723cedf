"""The baselines table: name -> factory, plus what each factory is told about the artifact.

A baseline runs the same workload as the artifact, from the artifact's own source weights
(manifest "source": {"path": ...}). When a baseline cannot run here — package not installed,
source weights gone, a task it does not cover — its factory or loader raises `Skip` with the
reason, and the report lists it as skipped. No baseline number is ever estimated or reused from
another machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flagc.bench.base import BenchEngine, Skip

__all__ = ["BaselineContext", "BASELINES", "create_baseline", "has_module"]


@dataclass(frozen=True)
class BaselineContext:
    """What a baseline needs to know about the artifact it is compared with."""

    manifest: dict[str, Any]
    artifact_dir: Path
    source: Path | None
    workload: str  # "encoder" or "decode"
    device: str
    threads: int
    cache_dir: Path

    @property
    def target(self) -> str:
        from flagc.bench.adapter import target_name

        return target_name(self.manifest)


def has_module(name: str) -> bool:
    """Whether a Python package is importable (the single check tests patch to hide one)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _require(module: str, pip_name: str) -> None:
    if not has_module(module):
        raise Skip(f"{module} is not installed (pip install {pip_name})")


def _transformers(ctx: BaselineContext) -> BenchEngine:
    _require("transformers", "transformers==5.23.0")
    from flagc.bench.baseline_hf import HFEngine

    return HFEngine(ctx)


def _ort_optimizer(ctx: BaselineContext) -> BenchEngine:
    _require("onnxruntime", "onnxruntime")
    _require("transformers", "transformers==5.23.0")
    from flagc.bench.baseline_ort import OrtOptimizerEngine

    return OrtOptimizerEngine(ctx)


def _ort_genai(ctx: BaselineContext) -> BenchEngine:
    _require("onnxruntime_genai", "onnxruntime-genai==0.18.0")
    from flagc.bench.baseline_genai import GenaiEngine

    return GenaiEngine(ctx)


# The order here is the column order in reports.
BASELINES: dict[str, Callable[[BaselineContext], BenchEngine]] = {
    "transformers": _transformers,
    "ort-optimizer": _ort_optimizer,
    "ort-genai": _ort_genai,
}


def create_baseline(name: str, ctx: BaselineContext) -> BenchEngine:
    """The baseline engine `name` for `ctx` (not loaded yet); `Skip` when it cannot run here."""
    if name not in BASELINES:
        raise Skip(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    engine = BASELINES[name](ctx)
    engine.name = name
    return engine
