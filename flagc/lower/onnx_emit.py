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


def merge_reshape_chains(em: OnnxEmitter, keep: set[str]) -> int:
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when the middle value has no other reader.

    Lowering a 4-D IR op to a 3-D kernel leaves such pairs (e.g. rotary then attention). `b` may
    copy a dim (0) only where `a` copied it too, so the copied dims are the same. Returns the
    number of Reshapes removed."""
    consts = {t.name: numpy_helper.to_array(t) for t in em.constants}
    producers = {o: n for n in em.nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in em.nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    removed: set[int] = set()
    for n in em.nodes:
        if n.op_type != "Reshape" or n.domain:
            continue
        inner = producers.get(n.input[0])
        if (inner is None or inner.op_type != "Reshape" or id(inner) in removed
                or readers.get(inner.output[0], 0) != 1 or inner.output[0] in keep):
            continue
        a, b = consts.get(inner.input[1]), consts.get(n.input[1])
        if a is None or b is None:
            continue
        if any(v == 0 and (i >= len(a) or a[i] != 0) for i, v in enumerate(b)):
            continue
        n.input[0] = inner.input[0]
        removed.add(id(inner))
    em.nodes = [n for n in em.nodes if id(n) not in removed]
    return len(removed)


def prune_dead_nodes(em: OnnxEmitter, keep: set[str]) -> int:
    """Drop nodes none of whose outputs is read (lowering may route around a value it emitted,
    e.g. a 4-D view a fused kernel did not need). Returns how many were dropped."""
    removed = 0
    while True:
        read = {i for n in em.nodes for i in n.input} | keep
        alive = [n for n in em.nodes if any(o and o in read for o in n.output)]
        if len(alive) == len(em.nodes):
            return removed
        removed += len(em.nodes) - len(alive)
        em.nodes = alive
