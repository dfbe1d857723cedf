"""The ONNX emitter: accumulates nodes, small constants and weight initializer requests.

Only flagc/lower/onnx*.py modules import onnx (the serialization boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.ir.types import DType

__all__ = ["OnnxEmitter", "WeightRequest", "ONNX_DTYPE"]

ONNX_DTYPE = {
    DType.F32: TensorProto.FLOAT, DType.F16: TensorProto.FLOAT16, DType.BF16: TensorProto.BFLOAT16,
    DType.I64: TensorProto.INT64, DType.I32: TensorProto.INT32, DType.I8: TensorProto.INT8,
    DType.U8: TensorProto.UINT8, DType.BOOL: TensorProto.BOOL,
}


@dataclass
class WeightRequest:
    """An initializer whose data is produced at write time (streamed, one tensor at a time)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


class OnnxEmitter:
    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.weights: dict[str, WeightRequest] = {}
        self.cache: dict[Any, Any] = {}  # shared subgraphs (e.g. attention masks) by key
        self._counter = 0
        self._const_cache: dict[tuple, str] = {}
        self.domains: set[str] = set()

    def fresh(self, hint: str = "t") -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, inputs: list[Optional[str]], outputs: int | list[str] = 1,
           domain: str = "", **attrs: Any):
        """Emit one node; returns its output name (or list of names when several)."""
        if isinstance(outputs, int):
            outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            outs = list(outputs)
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=self.fresh("n_" + op_type),
                                           domain=domain or None, **attrs))
        if domain:
            self.domains.add(domain)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype: Any = None) -> str:
        """A small constant initializer, deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh("const")
        self.constants.append(numpy_helper.from_array(arr, name))
        self._const_cache[key] = name
        return name

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def weight(self, name: str, dtype: DType, shape: tuple[int, ...],
               load: Callable[[], np.ndarray]) -> str:
        if name not in self.weights:
            self.weights[name] = WeightRequest(name, dtype, tuple(int(d) for d in shape), load)
        return name
