"""IR op -> ONNX lowering table (`lower_onnx[Op.X] = fn`), standard ONNX opset 17.

Each function gets the lowering context, the IR node, its input names (None for absent optionals)
and the output names it must define.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from flagc.errors import LoweringError
from flagc.ir.graph import Node, Value
from flagc.ir.ops import Op
from flagc.ir.types import DType
from flagc.lower.onnx_contrib import gqa_attention, mha_attention, rotary_embedding
from flagc.lower.onnx_emit import ONNX_DTYPE, OnnxEmitter
from flagc.lower.onnx_quant import lower_qlinear

__all__ = ["lower_onnx", "LowerContext"]

INT64_MAX = np.iinfo(np.int64).max


class LowerContext:
    """What a lowering function may use: the emitter, names of IR values, weight access."""

    def __init__(self, em: OnnxEmitter, weight_dtype: Callable[[Value], DType],
                 contrib_ops: bool = False):
        self.em = em
        self.contrib_ops = contrib_ops  # may emit onnxruntime's com.microsoft fused ops
        self.used: Optional[set[Value]] = None  # values something reads (None: assume all)
        self.flat: dict[Value, str] = {}  # [b, s, h, d] values also available as [b, s, h*d]
        self.names: dict[Value, str] = {}
        self.weight_dtype = weight_dtype
        self.weight_loaders: dict[str, Callable[[], np.ndarray]] = {}

    def is_used(self, v: Value) -> bool:
        return self.used is None or v in self.used

    def heads_flat(self, v: Value, name: str) -> str:
        """A [b, s, h, d] value as [b, s, h*d] for kernels that take heads flattened: the 3-D
        tensor it was split from (or a fused kernel produced) when known, else a Reshape."""
        if v in self.flat:
            return self.flat[v]
        return self.em.op("Reshape", [name, self.em.i64(0, 0, -1)])

    def name(self, v: Optional[Value]) -> Optional[str]:
        if v is None:
            return None
        if v.kind == "weight" and v not in self.names:
            self.names[v] = self.em.weight(v.name, self.weight_dtype(v), v.shape,
                                           self.weight_loaders[v.name])
        return self.names[v]

    def transposed_weight(self, v: Value) -> str:
        """The [in, out] layout of a [out, in] weight, transposed at write time.

        The loader returns a transposed *view*: the writer (onnx_stream) lays it out block by
        block, so no second full-size copy of the weight exists.
        """
        load = self.weight_loaders[v.name]
        return self.em.weight(v.name + ".T", self.weight_dtype(v), (v.shape[1], v.shape[0]),
                              lambda: _transposed_view(load()))


def _transposed_view(data):
    # bf16 weights arrive as torch tensors (numpy has no bfloat16); both support a lazy .T.
    return data.T if hasattr(data, "T") else np.asarray(data).T


LowerFn = Callable[[LowerContext, Node, list, list], None]
lower_onnx: dict[Op, LowerFn] = {}


def _simple(onnx_op: str, **fixed):
    def fn(ctx, node, ins, outs):
        ctx.em.op(onnx_op, ins, outs, **fixed)
    return fn


for _op, _name in {
    Op.ADD: "Add", Op.SUB: "Sub", Op.MUL: "Mul", Op.DIV: "Div", Op.POW: "Pow", Op.MAXIMUM: "Max",
    Op.EQUAL: "Equal", Op.LESS: "Less", Op.WHERE: "Where", Op.NEG: "Neg", Op.SQRT: "Sqrt",
    Op.RECIPROCAL: "Reciprocal", Op.EXP: "Exp", Op.LOG: "Log", Op.ABS: "Abs", Op.COS: "Cos",
    Op.SIN: "Sin", Op.TANH: "Tanh", Op.ERF: "Erf", Op.SIGMOID: "Sigmoid", Op.RELU: "Relu",
    Op.MATMUL: "MatMul",
}.items():
    lower_onnx[_op] = _simple(_name)


def _constant(ctx, node, ins, outs):
    from onnx import numpy_helper

    ctx.em.op("Constant", [], outs, value=numpy_helper.from_array(np.asarray(node.attrs["value"])))


def _rsqrt(ctx, node, ins, outs):
    ctx.em.op("Reciprocal", [ctx.em.op("Sqrt", ins)], outs)


def _silu(ctx, node, ins, outs):
    ctx.em.op("Mul", [ins[0], ctx.em.op("Sigmoid", ins)], outs)


def typed_scalar(ctx, value: float, dtype: DType) -> str:
    """A scalar constant of `dtype` (bf16, which numpy lacks, as a cast of an fp32 constant
    that onnxruntime folds at load)."""
    if dtype is DType.BF16:
        key = ("bf16-scalar", float(value))
        if key not in ctx.em.cache:
            ctx.em.cache[key] = ctx.em.op("Cast", [ctx.em.const(np.array(value, np.float32))],
                                          to=ONNX_DTYPE[DType.BF16])
        return ctx.em.cache[key]
    return ctx.em.const(np.array(value, dtype=dtype.numpy))


def _scalar(ctx, node, value: float) -> str:
    return typed_scalar(ctx, value, node.outputs[0].dtype)


def _gelu(ctx, node, ins, outs):
    em, x = ctx.em, ins[0]
    if node.attrs["approximate"] == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = em.op("Mul", [em.op("Mul", [x, x]), x])
        inner = em.op("Mul", [em.op("Add", [x, em.op("Mul", [x3, _scalar(ctx, node, 0.044715)])]),
                              _scalar(ctx, node, float(np.sqrt(2 / np.pi)))])
        t = em.op("Tanh", [inner])
    else:
        t = em.op("Erf", [em.op("Div", [x, _scalar(ctx, node, float(np.sqrt(2.0)))])])
    half_x = em.op("Mul", [x, _scalar(ctx, node, 0.5)])
    em.op("Mul", [half_x, em.op("Add", [t, _scalar(ctx, node, 1.0)])], outs)


def _cast(ctx, node, ins, outs):
    ctx.em.op("Cast", ins, outs, to=ONNX_DTYPE[DType(node.attrs["dtype"])])


def _linear(ctx, node, ins, outs):
    em = ctx.em
    w = node.inputs[1]
    if w.kind == "weight":
        wt = ctx.transposed_weight(w)
    else:
        wt = em.op("Transpose", [ins[1]], perm=[1, 0])
    if ins[2] is None:
        em.op("MatMul", [ins[0], wt], outs)
    else:
        em.op("Add", [em.op("MatMul", [ins[0], wt]), ins[2]], outs)


def _embedding(ctx, node, ins, outs):
    ctx.em.op("Gather", [ins[1], ins[0]], outs, axis=0)


def _gather(ctx, node, ins, outs):
    ctx.em.op("Gather", ins, outs, axis=node.attrs["axis"])


def _layer_norm(ctx, node, ins, outs):
    ctx.em.op("LayerNormalization", ins, outs, axis=-1, epsilon=float(node.attrs["eps"]))


def _rms_norm(ctx, node, ins, outs):
    # Standard-ONNX form; onnxruntime fuses it into SimplifiedLayerNormalization. Squares of
    # fp16 activations overflow, so reduced-precision inputs are normalized in fp32.
    em, x, w = ctx.em, ins[0], ins[1]
    dtype = node.inputs[0].dtype
    if dtype is not DType.F32:
        x = em.op("Cast", [x], to=ONNX_DTYPE[DType.F32])
    f32 = np.float32
    ms = em.op("ReduceMean", [em.op("Pow", [x, em.const(np.array(2.0, f32))])], axes=[-1],
               keepdims=1)
    eps = em.const(np.array(node.attrs["eps"], f32))
    # x / sqrt(...) (not x * reciprocal): the form onnxruntime's SimplifiedLayerNormFusion matches
    normed = em.op("Div", [x, em.op("Sqrt", [em.op("Add", [ms, eps])])])
    if dtype is not DType.F32:
        normed = em.op("Cast", [normed], to=ONNX_DTYPE[dtype])
    if node.attrs.get("offset"):
        w = em.op("Add", [w, _scalar(ctx, node, node.attrs["offset"])])
    em.op("Mul", [normed, w], outs)


def _add_norm(ctx, node, ins, outs):
    em = ctx.em
    kind, eps = node.attrs["kind"], float(node.attrs["eps"])
    if ctx.contrib_ops and kind == "rms":
        # onnxruntime's fused kernel: outputs (out, mean, inv_std_var, input_skip_bias_sum).
        em.op("SkipSimplifiedLayerNormalization", ins[:3], [outs[0], "", "", outs[1]],
              domain="com.microsoft", epsilon=eps)
        return
    # LayerNorm stays Add + LayerNormalization even with contrib ops: onnxruntime's CPU
    # SkipLayerNormalization kernel is 3-4x slower than the pair (fp32 [8, 128, 384]: 1.73 vs
    # 0.41 ms; [1, 1, 576]: 8.2 vs 3.6 us). CUDA sessions fuse the pair into it (one kernel);
    # CPU sessions keep that fusion off (runtimes/ort_engine.py). The RMS form above is as
    # fast fused as unfused on the CPU.
    em.op("Add", ins[:2], [outs[1]])
    norm_ins = [outs[1]] + list(ins[2:])
    if kind == "rms":
        _rms_norm(ctx, node, norm_ins, [outs[0]])
    else:
        _layer_norm(ctx, node, norm_ins, [outs[0]])


def _softmax(ctx, node, ins, outs):
    ctx.em.op("Softmax", ins, outs, axis=node.attrs["axis"])


def _reduce(onnx_op: str, axes_as_input: bool):
    def fn(ctx, node, ins, outs):
        axes = list(node.attrs["axes"])
        keep = int(bool(node.attrs["keepdims"]))
        if axes_as_input:
            ctx.em.op(onnx_op, [ins[0], ctx.em.i64(*axes)], outs, keepdims=keep)
        else:
            ctx.em.op(onnx_op, ins, outs, axes=axes, keepdims=keep)
    return fn


def _reshape(ctx, node, ins, outs):
    ctx.em.op("Reshape", [ins[0], ctx.em.i64(*node.attrs["shape"])], outs)
    x, y = node.inputs[0], node.outputs[0]
    if x.rank == 3 and y.rank == 4 and y.shape[:2] == x.shape[:2]:  # heads split off
        ctx.flat[y] = ins[0]


def _transpose(ctx, node, ins, outs):
    ctx.em.op("Transpose", ins, outs, perm=list(node.attrs["perm"]))


def _concat(ctx, node, ins, outs):
    ctx.em.op("Concat", ins, outs, axis=node.attrs["axis"])


def _slice(ctx, node, ins, outs):
    a = node.attrs
    end = min(int(a["end"]), INT64_MAX)
    ctx.em.op("Slice", [ins[0], ctx.em.i64(a["start"]), ctx.em.i64(end), ctx.em.i64(a["axis"])],
              outs)


def _split(ctx, node, ins, outs):
    ctx.em.op("Split", [ins[0], ctx.em.i64(*node.attrs["sizes"])], outs, axis=node.attrs["axis"])


def _unsqueeze(ctx, node, ins, outs):
    ctx.em.op("Unsqueeze", [ins[0], ctx.em.i64(*node.attrs["axes"])], outs)


def _squeeze(ctx, node, ins, outs):
    ctx.em.op("Squeeze", [ins[0], ctx.em.i64(*node.attrs["axes"])], outs)


def _expand(ctx, node, ins, outs):
    # Expand broadcasts, so a 1 in the target keeps the input dim (our 0 / -1).
    shape = [1 if s in (0, -1) else s for s in node.attrs["shape"]]
    ctx.em.op("Expand", [ins[0], ctx.em.i64(*shape)], outs)


def _last_token(ctx, node, ins, outs):
    ctx.em.op("Slice", [ins[0], ctx.em.i64(-1), ctx.em.i64(INT64_MAX), ctx.em.i64(1)], outs)


def _rotary(ctx, node, ins, outs):
    if ctx.contrib_ops and rotary_embedding(ctx, node, ins, outs):
        return
    em = ctx.em
    x, pos, cos, sin = ins
    rd = node.attrs["rotary_dim"]
    head_dim = node.inputs[0].shape[3]
    key = ("rotary", pos, cos, sin, node.attrs["interleaved"])
    if key not in em.cache:  # cos/sin rows for these positions, shared by q, k and every layer
        c = em.op("Unsqueeze", [em.op("Gather", [cos, pos], axis=0), em.i64(2)])  # [b,s,1,rd/2]
        s = em.op("Unsqueeze", [em.op("Gather", [sin, pos], axis=0), em.i64(2)])
        if node.attrs["interleaved"]:
            c, s = em.op("Unsqueeze", [c, em.i64(4)]), em.op("Unsqueeze", [s, em.i64(4)])
        em.cache[key] = (c, s)
    c, s = em.cache[key]
    rot = x if rd == head_dim else em.op("Slice", [x, em.i64(0), em.i64(rd), em.i64(3)])
    if node.attrs["interleaved"]:
        pairs = em.op("Reshape", [rot, em.i64(0, 0, 0, rd // 2, 2)])
        x1 = em.op("Slice", [pairs, em.i64(0), em.i64(1), em.i64(4)])
        x2 = em.op("Slice", [pairs, em.i64(1), em.i64(2), em.i64(4)])
        o1 = em.op("Sub", [em.op("Mul", [x1, c]), em.op("Mul", [x2, s])])
        o2 = em.op("Add", [em.op("Mul", [x2, c]), em.op("Mul", [x1, s])])
        merged = em.op("Concat", [o1, o2], axis=4)
        rotated_shape = em.i64(0, 0, 0, rd)
        if rd == head_dim:
            em.op("Reshape", [merged, rotated_shape], outs)
            return
        rotated = em.op("Reshape", [merged, rotated_shape])
    else:
        half = rd // 2
        x1 = em.op("Slice", [rot, em.i64(0), em.i64(half), em.i64(3)])
        x2 = em.op("Slice", [rot, em.i64(half), em.i64(rd), em.i64(3)])
        o1 = em.op("Sub", [em.op("Mul", [x1, c]), em.op("Mul", [x2, s])])
        o2 = em.op("Add", [em.op("Mul", [x2, c]), em.op("Mul", [x1, s])])
        if rd == head_dim:
            em.op("Concat", [o1, o2], outs, axis=3)
            return
        rotated = em.op("Concat", [o1, o2], axis=3)
    rest = em.op("Slice", [x, em.i64(rd), em.i64(INT64_MAX), em.i64(3)])
    em.op("Concat", [rotated, rest], outs, axis=3)


def _attention_mask(ctx, node, ins, seq_source: str, total_source: str) -> str:
    """Additive mask [b|1, 1, 1, s, T] (0 or a large negative), shared by every layer."""
    em = ctx.em
    kind = node.attrs["mask"]
    mask, prefix = ins[5], ins[7]
    dtype = np.dtype(np.float32)  # scores are masked and softmaxed in fp32 (see _attention)
    key = ("attn-mask", kind, mask, prefix)
    if key in em.cache:
        return em.cache[key]
    zero, one = em.i64(0), em.i64(1)
    s = em.op("Gather", [em.op("Shape", [seq_source]), one], axis=0)
    t = em.op("Gather", [em.op("Shape", [total_source]), em.i64(2)], axis=0)
    kpos = em.op("Range", [zero, t, one])  # [T]
    allowed = None
    if kind in ("causal", "prefix"):
        qpos = em.op("Range", [em.op("Sub", [t, s]), t, one])  # [S]: buffer index of each query
        allowed = em.op("LessOrEqual", [em.op("Unsqueeze", [kpos, em.i64(0)]),
                                        em.op("Unsqueeze", [qpos, em.i64(1)])])  # [S, T]
        if kind == "prefix":
            visible = em.op("Less", [em.op("Reshape", [kpos, em.i64(1, 1, -1)]),
                                     em.op("Reshape", [prefix, em.i64(-1, 1, 1)])])  # [b, 1, T]
            allowed = em.op("Or", [allowed, visible])
    if mask is not None:
        valid = em.op("Unsqueeze", [em.op("Cast", [mask], to=ONNX_DTYPE[DType.BOOL]), em.i64(1)])
        allowed = valid if allowed is None else em.op("And", [allowed, valid])  # [b, S|1, T]
    if allowed is None:
        em.cache[key] = None
        return None
    # A finite "minus infinity": fully masked rows (left padding) stay finite.
    additive = em.op("Where", [allowed, em.const(np.array(0.0, dtype)),
                               em.const(np.array(np.finfo(dtype).min, dtype))])
    if mask is not None or kind == "prefix":  # [b, S|1, T] -> [b, 1, 1, S|1, T]
        additive = em.op("Unsqueeze", [additive, em.i64(1, 2)])
    em.cache[key] = additive  # an [S, T] causal mask broadcasts as it is
    return additive


def _attention(ctx, node, ins, outs):
    if ctx.contrib_ops and (gqa_attention(ctx, node, ins, outs) or
                            mha_attention(ctx, node, ins, outs)):
        return
    em = ctx.em
    a = node.attrs
    H, KV = a["num_heads"], a["kv_heads"]
    G = H // KV
    q, k, v, past_k, past_v = ins[:5]
    d = node.inputs[0].shape[3]
    kt = em.op("Transpose", [k], perm=[0, 2, 1, 3])
    vt = em.op("Transpose", [v], perm=[0, 2, 1, 3])
    if past_k is not None:
        em.op("Concat", [past_k, kt], [outs[1]], axis=2)
        em.op("Concat", [past_v, vt], [outs[2]], axis=2)
    else:
        em.op("Identity", [kt], [outs[1]])
        em.op("Identity", [vt], [outs[2]])
    K, V = outs[1], outs[2]
    # Grouped heads without copying K/V: q as [b, KV, G, s, d] against K as [b, KV, 1, d, T].
    qs = em.op("Mul", [q, typed_scalar(ctx, a["scale"], node.inputs[0].dtype)])
    qg = em.op("Transpose", [em.op("Reshape", [qs, em.i64(0, 0, KV, G, d)])], perm=[0, 2, 3, 1, 4])
    kT = em.op("Unsqueeze", [em.op("Transpose", [K], perm=[0, 1, 3, 2]), em.i64(2)])
    scores = em.op("MatMul", [qg, kT])  # [b, KV, G, s, T]
    low = node.inputs[0].dtype is not DType.F32
    if low:  # reduced precision: mask and softmax in fp32 (large negatives, exp range)
        scores = em.op("Cast", [scores], to=ONNX_DTYPE[DType.F32])
    additive = _attention_mask(ctx, node, ins, q, K)
    if additive is not None:
        scores = em.op("Add", [scores, additive])
    bias = ins[6]
    if bias is not None and low:
        bias = em.op("Cast", [bias], to=ONNX_DTYPE[DType.F32])
    if bias is not None and node.inputs[6].shape[1] == 1:
        # A bias shared by all heads (a traced padding mask): [b|1, 1, s|1, T] broadcasts.
        scores = em.op("Add", [scores, em.op("Unsqueeze", [bias, em.i64(2)])])
    elif bias is not None:
        # [b|1, H, s, T] -> [b|1, KV, G, s, T]; built from Shape since s and T are dynamic.
        shp = em.op("Shape", [bias])
        target = em.op("Concat", [em.op("Slice", [shp, em.i64(0), em.i64(1), em.i64(0)]),
                                  em.i64(KV, G),
                                  em.op("Slice", [shp, em.i64(2), em.i64(4), em.i64(0)])], axis=0)
        scores = em.op("Add", [scores, em.op("Reshape", [bias, target])])
    probs = em.op("Softmax", [scores], axis=-1)
    if low:
        probs = em.op("Cast", [probs], to=ONNX_DTYPE[node.inputs[0].dtype])
    ctx_ = em.op("MatMul", [probs, em.op("Unsqueeze", [V, em.i64(2)])])  # [b, KV, G, s, d]
    ctx_t = em.op("Transpose", [ctx_], perm=[0, 3, 1, 2, 4])
    em.op("Reshape", [ctx_t, em.i64(0, 0, -1)], [outs[0]])


lower_onnx.update({
    Op.CONSTANT: _constant,
    Op.RSQRT: _rsqrt,
    Op.SILU: _silu,
    Op.GELU: _gelu,
    Op.CAST: _cast,
    Op.LINEAR: _linear,
    Op.EMBEDDING: _embedding,
    Op.GATHER: _gather,
    Op.LAYER_NORM: _layer_norm,
    Op.RMS_NORM: _rms_norm,
    Op.ADD_NORM: _add_norm,
    Op.SOFTMAX: _softmax,
    Op.REDUCE_SUM: _reduce("ReduceSum", axes_as_input=True),
    Op.REDUCE_MEAN: _reduce("ReduceMean", axes_as_input=False),
    Op.REDUCE_MAX: _reduce("ReduceMax", axes_as_input=False),
    Op.RESHAPE: _reshape,
    Op.TRANSPOSE: _transpose,
    Op.CONCAT: _concat,
    Op.SLICE: _slice,
    Op.SPLIT: _split,
    Op.UNSQUEEZE: _unsqueeze,
    Op.SQUEEZE: _squeeze,
    Op.EXPAND: _expand,
    Op.ROTARY: _rotary,
    Op.ATTENTION: _attention,
    Op.LAST_TOKEN: _last_token,
    Op.QLINEAR: lower_qlinear,
})


# Runtime shapes (DIM / RANGE / FULL, from the torch.export frontend) and CUMSUM.
def _dim(ctx, node, ins, outs):
    ctx.em.op("Gather", [ctx.em.op("Shape", ins), ctx.em.const(np.array(node.attrs["axis"],
                                                                        np.int64))], outs, axis=0)


def _range(ctx, node, ins, outs):
    ctx.em.op("Range", [ins[0], ins[1], ctx.em.const(np.array(1, np.int64))], outs)


def _full(ctx, node, ins, outs):
    from onnx import numpy_helper

    em = ctx.em
    dtype = DType(node.attrs["dtype"])
    shape = em.op("Concat", [em.op("Unsqueeze", [i, em.i64(0)]) for i in ins], axis=0) if ins \
        else em.const(np.zeros((0,), np.int64))
    value = np.array([node.attrs["value"]], dtype=dtype.numpy)
    em.op("ConstantOfShape", [shape], outs, value=numpy_helper.from_array(value))


def _cumsum(ctx, node, ins, outs):
    ctx.em.op("CumSum", [ins[0], ctx.em.const(np.array(node.attrs["axis"], np.int64))], outs)


lower_onnx.update({Op.DIM: _dim, Op.RANGE: _range, Op.FULL: _full, Op.CUMSUM: _cumsum})


# Padding removal: the mask's shape and its real tokens' row indices, computed once per mask.
def _token_rows(ctx, mask) -> tuple[str, str, str]:
    """(rows [tokens], mask shape [2], batch * seq [1]) for `mask`."""
    em = ctx.em
    key = ("token-rows", mask)
    if key not in em.cache:
        flat = em.op("Reshape", [mask, em.i64(-1)])
        rows = em.op("Squeeze", [em.op("NonZero", [flat]), em.i64(0)])
        shape = em.op("Shape", [mask])
        em.cache[key] = (rows, shape, em.op("ReduceProd", [shape], keepdims=1))
    return em.cache[key]


def _flat_rows(ctx, x, inner):
    return ctx.em.op("Reshape", [x, ctx.em.i64(-1, *inner)])


def _pack_tokens(ctx, node, ins, outs):
    inner = [int(d) for d in node.inputs[0].shape[2:]]
    ctx.em.op("Gather", [_flat_rows(ctx, ins[0], inner), _token_rows(ctx, ins[1])[0]], outs,
              axis=0)


def _unpack_tokens(ctx, node, ins, outs):
    from onnx import numpy_helper

    em = ctx.em
    inner = [int(d) for d in node.inputs[0].shape[1:]]
    rows, mask_shape, total = _token_rows(ctx, ins[1])
    zeros = em.op("ConstantOfShape", [em.op("Concat", [total, em.i64(*inner)], axis=0)],
                  value=numpy_helper.from_array(
                      np.zeros(1, dtype=node.inputs[0].dtype.numpy)))
    flat = em.op("ScatterND", [zeros, em.op("Unsqueeze", [rows, em.i64(-1)]), ins[0]])
    em.op("Reshape", [flat, em.op("Concat", [mask_shape, em.i64(*inner)], axis=0)], outs)


lower_onnx.update({Op.PACK_TOKENS: _pack_tokens, Op.UNPACK_TOKENS: _unpack_tokens})


def lowering_for(op: Op) -> LowerFn:
    if op not in lower_onnx:
        raise LoweringError(f"op {op.value!r} has no ONNX lowering")
    return lower_onnx[op]
