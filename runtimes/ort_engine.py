"""The onnxruntime engine: one InferenceSession with the artifact's IO contract.

It times what happens inside `session.run` so the generation loop can report the runtime's own
overhead (everything outside it). `binding()` gives an IO binding whose inputs and outputs can be
raw device buffers (the KV cache binds its preallocated buffers this way, without copies).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from flagc.errors import ArtifactError, RuntimeInputError
from flagc.runtimes import huge_pages

__all__ = ["OrtEngine", "OrtBinding", "CPU_DISABLED_OPTIMIZERS"]

# flagc lowers residual + LayerNorm as Add + LayerNormalization (flagc/lower/onnx_ops.py
# _add_norm): onnxruntime's CPU SkipLayerNormalization kernel is 3-4x slower than the pair.
# Its optimizer fuses the pair back where shapes are static, so CPU sessions turn that fusion
# off; CUDA sessions keep it (one kernel there; fused on the H100 as expected).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


class OrtEngine:
    def __init__(self, folder: str, manifest: dict[str, Any], device: str = "cpu",
                 threads: int | None = None, *, engine_file: str | None = None,
                 cuda_graph: bool = False):
        """Args:
            engine_file: another ONNX file of the artifact (default the manifest's engine).
            cuda_graph: on cuda, capture the first runs as a CUDA graph and replay it
                (every input and output must then stay bound to the same device memory).
        """
        import onnxruntime as ort

        self.manifest, self.folder, self.threads = manifest, folder, threads
        path = os.path.join(folder, engine_file or manifest["engine"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        custom = manifest.get("custom_ops") or {}
        if os.path.basename(path) in custom.get("files", ()):
            from flagc.runtimes import kernels

            # compiles flagc's kernels on this machine's first use
            kernels.register(opts, cuda=device == "cuda" and custom.get("device") == "cuda")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeInputError("device 'cuda' needs onnxruntime-gpu with the CUDA "
                                        "execution provider (pip install 'flagc[gpu]')")
            cuda = {"enable_cuda_graph": "1"} if cuda_graph else {}
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        elif device != "cpu":
            raise RuntimeInputError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
        disabled = list(CPU_DISABLED_OPTIMIZERS) if device == "cpu" else []
        mappings = (huge_pages.anonymous_mappings() if device == "cpu" and huge_pages.enabled()
                    else None)
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers,
                                                disabled_optimizers=disabled)
        except Exception as exc:
            raise ArtifactError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        if mappings is not None:  # the weights it copied and prepacked, into 2 MB pages
            huge_pages.collapse_new_mappings(mappings)
        self.device = device
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.run_seconds = 0.0
        self.run_calls = 0
        # The C session: its run_with_iobinding skips the Python wrapper's per-call checks,
        # which cost up to a third of a millisecond (more than a CUDA-graph decode step's launch).
        self._raw_session = getattr(self.session, "_sess", None)

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

    def binding(self) -> "OrtBinding":
        """A reusable IO binding on this session (see OrtBinding)."""
        return OrtBinding(self.session)

    def run_binding(self, binding: "OrtBinding", run_options=None) -> None:
        """Run with everything bound; timed like `run`."""
        t0 = time.perf_counter()
        try:
            if self._raw_session is not None and binding._raw is not None:
                self._raw_session.run_with_iobinding(binding._raw, run_options)
            else:
                self.session.run_with_iobinding(binding.io, run_options)
        except Exception as exc:
            raise RuntimeInputError(f"onnxruntime failed to run the model: {exc}") from exc
        self.run_seconds += time.perf_counter() - t0
        self.run_calls += 1


class OrtBinding:
    """An onnxruntime IOBinding with cheap pointer binds.

    A decode step rebinds every past/present tensor (4 x layers binds), so each bind must cost
    microseconds: device handles are made once, and the C binding is called directly when this
    onnxruntime exposes it (the public wrapper re-creates the device on every call).
    """

    def __init__(self, session):
        import onnxruntime as ort

        self._ort = ort
        self.io = session.io_binding()
        self._raw = getattr(self.io, "_iobinding", None)
        self._devices: dict[tuple[str, int], Any] = {}

    def _device(self, device: str, device_id: int):
        key = (device, device_id)
        dev = self._devices.get(key)
        if dev is None:
            dev = self._devices[key] = self._ort.OrtDevice.make(device, device_id)._get_c_device()
        return dev

    def input_array(self, name: str, array: np.ndarray) -> None:
        """Bind a host numpy array (kept alive by the binding until rebound)."""
        self.io.bind_cpu_input(name, array)

    def input_buffer(self, name: str, device: str, device_id: int, dtype: np.dtype,
                     shape: tuple[int, ...], ptr: int) -> None:
        """Bind raw memory at `ptr` holding a contiguous `dtype` tensor of `shape`."""
        if self._raw is not None:
            self._raw.bind_input(name, self._device(device, device_id), dtype, shape, ptr)
        else:
            self.io.bind_input(name, device, device_id, dtype, list(shape), ptr)

    def output_buffer(self, name: str, device: str, device_id: int, dtype: np.dtype,
                      shape: tuple[int, ...], ptr: int) -> None:
        """Have the run write output `name` ([shape], contiguous) into the memory at `ptr`."""
        if self._raw is not None:
            self._raw.bind_output(name, self._device(device, device_id), dtype, shape, ptr)
        else:
            self.io.bind_output(name, device, device_id, dtype, list(shape), ptr)

    def input_value(self, name: str, value) -> None:
        """Bind an OrtValue (e.g. a device buffer updated in place between runs)."""
        self.io.bind_ortvalue_input(name, value)

    def output_value(self, name: str, value) -> None:
        """Have the run write output `name` into the OrtValue `value`."""
        self.io.bind_ortvalue_output(name, value)

    def output_alloc(self, name: str, device: str = "cpu", device_id: int = 0) -> None:
        """Let onnxruntime allocate output `name` on `device` (for shapes not known up front)."""
        self.io.bind_output(name, device, device_id)

    def outputs(self) -> list:
        """OrtValues of the outputs, in the order they were first bound."""
        return self.io.get_outputs()
