"""Small helper ONNX models the runtime runs on its own buffers (not part of any artifact).

The KV cache keeps its tensors in device memory (CUDA) where numpy cannot reach them; reordering
rows for beam search, trimming a conversation and growing the buffers are then done by running
one of these models through onnxruntime with the inputs and outputs bound to raw buffer pointers.
They live here because only flagc/lower/onnx* may import onnx.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

__all__ = ["take_rows_prefix_model"]


def take_rows_prefix_model(count: int, dtype: str | np.dtype, opset: int = 17) -> bytes:
    """y_i = x_i[rows][:, :, :length] for `count` tensors x_i of shape [b, h, t, d].

    Inputs: x0..x{count-1}, rows int64 [r], length int64 [1]. Outputs: y0..y{count-1} of shape
    [r, h, length, d]. One run moves a whole KV cache (every layer's key and value).
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    axis2 = helper.make_tensor("axis2", TensorProto.INT64, [1], [2])
    nodes, inputs, outputs = [], [], []
    for i in range(count):
        inputs.append(helper.make_tensor_value_info(f"x{i}", elem, ["b", "h", "t", "d"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, ["r", "h", "n", "d"]))
        nodes.append(helper.make_node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0))
        nodes.append(helper.make_node("Slice", [f"g{i}", "zero", "length", "axis2"], [f"y{i}"]))
    inputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, ["r"]))
    inputs.append(helper.make_tensor_value_info("length", TensorProto.INT64, [1]))
    graph = helper.make_graph(nodes, "flagc_take_rows_prefix", inputs, outputs,
                              initializer=[zero, axis2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="flagc")
    model.ir_version = 8
    return model.SerializeToString()
