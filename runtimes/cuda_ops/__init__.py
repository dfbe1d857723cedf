"""flagc's own CUDA kernels for onnxruntime, built once per machine with nvcc.

`library_path()` returns the shared library compiled from the sources in this folder
(decode_gemv.cu: decode-step matrix-vector products; ort_ops.cc: their onnxruntime custom-op
registration, domain `ai.flagc`), compiling it on first use into a cache keyed by the sources and
the compiler, so a source change rebuilds and concurrent processes build once.
`register(session_options)` makes a session able to run graphs that use the ops.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

from flagc.errors import ResourceError

__all__ = ["DOMAIN", "library_path", "register", "find_nvcc"]

DOMAIN = "ai.flagc"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("decode_gemv.cu", "ort_ops.cc")
_LIBRARY = "libflagc_cuda_ops.so"
# Ampere and Hopper machine code, plus Hopper PTX that newer GPUs compile at load.
_ARCH_FLAGS = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-gencode", "arch=compute_90,code=compute_90")


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cache_dir() -> str:
    root = os.environ.get("FLAGC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flagc")
    return os.path.join(root, "cuda_ops")


def library_path() -> str:
    """Path of the compiled kernels library, compiling it if this machine has none yet."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise ResourceError("flagc's CUDA kernels (artifacts built with --gpu-kernels flagc) are "
                            "compiled once on first use and need CUDA's compiler: no nvcc on PATH, "
                            "in $NVCC or in $CUDA_HOME/bin; install the CUDA toolkit, or rebuild "
                            "the artifact with --gpu-kernels onnxruntime")
    digest = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_HERE, name), "rb") as f:
            digest.update(f.read())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join(_ARCH_FLAGS).encode())
    folder = os.path.join(_cache_dir(), digest.hexdigest()[:16])
    target = os.path.join(folder, _LIBRARY)
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    from filelock import FileLock

    with FileLock(target + ".lock"):
        if not os.path.exists(target):
            _compile(nvcc, target)
    return target


def _compile(nvcc: str, target: str) -> None:
    from flagc.progress import phase

    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
           *_ARCH_FLAGS, "-I", os.path.join(_HERE, "third_party"),
           *(os.path.join(_HERE, s) for s in _SOURCES), "-o", tmp]
    try:
        with phase("compiling flagc's CUDA kernels (once per machine)"):
            done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ResourceError(f"nvcc could not compile flagc's CUDA kernels "
                                f"({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(tmp, target)  # complete or absent: never a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def register(session_options) -> None:
    """Let sessions made with `session_options` run the `ai.flagc` ops (CUDA provider)."""
    session_options.register_custom_ops_library(library_path())
