"""Element types and tensor types of IR values."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from flagc.ir.symbolic import Dim, dim_str, parse_dim

__all__ = ["DType", "TensorType", "torch_view"]


def torch_view(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing `arr`'s memory. Read-only arrays (memory maps, bytes buffers) too,
    without torch's "not writable" warning: flagc reads weights and never writes them back."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class DType(Enum):
    """Element types; the value is the short name used in IR text."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I64 = "i64"
    I32 = "i32"
    I8 = "i8"
    U8 = "u8"
    BOOL = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16)

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self]

    @property
    def numpy(self) -> np.dtype:
        if self is DType.BF16:
            raise TypeError("numpy has no bfloat16; use torch for bf16 data")
        return np.dtype(_NUMPY[self])

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch).element_size()

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        for k, v in _TORCH.items():
            if v == dt:
                return k
        raise TypeError(f"no IR dtype for torch dtype {dt}")

    @staticmethod
    def from_numpy(dt: np.dtype) -> "DType":
        dt = np.dtype(dt)
        for k, v in _NUMPY.items():
            if np.dtype(v) == dt:
                return k
        raise TypeError(f"no IR dtype for numpy dtype {dt}")


_TORCH = {
    DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16,
    DType.I64: torch.int64, DType.I32: torch.int32, DType.I8: torch.int8, DType.U8: torch.uint8,
    DType.BOOL: torch.bool,
}
_NUMPY = {
    DType.F32: "float32", DType.F16: "float16", DType.I64: "int64", DType.I32: "int32",
    DType.I8: "int8", DType.U8: "uint8", DType.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorType:
    """dtype plus shape; each dim is an int or a symbolic expression."""

    dtype: DType
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(dim_str(d) for d in self.shape)}]"

    @staticmethod
    def parse(text: str) -> "TensorType":
        text = text.strip()
        name, _, rest = text.partition("[")
        if not rest.endswith("]"):
            raise ValueError(f"bad tensor type {text!r}")
        body = rest[:-1].strip()
        dims = tuple(parse_dim(d) for d in body.split(",")) if body else ()
        return TensorType(DType(name), dims)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))
