"""fp32 ONNX -> fp16 ONNX for strongly typed TensorRT engines (weights, float I/O, math in fp16).

A strongly typed TensorRT network computes in exactly the types the ONNX declares, so fp16 has
to be in the file. This is flagc's minimal conversion for the TensorRT targets; it works on the
standard-ONNX form that `lower_to_onnx` writes for them:

- weights (initializers with more than one element) are stored in fp16; float graph inputs and
  outputs (including the KV cache and logits) are fp16;
- sensitive reductions stay in fp32 through explicit Casts: softmax, LayerNormalization,
  ReduceMean/ReduceSum and Pow (RMSNorm's mean of squares overflows fp16 once |x| > 256);
- elementwise ops compute in the widest float type among their inputs, so an fp32 island (a
  norm, the additive attention mask whose "minus infinity" is below fp16's range) stays fp32
  until the next MatMul, which always runs in fp16;
- scalars and Constant values adopt whichever type their consumer computes in; a float produced
  by casting integers (index arithmetic such as T5's bucket math) stays fp32 so it stays exact.

The precision pass in `passes/` (precision-fp16) plans this on the IR, and trt-fp16 normally
lowers its plan as it is; this conversion is the fallback for a graph that reaches lowering
without a plan (e.g. `--passes` without precision-fp16) and needs nothing but the lowered file.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.errors import LoweringError

__all__ = ["convert_to_fp16", "KEEP_FP32", "FP16_MAX"]

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

KEEP_FP32 = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum",
                       "ReduceSumSquare", "ReduceMax", "Pow", "CumSum"})
ALWAYS_FP16 = frozenset({"MatMul", "Gemm", "Conv", "Einsum"})
# Ops whose float outputs have the type of their float inputs and that compute nothing worth
# widening (data movement and elementwise math): they take the widest input type.
TYPE_FOLLOW = frozenset({
    "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Concat", "Split", "Gather",
    "GatherElements", "Expand", "Identity", "Flatten", "Tile", "Pad", "Where", "Add", "Sub", "Mul",
    "Div", "Max", "Min", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh",
    "Sigmoid", "Relu", "Sin", "Cos", "Clip", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Shape", "Size", "ScatterND", "ScatterElements", "Floor", "Ceil", "Round",
    "Sign",
})


def _fits_fp16(arr: np.ndarray) -> bool:
    return arr.size == 0 or float(np.max(np.abs(arr))) <= FP16_MAX


class _Converter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        self.orig: dict[str, int] = {}
        for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output):
            self.orig[vi.name] = vi.type.tensor_type.elem_type
        self.flex: dict[str, np.ndarray] = {}  # float scalars: materialized per consumer type
        self.type: dict[str, int] = {}  # the new type of every originally-float tensor
        self.inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.casts: dict[tuple[str, int], str] = {}
        self.flex_made: dict[tuple[str, int], str] = {}
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}__fp16c{self._n}"

    # ---- sources -------------------------------------------------------------------------------
    def _add_float_source(self, name: str, arr: np.ndarray) -> None:
        self.orig[name] = F32
        if arr.size <= 1 and _fits_fp16(arr):
            self.flex[name] = arr
        elif _fits_fp16(arr):
            self.inits.append(numpy_helper.from_array(arr.astype(np.float16), name))
            self.type[name] = F16
        else:  # e.g. a finite "minus infinity" mask constant: fp16 would turn it into -inf
            self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
            self.type[name] = F32

    def sources(self) -> None:
        g = self.model.graph
        for init in g.initializer:
            if init.data_type == F32:
                self._add_float_source(init.name, numpy_helper.to_array(init))
            else:
                self.inits.append(init)
                self.orig[init.name] = init.data_type
        for vi in g.input:
            if vi.type.tensor_type.elem_type == F32:
                self.type[vi.name] = F16

    # ---- materializing an input in the type a node computes in --------------------------------
    def need(self, name: str, t: int) -> str:
        if name in self.flex:
            key = (name, t)
            if key not in self.flex_made:
                arr = self.flex[name].astype(np.float16 if t == F16 else np.float32)
                made = self.fresh(name)
                self.inits.append(numpy_helper.from_array(arr, made))
                self.flex_made[key] = made
            return self.flex_made[key]
        if self.type.get(name, t) == t:
            return name
        key = (name, t)
        if key not in self.casts:
            out = self.fresh(f"{name}_to{'16' if t == F16 else '32'}")
            self.nodes.append(helper.make_node("Cast", [name], [out], to=t,
                                               name=self.fresh("cast")))
            self.casts[key] = out
        return self.casts[key]

    def _float_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and self.orig.get(i) == F32]

    def _widest(self, names: Iterable[str]) -> int:
        fixed = [self.type[n] for n in names if n not in self.flex and n in self.type]
        return F32 if F32 in fixed else F16

    # ---- nodes ---------------------------------------------------------------------------------
    def node(self, node: onnx.NodeProto) -> None:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise LoweringError(f"fp16 conversion: node {node.name!r} ({node.op_type}) has a "
                                "subgraph, which the TensorRT fp16 conversion does not handle")
        if node.op_type == "Constant":
            return self._constant(node)
        floats = self._float_inputs(node)
        op = node.op_type
        if op == "Cast":
            return self._cast(node, floats)
        if op == "ConstantOfShape":
            return self._constant_of_shape(node)
        if op in KEEP_FP32:
            t = F32
        elif op in ALWAYS_FP16:
            t = F16
        elif op in TYPE_FOLLOW:
            t = self._widest(floats)
        else:
            t = F16 if floats else self._widest(floats)
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name in floats:
                new.input[i] = self.need(name, t)
        self.nodes.append(new)
        for out in node.output:
            if out and self.orig.get(out) == F32:
                self.type[out] = t

    def _constant(self, node) -> None:
        attrs = {a.name: a for a in node.attribute}
        if "value" not in attrs or attrs["value"].t.data_type != F32:
            self.nodes.append(node)
            return
        self._add_float_source(node.output[0], numpy_helper.to_array(attrs["value"].t))

    def _cast(self, node, floats: list[str]) -> None:
        to = next(a.i for a in node.attribute if a.name == "to")
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if floats:
            src = node.input[0]
            if to == F32:  # float -> float: a no-op in the converted graph
                t = self._widest(floats) if src not in self.flex else F16
                new.input[0] = self.need(src, t)
                self.nodes.append(helper.make_node("Identity", [new.input[0]], [node.output[0]],
                                                   name=node.name))
                self.type[node.output[0]] = t
                return
            new.input[0] = self.need(src, self._widest(floats))
        self.nodes.append(new)
        if to == F32:  # integers -> float: index arithmetic, kept exact in fp32
            self.type[node.output[0]] = F32

    def _constant_of_shape(self, node) -> None:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for a in new.attribute:
            if a.name == "value" and a.t.data_type == F32:
                arr = numpy_helper.to_array(a.t)
                if _fits_fp16(arr):
                    a.t.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), a.t.name))
                    self.type[node.output[0]] = F16
                else:
                    self.type[node.output[0]] = F32
        self.nodes.append(new)

    # ---- outputs -------------------------------------------------------------------------------
    def outputs(self) -> list[onnx.ValueInfoProto]:
        g = self.model.graph
        outs = []
        for vi in g.output:
            new = onnx.ValueInfoProto()
            new.CopyFrom(vi)
            if vi.type.tensor_type.elem_type == F32:
                if self.type.get(vi.name) != F16:
                    self._retarget_output(vi.name)
                new.type.tensor_type.elem_type = F16
            outs.append(new)
        return outs

    def _retarget_output(self, name: str) -> None:
        """An output computed in fp32: the producer writes a renamed value, a Cast makes `name`."""
        inner = self.fresh(name)
        for n in self.nodes:
            for i, x in enumerate(n.input):
                if x == name:
                    n.input[i] = inner
            for i, x in enumerate(n.output):
                if x == name:
                    n.output[i] = inner
        self.nodes.append(helper.make_node("Cast", [inner], [name], to=F16,
                                           name=self.fresh("cast_out")))


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model computing in fp16 with fp32 islands (see the module docstring)."""
    conv = _Converter(model)
    conv.sources()
    for node in model.graph.node:
        conv.node(node)
    outputs = conv.outputs()
    inputs = []
    for vi in model.graph.input:
        new = onnx.ValueInfoProto()
        new.CopyFrom(vi)
        if vi.type.tensor_type.elem_type == F32:
            new.type.tensor_type.elem_type = F16
        inputs.append(new)
    graph = helper.make_graph(conv.nodes, model.graph.name, inputs, outputs, conv.inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import),
                            producer_name="flagc", ir_version=model.ir_version)
    return out
