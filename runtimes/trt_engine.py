"""The TensorRT engine: a deserialized `engine.plan` and one execution context, on CUDA memory.

Same interface as `OrtEngine`: `input_names`, `output_names`, `run(feeds)` (numpy in, numpy out),
`binding()` + `run_binding()` (raw-pointer IO binding, which the KV cache uses to stay bound in
place on the GPU), `run_seconds` / `run_calls`. Host arrays and host outputs go through device
staging buffers that are kept and grown, so a decode step allocates nothing.

Before touching TensorRT the artifact is checked (`check_plan`): the plan's size and sha256 must
match the manifest, so a truncated or corrupt file is refused with a clear error instead of
crashing the deserializer. Then the TensorRT flavor and version that built it, a CUDA device, and
that device's compute capability must all fit (`check_device`); each failure says what it needs.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import time
from typing import Any

import numpy as np

from flagc.errors import ArtifactError, RuntimeInputError

__all__ = ["TrtEngine", "TrtBinding", "check_plan", "check_device", "load_flavor"]

_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_INSTALL = {"tensorrt": "full TensorRT (`pip install tensorrt`, matching the version)",
            "tensorrt-rtx": "TensorRT for RTX (`pip install 'flagc[trt]'`)"}
_NP = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "i8": np.int8,
       "u8": np.uint8, "bool": np.bool_}


def _trt_section(folder: str, manifest: dict[str, Any]) -> dict[str, Any]:
    info = manifest.get("tensorrt")
    if not isinstance(info, dict) or "sha256" not in info:
        raise ArtifactError(f"{folder}: the manifest has no `tensorrt` section with the engine's "
                            "digest (not a flagc TensorRT artifact, or built by an older flagc); "
                            "rebuild it with `flagc build --target trt-fp16`")
    return info


def check_plan(folder: str, manifest: dict[str, Any], role: str | None = None) -> bytes:
    """The engine bytes, after checking size and sha256 against the manifest.

    `role` names a companion engine (T5's "encoder"); without it the main engine is read and
    every companion's digest is checked too, so a damaged artifact is refused as a whole.
    """
    info = _trt_section(folder, manifest)
    if role is None:
        for other in info.get("companions", {}):
            check_plan(folder, manifest, other)
    else:
        info = info["companions"][role]
    path = os.path.join(folder, info.get("engine") or manifest["engine"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the engine: {exc}") from exc
    want = int(info.get("bytes", -1))
    if want >= 0 and len(data) != want:
        what = "truncated" if len(data) < want else "longer than built"
        raise ArtifactError(f"{path} is {what}: {len(data)} bytes, the manifest records {want}; "
                            "copy the artifact again or rebuild it")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["sha256"]:
        raise ArtifactError(f"{path} is corrupt: sha256 {digest[:16]}... differs from the "
                            f"manifest's {info['sha256'][:16]}...; copy the artifact again or "
                            "rebuild it")
    return data


def _needs(info: dict[str, Any]) -> str:
    ccs = ", ".join(info.get("compute_capabilities") or []) or "the GPU it was built on"
    return (f"this engine was built by {info.get('flavor')} {info.get('version')} and runs on "
            f"NVIDIA GPUs of compute capability {ccs}")


def load_flavor(info: dict[str, Any]):
    """The TensorRT module that built the engine, at a version that can deserialize it."""
    flavor = info.get("flavor")
    if flavor not in _MODULES:
        raise ArtifactError(f"unknown TensorRT flavor {flavor!r} in the manifest")
    try:
        trt = importlib.import_module(_MODULES[flavor])
    except ImportError as exc:
        raise RuntimeInputError(f"{_needs(info)}; {_MODULES[flavor]} is not importable ({exc}): "
                                f"install {_INSTALL[flavor]}") from exc
    have, want = str(trt.__version__), str(info.get("version"))
    # Plans are tied to the TensorRT release that built them (major.minor.patch).
    if have.split(".")[:3] != want.split(".")[:3]:
        raise RuntimeInputError(f"{_needs(info)}; the installed {flavor} is {have}: install "
                                f"{flavor} {want} or rebuild the artifact with {have}")
    return trt


def check_device(info: dict[str, Any], device: str) -> int:
    """The CUDA device index to run on; refuses when there is none or it is not supported."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeInputError(f"{_needs(info)}; the TensorRT runtime needs PyTorch with CUDA "
                                "for device memory") from exc
    if not torch.cuda.is_available():
        raise RuntimeInputError(f"{_needs(info)}; no CUDA device is available here "
                                "(torch.cuda.is_available() is False). Run it on such a GPU, "
                                "or build an onnx-* target for this machine")
    index = 0
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
    elif device not in ("cuda", "cpu"):  # "cpu" is the CLI default: TensorRT always uses CUDA
        raise RuntimeInputError(f"unknown device {device!r} for a TensorRT engine; use 'cuda' or "
                                "'cuda:N'")
    major, minor = torch.cuda.get_device_capability(index)
    cc = f"{major}.{minor}"
    allowed = info.get("compute_capabilities") or []
    if allowed and cc not in allowed:
        name = torch.cuda.get_device_name(index)
        hint = (" TensorRT-RTX does not support this GPU; rebuild with full TensorRT on it "
                "(FLAGC_TRT_FLAVOR=tensorrt), or use an onnx-fp16 artifact with --device cuda."
                if info.get("flavor") == "tensorrt-rtx" else
                " Rebuild the engine on this GPU.")
        raise RuntimeInputError(f"{_needs(info)}; cuda:{index} is {name} with compute "
                                f"capability {cc}.{hint}")
    return index


