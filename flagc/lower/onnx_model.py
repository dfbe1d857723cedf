"""IR graph -> ONNX model file. Weights stream to the file one tensor at a time.

Models whose weights exceed `EMBED_WEIGHTS_LIMIT` bytes keep them in `model.onnx.data`, written
tensor by tensor (protobuf caps a file at 2 GB, and embedding holds every weight in memory);
smaller ones embed them so the model is one file.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from flagc.errors import LoweringError
from flagc.ir.graph import Graph, Value
from flagc.ir.ops import opdef
from flagc.ir.symbolic import dim_str
from flagc.ir.types import DType
from flagc.lower.onnx_emit import (ONNX_DTYPE, OnnxEmitter, merge_reshape_chains,
                                   prune_dead_nodes)
from flagc.lower.onnx_ops import LowerContext, lowering_for
from flagc.lower.onnx_stream import external_tensor
from flagc.lower.targets import Target
from flagc.progress import progress

__all__ = ["lower_to_onnx", "EXTERNAL_DATA_THRESHOLD", "EMBED_WEIGHTS_LIMIT"]

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's 2 GB cap on one message, with headroom
# What lower_to_onnx embeds: embedded weights sit whole in the ModelProto, again in its
# serialization and again in onnx.checker's copy (a 1.25 GB int4 model peaked at 6.8 GiB RSS),
# while external data streams one tensor at a time. Small models stay one self-contained file.
EMBED_WEIGHTS_LIMIT = 256 * 2**20


def _value_info(name: str, v: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else dim_str(d) for d in v.shape]
    return helper.make_tensor_value_info(name, ONNX_DTYPE[v.dtype], dims)


def emit_graph(graph: Graph, target: Target) -> tuple[OnnxEmitter, LowerContext]:
    em = OnnxEmitter(target.opset)
    ctx = LowerContext(em, weight_dtype=lambda v: v.dtype, contrib_ops=target.contrib_ops)
    for name in graph.weights:
        ctx.weight_loaders[name] = (lambda n=name: graph.load_weight(n))
    ctx.used = {v for n in graph.nodes for v in n.inputs if v is not None} | \
        set(graph.outputs.values())
    for v in graph.inputs:
        ctx.names[v] = v.name
    output_names: dict[Value, str] = {}
    for out_name, v in graph.outputs.items():
        if v.kind == "node" and v not in output_names:
            output_names[v] = out_name
    for node in graph.nodes:
        ins = [ctx.name(v) for v in node.inputs]
        schema = opdef(node.op).inputs
        if not (schema and schema[-1].endswith("*")):
            ins += [None] * (len(schema) - len(ins))  # trimmed trailing optionals
        outs = []
        for v in node.outputs:
            ctx.names[v] = output_names.get(v) or em.fresh(node.op.value)
            outs.append(ctx.names[v])
        try:
            lowering_for(node.op)(ctx, node, ins, outs)
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(f"lowering {node.op.value} ({node.name or 'unnamed'}) to ONNX "
                                f"failed: {type(exc).__name__}: {exc}") from exc
    for out_name, v in graph.outputs.items():
        if ctx.name(v) != out_name:
            em.op("Identity", [ctx.name(v)], [out_name])
    merge_reshape_chains(em, keep=set(graph.outputs))
    prune_dead_nodes(em, keep=set(graph.outputs))
    return em, ctx


def lower_to_onnx(graph: Graph, target: Target, path: str, *,
                  external_threshold: int = EMBED_WEIGHTS_LIMIT,
                  on_weight: Callable[[str], None] | None = None) -> list[str]:
    """Write `path` (and `path + '.data'` for big models); returns the file names written."""
    em, ctx = emit_graph(graph, target)
    used = {i for n in em.nodes for i in n.input}
    em.weights = {k: w for k, w in em.weights.items() if k in used}  # e.g. untransposed Linear W
    inputs = [_value_info(v.name, v) for v in graph.inputs]
    outputs = [_value_info(k, v) for k, v in graph.outputs.items()]
    total = sum(_nbytes(w) for w in em.weights.values())
    external = total > external_threshold
    data_name = os.path.basename(path) + ".data"
    files = [os.path.basename(path)]
    initializers = list(em.constants)
    count = len(em.weights)
    with progress("writing weights", total, unit="bytes") as bar:
        if external:
            files.append(data_name)
            with open(path + ".data", "wb") as data_file:
                for i, req in enumerate(em.weights.values()):
                    initializers.append(external_tensor(req, data_file, data_name))
                    bar.advance(_nbytes(req), f"writing weights {i + 1}/{count}")
                    if on_weight:
                        on_weight(req.name)
        else:
            for i, req in enumerate(em.weights.values()):
                initializers.append(helper.make_tensor(
                    req.name, ONNX_DTYPE[req.dtype], req.shape,
                    _checked_array(req).tobytes(), raw=True))
                bar.advance(_nbytes(req), f"writing weights {i + 1}/{count}")
                if on_weight:
                    on_weight(req.name)
    g = helper.make_graph(em.nodes, graph.name, inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", target.opset)]
    opsets += [helper.make_opsetid(d, 1) for d in sorted(em.domains)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="flagc",
                              ir_version=9)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        raise LoweringError(f"onnx.checker rejected the lowered model {path}: {exc}") from exc
    return files


def _checked_array(req) -> np.ndarray:
    data = req.load()
    if tuple(data.shape) != req.shape:
        raise LoweringError(f"weight {req.name!r}: loader returned shape {tuple(data.shape)}, "
                            f"the graph expects {req.shape}")
    if req.dtype is DType.BF16:  # numpy has no bfloat16: write the raw 16-bit patterns
        import torch

        tensor = torch.as_tensor(data).to(torch.bfloat16).contiguous()
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(np.asarray(data).astype(req.dtype.numpy, copy=False))


def _nbytes(req) -> int:
    return int(np.prod(req.shape, dtype=np.int64)) * req.dtype.itemsize
