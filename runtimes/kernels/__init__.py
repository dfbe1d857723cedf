"""flagc's own kernels for onnxruntime, compiled once per machine.

`library_path(cuda)` returns the shared library built from the sources in this folder, an
onnxruntime custom-op library (ort_ops.cc, domain `ai.flagc`) holding DecodeGemv, the decode
step's matrix-vector products, for CUDA (decode_gemv.cu) and as a plain CPU loop with the same
rounding (the tests run rewritten graphs on it); DecodeAttention, the decode step's
attention over a max-length KV cache on the CPU (decode_attention.cc); QGemv, the CPU
decode step's block-quantized products (qgemv.cc; its weights copied into huge pages,
weight_arena.cc); and PackedAttention, encoders' attention over packed tokens
(packed_attention.cc). With CUDA's compiler (`nvcc`) the library holds the CUDA kernel; without
it the host C++ compiler builds the CPU ops alone, and a session that needs the CUDA kernel is
refused with a message that says so. The library is cached under
~/.cache/flagc/kernels (or $FLAGC_CACHE/kernels), keyed by the sources, the compiler and this
CPU, so a source change rebuilds and concurrent processes build once.
`register(session_options, cuda)` makes a session able to run graphs that use the ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from flagc.errors import ResourceError

__all__ = ["DOMAIN", "library_path", "register", "find_nvcc", "find_cxx"]

DOMAIN = "ai.flagc"
_HERE = os.path.dirname(os.path.abspath(__file__))
_CPU_SOURCES = ("ort_ops.cc", "decode_attention.cc", "qgemv.cc", "weight_arena.cc",
                "packed_attention.cc")
_CUDA_SOURCES = ("decode_gemv.cu",)
_LIBRARY = "libflagc_kernels.so"
# Ampere and Hopper machine code, plus Hopper PTX that newer GPUs compile at load.
_ARCH_FLAGS = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-gencode", "arch=compute_90,code=compute_90")
# Host code is compiled for this machine's instruction set (the cache key has its CPU).
_HOST_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-fvisibility=hidden")


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_cxx() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    return None


def _cache_dir() -> str:
    root = os.environ.get("FLAGC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flagc")
    return os.path.join(root, "kernels")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=None)
def _build_key(compiler: str, sources: tuple[str, ...]) -> str:
    """Hash of what the library is built from. Once per process: every session that loads the
    library asks, and the compiler's --version is a subprocess (~0.1 s for nvcc)."""
    digest = hashlib.sha256()
    for name in sources:
        with open(os.path.join(_HERE, name), "rb") as f:
            digest.update(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(f"{compiler}\n{version}\n{_ARCH_FLAGS}\n{_HOST_FLAGS}\n{_cpu_model()}".encode())
    return digest.hexdigest()[:16]


def library_path(cuda: bool = False) -> str:
    """Path of the compiled library, compiling it if this machine has none yet. `cuda`: the
    caller needs the CUDA kernels (an artifact built with flagc's GPU kernels)."""
    nvcc = find_nvcc()
    if cuda and nvcc is None:
        raise ResourceError("flagc's CUDA kernels (artifacts built with --kernels flagc) are "
                            "compiled once on first use and need CUDA's compiler: "
                            "no nvcc on PATH, in $NVCC or in $CUDA_HOME/bin; install the CUDA "
                            "toolkit, or rebuild the artifact without --kernels flagc")
    compiler = nvcc or find_cxx()
    if compiler is None:
        raise ResourceError("flagc's kernels (artifacts built with --kernels flagc) are "
                            "compiled once on first use and need a C++ compiler: no g++, c++ "
                            "or clang++ on PATH and no $CXX; install one, or rebuild the "
                            "artifact without --kernels flagc")
    sources = _CPU_SOURCES + (_CUDA_SOURCES if nvcc else ())
    folder = os.path.join(_cache_dir(), _build_key(compiler, sources))
    target = os.path.join(folder, _LIBRARY)
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    from filelock import FileLock

    with FileLock(target + ".lock"):
        if not os.path.exists(target):
            _compile(compiler, bool(nvcc), sources, target)
    return target


def _compile(compiler: str, with_cuda: bool, sources: tuple[str, ...], target: str) -> None:
    from flagc.progress import phase

    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    paths = [os.path.join(_HERE, s) for s in sources]
    include = ["-I", os.path.join(_HERE, "third_party")]
    if with_cuda:
        cmd = [compiler, "-std=c++17", "-shared", "-DFLAGC_WITH_CUDA", "-O3",
               "-Xcompiler", ",".join(_HOST_FLAGS), *_ARCH_FLAGS, *include, *paths, "-o", tmp]
    else:
        cmd = [compiler, "-std=c++17", "-shared", *_HOST_FLAGS, *include, *paths, "-o", tmp]
    what = "flagc's CUDA kernels" if with_cuda else "flagc's kernels (CPU versions only)"
    try:
        with phase(f"compiling {what} (once per machine)"):
            done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ResourceError(f"{os.path.basename(compiler)} could not compile {what} "
                                f"({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(tmp, target)  # complete or absent: never a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def register(session_options, cuda: bool = False) -> None:
    """Let sessions made with `session_options` run the `ai.flagc` ops (`cuda`: their CUDA
    kernels are needed)."""
    session_options.register_custom_ops_library(library_path(cuda))
