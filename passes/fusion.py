"""Fusion passes: raise primitive op chains (as traced torch code produces them) to the IR's
transformer ops, so lowering can pick each target's fast kernel.

- fuse-norms: LayerNorm and RMSNorm from mean/sub/pow/sqrt chains
- fuse-activations: GELU (erf and tanh forms) and SiLU
- fuse-linear: matmul with a transposed weight -> linear; bias add -> linear bias
- fuse-attention: matmul -> scale -> (+ mask) -> softmax -> matmul -> attention
- fuse-residual-norm: residual add feeding a norm -> add_norm (skip layer norm)
- merge-projections: linears that read the same input (q/k/v, gate/up) -> one linear + split
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from flagc.ir.graph import Graph, Node, Value, WeightSource
from flagc.ir.ops import Op
from flagc.ir.types import TensorType
from flagc.passes.cleanup import dce, redirect_outputs, redirected
from flagc.passes.manager import PassContext, register_pass
from flagc.passes.pattern import Const, Pat, Rewrite, Var, apply_rewrites

__all__ = ["NORM_RULES", "ACTIVATION_RULES", "LINEAR_RULES", "ATTENTION_RULES",
           "RESIDUAL_NORM_RULES"]


def _is_weight(v: Value) -> bool:
    return v.kind == "weight"


def _last_axis(axes) -> bool:
    return list(axes) in ([-1],)


def _keep(k) -> bool:
    return bool(k)


def _mean(x) -> Pat:
    return Pat(Op.REDUCE_MEAN, [x], {"axes": lambda a: len(a) == 1, "keepdims": _keep},
               name=None)


def _square(x) -> list[Pat]:
    return [Pat(Op.POW, [x, Const(value=2.0)]), Pat(Op.MUL, [x, x])]


def _last_axis_mean(m, names=("mean",)) -> Optional[str]:
    for n in m.matched:
        if n.op is Op.REDUCE_MEAN:
            axis = n.attrs["axes"][0]
            if axis not in (-1, len(n.inputs[0].shape) - 1):
                return "the mean is not over the last axis"
    return None


# -- norms ------------------------------------------------------------------------------------


def _rms_patterns() -> list[Pat]:
    out = []
    for sq in _square(Var("x")):
        var = Pat(Op.ADD, [_mean(sq), Const("eps")])
        for inv in (Pat(Op.MUL, [Var("x"), Pat(Op.RSQRT, [var])]),
                    Pat(Op.DIV, [Var("x"), Pat(Op.SQRT, [var])]),
                    Pat(Op.MUL, [Var("x"), Pat(Op.RECIPROCAL, [Pat(Op.SQRT, [var])])])):
            out.append(Pat(Op.MUL, [inv, Var("w", _is_weight)]))
    return out


def _layer_norm_patterns() -> list[Pat]:
    out = []
    centered = Pat(Op.SUB, [Var("x"), _mean(Var("x"))])
    for sq in _square(centered):
        var = Pat(Op.ADD, [_mean(sq), Const("eps")])
        for normed in (Pat(Op.DIV, [centered, Pat(Op.SQRT, [var])]),
                       Pat(Op.MUL, [centered, Pat(Op.RSQRT, [var])])):
            scaled = Pat(Op.MUL, [normed, Var("w", _is_weight)])
            out.append(Pat(Op.ADD, [scaled, Var("b", _is_weight)]))
    return out


def _norm_ok(m, g) -> Optional[str]:
    reason = _last_axis_mean(m)
    if reason:
        return reason
    x, w = m["x"], m["w"]
    if w.rank != 1 or w.shape[0] != x.shape[-1]:
        return f"scale {w.type} is not a per-feature vector of {x.type}"
    if "b" in m and m["b"].type != w.type:
        return f"bias {m['b'].type} differs from scale {w.type}"
    return None


NORM_RULES = (
    [Rewrite("rms_norm", p, condition=_norm_ok,
             replace=lambda m, r: r.emit(Op.RMS_NORM, [m["x"], m["w"]], eps=m.consts["eps"]))
     for p in _rms_patterns()]
    + [Rewrite("layer_norm", p, condition=_norm_ok,
               replace=lambda m, r: r.emit(Op.LAYER_NORM, [m["x"], m["w"], m["b"]],
                                           eps=m.consts["eps"]))
       for p in _layer_norm_patterns()]
)


@register_pass("fuse-norms")
def fuse_norms(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return _rewrite(graph, NORM_RULES, ctx)


# -- activations ------------------------------------------------------------------------------

_SQRT2 = math.sqrt(2.0)


def _gelu_erf_patterns() -> list[Pat]:
    x = Var("x")
    args = [Pat(Op.DIV, [x, Const(value=_SQRT2)]), Pat(Op.MUL, [x, Const(value=1 / _SQRT2)])]
    out = []
    for arg in args:
        one_plus = Pat(Op.ADD, [Pat(Op.ERF, [arg]), Const(value=1.0)])
        out += [Pat(Op.MUL, [Pat(Op.MUL, [x, Const(value=0.5)]), one_plus]),
                Pat(Op.MUL, [x, Pat(Op.MUL, [one_plus, Const(value=0.5)])]),
                Pat(Op.MUL, [Pat(Op.MUL, [x, one_plus]), Const(value=0.5)])]
    return out


def _gelu_tanh_patterns() -> list[Pat]:
    x = Var("x")
    out = []
    for cube in (Pat(Op.POW, [x, Const(value=3.0)]), Pat(Op.MUL, [Pat(Op.MUL, [x, x]), x])):
        inner = Pat(Op.ADD, [x, Pat(Op.MUL, [cube, Const(value=0.044715)])])
        t = Pat(Op.TANH, [Pat(Op.MUL, [inner, Const(value=math.sqrt(2 / math.pi))])])
        one_plus = Pat(Op.ADD, [t, Const(value=1.0)])
        out += [Pat(Op.MUL, [Pat(Op.MUL, [x, Const(value=0.5)]), one_plus]),
                Pat(Op.MUL, [x, Pat(Op.MUL, [one_plus, Const(value=0.5)])]),
                Pat(Op.MUL, [Pat(Op.MUL, [x, one_plus]), Const(value=0.5)])]
    return out


ACTIVATION_RULES = (
    [Rewrite("gelu(erf)", p, replace=lambda m, r: r.emit(Op.GELU, [m["x"]]))
     for p in _gelu_erf_patterns()]
    + [Rewrite("gelu(tanh)", p, replace=lambda m, r: r.emit(Op.GELU, [m["x"]],
                                                             approximate="tanh"))
       for p in _gelu_tanh_patterns()]
    + [Rewrite("silu", Pat(Op.MUL, [Var("x"), Pat(Op.SIGMOID, [Var("x")])]),
               replace=lambda m, r: r.emit(Op.SILU, [m["x"]]))]
)


@register_pass("fuse-activations")
def fuse_activations(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return _rewrite(graph, ACTIVATION_RULES, ctx)


# -- linear -----------------------------------------------------------------------------------


def _transposed_source(graph: Graph, w: Value) -> WeightSource:
    src = graph.weight_sources.get(w.name)
    # A view, not a copy: lowering streams views block by block (flagc.lower.onnx_stream), and
    # linear's own [in, out] write transposes it back to the stored layout for free.
    return WeightSource(lambda: np.asarray(src.load()).T,
                        origin=f"transpose of {src.origin if src else w.name}")


def _matmul_weight_ok(m, g) -> Optional[str]:
    w = m["w"]
    if w.rank != 2:
        return f"weight {w.type} is not a matrix"
    if m["x"].rank < 2:
        return "the input is a vector"
    return None


def _matmul_by_weight(m, r):
    # x @ W with W [in, out] (GPT-2 Conv1D, traced mm): linear wants [out, in], transposed
    # lazily at write time (the weight loader composes, nothing is materialized here).
    w = m["w"]
    name = w.name + ".T"
    t = TensorType(w.dtype, (w.shape[1], w.shape[0]))
    wt = r.graph.add_weight(name, t, _transposed_source(r.graph, w))
    return r.emit(Op.LINEAR, [m["x"], wt])


def _bias_ok(m, g) -> Optional[str]:
    lin, b = m.nodes["lin"], m["b"]
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        return "the linear already has a bias"
    if b.rank != 1 or b.shape[0] != lin.inputs[1].shape[0]:
        return f"{b.type} is not a per-output bias"
    if b.dtype != lin.outputs[0].dtype:
        return "bias dtype differs"
    return None


LINEAR_RULES = [
    Rewrite("linear from matmul(x, transpose(W))",
            Pat(Op.MATMUL, [Var("x"), Pat(Op.TRANSPOSE, [Var("w", _is_weight)],
                                          {"perm": lambda p: list(p) == [1, 0]})]),
            condition=_matmul_weight_ok,
            replace=lambda m, r: r.emit(Op.LINEAR, [m["x"], m["w"]])),
    Rewrite("linear from matmul(x, W)", Pat(Op.MATMUL, [Var("x"), Var("w", _is_weight)]),
            condition=_matmul_weight_ok, replace=_matmul_by_weight),
    Rewrite("bias into linear",
            Pat(Op.ADD, [Pat(Op.LINEAR, [Var("x"), Var("w")], name="lin"),
                         Var("b", _is_weight)]),
            condition=_bias_ok,
            replace=lambda m, r: r.emit(Op.LINEAR, [m["x"], m["w"], m["b"]])),
]


@register_pass("fuse-linear")
def fuse_linear(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return _rewrite(graph, LINEAR_RULES, ctx)


# -- attention --------------------------------------------------------------------------------
# Traced eager attention: q/k/v [b, s, H, d] are transposed to heads-first, scores = q @ k^T,
# scaled, optionally masked additively, softmaxed and applied to v. The ATTENTION op takes
# [b, s, H, d] operands and returns [b, s, H*d]; the heads-first result is rebuilt with a
# reshape + transpose that canonicalization then cancels against the caller's transpose back.

_HEADS_FIRST = [0, 2, 1, 3]


def _attention_patterns() -> list[Pat]:
    q = Pat(Op.TRANSPOSE, [Var("q")], {"perm": lambda p: list(p) == _HEADS_FIRST})
    k = Pat(Op.TRANSPOSE, [Var("k")], {"perm": lambda p: list(p) == [0, 2, 3, 1]})
    v = Pat(Op.TRANSPOSE, [Var("v")], {"perm": lambda p: list(p) == _HEADS_FIRST})
    scores = Pat(Op.MATMUL, [q, k])
    out = []
    for scaled in (Pat(Op.MUL, [scores, Const("scale")]),
                   Pat(Op.DIV, [scores, Const("inv_scale")])):
        for masked in (scaled, Pat(Op.ADD, [scaled, Var("bias")])):
            probs = Pat(Op.SOFTMAX, [masked], {"axis": lambda a: a in (-1, 3)})
            out.append(Pat(Op.MATMUL, [probs, v]))
    return out


def _attention_ok(m, g) -> Optional[str]:
    q, k, v = m["q"], m["k"], m["v"]
    if any(t.rank != 4 for t in (q, k, v)):
        return "q/k/v are not [batch, seq, heads, head_dim]"
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        return "head counts do not group"
    if "bias" in m:
        b = m["bias"]
        if b.rank != 4 or b.dtype != q.dtype or b.shape[-1] != k.shape[1]:
            return f"mask {b.type} is not an additive [b, h|1, s|1, T] bias"
    return None


def _attention(m, r):
    q, k, v = m["q"], m["k"], m["v"]
    scale = m.consts["scale"] if "scale" in m.consts else 1.0 / m.consts["inv_scale"]
    out, _, _ = r.emit(Op.ATTENTION, [q, k, v, None, None, None, m.get("bias")],
                       num_heads=int(q.shape[2]), kv_heads=int(k.shape[2]), scale=float(scale),
                       mask="bidirectional")
    b, s, h, d = q.shape
    split = r.emit(Op.RESHAPE, [out], shape=[0, 0, int(h), int(d)])
    return r.emit(Op.TRANSPOSE, [split], perm=_HEADS_FIRST)


# Traced decoder attention with a KV cache: q/k/v arrive heads-first [b, h, s, d], the cache is
# concat(past, new) along the sequence (its result is the graph's `present`), grouped heads are
# repeated by unsqueeze/expand/reshape, and the causal + padding mask is an additive bias.


def _cached_kv(name: str, past: str, new: str, repeated: bool) -> tuple[Pat, Pat]:
    full = Pat(Op.CONCAT, [Var(past), Var(new)], {"axis": lambda a: a in (2, -2)}, name=name,
               shared=True)
    if not repeated:
        return full, full
    rep = Pat(Op.RESHAPE, [Pat(Op.EXPAND, [Pat(Op.UNSQUEEZE, [full], {"axes": [2]})],
                               name=name + "_expand")], name=name + "_repeat")
    return full, rep


def _cached_attention_patterns() -> list[Pat]:
    out = []
    for repeated in (True, False):
        _, krep = _cached_kv("k_full", "past_k", "kh", repeated)
        _, vrep = _cached_kv("v_full", "past_v", "vh", repeated)
        scores = Pat(Op.MATMUL, [Var("qh"), Pat(Op.TRANSPOSE, [krep],
                                                {"perm": lambda p: list(p) == [0, 1, 3, 2]})])
        for scaled in (Pat(Op.MUL, [scores, Const("scale")]),
                       Pat(Op.DIV, [scores, Const("inv_scale")]), scores):
            for masked in (Pat(Op.ADD, [scaled, Var("bias")]), scaled):
                probs = Pat(Op.SOFTMAX, [masked], {"axis": lambda a: a in (-1, 3)})
                out.append(Pat(Op.MATMUL, [probs, vrep]))
    return out


def _cached_attention_ok(m, g) -> Optional[str]:
    qh, kh, vh, pk, pv = (m[n] for n in ("qh", "kh", "vh", "past_k", "past_v"))
    if any(t.rank != 4 for t in (qh, kh, vh, pk, pv)):
        return "q/k/v/past are not [batch, heads, seq, head_dim]"
    H, KV = qh.shape[1], kh.shape[1]
    if not isinstance(H, int) or not isinstance(KV, int) or H % KV or vh.shape[1] != KV:
        return f"heads do not group: q {qh.type}, k {kh.type}, v {vh.type}"
    if "k_full_expand" in m.nodes:
        g_k = m.nodes["k_full_expand"].outputs[0].shape[2]
        g_v = m.nodes["v_full_expand"].outputs[0].shape[2]
        if g_k != H // KV or g_v != H // KV:
            return "the repeated heads do not match num_heads / kv_heads"
    elif H != KV:
        return "grouped heads without a repeat"
    if "bias" in m:
        b = m["bias"]
        if b.rank != 4 or b.dtype != qh.dtype or b.shape[1] not in (1, H):
            return f"mask {b.type} is not an additive [b|1, h|1, s, T] bias"
    return None


def _cached_attention(m, r):
    qh, kh, vh = m["qh"], m["kh"], m["vh"]
    if "scale" in m.consts:
        scale = m.consts["scale"]
    elif "inv_scale" in m.consts:
        scale = 1.0 / m.consts["inv_scale"]
    else:
        scale = 1.0  # e.g. T5, whose query projection is pre-scaled
    q, k, v = (r.emit(Op.TRANSPOSE, [x], perm=_HEADS_FIRST) for x in (qh, kh, vh))
    out, present_k, present_v = r.emit(
        Op.ATTENTION, [q, k, v, m["past_k"], m["past_v"], None, m.get("bias")],
        num_heads=int(qh.shape[1]), kv_heads=int(kh.shape[1]), scale=float(scale),
        mask="bidirectional")  # the traced bias carries the causal part
    r.alias(m.nodes["k_full"].outputs[0], present_k)
    r.alias(m.nodes["v_full"].outputs[0], present_v)
    b, h, s, d = qh.shape
    split = r.emit(Op.RESHAPE, [out], shape=[0, 0, int(h), int(d)])
    return r.emit(Op.TRANSPOSE, [split], perm=_HEADS_FIRST)


ATTENTION_RULES = [Rewrite("attention", p, condition=_attention_ok, replace=_attention)
                   for p in _attention_patterns()] + \
    [Rewrite("attention with cache", p, condition=_cached_attention_ok, replace=_cached_attention)
     for p in _cached_attention_patterns()]


@register_pass("fuse-attention")
def fuse_attention(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return _rewrite(graph, ATTENTION_RULES, ctx)


# -- rotary embedding ---------------------------------------------------------------------------
# Traced rotate-half RoPE on heads-first x [b, h, s, d]: x*cos + cat(-x2, x1)*sin, with cos/sin
# computed per step from position_ids * inv_freq. The ROTARY op gathers rows of precomputed
# tables instead (computed in fp32 like the trace, `max_seq` rows).


def _is_constant(v: Value) -> bool:
    return v.kind == "node" and v.producer is not None and v.producer.op is Op.CONSTANT


def _rotary_patterns() -> list[Pat]:
    pos = Pat(Op.UNSQUEEZE, [Pat(Op.CAST, [Var("pos")])], {"axes": [2]})
    freqs = Pat(Op.MUL, [pos, Var("inv_freq", _is_constant)])
    angles = Pat(Op.CONCAT, [freqs, freqs], {"axis": lambda a: a in (-1, 2)}, shared=True)
    cos = Pat(Op.UNSQUEEZE, [Pat(Op.COS, [angles], shared=True)], {"axes": [1]}, shared=True)
    sin = Pat(Op.UNSQUEEZE, [Pat(Op.SIN, [angles], shared=True)], {"axes": [1]}, shared=True)
    x = Var("x")
    upper = Pat(Op.SLICE, [x], {"axis": lambda a: a in (3, -1)}, name="upper")
    lower = Pat(Op.SLICE, [x], {"axis": lambda a: a in (3, -1)}, name="lower")
    rotated = Pat(Op.CONCAT, [Pat(Op.NEG, [upper]), lower], {"axis": lambda a: a in (3, -1)})
    return [Pat(Op.ADD, [Pat(Op.MUL, [x, cos]), Pat(Op.MUL, [rotated, sin])])]


def _rotary_ok(m, g) -> Optional[str]:
    x, pos = m["x"], m["pos"]
    inv = np.asarray(m["inv_freq"].producer.attrs["value"]).reshape(-1)
    d = x.shape[3] if x.rank == 4 else None
    if x.rank != 4 or not isinstance(d, int) or 2 * inv.size != d:
        return "not a full-width rotation of a [b, h, s, d] tensor"
    half = d // 2
    up, lo = m.nodes["upper"].attrs, m.nodes["lower"].attrs
    if up["start"] != half or up["end"] < d or lo["start"] != 0 or lo["end"] != half:
        return "the halves are not x[..., d/2:] and x[..., :d/2]"
    if pos.rank != 2 or pos.dtype.is_float:
        return "positions are not integer [batch, seq]"
    if not g.metadata.get("max_seq"):
        return "no max_seq to size the cos/sin tables"
    return None


def _rope_tables(graph: Graph, inv: np.ndarray, rows: int) -> tuple[Value, Value]:
    import hashlib

    key = "rope." + hashlib.sha1(inv.astype(np.float32).tobytes()).hexdigest()[:8]
    if key + ".cos" not in graph.weights:
        angles = np.arange(rows, dtype=np.float32)[:, None] * inv.astype(np.float32)[None, :]
        graph.add_constant_weight(key + ".cos", np.cos(angles).astype(np.float32))
        graph.add_constant_weight(key + ".sin", np.sin(angles).astype(np.float32))
    return graph.weights[key + ".cos"], graph.weights[key + ".sin"]


def _rotary(m, r):
    x = m["x"]
    inv = np.asarray(m["inv_freq"].producer.attrs["value"]).reshape(-1)
    cos_t, sin_t = _rope_tables(r.graph, inv, int(r.graph.metadata["max_seq"]))
    x4 = r.emit(Op.TRANSPOSE, [x], perm=_HEADS_FIRST)
    y = r.emit(Op.ROTARY, [x4, m["pos"], cos_t, sin_t], rotary_dim=int(x.shape[3]))
    return r.emit(Op.TRANSPOSE, [y], perm=_HEADS_FIRST)


ROTARY_RULES = [Rewrite("rotary", p, condition=_rotary_ok, replace=_rotary)
                for p in _rotary_patterns()]


@register_pass("fuse-rotary")
def fuse_rotary(graph: Graph, ctx: PassContext) -> dict[str, int]:
    if ctx.options.get("max_seq"):
        graph.metadata["max_seq"] = int(ctx.options["max_seq"])
    return _rewrite(graph, ROTARY_RULES, ctx)


# -- residual add + norm ------------------------------------------------------------------------


def _add_norm_ok(m, g) -> Optional[str]:
    if m["x"].type != m["r"].type:
        return "the residual add broadcasts"
    # The sum moves to the norm's position: every other reader must come after it.
    add, norm = m.nodes["add"], m.nodes["norm"]
    position = {id(n): i for i, n in enumerate(g.nodes)}
    at = position.get(id(norm))
    for i in range(position.get(id(add), 0) + 1, at or 0):
        if add.outputs[0] in g.nodes[i].inputs:
            return "the residual sum is read before the norm"
    return None


def _add_norm(kind: str):
    def replace(m, r):
        norm = m.nodes["norm"]
        bias = [norm.inputs[2]] if kind == "layer" and len(norm.inputs) > 2 else []
        normed, total = r.emit(Op.ADD_NORM, [m["x"], m["r"], norm.inputs[1], *bias], kind=kind,
                               eps=norm.attrs["eps"])
        r.alias(m.nodes["add"].outputs[0], total)
        return normed
    return replace


def _residual_norm_rules() -> list[Rewrite]:
    rules = []
    for op, kind in ((Op.RMS_NORM, "rms"), (Op.LAYER_NORM, "layer")):
        attrs = {"offset": lambda o: not o} if op is Op.RMS_NORM else {}
        pat = Pat(op, [Pat(Op.ADD, [Var("x"), Var("r")], name="add", shared=True),
                       Var("w", _is_weight)] + ([Var("b", _is_weight)] if kind == "layer" else []),
                  attrs, name="norm")
        rules.append(Rewrite(f"add_norm({kind})", pat, condition=_add_norm_ok,
                             replace=_add_norm(kind)))
    return rules


RESIDUAL_NORM_RULES = _residual_norm_rules()


@register_pass("fuse-residual-norm")
def fuse_residual_norm(graph: Graph, ctx: PassContext) -> dict[str, int]:
    return _rewrite(graph, RESIDUAL_NORM_RULES, ctx)


# -- sibling projections ------------------------------------------------------------------------


@register_pass("merge-projections")
def merge_projections(graph: Graph, ctx: PassContext) -> dict[str, int]:
    """Linears reading the same input with weights (and biases alike) become one wider linear
    and a split: one pass over the activations instead of several (q/k/v, gate/up)."""
    from flagc.ir.builder import make_node

    groups: dict[Value, list[Node]] = {}
    for n in graph.nodes:
        if n.op is Op.LINEAR and n.inputs[1].kind == "weight":
            has_bias = len(n.inputs) > 2 and n.inputs[2] is not None
            if has_bias and n.inputs[2].kind != "weight":
                continue
            groups.setdefault(n.inputs[0], []).append(n)
    merged = 0
    replace: dict[int, list[Node]] = {}
    drop: set[int] = set()
    redirect: dict[Value, Value] = {}
    for x, nodes in groups.items():
        biased = [len(n.inputs) > 2 and n.inputs[2] is not None for n in nodes]
        if len(nodes) < 2:
            continue
        if len(set(biased)) != 1:
            ctx.decline("merge-projections", "some projections have a bias and some not")
            continue
        ws = [n.inputs[1] for n in nodes]
        if len({w.dtype for w in ws}) != 1 or len({w.shape[1] for w in ws}) != 1:
            ctx.decline("merge-projections", "weights differ in dtype or input features")
            continue
        sizes = [int(w.shape[0]) for w in ws]
        w = graph.add_weight("+".join(w.name for w in ws),
                             TensorType(ws[0].dtype, (sum(sizes), ws[0].shape[1])),
                             _concat_source(graph, [w.name for w in ws]))
        inputs = [x, w]
        if biased[0]:
            bs = [n.inputs[2] for n in nodes]
            inputs.append(graph.add_weight("+".join(b.name for b in bs),
                                           TensorType(bs[0].dtype, (sum(sizes),)),
                                           _concat_source(graph, [b.name for b in bs])))
        lin = make_node(Op.LINEAR, inputs, {}, nodes[0].name)
        split = make_node(Op.SPLIT, [lin.outputs[0]], {"axis": -1, "sizes": sizes},
                          nodes[0].name)
        replace[id(nodes[0])] = [lin, split]
        for n, out in zip(nodes, split.outputs):
            drop.add(id(n))
            redirect[n.outputs[0]] = out
        merged += 1
    if not merged:
        return {"groups merged": 0}
    nodes = []
    for n in graph.nodes:
        nodes.extend(replace.get(id(n), []))
        if id(n) not in drop:
            nodes.append(redirected(n, redirect))
    graph.nodes = nodes
    redirect_outputs(graph, redirect)
    dce(graph, ctx)
    return {"groups merged": merged}


def _concat_source(graph: Graph, names: list[str]) -> WeightSource:
    sources = [graph.weight_sources[n] for n in names]
    return WeightSource(lambda: np.concatenate([np.asarray(s.load()) for s in sources], axis=0),
                        origin="concat of " + ", ".join(names))


def _rewrite(graph: Graph, rules, ctx) -> dict[str, int]:
    counts = apply_rewrites(graph, rules, ctx)
    merged: dict[str, int] = {}
    for k, v in counts.items():
        merged[k] = merged.get(k, 0) + v
    if any(merged.values()):
        dce(graph, ctx)
    return merged
