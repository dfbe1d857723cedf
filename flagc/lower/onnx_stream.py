"""Streaming weights into ONNX external data, one tensor at a time, in row blocks.

A weight arrives as whatever its loader returns (float32 from a checkpoint, possibly a transposed
view of it). Converting and laying it out block by block means the only full-size buffer alive is
the loader's own array: no contiguous transposed copy, no converted copy, no `tobytes()` copy. That
is what keeps a 10B-parameter build near "overhead + one tensor" of memory.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from onnx import TensorProto

from flagc.errors import LoweringError
from flagc.ir.types import DType, torch_view
from flagc.lower.onnx_emit import ONNX_DTYPE

__all__ = ["external_tensor", "append_tensor", "write_array", "release_freed_memory",
           "DerivedWeights", "BLOCK_BYTES", "ALIGN"]

BLOCK_BYTES = 16 * 2**20  # converted bytes per block: big enough to stream at disk speed
ALIGN = 64  # aligned offsets let onnxruntime memory-map tensors directly
_TRIM_BYTES = 8 * 2**20  # trimming after smaller tensors costs more time than it returns


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by the last tensor back to the OS. glibc keeps freed blocks below its
    (adaptive, up to 32 MiB) mmap threshold in the heap, so streaming hundreds of tensors leaves
    ~100 MiB of free-but-resident heap behind without this (measured on a 0.5B build)."""
    if _TRIM is not None:
        _TRIM(0)


def write_array(arr: np.ndarray, dtype: np.dtype, f, block_bytes: int = BLOCK_BYTES) -> int:
    """Write `arr` converted to `dtype` in C order to the binary file `f`; returns bytes written."""
    dtype = np.dtype(dtype)
    if arr.ndim == 2 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous:
        return _write_transposed(arr.T, dtype, f, block_bytes)
    if arr.ndim < 2 or (arr.flags.c_contiguous and arr.dtype == dtype):
        out = np.ascontiguousarray(arr, dtype=dtype)  # no copy when already in place
        f.write(out.reshape(-1).view(np.uint8).data)
        return out.nbytes
    rows = torch_view(arr.reshape(arr.shape[0], -1))
    target = _torch_dtype(dtype)
    step = max(1, block_bytes // max(1, rows.shape[1] * dtype.itemsize))
    written = 0
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(target).contiguous().numpy()
        f.write(block.reshape(-1).view(np.uint8).data)
        written += block.nbytes
        del block
    return written


def _torch_dtype(dtype: np.dtype):
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _write_transposed(src: np.ndarray, dtype: np.dtype, f, block_bytes: int) -> int:
    """Write src.T (src C-contiguous [out, in]) as [in, out] in C order, one tile at a time.

    A tile of source rows [s, s+k) is a column strip of the output: it is transposed (torch's
    blocked copy, as fast as a whole-matrix transpose) and placed with one pwrite per output row.
    Strips of output rows instead would read the source k floats at a time, ~4x slower.
    """
    out_rows, out_cols = src.shape[1], src.shape[0]
    size = dtype.itemsize
    f.flush()
    base, fd = f.tell(), f.fileno()
    tiles = torch_view(src)
    target = _torch_dtype(dtype)
    k = max(1, block_bytes // max(1, out_rows * size))
    for s in range(0, out_cols, k):
        tile = tiles[s:s + k].t().to(target).contiguous().numpy()  # [out_rows, kk]
        stride = tile.shape[1] * size
        view = memoryview(tile.reshape(-1).view(np.uint8))
        for r in range(out_rows):
            os.pwrite(fd, view[r * stride:(r + 1) * stride], base + (r * out_cols + s) * size)
        del tile, view  # before the next tile is made: one tile alive, not two
    total = out_rows * out_cols * size
    f.seek(base + total)
    return total


def external_tensor(req, data_file, location: str) -> TensorProto:
    """Load `req` (an onnx_emit.WeightRequest), append it to `data_file`, return its proto."""
    arr = req.load()
    if req.dtype is DType.BF16:  # numpy has no bfloat16: write the raw 16-bit patterns
        arr = torch.as_tensor(arr).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        dtype = np.dtype(np.uint16)
    else:
        dtype = req.dtype.numpy
    arr = np.asarray(arr)
    if tuple(arr.shape) != req.shape:
        raise LoweringError(f"weight {req.name!r}: loader returned shape {tuple(arr.shape)}, "
                            f"the graph expects {req.shape}")
    t = append_tensor(arr, dtype, ONNX_DTYPE[req.dtype], req.name, data_file, location)
    del arr  # before the next tensor loads
    if int(np.prod(req.shape)) * np.dtype(dtype).itemsize >= _TRIM_BYTES:
        release_freed_memory()
    return t


def append_tensor(arr: np.ndarray, dtype: np.dtype, onnx_dtype: int, name: str, data_file,
                  location: str) -> TensorProto:
    """Write `arr` converted to `dtype` (C order, block by block: write_array) at the next ALIGN
    offset of the open binary file `data_file`, saved as `location`; its external-data proto."""
    offset = data_file.tell()
    pad = (-offset) % ALIGN
    if pad:
        data_file.write(b"\0" * pad)
        offset += pad
    length = write_array(arr, dtype, data_file)
    t = TensorProto()
    t.name = name
    t.data_type = onnx_dtype
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


class DerivedWeights:
    """Weights in another layout for a kernel (transposed, packed), appended once per name to
    one data file beside the graphs (`file_name` in `folder`) and shared by every graph that
    names them."""

    def __init__(self, folder: str, file_name: str):
        self.folder, self.file_name = folder, file_name
        self.path = os.path.join(folder, file_name)
        self._done: dict[str, TensorProto] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._done

    @property
    def used(self) -> bool:
        return bool(self._done)

    def get(self, name: str, derive, onnx_dtype: int) -> TensorProto:
        """The external-data proto of tensor `name`, written from `derive()` (an array, possibly
        a strided view) the first time it is asked for."""
        if name not in self._done:
            arr = derive()
            # not append mode: the tiled writer places rows with pwrite, which O_APPEND ignores
            with open(self.path, "r+b" if os.path.exists(self.path) else "w+b") as f:
                f.seek(0, os.SEEK_END)
                self._done[name] = append_tensor(arr, arr.dtype, onnx_dtype, name, f,
                                                 self.file_name)
        copy = TensorProto()
        copy.CopyFrom(self._done[name])
        return copy
