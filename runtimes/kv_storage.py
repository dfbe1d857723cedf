"""Where the KV cache's bytes live: two flat buffers ("arenas") per cached tensor, on one device.

A tensor of shape [rows, kv_heads, length, head_dim] is stored contiguously at the start of an
arena, so binding it to the engine is a pointer plus a shape. The cache ping-pongs between the two
arenas: the engine reads `past` from one and writes `present` (past + new) into the other.

Two implementations with one interface:
- `HostStorage` (device "cpu"): numpy arrays; copies are numpy slicing.
- `KernelStorage` (any onnxruntime device, "cuda" in practice): OrtValues allocated on the device;
  copies run a tiny ONNX model (Gather rows, Slice a prefix) with raw-pointer bindings, so the data
  never visits the host. It also runs on "cpu", which is how the tests cover it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flagc.errors import RuntimeInputError

__all__ = ["HostStorage", "KernelStorage", "make_storage"]


class HostStorage:
    """Arenas in host memory."""

    device, device_id = "cpu", 0

    def __init__(self, names: Sequence[str], dtype: np.dtype, capacity: int, copies: int = 2):
        self.names, self.dtype, self.capacity = list(names), np.dtype(dtype), int(capacity)
        self._arenas = [{n: np.empty(self.capacity, self.dtype) for n in self.names}
                        for _ in range(copies)]
        # Addresses are fixed for the arena's life; `.ctypes.data` costs microseconds per call.
        self._ptrs = [{n: a.ctypes.data for n, a in arenas.items()} for arenas in self._arenas]

    def ptr(self, which: int, name: str) -> int:
        return self._ptrs[which][name]

    def view(self, which: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor of `shape` at the start of arena `which` (host storage only)."""
        return self._arenas[which][name][: int(np.prod(shape))].reshape(shape)

    def take(self, src: int, dst: int, shape: tuple[int, ...], rows: np.ndarray,
             length: int) -> None:
        """dst = src[rows][:, :, :length] for every tensor (src holds `shape`)."""
        out = (len(rows), shape[1], length, shape[3])
        for n in self.names:
            np.take(self.view(src, n, shape)[:, :, :length], rows, axis=0,
                    out=self.view(dst, n, out))

    def grown(self, capacity: int, src: int, shape: tuple[int, ...]) -> "HostStorage":
        """New storage of `capacity` elements per arena holding src's `shape` tensor in arena 0."""
        new = HostStorage(self.names, self.dtype, capacity, len(self._arenas))
        size = int(np.prod(shape))
        for n in self.names:
            new._arenas[0][n][:size] = self._arenas[src][n][:size]
        return new

    @property
    def nbytes(self) -> int:
        return len(self._arenas) * len(self.names) * self.capacity * self.dtype.itemsize


class KernelStorage:
    """Arenas as onnxruntime OrtValues on `device`; copies run `take_rows_prefix_model`."""

    def __init__(self, names: Sequence[str], dtype: np.dtype, capacity: int, copies: int = 2,
                 device: str = "cuda", device_id: int = 0):
        import onnxruntime as ort

        self.names, self.dtype, self.capacity = list(names), np.dtype(dtype), int(capacity)
        self.device, self.device_id = device, device_id
        self._ort = ort
        try:
            self._arenas = [{n: ort.OrtValue.ortvalue_from_shape_and_type(
                [self.capacity], self.dtype.type, device, device_id) for n in self.names}
                for _ in range(copies)]
        except Exception as exc:
            raise RuntimeInputError(f"cannot allocate the KV cache on {device}:{device_id} "
                                    f"({len(self.names)} x {self.capacity} {self.dtype}): {exc}") \
                from exc
        self._kernel = None
        self._ptrs = [{n: v.data_ptr() for n, v in arenas.items()} for arenas in self._arenas]

    def ptr(self, which: int, name: str) -> int:
        return self._ptrs[which][name]

    def view(self, which: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A host copy of the tensor of `shape` at the start of arena `which` (for tests)."""
        full = self._arenas[which][name].numpy()
        return full[: int(np.prod(shape))].reshape(shape)

    def _session(self):
        if self._kernel is None:
            from flagc.lower.onnx_kernels import take_rows_prefix_model

            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            providers = (["CUDAExecutionProvider"] if self.device == "cuda" else []) + \
                ["CPUExecutionProvider"]
            self._kernel = self._ort.InferenceSession(
                take_rows_prefix_model(len(self.names), self.dtype), opts, providers=providers)
        return self._kernel

    def _copy(self, src_arenas, dst_arenas, shape, rows: np.ndarray, length: int) -> None:
        sess = self._session()
        io = sess.io_binding()
        out = [len(rows), shape[1], length, shape[3]]
        for i, n in enumerate(self.names):
            io.bind_input(f"x{i}", self.device, self.device_id, self.dtype.type, list(shape),
                          src_arenas[n].data_ptr())
            io.bind_output(f"y{i}", self.device, self.device_id, self.dtype.type, out,
                           dst_arenas[n].data_ptr())
        io.bind_cpu_input("rows", np.ascontiguousarray(rows, dtype=np.int64))
        io.bind_cpu_input("length", np.array([length], dtype=np.int64))
        sess.run_with_iobinding(io)

    def take(self, src: int, dst: int, shape: tuple[int, ...], rows: np.ndarray,
             length: int) -> None:
        """dst = src[rows][:, :, :length] for every tensor (src holds `shape`)."""
        self._copy(self._arenas[src], self._arenas[dst], shape, rows, length)

    def grown(self, capacity: int, src: int, shape: tuple[int, ...]) -> "KernelStorage":
        new = KernelStorage(self.names, self.dtype, capacity, len(self._arenas), self.device,
                            self.device_id)
        new._kernel = self._kernel
        if int(np.prod(shape)):
            self._copy(self._arenas[src], new._arenas[0], shape, np.arange(shape[0]), shape[2])
        return new

    @property
    def nbytes(self) -> int:
        return len(self._arenas) * len(self.names) * self.capacity * self.dtype.itemsize


def make_storage(names: Sequence[str], dtype, capacity: int, device: str = "cpu",
                 device_id: int = 0, copies: int = 2, kernel: bool = False):
    """Host storage for "cpu" (unless `kernel`), kernel storage for any other device."""
    if device == "cpu" and not kernel:
        return HostStorage(names, dtype, capacity, copies)
    return KernelStorage(names, dtype, capacity, copies, device, device_id)
