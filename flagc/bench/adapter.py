"""Every call `flagc bench` makes into flagc's own engine API lives here, and only here.

The engine API (`flagc.load`, `Engine.forward`, `Engine.generate`, `flagc.build`) is young; when
it changes, this module is the one place to follow it.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

from flagc.bench.base import DECODE, ENCODER, BenchEngine, Point, Skip
from flagc.errors import ArtifactError

__all__ = ["read_manifest", "target_name", "workload_of", "source_path", "FlagcEngine",
           "build_artifact"]

# Tasks timed with one forward over a padded batch, and tasks timed by greedy generation.
ENCODER_TASKS = {"embedding", "feature-extraction", "classification", "text-classification",
                 "sequence-labeling", "token-classification", "fill-mask"}
DECODER_TASKS = {"text-generation", "causal-lm", "chat"}


def read_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """(artifact folder, manifest) for an artifact folder or the engine file inside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    mpath = folder / "manifest.json"
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist; pass an artifact folder written by "
                            f"`flagc build` or the engine file inside it")
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a flagc artifact: no manifest.json in {folder}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); rebuild the artifact") from e
    for key in ("task", "target"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} has no {key!r} field; rebuild it with this flagc")
    return folder, manifest


def target_name(manifest: dict[str, Any]) -> str:
    """The target's name: manifests store {"name", "backend", "precision", ...}."""
    target = manifest.get("target")
    return str(target.get("name", "?")) if isinstance(target, dict) else str(target)


def workload_of(manifest: dict[str, Any]) -> str:
    """"encoder" or "decode" for the manifest's task; `Skip` for tasks bench does not time."""
    task = manifest["task"]
    if task in ENCODER_TASKS:
        return ENCODER
    if task in DECODER_TASKS:
        return DECODE
    raise Skip(f"task {task!r} has no bench workload (timed tasks: "
               f"{sorted(ENCODER_TASKS | DECODER_TASKS)})")


def source_path(manifest: dict[str, Any], artifact_dir: Path) -> Path | None:
    """The model the artifact was built from (manifest "source": {"path": ...}), if recorded."""
    src = manifest.get("source")
    p = src.get("path") if isinstance(src, dict) else src if isinstance(src, str) else None
    if not p:
        return None
    p = Path(p)
    return p if p.is_absolute() else (artifact_dir / p)


def _supports(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class FlagcEngine(BenchEngine):
    """The artifact under test, through `flagc.load`."""

    name = "flagc"

    def __init__(self, path: Path, manifest: dict[str, Any], device: str, threads: int) -> None:
        super().__init__()
        self.path, self.manifest, self.device, self.threads = Path(path), manifest, device, threads
        self.label = f"flagc {target_name(manifest)}"
        self.engine: Any = None

    def load(self) -> None:
        import flagc

        if not hasattr(flagc, "load"):
            raise ArtifactError("this flagc has no flagc.load(); the engine API is not installed")
        self.engine = flagc.load(self.path, device=self.device, threads=self.threads)
        self.details["target"] = target_name(self.manifest)

    def run(self, point: Point, inputs: Any) -> dict[str, float]:
        if point.workload == ENCODER:
            t0 = time.perf_counter()
            self.engine.forward(inputs.input_ids, attention_mask=inputs.attention_mask)
            return {"latency_s": time.perf_counter() - t0}
        return self._generate(point, inputs)

    def _generate(self, point: Point, inputs: Any) -> dict[str, float]:
        kw: dict[str, Any] = {"max_new_tokens": point.new_tokens, "temperature": 0.0}
        # Every engine must generate exactly new_tokens (the anchors suppress EOS the same way);
        # pass whichever knob this engine API offers for that.
        gen = self.engine.generate
        if _supports(gen, "min_new_tokens"):
            kw["min_new_tokens"] = point.new_tokens
        elif _supports(gen, "ignore_eos"):
            kw["ignore_eos"] = True
        prompts = inputs.prompts if point.batch > 1 else inputs.prompts[0]
        t0 = time.perf_counter()
        result = gen(prompts, **kw)
        total = time.perf_counter() - t0
        # A batch gives one result per row; rows step together, so their token times agree.
        if isinstance(result, list):
            result = max(result, key=lambda r: len(r.timings["token_times_s"]))
        times = list(result.timings["token_times_s"])
        if not times:
            raise ArtifactError(f"{self.path}: generate() returned no token times")
        out = {"ttft_s": times[0], "total_s": total, "new_tokens": float(len(times)),
               "decode_s_per_token": (times[-1] - times[0]) / max(len(times) - 1, 1)}
        if "session_run_s" in result.timings:
            out["session_run_s"] = float(result.timings["session_run_s"])
        return out

    def close(self) -> None:
        self.engine = None


def build_artifact(source: Path, target: str, out: Path, task: str, **options: Any) -> Path:
    """Build `source` for `target` and `task` into `out` with `flagc.build`; returns the folder.

    `options` go to `flagc.build` as they are (for example `custom`, a model file)."""
    import flagc

    if not hasattr(flagc, "build"):
        raise ArtifactError("this flagc has no flagc.build(); suites that build their own "
                            "artifacts need it — pass ARTIFACT folders instead")
    flagc.build(str(source), target=target, output=str(out), task=task, **options)
    return Path(out)
