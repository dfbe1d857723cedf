"""Run metadata: machine, versions, load. Absolute numbers are only read next to these."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any

from flagc.bench.stats import peak_rss_method

__all__ = ["run_meta", "versions", "machine"]

DISTRIBUTIONS = ("flagc", "numpy", "torch", "transformers", "tokenizers", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "onnxruntime-genai", "matplotlib", "psutil")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages whose speed or numbers the results depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and the thread-related environment variables."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "platform": platform.platform(), "cpu": None,
                            "mem_gib": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("OMP_", "MKL_", "OPENBLAS_", "ORT_", "CUDA_VISIBLE"))}
    return info


def run_meta(opts: Any) -> dict[str, Any]:
    """The result's "meta" block at the start of a run (`wall_s`, `loadavg_end` come later)."""
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": opts.command, "versions": versions(), "machine": machine(),
            "torch_threads": torch_threads, "peak_rss_method": peak_rss_method(),
            "loadavg_start": list(os.getloadavg()), "loadavg_end": None, "wall_s": None}
