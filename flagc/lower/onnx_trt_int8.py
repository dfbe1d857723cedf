"""int8 for TensorRT: calibrate activation ranges on the IR, then put Q/DQ pairs into the ONNX.

TensorRT's explicit quantization reads scales from QuantizeLinear/DequantizeLinear nodes; in a
strongly typed network they are the only way to say "int8 here". For every Linear (an ONNX MatMul
whose right operand is a weight initializer, named `<weight>.T` by the ONNX lowering):
- the weight is stored as int8 with a per-output-channel symmetric scale (max|w| / 127) and a
  DequantizeLinear (axis 1 of the [in, out] layout) in front of the MatMul;
- the activation gets a QuantizeLinear/DequantizeLinear pair whose per-tensor scale is the
  absolute maximum the IR interpreter saw at that Linear's input over a few calibration inputs
  (random token ids unless the caller passes samples), divided by 127.
Attention's activation x activation MatMuls and everything else stay in the float type.
QuantizeLinear takes fp32 input at opset 17, so the int8 engines compute around the Q/DQ pairs in
fp32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.errors import LoweringError
from flagc.ir.graph import Graph, Value
from flagc.ir.ops import Op
from flagc.ir.symbolic import eval_dim

__all__ = ["calibrate_linear_inputs", "calibration_feeds", "insert_qdq"]

QMAX = 127.0


def calibration_feeds(graph: Graph, batch: int = 2, seq: int = 16,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: token ids in range, an all-ones mask, empty cache."""
    rng = np.random.default_rng(seed)
    bind = {"batch": batch, "seq": seq, "past": 0}
    vocab = _vocab_size(graph)
    feeds = {}
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else eval_dim(d, {s: bind.get(s, seq) for s in d.symbols})
                 for d in v.shape]
        if v.dtype.is_float:
            feeds[v.name] = rng.standard_normal(shape).astype(v.dtype.numpy)
        elif v.name == "input_ids" or v.name.endswith("input_ids"):
            feeds[v.name] = rng.integers(0, vocab, size=shape).astype(v.dtype.numpy)
        elif "mask" in v.name:
            feeds[v.name] = np.ones(shape, dtype=v.dtype.numpy)
        elif v.name == "position_ids" and len(shape) == 2:
            feeds[v.name] = np.broadcast_to(np.arange(shape[1]), shape).astype(v.dtype.numpy)
        else:
            feeds[v.name] = np.zeros(shape, dtype=v.dtype.numpy)
    return feeds


def _vocab_size(graph: Graph) -> int:
    for n in graph.nodes:
        if n.op is Op.EMBEDDING and n.inputs[0].kind == "input":
            return int(n.inputs[1].shape[0])
    return 2


def calibrate_linear_inputs(graph: Graph, samples: Sequence[Mapping[str, Any]] | None = None,
                            ) -> dict[str, float]:
    """{weight name: max |input activation|} over the samples, for every Linear with a weight."""
    from flagc.ir.interpreter import interpret_all

    linears: dict[Value, list[str]] = {}
    for n in graph.nodes:
        if n.op is Op.LINEAR and n.inputs[1].kind == "weight":
            linears.setdefault(n.inputs[0], []).append(n.inputs[1].name)
    if not linears:
        return {}
    samples = list(samples) if samples else [calibration_feeds(graph, seed=s) for s in (0, 1)]
    amax: dict[str, float] = {}
    for feeds in samples:
        _, env = interpret_all(graph, feeds)
        for v, weights in linears.items():
            m = float(env[v].detach().abs().max()) if env[v].numel() else 0.0
            for w in weights:
                amax[w] = max(amax.get(w, 0.0), m)
    return amax


def insert_qdq(model: onnx.ModelProto, amax: Mapping[str, float]) -> dict[str, Any]:
    """Quantize, in place, every MatMul whose weight `<name>.T` has a calibrated input range."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    zp = "flagc_qdq_zero_point"
    g.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zp))
    new_nodes, quantized, act_qdq = [], [], {}
    dq_weights: dict[str, str] = {}
    for node in g.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        src = w[:-2] if w and w.endswith(".T") else None
        if src is None or src not in amax or w not in inits \
                or inits[w].data_type != TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        if w not in dq_weights:
            dq_weights[w] = _quantize_weight(g, inits[w], new_nodes)
        x = node.input[0]
        if x not in act_qdq:
            act_qdq[x] = _activation_qdq(g, x, amax[src], zp, new_nodes)
        node.input[0], node.input[1] = act_qdq[x], dq_weights[w]
        new_nodes.append(node)
        quantized.append(src)
    if not quantized:
        raise LoweringError("int8: found no Linear weight to quantize (no MatMul reads a "
                            "`<weight>.T` initializer with a calibrated input)")
    keep = [t for t in g.initializer if t.name not in dq_weights]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(new_nodes)
    return {"scheme": "int8 Q/DQ: per-channel symmetric weights, per-tensor calibrated "
                      "activations", "quantized_linears": len(set(quantized)),
            "activation_amax": {k: round(v, 6) for k, v in sorted(amax.items())}}


def _quantize_weight(g, init: TensorProto, nodes: list) -> str:
    w = numpy_helper.to_array(init).astype(np.float32)  # [in, out]
    scale = np.max(np.abs(w), axis=0) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column stays zero
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    qname, sname, out = init.name + ".int8", init.name + ".scale", init.name + ".dq"
    g.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)])
    nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [out], axis=1,
                                  name=f"dq_{init.name}"))
    return out


def _activation_qdq(g, x: str, amax: float, zp: str, nodes: list) -> str:
    scale = np.array(max(amax, 1e-8) / QMAX, np.float32)
    sname, q, dq = f"{x}.act_scale", f"{x}.q", f"{x}.dq"
    g.initializer.append(numpy_helper.from_array(scale, sname))
    nodes.append(helper.make_node("QuantizeLinear", [x, sname, zp], [q], name=f"q_{x}"))
    nodes.append(helper.make_node("DequantizeLinear", [q, sname, zp], [dq], name=f"dq_{x}"))
    return dq
