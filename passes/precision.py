"""Range-aware fp16 / bf16 precision planning.

1. Calibration: the reference interpreter runs the fp32 graph on a calibration input and records
   each value's largest magnitude (skipped for models too large to interpret; the plan says so).
2. Plan: every float-computing node gets f16 (or bf16) unless a rule keeps it in fp32: ops whose
   values leave fp16's safe range (a calibrated magnitude above `limit`), exponent/reduction ops
   that overflow in fp16 (pow, exp, reduce_sum), and the last `keep_last` nodes' head (the logits).
   Norm and attention kernels keep their internal math in fp32 whatever their I/O type.
3. Rewrite: nodes are re-created with inputs cast to their planned type (casts are shared, casts of
   constants fold), weights read only in reduced precision are stored in it, KV-cache inputs take
   the attention's type, and float graph outputs keep their original type.

The plan (counts, the fp32 nodes and why) goes to the manifest as `precision_plan`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from flagc.errors import ConfigError
from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Node, Value, WeightSource
from flagc.ir.ops import Op
from flagc.ir.types import DType
from flagc.passes.cleanup import dce, fold_constants
from flagc.passes.manager import PassContext, register_pass

__all__ = ["plan_precision", "calibrate", "FP16_SAFE_LIMIT", "CALIBRATION_PARAM_LIMIT"]

FP16_SAFE_LIMIT = 8192.0  # 1/8 of fp16's max: headroom for the values calibration did not see
CALIBRATION_PARAM_LIMIT = 2_000_000_000  # bigger models are planned by rule only
ALWAYS_FP32 = frozenset({Op.POW, Op.EXP, Op.LOG, Op.REDUCE_SUM})
MASK_SENTINEL = 1e30  # no activation gets near this: such values are masks (fp32 min / max)
SHAPE_ONLY = frozenset({Op.DIM})  # read a value's shape, not its elements
CACHE_OUTPUTS = ("present.", "cross.")
LOW = {"fp16": DType.F16, "bf16": DType.BF16}


def calibrate(graph: Graph, feeds: Optional[dict] = None) -> dict[Value, float]:
    """Largest |value| of every float value on a calibration input (a fixed random prompt)."""
    from flagc.ir.interpreter import interpret_all
    from flagc.passes.manager import random_feeds

    _, env = interpret_all(graph, feeds if feeds is not None else
                           random_feeds(graph, seed=1234, batch=1, seq=16, past=0))
    return {v: float(t.float().abs().max()) if t.numel() else 0.0
            for v, t in env.items() if t.is_floating_point()}


def _magnitude(ranges: dict[Value, float], v: Value) -> float:
    """A value's calibrated magnitude; additive-mask sentinels (fp32's "minus infinity", any
    magnitude beyond MASK_SENTINEL) do not count: they saturate to fp16's range and still mask."""
    peak = ranges.get(v, 0.0)
    return 0.0 if peak >= MASK_SENTINEL else peak


def _constant_branches(node: Node) -> bool:
    return all(v is not None and v.producer is not None and v.producer.op is Op.CONSTANT
               for v in node.inputs[1:3])


def _float_out(node: Node) -> bool:
    return any(v.dtype.is_float for v in node.outputs)


