"""Cleanup passes: dead-code elimination, common-subexpression elimination, constant folding and
canonicalization (no-op reshapes/transposes/casts, merged transposes and reshapes)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from flagc.ir.graph import Graph, Node, Value
from flagc.ir.ops import Op, opdef
from flagc.passes.manager import PassContext, register_pass
from flagc.passes.pattern import Const, Pat, Rewrite, Var, apply_rewrites

__all__ = ["dce", "cse", "fold_constants", "canonicalize", "CANONICAL_RULES", "redirected",
           "redirect_outputs"]

FOLD_LIMIT = 1 << 16  # elements: larger results stay computed (they would bloat the model)


def redirected(node: Node, redirect: dict[Value, Value]) -> Node:
    """`node` reading each replaced value's replacement (the same node when none applies)."""
    if any(v in redirect for v in node.inputs if v is not None):
        return node.with_inputs(redirect.get(v, v) if v is not None else None
                                for v in node.inputs)
    return node


def redirect_outputs(graph: Graph, redirect: dict[Value, Value]) -> None:
    for k, v in graph.outputs.items():
        graph.outputs[k] = redirect.get(v, v)


@register_pass("dce")
def dce(graph: Graph, ctx: PassContext) -> dict[str, int]:
    live: set[Value] = set(graph.outputs.values())
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(v in live for v in node.outputs):
            kept.append(node)
            live.update(v for v in node.inputs if v is not None)
    removed = len(graph.nodes) - len(kept)
    graph.nodes = kept[::-1]
    weights = len(graph.weights)
    graph.prune_weights()
    return {"nodes removed": removed, "weights removed": weights - len(graph.weights)}


def _attr_key(value) -> object:
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    return value


