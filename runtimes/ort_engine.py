"""The onnxruntime engine: one InferenceSession with the artifact's IO contract.

It times what happens inside `session.run` so the generation loop can report the runtime's own
overhead (everything outside it).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from flagc.errors import ArtifactError, RuntimeInputError

__all__ = ["OrtEngine"]


class OrtEngine:
    def __init__(self, folder: str, manifest: dict[str, Any], device: str = "cpu",
                 threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
        path = os.path.join(folder, manifest["engine"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeInputError("device 'cuda' needs onnxruntime-gpu with the CUDA "
                                        "execution provider (pip install 'flagc[gpu]')")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device != "cpu":
            raise RuntimeInputError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as exc:
            raise ArtifactError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.run_seconds = 0.0
        self.run_calls = 0

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
        names = outputs or self.output_names
        t0 = time.perf_counter()
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:
            raise RuntimeInputError(f"onnxruntime failed to run the model: {exc}") from exc
        self.run_seconds += time.perf_counter() - t0
        self.run_calls += 1
        return dict(zip(names, values))
