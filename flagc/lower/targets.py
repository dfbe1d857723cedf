"""Targets: backend + precision. A target decides which ops lowering may emit."""

from __future__ import annotations

from dataclasses import dataclass

from flagc.errors import ConfigError

__all__ = ["Target", "TARGETS", "get_target"]


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8" | "int4"
    contrib_ops: bool  # may emit onnxruntime's com.microsoft ops
    opset: int = 17
    implemented: bool = True

    @property
    def engine_file(self) -> str:
        return "engine.plan" if self.backend == "tensorrt" else "model.onnx"


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnx-fp32", "onnxruntime", "fp32", contrib_ops=True),
    Target("onnx-fp16", "onnxruntime", "fp16", contrib_ops=True),
    Target("onnx-bf16", "onnxruntime", "bf16", contrib_ops=True),
    Target("onnx-int8", "onnxruntime", "int8", contrib_ops=True),
    Target("onnx-int4", "onnxruntime", "int4", contrib_ops=True),
    Target("trt-fp32", "tensorrt", "fp32", contrib_ops=False),
    Target("trt-fp16", "tensorrt", "fp16", contrib_ops=False),
    Target("trt-int8", "tensorrt", "int8", contrib_ops=False),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    t = TARGETS[name]
    if not t.implemented:
        ready = [n for n, x in TARGETS.items() if x.implemented]
        raise ConfigError(f"target {name!r} is not implemented yet; available: {', '.join(ready)}")
    return t