def _decide(graph: Graph, low: DType, ranges: Optional[dict[Value, float]], limit: float,
            keep_last: int) -> tuple[dict[int, DType], list[dict[str, Any]]]:
    choice: dict[int, DType] = {}
    kept: list[dict[str, Any]] = []
    float_nodes = [n for n in graph.nodes if _float_out(n) and n.op is not Op.CONSTANT]
    tail = {id(n) for n in float_nodes[len(float_nodes) - keep_last:]} if keep_last else set()
    for i, n in enumerate(graph.nodes):
        if n.op is Op.CONSTANT or not _float_out(n):
            continue
        reason = None
        if n.op in ALWAYS_FP32:
            reason = f"{n.op.value} overflows in reduced precision"
        elif id(n) in tail:
            reason = "one of the last nodes (the model head)"
        elif n.op is Op.WHERE and _constant_branches(n):
            reason = None  # a mask: its constants saturate to fp16's range (see as_dtype)
        elif ranges is not None and low is DType.F16:
            peak = max((_magnitude(ranges, v) for v in list(n.outputs) +
                        [x for x in n.inputs if x is not None and x.dtype.is_float]),
                       default=0.0)
            if peak > limit:
                reason = f"calibrated magnitude {peak:.4g} exceeds {limit:g}"
        if n.op is Op.CAST and not DType(n.attrs["dtype"]).is_float:
            continue
        if reason:
            choice[id(n)] = DType.F32
            kept.append({"node": i, "op": n.op.value, "name": n.name, "reason": reason})
        else:
            choice[id(n)] = low
    return choice, kept


def _cast_source(src: Optional[WeightSource], dtype: DType, name: str) -> WeightSource:
    if src is None:
        return None  # type: ignore[return-value]
    if dtype is DType.BF16:
        import torch

        def load_bf16():
            return torch.as_tensor(np.asarray(src.load(), dtype=np.float32)).to(torch.bfloat16)
        return WeightSource(load_bf16, origin=f"{src.origin} as bf16")
    return WeightSource(lambda: np.asarray(src.load()).astype(dtype.numpy),
                        origin=f"{src.origin} as {dtype.value}")


def _rewrite(graph: Graph, choice: dict[int, DType], low: DType) -> dict[str, int]:
    users: dict[Value, list[Node]] = graph.uses()
    counts = {"nodes in reduced precision": 0, "nodes kept in fp32": 0, "casts inserted": 0,
              "weights converted": 0, "inputs converted": 0}
    new_value: dict[Value, Value] = {}  # original value -> its rewritten version

    # Weights and float inputs read only by reduced-precision nodes are stored in it.
    def only_low(v: Value) -> bool:
        us = [u for u in users.get(v, []) if u.op not in SHAPE_ONLY]  # dtype-blind readers
        return bool(us) and all(choice.get(id(u)) is low for u in us)

    for name, w in list(graph.weights.items()):
        if w.dtype is DType.F32 and only_low(w):
            nv = Value(w.type.with_dtype(low), name, kind="weight")
            graph.weights[name] = nv
            graph.weight_sources[name] = _cast_source(graph.weight_sources.get(name), low, name)
            new_value[w] = nv
            counts["weights converted"] += 1
    for i, v in enumerate(graph.inputs):
        if v.dtype is DType.F32 and only_low(v):
            nv = Value(v.type.with_dtype(low), v.name, kind="input")
            graph.inputs[i] = nv
            new_value[v] = nv
            counts["inputs converted"] += 1

    casts: dict[tuple[Value, DType], Value] = {}
    nodes: list[Node] = []

    def as_dtype(v: Value, dtype: DType, scope) -> Value:
        v = new_value.get(v, v)
        if v.dtype is dtype or not v.dtype.is_float:
            return v
        key = (v, dtype)
        if key not in casts:
            if v.producer is not None and v.producer.op is Op.CONSTANT and dtype is DType.F16:
                # Saturate: a mask's "minus infinity" (fp32 min) must stay finite in fp16, or
                # fully masked rows turn into NaN.
                info = np.finfo(np.float16)
                value = np.clip(np.asarray(v.producer.attrs["value"], np.float32),
                                info.min, info.max).astype(np.float16)
                node = make_node(Op.CONSTANT, [], {"value": value}, scope)
            else:
                node = make_node(Op.CAST, [v], {"dtype": dtype.value}, scope)
                counts["casts inserted"] += 1
            nodes.append(node)
            casts[key] = node.outputs[0]
        return casts[key]

    for n in graph.nodes:
        want = choice.get(id(n))
        if want is None:  # integer / boolean work, constants: inputs renamed only
            ins = [None if v is None else new_value.get(v, v) for v in n.inputs]
            if n.op is Op.CONSTANT or all(a is b for a, b in zip(ins, n.inputs)):
                nodes.append(n)
                continue
            rebuilt = make_node(n.op, ins, n.attrs, n.name)
        else:
            attrs = dict(n.attrs)
            if n.op is Op.CAST:  # a cast to a float type now targets the planned type
                attrs["dtype"] = want.value
            ins = [None if v is None else
                   (as_dtype(v, want, n.name) if _casts_input(n, j) else new_value.get(v, v))
                   for j, v in enumerate(n.inputs)]
            rebuilt = make_node(n.op, ins, attrs, n.name)
            counts["nodes in reduced precision" if want is low else "nodes kept in fp32"] += 1
        nodes.append(rebuilt)
        for old, nv in zip(n.outputs, rebuilt.outputs):
            new_value[old] = nv
    graph.nodes = nodes
    # Graph outputs keep their declared type (logits stay fp32 for sampling) except caches
    # (self-attention presents, an encoder's cross-attention keys/values), which take the type of
    # the engine that reads them back.
    for k, v in list(graph.outputs.items()):
        nv = new_value.get(v, v)
        if k.startswith(CACHE_OUTPUTS) or nv.dtype is v.dtype or not v.dtype.is_float:
            graph.outputs[k] = nv
        else:
            graph.outputs[k] = as_dtype(nv, v.dtype, None)
    return counts


