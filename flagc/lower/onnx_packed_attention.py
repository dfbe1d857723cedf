"""Encoders on flagc's CPU attention over packed tokens: MultiHeadAttention -> PackedAttention.

With pack-tokens (passes/padding.py) an encoder's per-token ops run on its real tokens,
[tokens, hidden], but onnxruntime's MultiHeadAttention needs [batch, max_len, hidden]: the
graph scatters the tokens back into padding before the q|k|v projection, so the projection and
the attention (every query against every key slot) still run on the padding, and gathers the
real rows again afterwards. `ai.flagc.PackedAttention` (runtimes/kernels/packed_attention.cc)
attends over each sequence's real tokens in the packed layout, so per layer:

    Reshape(ScatterND(zeros, rows, packed)) -> P -> Split(q, k, v)
        -> MultiHeadAttention(q, k, v, -, -, mask bias) -> Reshape -> Gather(., rows)
    =>  P(packed) -> PackedAttention(., cu_seqlens)

where P is the q|k|v projection (DynamicQuantizeMatMul, MatMulNBits or a bias-free MatMul:
ops that read one row at a time, x as their first input), and cu_seqlens [batch + 1] (each
sequence's first packed row) is computed once from `attention_mask`. Packed rows are the mask's
nonzero positions in row-major order (the pass's packing), so sequence b's real tokens are rows
cu_seqlens[b] .. cu_seqlens[b + 1].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.lower.onnx_kernel_rewrite import DOMAIN, commit_rewrites, drop_dead, \
    only_reader_lookup, readers_of

__all__ = ["use_packed_attention", "CU_SEQLENS"]

CU_SEQLENS = "packed_attention.cu_seqlens"
_MS = "com.microsoft"
_ROWWISE = {("DynamicQuantizeMatMul", _MS), ("MatMul", ""), ("MatMulNBits", _MS)}


def use_packed_attention(model: onnx.ModelProto, mask: str = "attention_mask") -> int:
    """Rewrite `model`'s attention (module docstring); returns how many layers changed."""
    g = model.graph
    if mask not in {i.name for i in g.input}:
        return 0
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    readers = readers_of(nodes)
    only_reader = only_reader_lookup(g, readers)
    plans = []
    for mha in nodes:
        if mha.op_type != "MultiHeadAttention" or mha.domain != _MS:
            continue
        plan = _plan(mha, producer, only_reader)
        if plan is not None:
            plans.append(plan)
    if not plans:
        return 0
    replaced = {}
    for mha, proj, qkv, packed, gather in plans:
        proj.input[0] = packed  # the projection reads the packed rows
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        # in the gather's place: after the projection, before the gather's readers
        replaced[id(gather)] = helper.make_node(
            "PackedAttention", [qkv, CU_SEQLENS], [gather.output[0]], domain=DOMAIN,
            name=f"{mha.name or gather.output[0]}.packed",
            num_heads=int(attrs["num_heads"]), scale=float(attrs.get("scale", 0.0)))
    commit_rewrites(model, nodes, replaced, {})
    _add_cu_seqlens(g, mask)
    drop_dead(g)  # the scatters to padding, the attention and its mask bias
    return len(plans)


def _plan(mha, producer, only_reader):
    """(MultiHeadAttention, projection, its q|k|v output, the packed rows it should read, the
    Gather re-packing the attention's output) when `mha` has the form of the module
    docstring, else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    ins = list(mha.input) + [""] * 6
    if int(attrs.get("unidirectional", 0)) or ins[3] or ins[4] or len(mha.input) > 6:
        return None
    split = producer.get(ins[0])
    if split is None or split.op_type != "Split" or list(split.output) != ins[:3]:
        return None
    proj_out = split.input[0]
    proj = producer.get(proj_out)
    if proj is None or (proj.op_type, proj.domain) not in _ROWWISE \
            or only_reader(proj_out) is not split:
        return None
    reshape = producer.get(proj.input[0])
    scatter = producer.get(reshape.input[0]) if reshape is not None else None
    if (reshape is None or reshape.op_type != "Reshape" or scatter is None
            or scatter.op_type != "ScatterND"):
        return None
    after = only_reader(mha.output[0])
    gather = only_reader(after.output[0]) if after is not None else None
    if (after is None or after.op_type != "Reshape" or gather is None
            or gather.op_type != "Gather"):
        return None
    # the scatter and the gather use the same packed-row indices (Unsqueeze'd for ScatterND)
    rows = producer.get(scatter.input[1])
    if rows is None or rows.op_type != "Unsqueeze" or rows.input[0] != gather.input[1]:
        return None
    return mha, proj, proj_out, scatter.input[2], gather


def _add_cu_seqlens(g: onnx.GraphProto, mask: str) -> None:
    """cu_seqlens = [0, cumsum(nonzeros of each mask row)] (int64 [batch + 1])."""
    one, zero = f"{CU_SEQLENS}.axis1", f"{CU_SEQLENS}.zero"
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), one),
                          numpy_helper.from_array(np.array([0], np.int64), zero)])
    nodes = [
        helper.make_node("Cast", [mask], [f"{CU_SEQLENS}.bool"], to=TensorProto.BOOL),
        helper.make_node("Cast", [f"{CU_SEQLENS}.bool"], [f"{CU_SEQLENS}.ones"],
                         to=TensorProto.INT64),
        helper.make_node("ReduceSum", [f"{CU_SEQLENS}.ones", one], [f"{CU_SEQLENS}.lengths"],
                         keepdims=0),
        helper.make_node("CumSum", [f"{CU_SEQLENS}.lengths", zero], [f"{CU_SEQLENS}.ends"]),
        helper.make_node("Concat", [zero, f"{CU_SEQLENS}.ends"], [CU_SEQLENS], axis=0),
    ]
    for n in reversed(nodes):
        g.node.insert(0, n)