class _Logger:
    def __init__(self, trt):
        base = trt.ILogger

        class Logger(base):
            def __init__(self):
                base.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(msg))

        self.logger = Logger()


class _RtxRuntimeCache:
    """TensorRT-RTX compiles kernels just in time on the GPU; its runtime cache keeps them in
    `<engine>.rtx-cache` beside the plan, so the next load skips the compilation. Decode steps
    repeat their shapes, so the whole graph is captured as a CUDA graph per shape.
    No-op for full TensorRT. (Not yet run on an Ampere/Ada/Blackwell GPU: see issue 6.)
    """

    def __init__(self, trt, engine, plan_path: str):
        self.config = self.cache = None
        self.path = plan_path + ".rtx-cache"
        if not (hasattr(trt, "IRuntimeCache") and hasattr(engine, "create_runtime_config")):
            return  # full TensorRT: kernels were chosen at build time
        self.config = engine.create_runtime_config()
        if hasattr(trt, "CudaGraphStrategy"):
            self.config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self.cache = self.config.create_runtime_cache()
        if os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                self.cache.deserialize(f.read())  # False on a mismatch: simply recompiles
        self.config.set_runtime_cache(self.cache)

    def save(self) -> None:
        if self.cache is None:
            return
        try:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(memoryview(self.cache.serialize()))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only artifact only loses the cache, never the run


