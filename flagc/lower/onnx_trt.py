"""The ONNX a TensorRT engine is built from: standard ops, precision explicit in the file.

`write_trt_onnx` lowers the IR (the TensorRT targets have contrib_ops=False, so only what
TensorRT's ONNX parser takes is emitted), then makes the precision explicit, because a strongly
typed network computes in exactly the types the file declares:
- fp16: a graph the precision pass planned is lowered as it is; an unplanned one goes through
  `onnx_trt_fp16` (fp16 weights and I/O, fp32 islands for norms and softmax);
- int8: Q/DQ pairs (`onnx_trt_int8`), activation ranges calibrated on the IR interpreter.
It also enforces the runtime's KV contract: each `past_key_values.*` input has the type of its
`present.*` output, since the runtime binds one step's present as the next step's past.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import onnx
from onnx import helper

from flagc.errors import LoweringError
from flagc.ir.graph import Graph
from flagc.lower.onnx_model import EXTERNAL_DATA_THRESHOLD, lower_to_onnx
from flagc.lower.targets import Target

__all__ = ["write_trt_onnx", "unify_kv_inputs"]

PAST, PRESENT = "past_key_values.", "present."


def write_trt_onnx(graph: Graph, target: Target, path: str,
                   calibration: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write `path` (+ `.data` for big models); returns the manifest's precision description."""
    lower_to_onnx(graph, target, path)
    planned = any(v.dtype.value == "f16"
                  for v in list(graph.inputs) + list(graph.weights.values()))
    info: dict[str, Any]
    if target.precision == "fp32":
        info = {"compute": "fp32"}
        fn = None
    elif target.precision == "fp16" and planned:
        info = {"compute": "fp16", "planned_by": "passes (precision plan in the IR)"}
        fn = None
    elif target.precision == "fp16":
        from flagc.lower.onnx_trt_fp16 import KEEP_FP32, convert_to_fp16

        info = {"compute": "fp16", "planned_by": "flagc.lower.onnx_trt_fp16",
                "fp32_ops": sorted(KEEP_FP32)}
        fn = convert_to_fp16
    elif target.precision == "int8":
        from flagc.lower.onnx_trt_int8 import calibrate_linear_inputs, insert_qdq

        amax = calibrate_linear_inputs(graph, calibration)
        info = {"compute": "int8 Q/DQ around fp32",
                "calibration": ("caller samples" if calibration else
                                "2 random token-id batches (2 x 16) through the IR interpreter")}

        def fn(m):
            info.update(insert_qdq(m, amax))
            return m
    else:
        raise LoweringError(f"target {target.name!r}: precision {target.precision!r} has no "
                            "TensorRT lowering")

    if fn is not None:
        _rewrite(path, fn)
    _unify_kv_in_file(path, info)
    return info


def _unify_kv_in_file(path: str, info: dict[str, Any]) -> None:
    """unify_kv_inputs on the file, reading only the graph: weights in `.data` stay untouched."""
    model = onnx.load(path, load_external_data=False)
    recast = unify_kv_inputs(model)
    if not recast:
        return
    info["kv_inputs_recast"] = recast
    onnx.save_model(model, path)  # external tensors keep their location/offset entries
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise LoweringError(f"the TensorRT ONNX {path} is inconsistent after retyping the KV "
                            f"inputs {recast}: {exc}") from exc


def unify_kv_inputs(model: onnx.ModelProto) -> list[str]:
    """Give every past input its present output's float type; returns the inputs changed.

    A precision plan may leave one past input in fp32 when its first consumer reads only its
    shape; the engine would then take fp32 and return fp16 for the same cache. The input takes
    the present's type and a Cast restores what its consumers were built for.
    """
    g = model.graph
    outs = {o.name: o.type.tensor_type.elem_type for o in g.output}
    changed = []
    for vi in g.input:
        if not vi.name.startswith(PAST):
            continue
        want = outs.get(PRESENT + vi.name[len(PAST):])
        have = vi.type.tensor_type.elem_type
        if want is None or want == have:
            continue
        inner = vi.name + ".as_planned"
        for node in g.node:
            for i, x in enumerate(node.input):
                if x == vi.name:
                    node.input[i] = inner
        g.node.insert(0, helper.make_node("Cast", [vi.name], [inner], to=have,
                                          name=f"kv_cast_{vi.name}"))
        vi.type.tensor_type.elem_type = want
        changed.append(vi.name)
    return changed


def _rewrite(path: str, fn: Callable[[onnx.ModelProto], onnx.ModelProto]) -> None:
    """Load the lowered ONNX (with its external data), transform it, write it back, check it."""
    model = fn(onnx.load(path))
    data = path + ".data"
    if os.path.exists(data):
        os.remove(data)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:  # protobuf caps one message at 2 GB
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(data), size_threshold=1024)
    else:
        onnx.save_model(model, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise LoweringError(f"the TensorRT ONNX {path} is inconsistent after the precision "
                            f"rewrite: {exc}") from exc