def _casts_input(node: Node, index: int) -> bool:
    """Whether input `index` must share the node's compute type (float operands do; integer
    operands such as ids, positions and masks keep theirs)."""
    v = node.inputs[index]
    if node.op is Op.CAST:
        return False
    return v is not None and v.dtype.is_float


def plan_precision(graph: Graph, ctx: PassContext, precision: str) -> dict[str, int]:
    if precision not in LOW:
        raise ConfigError(f"precision {precision!r}: expected one of {sorted(LOW)}")
    low = LOW[precision]
    opts = ctx.options
    limit = float(opts.get("fp16_limit", FP16_SAFE_LIMIT))
    keep_last = int(opts.get("keep_last_fp32", 0))
    params = graph.parameter_count()
    ranges = None
    calibration = "skipped: bf16 has fp32's range" if low is DType.BF16 else None
    if low is DType.F16:
        if opts.get("calibrate", True) is False:
            calibration = "skipped: disabled"
        elif params > CALIBRATION_PARAM_LIMIT:
            calibration = (f"skipped: {params / 1e9:.1f} B parameters are too many to interpret "
                           f"(limit {CALIBRATION_PARAM_LIMIT / 1e9:.0f} B); rules only")
        else:
            ranges = calibrate(graph, opts.get("calibration_feeds"))
            calibration = f"interpreter on a {opts.get('calibration_label', 'random 16-token')} " \
                          f"input, {len(ranges)} values"
    choice, kept = _decide(graph, low, ranges, limit, keep_last)
    counts = _rewrite(graph, choice, low)
    fold_constants(graph, ctx)
    dce(graph, ctx)
    ctx.plan.update({
        "precision": precision, "dtype": low.value, "calibration": calibration,
        "fp16_limit": limit if low is DType.F16 else None,
        "kept_fp32": kept, "counts": counts,
        "peak_magnitude": max(ranges.values()) if ranges else None,
    })
    return counts


@register_pass("precision-fp16")
def precision_fp16(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return plan_precision(graph, ctx, "fp16")


@register_pass("precision-bf16")
def precision_bf16(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return plan_precision(graph, ctx, "bf16")


precision_fp16.check_tolerance = 2e-2  # type: ignore[attr-defined]
precision_bf16.check_tolerance = 8e-2  # type: ignore[attr-defined]