@register_pass("cse")
def cse(graph: Graph, ctx: PassContext) -> dict[str, int]:
    seen: dict[tuple, Node] = {}
    replaced = 0
    redirect: dict[Value, Value] = {}
    kept: list[Node] = []
    for node in graph.nodes:
        node = redirected(node, redirect)
        key = (node.op, tuple(id(v) for v in node.inputs),
               tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
        twin = seen.get(key)
        if twin is None:
            seen[key] = node
            kept.append(node)
            continue
        for old, new in zip(node.outputs, twin.outputs):
            redirect[old] = new
        replaced += 1
    graph.nodes = kept
    redirect_outputs(graph, redirect)
    return {"duplicates merged": replaced}


@register_pass("fold-constants")
def fold_constants(graph: Graph, ctx: PassContext) -> dict[str, int]:
    """Evaluate nodes whose inputs are all inline constants (small results only)."""
    import torch

    from flagc.ir.builder import make_node

    folded = 0
    redirect: dict[Value, Value] = {}
    out: list[Node] = []
    for node in graph.nodes:
        node = redirected(node, redirect)
        ins = [v for v in node.inputs if v is not None]
        if (node.op is Op.CONSTANT or not ins or len(node.outputs) != 1
                or not all(v.producer is not None and v.producer.op is Op.CONSTANT for v in ins)
                or not all(isinstance(d, int) for d in node.outputs[0].shape)
                or int(np.prod(node.outputs[0].shape, dtype=np.int64)) > FOLD_LIMIT):
            out.append(node)
            continue
        args = [None if v is None else torch.from_numpy(np.array(v.producer.attrs["value"]))
                for v in node.inputs]
        value = opdef(node.op).reference(*args, **node.attrs)
        array = value.detach().cpu().numpy().astype(node.outputs[0].dtype.numpy)
        const = make_node(Op.CONSTANT, [], {"value": array}, node.name)
        out.append(const)
        redirect[node.outputs[0]] = const.outputs[0]
        folded += 1
    graph.nodes = out
    redirect_outputs(graph, redirect)
    if folded:
        dce(graph, ctx)
    return {"nodes folded": folded}


# -- canonicalization ---------------------------------------------------------------------------


def _same_type(a: Value, b: Value) -> Optional[str]:
    return None if a.type == b.type else f"changes the type {a.type} -> {b.type}"


def _identity_if_same(m, g) -> Optional[str]:
    return _same_type(m["x"], m.nodes["op"].outputs[0])


def _merged_transpose(m, r):
    inner = m.nodes["inner"].attrs["perm"]
    outer = m.nodes["op"].attrs["perm"]
    perm = [inner[p] for p in outer]
    if perm == sorted(perm):
        return m["x"]
    return r.emit(Op.TRANSPOSE, [m["x"]], perm=perm)


def reshape_spec(src: Value, shape) -> Optional[list[int]]:
    """An ONNX reshape spec taking `src` to `shape` (0 = copy src dim, -1 = infer), or None."""
    spec: list[int] = []
    for i, d in enumerate(shape):
        if isinstance(d, int):
            spec.append(d)
        elif i < len(src.shape) and src.shape[i] == d:
            spec.append(0)
        else:
            spec.append(-1)
    return spec if spec.count(-1) <= 1 else None


def _merge_reshapes_ok(m, g) -> Optional[str]:
    if reshape_spec(m["x"], m.nodes["op"].outputs[0].shape) is None:
        return "the merged shape has more than one dim to infer"
    return None


def _merged_reshape(m, r):
    out = m.nodes["op"].outputs[0]
    if out.type == m["x"].type:
        return m["x"]
    return r.emit(Op.RESHAPE, [m["x"]], shape=reshape_spec(m["x"], out.shape))


def _neutral_scalar(op: Op, value: float) -> Rewrite:
    return Rewrite(f"drop {op.value} by {value:g}",
                   Pat(op, [Var("x"), Const(value=value)], name="op"),
                   replace=lambda m, r: m["x"], condition=_identity_if_same)


CANONICAL_RULES = [
    Rewrite("drop no-op reshape", Pat(Op.RESHAPE, [Var("x")], name="op"),
            replace=lambda m, r: m["x"], condition=_identity_if_same),
    Rewrite("drop identity transpose",
            Pat(Op.TRANSPOSE, [Var("x")], {"perm": lambda p: list(p) == sorted(p)}, name="op"),
            replace=lambda m, r: m["x"]),
    Rewrite("drop no-op cast", Pat(Op.CAST, [Var("x")], name="op"),
            replace=lambda m, r: m["x"], condition=_identity_if_same),
    Rewrite("drop no-op expand", Pat(Op.EXPAND, [Var("x")], name="op"),
            replace=lambda m, r: m["x"], condition=_identity_if_same),
    Rewrite("merge transposes",
            Pat(Op.TRANSPOSE, [Pat(Op.TRANSPOSE, [Var("x")], name="inner")], name="op"),
            replace=_merged_transpose),
    Rewrite("merge reshapes",
            Pat(Op.RESHAPE, [Pat(Op.RESHAPE, [Var("x")], name="inner")], name="op"),
            replace=_merged_reshape, condition=_merge_reshapes_ok),
    Rewrite("drop squeeze of unsqueeze",
            Pat(Op.SQUEEZE, [Pat(Op.UNSQUEEZE, [Var("x")], name="inner")], name="op"),
            replace=lambda m, r: m["x"],
            condition=lambda m, g: None if m.nodes["inner"].attrs["axes"]
            == m.nodes["op"].attrs["axes"] else "different axes"),
    _neutral_scalar(Op.MUL, 1.0),
    _neutral_scalar(Op.DIV, 1.0),
    _neutral_scalar(Op.ADD, 0.0),
    _neutral_scalar(Op.SUB, 0.0),
]


@register_pass("canonicalize")
def canonicalize(graph: Graph, ctx: PassContext) -> dict[str, int]:
    counts = apply_rewrites(graph, CANONICAL_RULES, None)  # declines are routine here
    if any(counts.values()):
        dce(graph, ctx)
    return counts
