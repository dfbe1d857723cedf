"""IR graph -> `engine.plan` for the TensorRT targets (trt-fp32, trt-fp16, trt-int8).

Steps: lower to standard ONNX (the target has contrib_ops=False, so nothing TensorRT's parser
lacks), make the precision explicit in the file (fp16 types, or int8 Q/DQ pairs), build a strongly
typed engine with one optimization profile from the manifest's dims, and describe it for the
manifest (flavor, version, compute capabilities, profiles, sha256 of the plan).

The intermediate ONNX is written to a temp folder inside the staged artifact and removed after the
build: the artifact ships only the engine. `FLAGC_TRT_KEEP_ONNX=1` keeps it as `trt.onnx` (plus
`trt.onnx.data` for big models; `encoder.trt.onnx` for T5's encoder.plan) in the artifact to
debug a parser or numerics problem with onnxruntime or polygraphy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from flagc.errors import ArtifactError, LoweringError
from flagc.ir.graph import Graph
from flagc.lower.targets import Target

__all__ = ["lower_to_trt", "update_manifest", "plan_digest", "KEEP_ONNX_ENV", "TIMING_CACHE_NAME"]

KEEP_ONNX_ENV = "FLAGC_TRT_KEEP_ONNX"
TIMING_CACHE_NAME = ".flagc-trt-timing-{flavor}-{version}.cache"


def lower_to_trt(graph: Graph, target: Target, folder: str, *, output: str, max_seq: int,
                 max_batch: int, io: Mapping[str, Sequence[Mapping[str, Any]]],
                 engine_file: str | None = None,
                 calibration: Sequence[Mapping[str, Any]] | None = None,
                 ) -> tuple[list[str], dict[str, Any]]:
    """Write `folder/engine.plan`; returns (files written, the manifest's `tensorrt` section).

    Args:
        folder: the staged artifact folder.
        engine_file: the plan's name (default the target's `engine.plan`; a companion graph
            such as T5's encoder gets `encoder.plan`).
        output: the final artifact path; the shared timing cache lives beside it.
        io: the IR's io signature (`api._io_signature`), whose symbolic dims give the profiles.
        calibration: int8 only: input feeds for activation ranges (default: random token ids).
    """
    from flagc.lower.onnx_trt import write_trt_onnx
    from flagc.lower.trt_build import build_engine, load_tensorrt
    from flagc.lower.trt_profiles import profile_shapes

    if target.backend != "tensorrt":
        raise LoweringError(f"target {target.name!r} is not a TensorRT target")
    flavor = load_tensorrt()  # fail before the (long) lowering when TensorRT is missing
    keep = os.environ.get(KEEP_ONNX_ENV) == "1"
    onnx_dir = folder if keep else tempfile.mkdtemp(prefix=".trt-onnx-", dir=folder)
    engine_file = engine_file or target.engine_file
    stem = "trt" if engine_file == target.engine_file else engine_file.rsplit(".", 1)[0] + ".trt"
    onnx_path = os.path.join(onnx_dir, stem + ".onnx")
    try:
        precision = write_trt_onnx(graph, target, onnx_path, calibration)
        profiles = profile_shapes(io["inputs"], max_batch, max_seq)
        cache = os.path.join(os.path.dirname(os.path.abspath(output)),
                             TIMING_CACHE_NAME.format(flavor=flavor.name, version=flavor.version))
        engine_path = os.path.join(folder, engine_file)
        info = build_engine(onnx_path, engine_path, profiles, flavor=flavor, timing_cache=cache)
    finally:
        if not keep:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    kept = [f for f in (stem + ".onnx", stem + ".onnx.data")
            if keep and os.path.exists(os.path.join(folder, f))]
    info["precision"] = precision
    info["onnx"] = {"kept": kept, "opset": target.opset}
    info["sha256"], info["bytes"] = plan_digest(engine_path)
    info["engine"] = engine_file
    return [engine_file] + kept, info


def update_manifest(manifest: dict[str, Any], info: Mapping[str, Any]) -> None:
    """Put the engine's section into the manifest and make its io/KV dtypes the engine's own
    (an fp16 engine takes and returns fp16 cache tensors, whatever the IR said).

    Companion engines (`info["companions"]`, e.g. T5's encoder) replace the `.onnx` engine name
    and io dtypes of their manifest section (`manifest[role]`) the same way.
    """
    manifest["tensorrt"] = dict(info)
    _retype(manifest["io"], info["io"])
    for role, sub in info.get("companions", {}).items():
        section = manifest.setdefault(role, {})
        section["engine"] = sub["engine"]
        if "io" in section:
            _retype(section["io"], sub["io"])
    engine_io = {sig["name"]: sig for part in ("inputs", "outputs") for sig in info["io"][part]}
    kv = manifest.get("kv_cache")
    past = engine_io.get("past_key_values.0.key")
    if kv and past:
        kv["dtype"] = {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}.get(
            past["dtype"], kv["dtype"])


def _retype(io: dict[str, Any], engine: Mapping[str, Any]) -> None:
    types = {sig["name"]: sig["dtype"] for part in ("inputs", "outputs") for sig in engine[part]}
    for part in ("inputs", "outputs"):
        for sig in io[part]:
            sig["dtype"] = types.get(sig["name"], sig["dtype"])


def plan_digest(path: str) -> tuple[str, int]:
    """(sha256 hex, size) of an engine file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the engine: {exc}") from exc
    return h.hexdigest(), size
