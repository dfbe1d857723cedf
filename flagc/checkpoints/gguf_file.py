"""Reading GGUF files: metadata as plain Python values, tensors as lazy dequantizing loaders.

The `gguf` package memory-maps the file, so opening a multi-GB GGUF costs no RAM; a tensor is
dequantized to fp32 only when its loader is called (one tensor at a time during lowering).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flagc.errors import CheckpointError

__all__ = ["GGUFFile", "read_gguf"]


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF stores dims innermost-first
    quant: str
    load: Callable[[], np.ndarray]


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file; raise CheckpointError naming the file when it is truncated or corrupt."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise CheckpointError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise CheckpointError(f"{path}: metadata field {key!r} is corrupt: {exc}") from exc

    file_size = os.path.getsize(path)
    tensors: dict[str, GGUFTensorInfo] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_size:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} ends at byte {end} but the file has {file_size} bytes "
                "(truncated download?)"
            )
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        tensors[t.name] = GGUFTensorInfo(t.name, shape, t.tensor_type.name, _loader(t, shape))
    return GGUFFile(path, metadata, tensors)


def _loader(tensor: Any, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from gguf.quants import dequantize

        data = dequantize(tensor.data, tensor.tensor_type)
        return np.ascontiguousarray(data, dtype=np.float32).reshape(shape)

    return load
