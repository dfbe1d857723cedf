"""ONNX file -> serialized TensorRT engine (strongly typed), with the TensorRT Python API.

Two flavors share one API: full TensorRT (`tensorrt`), preferred when installed, and TensorRT for
RTX (`tensorrt_rtx_bindings`), which installs from PyPI and builds on a machine without a GPU.
They differ in what the engine can run on, which this module records for the manifest:
- TensorRT-RTX builds ahead of time for a list of compute capabilities (we set them explicitly so
  the manifest names exactly what was built; the runtime JIT-compiles kernels on first use). It
  has no Hopper (sm_90) support.
- Full TensorRT builds for the GPU it runs on (its tactics are timed there), so the engine runs
  on that compute capability only.

Only this module and `runtimes/trt_*` import TensorRT (ruff TID251 / STYLE.md rule 5).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

from flagc.errors import ConfigError, LoweringError
from flagc.progress import progress

__all__ = ["TrtFlavor", "load_tensorrt", "build_engine", "RTX_COMPUTE_CAPABILITIES"]

# TensorRT-RTX's own default set (Ampere and later; Turing needs an explicit opt-in that costs
# speed elsewhere). Names as the ComputeCapability enum spells them, filtered by what the
# installed version knows.
RTX_COMPUTE_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120", "SM121")


@dataclass(frozen=True)
class TrtFlavor:
    name: str  # "tensorrt" | "tensorrt-rtx"
    module_name: str
    version: str
    trt: Any  # the imported module

    def describe(self) -> str:
        return f"{self.name} {self.version} (python module {self.module_name})"


_FLAVORS = (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx_bindings"))
INSTALL_HINT = ("install TensorRT for RTX with `pip install 'flagc[trt]'` (tensorrt-rtx-cu13-libs "
                "and tensorrt-rtx-cu13-bindings), or full TensorRT (`tensorrt`)")


def load_tensorrt(prefer: str | None = None) -> TrtFlavor:
    """The TensorRT flavor to use: `prefer` ("tensorrt" | "tensorrt-rtx") or the first installed.

    FLAGC_TRT_FLAVOR overrides the default order (e.g. to build RTX engines where both exist).
    """
    prefer = prefer or os.environ.get("FLAGC_TRT_FLAVOR") or None
    known = dict(_FLAVORS)
    if prefer is not None and prefer not in known:
        raise ConfigError(f"unknown TensorRT flavor {prefer!r}; use one of {', '.join(known)}")
    order = [(prefer, known[prefer])] if prefer else list(_FLAVORS)
    errors = []
    for name, module_name in order:
        try:
            mod = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        return TrtFlavor(name, module_name, str(mod.__version__), mod)
    raise LoweringError(f"TensorRT targets need TensorRT, which is not importable "
                        f"({'; '.join(errors)}); {INSTALL_HINT}")


class _Logger:
    """A TensorRT logger that keeps errors so a failed build can say why."""

    def __init__(self, trt):
        base = trt.ILogger

        class Logger(base):
            def __init__(self):
                base.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(msg))
                elif os.environ.get("FLAGC_TRT_VERBOSE"):  # TensorRT's own warnings and info
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        self.logger = Logger()


def _progress_monitor(trt, task):
    """Forward TensorRT's build phases to flagc's progress bar (one bar, phase in its label)."""
    base = trt.IProgressMonitor

    class Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            task.advance(0, description=f"TensorRT: {phase_name}")

        def step_complete(self, phase_name, step):
            task.advance(1)
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _parse(trt, builder, logger, onnx_path: str):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LoweringError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errs))
    return network, parser


def _set_compute_capabilities(flavor: TrtFlavor, config) -> list[str]:
    trt = flavor.trt
    if flavor.name != "tensorrt-rtx":
        return []  # decided after the build from the device it ran on
    wanted = [getattr(trt.ComputeCapability, n) for n in RTX_COMPUTE_CAPABILITIES
              if hasattr(trt.ComputeCapability, n)]
    config.num_compute_capabilities = len(wanted)
    for i, cc in enumerate(wanted):
        if not config.set_compute_capability(cc, i):
            raise LoweringError(f"{flavor.describe()} refused compute capability {cc}")
    return [_cc_str(cc.name) for cc in wanted]


def _cc_str(enum_name: str) -> str:
    digits = enum_name.removeprefix("SM")  # "SM120" -> "12.0", "SM86" -> "8.6"
    return f"{digits[:-1]}.{digits[-1]}"


def _current_device_cc() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return [f"{major}.{minor}"]
    except ImportError:
        pass
    return []


def _timing_cache(flavor: TrtFlavor, config, path: str | None):
    """Load the shared timing cache (full TensorRT only: it is a no-op in TensorRT-RTX)."""
    if path is None or flavor.name == "tensorrt-rtx":
        return None
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(cache, path: str) -> None:
    data = cache.serialize()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)  # atomic: concurrent builds never see half a cache


def build_engine(onnx_path: str, engine_path: str, profiles: Mapping[str, Mapping[str, list]],
                 *, flavor: TrtFlavor | None = None, timing_cache: str | None = None,
                 workspace_bytes: int | None = None) -> dict[str, Any]:
    """Parse `onnx_path`, build a strongly typed engine into `engine_path`.

    Args:
        profiles: {input name: {"min", "opt", "max"}} (see `trt_profiles.profile_shapes`); one
            optimization profile covering every dynamic input.
        timing_cache: file shared by builds beside the artifact; read, then updated atomically.

    Returns:
        The manifest's `tensorrt` section (flavor, version, compute capabilities, io dtypes, ...).
    """
    flavor = flavor or load_tensorrt()
    trt = flavor.trt
    log = _Logger(trt).logger
    t0 = time.perf_counter()
    builder = trt.Builder(log)
    network, _parser = _parse(trt, builder, log, onnx_path)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    io = _network_io(network)
    for name, sig in io["inputs"].items():
        if -1 not in sig["shape"]:
            continue
        if name not in profiles:
            raise LoweringError(f"input {name!r} has dynamic shape {sig['shape']} but no "
                                f"optimization profile (profiles cover {sorted(profiles)})")
        p = profiles[name]
        profile.set_shape(name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    ccs = _set_compute_capabilities(flavor, config)
    cache = _timing_cache(flavor, config, timing_cache)
    with progress(f"building TensorRT engine ({flavor.name})", None, unit="steps") as task:
        monitor = _progress_monitor(trt, task)
        config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LoweringError(f"{flavor.describe()} failed to build an engine from {onnx_path}: "
                            + ("; ".join(log.errors[-5:]) or "no error message"))
    with open(engine_path, "wb") as f:
        f.write(memoryview(plan))
    if cache is not None:
        _save_timing_cache(cache, timing_cache)
    if not ccs:
        ccs = _current_device_cc()
    return {
        "flavor": flavor.name,
        "module": flavor.module_name,
        "version": flavor.version,
        "compute_capabilities": ccs,
        "strongly_typed": True,
        "profiles": [{k: {kk: list(vv) for kk, vv in v.items()} for k, v in profiles.items()}],
        "io": {"inputs": list(io["inputs"].values()), "outputs": list(io["outputs"].values())},
        "timing_cache": (os.path.basename(timing_cache) if cache is not None else
                         "none: TensorRT-RTX picks kernels at run time (runtime cache beside "
                         "the plan)" if flavor.name == "tensorrt-rtx" else None),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "layers": network.num_layers,
    }


_DTYPES = {"FLOAT": "f32", "HALF": "f16", "BF16": "bf16", "INT8": "i8", "INT32": "i32",
           "INT64": "i64", "BOOL": "bool", "UINT8": "u8"}


def _network_io(network) -> dict[str, dict[str, dict[str, Any]]]:
    def sig(t):
        return {"name": t.name, "dtype": _DTYPES.get(t.dtype.name, t.dtype.name.lower()),
                "shape": list(t.shape)}

    return {"inputs": {network.get_input(i).name: sig(network.get_input(i))
                       for i in range(network.num_inputs)},
            "outputs": {network.get_output(i).name: sig(network.get_output(i))
                        for i in range(network.num_outputs)}}