class TrtEngine:
    """A TensorRT engine with the OrtEngine interface (see the module docstring)."""

    _rtx: "_RtxRuntimeCache | None" = None  # set by __init__ for TensorRT-RTX engines

    def __init__(self, folder: str, manifest: dict[str, Any], device: str = "cpu",
                 threads: int | None = None, role: str | None = None):
        """`role` loads a companion engine instead of the main one (T5's "encoder")."""
        import torch

        data = check_plan(folder, manifest, role)
        info = manifest["tensorrt"]
        engine_file = info["companions"][role]["engine"] if role else manifest["engine"]
        index = check_device(info, device)  # before the import: installing can't fix the GPU
        trt = load_flavor(info)
        torch.cuda.set_device(index)
        log = _Logger(trt).logger
        self._runtime = trt.Runtime(log)  # kept alive: the engine refers to it
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ArtifactError(f"{os.path.join(folder, engine_file)}: {info['flavor']} "
                                f"{trt.__version__} cannot deserialize the engine: "
                                + ("; ".join(log.errors[-3:]) or "no message"))
        self._rtx = _RtxRuntimeCache(trt, engine, os.path.join(folder, engine_file))
        context = engine.create_execution_context(self._rtx.config) if self._rtx.config \
            else engine.create_execution_context()
        if context is None:
            raise RuntimeInputError("TensorRT could not create an execution context: "
                                    + ("; ".join(log.errors[-3:]) or "out of GPU memory?"))
        self._engine = engine
        self._setup(manifest, context, torch.device("cuda", index), role)

    @classmethod
    def from_context(cls, manifest: dict[str, Any], context, device,
                     role: str | None = None) -> "TrtEngine":
        """An engine over an existing execution context (tests use a stand-in context)."""
        self = cls.__new__(cls)
        self._setup(manifest, context, device, role)
        return self

    def _setup(self, manifest, context, device, role) -> None:
        import torch

        self.manifest = manifest
        self.context = context
        self.torch_device = device
        # Where the KV cache's arenas live (the decoder reads `device`): on the GPU when
        # onnxruntime-gpu can allocate and copy them there (kv_storage's kernel storage), else in
        # host memory, bound by pointer and staged through device buffers each step.
        self.device = "cuda" if device.type == "cuda" and _ort_cuda() else "cpu"
        self.device_id = device.index or 0
        self.info = manifest["tensorrt"] if role is None else \
            manifest["tensorrt"]["companions"][role]
        io = self.info["io"]
        self.input_names = [s["name"] for s in io["inputs"]]
        self.output_names = [s["name"] for s in io["outputs"]]
        self.dtypes = {s["name"]: np.dtype(_NP[s["dtype"]]) for s in io["inputs"] + io["outputs"]}
        self._staging: dict[str, torch.Tensor] = {}
        self.run_seconds = 0.0
        self.run_calls = 0

    # ---- device memory ------------------------------------------------------------------------
    def staging(self, name: str, nbytes: int):
        """A device buffer of at least `nbytes` (at least 1, so its address is never null)."""
        import torch

        buf = self._staging.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.torch_device)
            self._staging[name] = buf
        return buf

    def _stream(self) -> int:
        import torch

        if self.torch_device.type != "cuda":
            return 0
        return torch.cuda.current_stream(self.torch_device).cuda_stream

    def _sync(self) -> None:
        import torch

        if self.torch_device.type == "cuda":
            torch.cuda.current_stream(self.torch_device).synchronize()

    # ---- running ------------------------------------------------------------------------------
    def binding(self) -> "TrtBinding":
        return TrtBinding(self)

    def run_binding(self, binding: "TrtBinding") -> None:
        t0 = time.perf_counter()
        binding.execute()
        self.run_seconds += time.perf_counter() - t0
        self.run_calls += 1
        if self._rtx is not None and self.run_calls in (1, 2, 64):  # prefill, decode, warm
            self._rtx.save()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RuntimeInputError(f"TensorRT engine inputs missing: {missing}")
        b = self.binding()
        for name in self.input_names:
            b.input_array(name, np.asarray(feeds[name]))
        names = outputs or self.output_names
        for name in self.output_names:
            b.output_alloc(name)
        self.run_binding(b)
        values = dict(zip(self.output_names, (v.numpy() for v in b.outputs())))
        return {n: values[n] for n in names}


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class _HostOutput:
    """An output copied to host after the run; `.numpy()` like an OrtValue."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)


class TrtBinding:
    """IO binding for TensorRT with OrtBinding's methods: host arrays, raw buffers, allocation.

    TensorRT reads and writes device addresses only, so host inputs are uploaded into staging
    buffers and host outputs downloaded after the run; CUDA buffers are bound as they are.
    """

    def __init__(self, engine: TrtEngine):
        self.engine = engine
        self._inputs: dict[str, tuple[str, Any]] = {}
        self._outputs: dict[str, tuple[str, Any]] = {}
        self._order: list[str] = []
        self._results: dict[str, _HostOutput] = {}

    def _check_dtype(self, name: str, dtype) -> None:
        want = self.engine.dtypes.get(name)
        if want is None:
            raise RuntimeInputError(f"the TensorRT engine has no tensor {name!r}")
        if np.dtype(dtype) != want:
            raise RuntimeInputError(f"tensor {name!r}: buffer dtype {np.dtype(dtype)}, the "
                                    f"engine expects {want}")

    def input_array(self, name: str, array: np.ndarray) -> None:
        want = self.engine.dtypes.get(name)
        if want is None:
            raise RuntimeInputError(f"the TensorRT engine has no input {name!r}")
        self._inputs[name] = ("host", np.ascontiguousarray(array, dtype=want))

    def input_buffer(self, name: str, device: str, device_id: int, dtype, shape, ptr: int) -> None:
        self._check_dtype(name, dtype)
        self._inputs[name] = (device, (tuple(int(s) for s in shape), int(ptr)))

    def output_buffer(self, name: str, device: str, device_id: int, dtype, shape,
                      ptr: int) -> None:
        self._check_dtype(name, dtype)
        self._bind_out(name, (device, (tuple(int(s) for s in shape), int(ptr))))

    def output_alloc(self, name: str, device: str = "cpu", device_id: int = 0) -> None:
        self._bind_out(name, ("alloc", None))

    def _bind_out(self, name: str, how) -> None:
        if name not in self._outputs:
            self._order.append(name)
        self._outputs[name] = how

    def outputs(self) -> list[_HostOutput]:
        return [self._results[n] for n in self._order if n in self._results]

    # ---- one run ------------------------------------------------------------------------------
    def execute(self) -> None:
        import torch

        eng, ctx = self.engine, self.engine.context
        missing = [n for n in eng.input_names if n not in self._inputs]
        if missing:
            raise RuntimeInputError(f"TensorRT engine inputs not bound: {missing}")
        for name in eng.input_names:
            kind, value = self._inputs[name]
            if kind == "host":
                shape = value.shape
                buf = eng.staging(name, value.nbytes)
                if value.nbytes:
                    buf[: value.nbytes].copy_(torch.from_numpy(value.reshape(-1).view(np.uint8)),
                                              non_blocking=False)
                ptr = buf.data_ptr()
            elif kind == "cuda":
                shape, ptr = value
            else:  # a host pointer: upload it
                shape, host_ptr = value
                nbytes = int(np.prod(shape)) * eng.dtypes[name].itemsize
                buf = eng.staging(name, nbytes)
                if nbytes:
                    host = np.frombuffer((ctypes.c_char * nbytes).from_address(host_ptr),
                                         dtype=np.uint8)
                    buf[:nbytes].copy_(torch.from_numpy(host))
                ptr = buf.data_ptr()
            if not ctx.set_input_shape(name, tuple(shape)):
                raise RuntimeInputError(f"TensorRT refused input {name!r} of shape "
                                        f"{tuple(shape)}: outside the engine's optimization "
                                        f"profile {self._profile(name)}")
            ctx.set_tensor_address(name, ptr)
        downloads = []
        for name in eng.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * eng.dtypes[name].itemsize
            kind, value = self._outputs.get(name, ("alloc", None))
            if kind == "cuda":
                bound_shape, ptr = value
                if tuple(bound_shape) != shape:
                    raise RuntimeInputError(f"output {name!r}: bound shape {bound_shape}, the "
                                            f"engine produces {shape}")
            else:
                buf = eng.staging("out:" + name, nbytes)
                ptr = buf.data_ptr()
                if name in self._outputs:
                    downloads.append((name, kind, value, shape, buf, nbytes))
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(eng._stream()):
            raise RuntimeInputError("TensorRT failed to run the engine (execute_async_v3)")
        eng._sync()
        self._results = {}
        for name, kind, value, shape, buf, nbytes in downloads:
            if kind == "alloc":
                out = np.empty(shape, dtype=eng.dtypes[name])
            else:  # a host buffer bound by pointer
                out_shape, host_ptr = value
                out = np.frombuffer((ctypes.c_char * nbytes).from_address(host_ptr),
                                    dtype=eng.dtypes[name]).reshape(shape)
            if nbytes:
                torch.from_numpy(out.reshape(-1).view(np.uint8)).copy_(buf[:nbytes])
            self._results[name] = _HostOutput(out)

    def _profile(self, name: str) -> Any:
        prof = self.engine.info.get("profiles") or [{}]
        return prof[0].get(name)
