"""The op registry: one closed enum of ops, and for each op its schema, shape/dtype inference and
PyTorch reference implementation (used by the interpreter). Target lowerings live in flagc/lower.

Every fact about an op sits in its `OpDef`, registered with `_define`. Inference functions get the
input types (None for an absent optional input) and the attrs, and return the output types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Sequence

from flagc.errors import IRError
from flagc.ir.symbolic import Dim, dim_div, dim_mul
from flagc.ir.types import DType, TensorType

__all__ = ["Op", "OpDef", "REGISTRY", "opdef", "ELEMENTWISE", "UNARY", "BINARY", "broadcast_shapes"]


class Op(Enum):
    # sources
    CONSTANT = "constant"
    # elementwise binary (numpy broadcasting)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MAXIMUM = "maximum"
    EQUAL = "equal"
    LESS = "less"
    WHERE = "where"
    # elementwise unary
    NEG = "neg"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    RECIPROCAL = "reciprocal"
    EXP = "exp"
    LOG = "log"
    ABS = "abs"
    COS = "cos"
    SIN = "sin"
    TANH = "tanh"
    ERF = "erf"
    SIGMOID = "sigmoid"
    RELU = "relu"
    SILU = "silu"
    GELU = "gelu"
    CAST = "cast"
    # linear algebra and lookups
    MATMUL = "matmul"
    LINEAR = "linear"
    EMBEDDING = "embedding"
    GATHER = "gather"
    # normalization and reductions
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    ADD_NORM = "add_norm"
    SOFTMAX = "softmax"
    REDUCE_SUM = "reduce_sum"
    REDUCE_MEAN = "reduce_mean"
    REDUCE_MAX = "reduce_max"
    # shape
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    CONCAT = "concat"
    SLICE = "slice"
    SPLIT = "split"
    UNSQUEEZE = "unsqueeze"
    SQUEEZE = "squeeze"
    EXPAND = "expand"
    # transformer blocks
    ROTARY = "rotary"
    ATTENTION = "attention"
    LAST_TOKEN = "last_token"
    QLINEAR = "qlinear"  # quantized-weight linear (flagc/ir/ops_quant.py)
    # runtime shapes (symbolic dims as values; the torch.export frontend needs them for masks)
    DIM = "dim"
    RANGE = "range"
    FULL = "full"
    CUMSUM = "cumsum"
    PACK_TOKENS = "pack_tokens"
    UNPACK_TOKENS = "unpack_tokens"


UNARY = frozenset({
    Op.NEG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.EXP, Op.LOG, Op.ABS, Op.COS, Op.SIN, Op.TANH,
    Op.ERF, Op.SIGMOID, Op.RELU, Op.SILU, Op.GELU,
})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.EQUAL, Op.LESS})
ELEMENTWISE = UNARY | BINARY | {Op.WHERE, Op.CAST}
COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.MAXIMUM, Op.EQUAL})

Infer = Callable[[list[Optional[TensorType]], dict[str, Any]], list[TensorType]]
Reference = Callable[..., Any]


@dataclass
class OpDef:
    """Schema and semantics of one op.

    `inputs` names each operand; a trailing '?' marks it optional, a trailing '*' variadic (last only).
    `attrs` maps attribute names to defaults; `REQUIRED` marks attributes without default.
    """

    op: Op
    inputs: tuple[str, ...]
    attrs: dict[str, Any]
    infer: Infer
    reference: Reference
    num_outputs: Callable[[dict[str, Any]], int] = field(default=lambda attrs: 1)
    doc: str = ""

    def check_arity(self, n: int) -> Optional[str]:
        required = [i for i in self.inputs if not i.endswith(("?", "*"))]
        variadic = self.inputs and self.inputs[-1].endswith("*")
        if n < len(required):
            return f"expects at least {len(required)} inputs {self.inputs}, got {n}"
        if not variadic and n > len(self.inputs):
            return f"expects at most {len(self.inputs)} inputs {self.inputs}, got {n}"
        return None

    def full_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """attrs with defaults filled in; IRError for unknown or missing ones."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{self.op.value}: unknown attribute(s) {sorted(unknown)}; "
                          f"known: {sorted(self.attrs)}")
        out = {}
        for k, default in self.attrs.items():
            if k in attrs:
                out[k] = attrs[k]
            elif default is REQUIRED:
                raise IRError(f"{self.op.value}: missing required attribute {k!r}")
            else:
                out[k] = default
        return out


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()
REGISTRY: dict[Op, OpDef] = {}


def _define(op: Op, inputs: Sequence[str], attrs: dict[str, Any], infer: Infer,
            reference: Reference, num_outputs=None, doc: str = "") -> None:
    REGISTRY[op] = OpDef(op, tuple(inputs), dict(attrs), infer, reference,
                         num_outputs or (lambda attrs: 1), doc)


def opdef(op: Op) -> OpDef:
    return REGISTRY[op]


# ----------------------------------------------------------------------------------------------
# shape helpers


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        non_one = [d for d in dims if d != 1]
        if not non_one:
            out.append(1)
            continue
        first = non_one[0]
        for d in non_one[1:]:
            if d != first:
                raise IRError(f"shapes {[list(map(str, s)) for s in shapes]} do not broadcast "
                              f"(dim {i}: {first} vs {d})")
        out.append(first)
    return tuple(out)


def _norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise IRError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _same(types, attrs):
    return [types[0]]


def _binary(types, attrs):
    a, b = types
    if a.dtype != b.dtype:
        raise IRError(f"dtype mismatch {a.dtype.value} vs {b.dtype.value}; insert a cast")
    return [TensorType(a.dtype, broadcast_shapes(a.shape, b.shape))]


def _compare(types, attrs):
    t = _binary(types, attrs)[0]
    return [t.with_dtype(DType.BOOL)]


def _where(types, attrs):
    c, a, b = types
    if c.dtype is not DType.BOOL:
        raise IRError(f"where: condition must be bool, got {c.dtype.value}")
    if a.dtype != b.dtype:
        raise IRError(f"where: branch dtypes differ: {a.dtype.value} vs {b.dtype.value}")
    return [TensorType(a.dtype, broadcast_shapes(c.shape, a.shape, b.shape))]


def _require_float(t: TensorType, op: str):
    if not t.dtype.is_float:
        raise IRError(f"{op}: expects a floating-point input, got {t.dtype.value}")


# ----------------------------------------------------------------------------------------------
# reference implementations need torch; imported lazily so the registry loads fast.

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _t_constant(*, value):
    import numpy as np

    return torch.from_numpy(np.array(value, copy=True))


_define(Op.CONSTANT, [], {"value": REQUIRED},
        lambda types, attrs: [TensorType(DType.from_numpy(attrs["value"].dtype),
                                         tuple(int(d) for d in attrs["value"].shape))],
        _t_constant, doc="A small inline tensor (large tensors are weights).")

_BINARY_REF = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div,
    Op.POW: torch.pow, Op.MAXIMUM: torch.maximum, Op.EQUAL: torch.eq, Op.LESS: torch.lt,
}
for _op, _fn in _BINARY_REF.items():
    _define(_op, ["a", "b"], {},
            _compare if _op in (Op.EQUAL, Op.LESS) else _binary,
            (lambda fn: lambda a, b: fn(a, b))(_fn))

_define(Op.WHERE, ["cond", "a", "b"], {}, _where, lambda c, a, b: torch.where(c, a, b))

_UNARY_REF = {
    Op.NEG: torch.neg, Op.SQRT: torch.sqrt, Op.RSQRT: torch.rsqrt,
    Op.RECIPROCAL: torch.reciprocal, Op.EXP: torch.exp, Op.LOG: torch.log, Op.ABS: torch.abs,
    Op.COS: torch.cos, Op.SIN: torch.sin, Op.TANH: torch.tanh, Op.ERF: torch.erf,
    Op.SIGMOID: torch.sigmoid, Op.RELU: torch.relu, Op.SILU: F.silu,
}
for _op, _fn in _UNARY_REF.items():
    _define(_op, ["x"], {}, _same, (lambda fn: lambda x: fn(x))(_fn))


def _gelu_infer(types, attrs):
    if attrs["approximate"] not in ("none", "tanh"):
        raise IRError(f"gelu: approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")
    return [types[0]]


_define(Op.GELU, ["x"], {"approximate": "none"}, _gelu_infer,
        lambda x, *, approximate: F.gelu(x, approximate=approximate))


def _cast_infer(types, attrs):
    return [types[0].with_dtype(DType(attrs["dtype"]))]


_define(Op.CAST, ["x"], {"dtype": REQUIRED}, _cast_infer,
        lambda x, *, dtype: x.to(DType(dtype).torch))


def _matmul_infer(types, attrs):
    a, b = types
    if a.dtype != b.dtype:
        raise IRError(f"matmul: dtype mismatch {a.dtype.value} vs {b.dtype.value}")
    if a.rank < 2 or b.rank < 2:
        raise IRError(f"matmul: operands must have rank >= 2, got {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise IRError(f"matmul: inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType(a.dtype, batch + (a.shape[-2], b.shape[-1]))]


_define(Op.MATMUL, ["a", "b"], {}, _matmul_infer, lambda a, b: torch.matmul(a, b))


def _linear_infer(types, attrs):
    x, w, b = types
    _require_float(x, "linear")
    if w.rank != 2:
        raise IRError(f"linear: weight must be [out, in], got {w}")
    if x.shape[-1] != w.shape[1]:
        raise IRError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]} "
                      f"(weight {w})")
    if b is not None and (b.rank != 1 or b.shape[0] != w.shape[0]):
        raise IRError(f"linear: bias must be [{w.shape[0]}], got {b}")
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


_define(Op.LINEAR, ["x", "weight", "bias?"], {}, _linear_infer,
        lambda x, w, b=None: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)),
        doc="y = x @ weight.T + bias; weight is [out_features, in_features] as in checkpoints.")


def _embedding_infer(types, attrs):
    ids, table = types
    if ids.dtype not in (DType.I64, DType.I32):
        raise IRError(f"embedding: ids must be integers, got {ids.dtype.value}")
    if table.rank != 2:
        raise IRError(f"embedding: table must be [vocab, dim], got {table}")
    return [TensorType(table.dtype, ids.shape + (table.shape[1],))]


_define(Op.EMBEDDING, ["ids", "table"], {}, _embedding_infer,
        lambda ids, table: F.embedding(ids.long(), table))


def _gather_infer(types, attrs):
    x, idx = types
    axis = _norm_axis(attrs["axis"], x.rank, "gather")
    return [TensorType(x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _t_gather(x, idx, *, axis):
    axis = axis % x.dim()
    flat = torch.index_select(x, axis, idx.reshape(-1).long())
    return flat.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


_define(Op.GATHER, ["x", "indices"], {"axis": 0}, _gather_infer, _t_gather)


def _norm_infer(op):
    def infer(types, attrs):
        x, w = types[0], types[1]
        _require_float(x, op)
        if w.rank != 1 or w.shape[0] != x.shape[-1]:
            raise IRError(f"{op}: weight must be [{x.shape[-1]}], got {w}")
        if len(types) > 2 and types[2] is not None and types[2].shape != w.shape:
            raise IRError(f"{op}: bias must be [{x.shape[-1]}], got {types[2]}")
        return [x]
    return infer


def _t_layer_norm(x, w, b=None, *, eps):
    y = F.layer_norm(x.float(), (x.shape[-1],), w.float(), None if b is None else b.float(), eps)
    return y.to(x.dtype)


def _t_rms_norm(x, w, *, eps, offset):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((w.float() + offset) * y).to(x.dtype)


_define(Op.LAYER_NORM, ["x", "weight", "bias?"], {"eps": 1e-5}, _norm_infer("layer_norm"),
        _t_layer_norm)
_define(Op.RMS_NORM, ["x", "weight"], {"eps": 1e-6, "offset": 0.0}, _norm_infer("rms_norm"),
        _t_rms_norm, doc="x / rms(x) * (weight + offset), computed in fp32.")


NORM_KINDS = ("rms", "layer")


def _add_norm_infer(types, attrs):
    x, residual, w, b = types
    if attrs["kind"] not in NORM_KINDS:
        raise IRError(f"add_norm: kind must be one of {NORM_KINDS}, got {attrs['kind']!r}")
    if attrs["kind"] == "rms" and b is not None:
        raise IRError("add_norm: an rms norm takes no bias")
    total = _binary([x, residual], attrs)[0]
    if total.shape != x.shape:
        raise IRError(f"add_norm: residual {residual} must not broadcast x {x}")
    _norm_infer("add_norm")([total, w, b], attrs)
    return [total, total]


def _t_add_norm(x, residual, w, b=None, *, kind, eps):
    total = x + residual
    if kind == "rms":
        return _t_rms_norm(total, w, eps=eps, offset=0.0), total
    return _t_layer_norm(total, w, b, eps=eps), total


_define(Op.ADD_NORM, ["x", "residual", "weight", "bias?"], {"kind": REQUIRED, "eps": REQUIRED},
        _add_norm_infer, _t_add_norm, num_outputs=lambda attrs: 2,
        doc="Residual add then norm: outputs (norm(x + residual), x + residual). Lowered to "
            "onnxruntime's SkipSimplifiedLayerNormalization / SkipLayerNormalization.")


def _softmax_infer(types, attrs):
    _norm_axis(attrs["axis"], types[0].rank, "softmax")
    _require_float(types[0], "softmax")
    return [types[0]]


_define(Op.SOFTMAX, ["x"], {"axis": -1}, _softmax_infer,
        lambda x, *, axis: torch.softmax(x.float(), dim=axis).to(x.dtype))


def _reduce_infer(op):
    def infer(types, attrs):
        x = types[0]
        axes = sorted(_norm_axis(a, x.rank, op) for a in attrs["axes"])
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [x.with_shape(shape)]
    return infer


_define(Op.REDUCE_SUM, ["x"], {"axes": REQUIRED, "keepdims": True}, _reduce_infer("reduce_sum"),
        lambda x, *, axes, keepdims: torch.sum(x, dim=tuple(axes), keepdim=keepdims))
_define(Op.REDUCE_MEAN, ["x"], {"axes": REQUIRED, "keepdims": True}, _reduce_infer("reduce_mean"),
        lambda x, *, axes, keepdims: torch.mean(x, dim=tuple(axes), keepdim=keepdims))
_define(Op.REDUCE_MAX, ["x"], {"axes": REQUIRED, "keepdims": True}, _reduce_infer("reduce_max"),
        lambda x, *, axes, keepdims: torch.amax(x, dim=tuple(axes), keepdim=keepdims))


def reshape_dims(in_shape: tuple[Dim, ...], spec: Sequence[int]) -> tuple[Dim, ...]:
    """ONNX Reshape semantics: 0 copies the input dim at that position, -1 is inferred."""
    out: list[Dim | None] = []
    for i, s in enumerate(spec):
        if s == 0:
            if i >= len(in_shape):
                raise IRError(f"reshape: 0 at position {i} but input has rank {len(in_shape)}")
            out.append(in_shape[i])
        elif s == -1:
            out.append(None)
        elif s > 0:
            out.append(int(s))
        else:
            raise IRError(f"reshape: bad dim {s} in {list(spec)}")
    if out.count(None) > 1:
        raise IRError(f"reshape: more than one -1 in {list(spec)}")
    if None in out:
        total: Dim = 1
        for d in in_shape:
            total = dim_mul(total, d)
        known: Dim = 1
        for d in out:
            if d is not None:
                known = dim_mul(known, d)
        rest = dim_div(total, known)
        if rest is None:
            raise IRError(f"reshape: cannot infer -1 in {list(spec)} from input "
                          f"[{', '.join(map(str, in_shape))}]")
        out[out.index(None)] = rest
    return tuple(out)  # type: ignore[arg-type]


def _reshape_infer(types, attrs):
    x = types[0]
    shape = reshape_dims(x.shape, attrs["shape"])
    total_in: Dim = 1
    for d in x.shape:
        total_in = dim_mul(total_in, d)
    total_out: Dim = 1
    for d in shape:
        total_out = dim_mul(total_out, d)
    if total_in != total_out:
        raise IRError(f"bad reshape: [{', '.join(map(str, x.shape))}] -> "
                      f"[{', '.join(map(str, shape))}] changes the element count")
    return [x.with_shape(shape)]


def _t_reshape(x, *, shape):
    spec = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(spec)


_define(Op.RESHAPE, ["x"], {"shape": REQUIRED}, _reshape_infer, _t_reshape,
        doc="ONNX-style shape spec: 0 copies the input dim, -1 is inferred.")


def _transpose_infer(types, attrs):
    x = types[0]
    perm = list(attrs["perm"])
    if sorted(perm) != list(range(x.rank)):
        raise IRError(f"transpose: perm {perm} is not a permutation of rank {x.rank}")
    return [x.with_shape(tuple(x.shape[p] for p in perm))]


_define(Op.TRANSPOSE, ["x"], {"perm": REQUIRED}, _transpose_infer,
        lambda x, *, perm: x.permute(*perm).contiguous())


def _concat_infer(types, attrs):
    first = types[0]
    axis = _norm_axis(attrs["axis"], first.rank, "concat")
    total: Dim = 0
    for t in types:
        if t.rank != first.rank or t.dtype != first.dtype:
            raise IRError(f"concat: inputs differ in rank/dtype: {first} vs {t}")
        for i, (a, b) in enumerate(zip(first.shape, t.shape)):
            if i != axis and a != b:
                raise IRError(f"concat: dim {i} differs: {first} vs {t}")
        total = total + t.shape[axis]
    return [first.with_shape(first.shape[:axis] + (total,) + first.shape[axis + 1:])]


_define(Op.CONCAT, ["xs*"], {"axis": REQUIRED}, _concat_infer,
        lambda *xs, axis: torch.cat(xs, dim=axis))


def _slice_len(d: Dim, start: int, end: int, op: str) -> Dim:
    # Python slice semantics on one axis, with negative indices counted from the end; symbolic
    # dims support the common forms x[a:], x[:b], x[-k:], x[a:-b].
    big = 2**62
    if isinstance(d, int):
        return len(range(*slice(start, end).indices(d)))
    if start >= 0 and end >= big:
        return d - start
    if start < 0 and end >= big:
        return -start
    if start >= 0 and 0 <= end < big:
        return end - start
    if start >= 0 and end < 0:
        return d + end - start
    raise IRError(f"{op}: cannot slice symbolic dim {d} with [{start}:{end}]")


def _slice_infer(types, attrs):
    x = types[0]
    axis = _norm_axis(attrs["axis"], x.rank, "slice")
    n = _slice_len(x.shape[axis], attrs["start"], attrs["end"], "slice")
    return [x.with_shape(x.shape[:axis] + (n,) + x.shape[axis + 1:])]


def _t_slice(x, *, axis, start, end):
    return x.narrow(axis, *_slice_bounds(x.shape[axis], start, end))


def _slice_bounds(n: int, start: int, end: int) -> tuple[int, int]:
    s, e, _ = slice(start, end).indices(n)
    return s, max(e - s, 0)


_define(Op.SLICE, ["x"], {"axis": REQUIRED, "start": 0, "end": 2**63 - 1}, _slice_infer, _t_slice)


def _split_infer(types, attrs):
    x = types[0]
    axis = _norm_axis(attrs["axis"], x.rank, "split")
    sizes = list(attrs["sizes"])
    d = x.shape[axis]
    if isinstance(d, int) and sum(sizes) != d:
        raise IRError(f"split: sizes {sizes} do not add up to dim {axis} = {d} of {x}")
    return [x.with_shape(x.shape[:axis] + (s,) + x.shape[axis + 1:]) for s in sizes]


_define(Op.SPLIT, ["x"], {"axis": REQUIRED, "sizes": REQUIRED}, _split_infer,
        lambda x, *, axis, sizes: tuple(torch.split(x, list(sizes), dim=axis)),
        num_outputs=lambda attrs: len(attrs["sizes"]))


def _unsqueeze_infer(types, attrs):
    x = types[0]
    shape = list(x.shape)
    for a in sorted(attrs["axes"]):
        shape.insert(_norm_axis(a, len(shape) + 1, "unsqueeze"), 1)
    return [x.with_shape(tuple(shape))]


def _t_unsqueeze(x, *, axes):
    for a in sorted(axes):
        x = x.unsqueeze(a)
    return x


_define(Op.UNSQUEEZE, ["x"], {"axes": REQUIRED}, _unsqueeze_infer, _t_unsqueeze)


def _squeeze_infer(types, attrs):
    x = types[0]
    axes = {_norm_axis(a, x.rank, "squeeze") for a in attrs["axes"]}
    for a in axes:
        if x.shape[a] != 1:
            raise IRError(f"squeeze: dim {a} of {x} is not 1")
    return [x.with_shape(tuple(d for i, d in enumerate(x.shape) if i not in axes))]


_define(Op.SQUEEZE, ["x"], {"axes": REQUIRED}, _squeeze_infer,
        lambda x, *, axes: x.squeeze(tuple(axes)))


def _expand_infer(types, attrs):
    x = types[0]
    target = reshape_dims(x.shape, [0 if s == -1 else s for s in attrs["shape"]]) \
        if len(attrs["shape"]) == x.rank else tuple(attrs["shape"])
    return [x.with_shape(broadcast_shapes(x.shape, target))]


_define(Op.EXPAND, ["x"], {"shape": REQUIRED}, _expand_infer,
        lambda x, *, shape: x.expand(*[-1 if s in (0, -1) else s for s in shape]).contiguous(),
        doc="Broadcast to shape; 0 or -1 keeps the input dim.")


def _rotary_infer(types, attrs):
    x, pos, cos, sin = types
    _require_float(x, "rotary")
    if x.rank != 4:
        raise IRError(f"rotary: x must be [batch, seq, heads, head_dim], got {x}")
    if pos.shape != x.shape[:2]:
        raise IRError(f"rotary: position_ids {pos} must be [batch, seq] of x {x}")
    rd = attrs["rotary_dim"]
    if rd % 2 or not isinstance(x.shape[3], int) or rd > x.shape[3]:
        raise IRError(f"rotary: rotary_dim {rd} must be even and <= head_dim of {x}")
    if cos.rank != 2 or cos.shape[1] != rd // 2 or sin.shape != cos.shape:
        raise IRError(f"rotary: cos/sin tables must be [positions, {rd // 2}], got {cos}, {sin}")
    return [x]


def _t_rotary(x, pos, cos, sin, *, rotary_dim, interleaved):
    c = cos[pos.long()].unsqueeze(2).to(torch.float32)  # [b, s, 1, rd/2]
    s = sin[pos.long()].unsqueeze(2).to(torch.float32)
    xf = x.float()
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


_define(Op.ROTARY, ["x", "position_ids", "cos", "sin"],
        {"rotary_dim": REQUIRED, "interleaved": False}, _rotary_infer, _t_rotary,
        doc="Rotary position embedding on x [b, s, h, d]; cos/sin tables [positions, rd/2] are "
            "gathered by position_ids. interleaved=False is the rotate-half (LLaMA/NeoX) form.")


MASK_KINDS = ("causal", "bidirectional", "prefix")


def _attention_infer(types, attrs):
    q, k, v, past_k, past_v, mask, bias, prefix = types
    H, KV = attrs["num_heads"], attrs["kv_heads"]
    if attrs["mask"] not in MASK_KINDS:
        raise IRError(f"attention: mask must be one of {MASK_KINDS}, got {attrs['mask']!r}")
    for name, t, heads in (("q", q, H), ("k", k, KV), ("v", v, KV)):
        if t.rank != 4 or t.shape[2] != heads:
            raise IRError(f"attention: {name} must be [batch, seq, {heads}, head_dim], got {t}")
    if H % KV:
        raise IRError(f"attention: num_heads {H} is not a multiple of kv_heads {KV}")
    if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[:2] != k.shape[:2]:
        raise IRError(f"attention: q/k/v batch and seq differ: {q}, {k}, {v}")
    b, s, d = q.shape[0], q.shape[1], k.shape[3]
    if (past_k is None) != (past_v is None):
        raise IRError("attention: past_key and past_value must be given together")
    total: Dim = s
    if past_k is not None:
        if past_k.rank != 4 or past_k.shape[1] != KV or past_k.shape[3] != d:
            raise IRError(f"attention: past_key must be [batch, {KV}, past, {d}], got {past_k}")
        total = past_k.shape[2] + s
    if attrs["mask"] == "prefix" and prefix is None:
        raise IRError("attention: mask='prefix' needs the prefix_len input")
    out = TensorType(q.dtype, (b, s, H * v.shape[3]))
    present = TensorType(k.dtype, (b, KV, total, d))
    return [out, present, present.with_shape((b, KV, total, v.shape[3]))]


def _t_attention(q, k, v, past_k=None, past_v=None, mask=None, bias=None, prefix=None, *,
                 num_heads, kv_heads, scale, mask_kind="causal", **_):
    b, s = q.shape[0], q.shape[1]
    qh = q.transpose(1, 2).float()  # [b, H, s, d]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    if past_k is not None:
        kh, vh = torch.cat((past_k, kh), dim=2), torch.cat((past_v, vh), dim=2)
    present_k, present_v = kh, vh
    T = kh.shape[2]
    rep = num_heads // kv_heads
    kf = kh.float().repeat_interleave(rep, dim=1)
    vf = vh.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(qh, kf.transpose(-1, -2)) * scale  # [b, H, s, T]
    allowed = torch.ones((b, 1, s, T), dtype=torch.bool)
    qpos = torch.arange(T - s, T).view(1, 1, s, 1)
    kpos = torch.arange(T).view(1, 1, 1, T)
    if mask_kind in ("causal", "prefix"):
        causal = kpos <= qpos
        if mask_kind == "prefix":
            causal = causal | (kpos < prefix.view(b, 1, 1, 1))
        allowed = allowed & causal
    if mask is not None:
        allowed = allowed & (mask.view(b, 1, 1, T) != 0)
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vf)  # [b, H, s, d]
    out = out.transpose(1, 2).reshape(b, s, -1).to(q.dtype)
    return out, present_k, present_v


def _attention_ref(*tensors, **attrs):
    # The attribute `mask` (the kind) shares its name with the mask tensor input; rename it.
    attrs = dict(attrs)
    attrs["mask_kind"] = attrs.pop("mask")
    return _t_attention(*tensors, **attrs)


_define(Op.ATTENTION,
        ["q", "k", "v", "past_key?", "past_value?", "attention_mask?", "bias?", "prefix_len?"],
        {"num_heads": REQUIRED, "kv_heads": REQUIRED, "scale": REQUIRED, "mask": "causal"},
        _attention_infer, _attention_ref, num_outputs=lambda attrs: 3,
        doc="Multi-head / grouped-query attention. q [b, s, H, d], k/v [b, s, KV, d], past "
            "[b, KV, past, d]; attention_mask [b, past+s] marks valid keys (left padding); "
            "mask kind causal / bidirectional / prefix (keys < prefix_len[b] always visible); "
            "bias is additive [b|1, H, s, past+s]. Outputs [b, s, H*d] and presents "
            "[b, KV, past+s, d].")


def _last_token_infer(types, attrs):
    x = types[0]
    if x.rank != 3:
        raise IRError(f"last_token: x must be [batch, seq, hidden], got {x}")
    return [x.with_shape((x.shape[0], 1, x.shape[2]))]


_define(Op.LAST_TOKEN, ["x"], {}, _last_token_infer, lambda x: x[:, -1:, :],
        doc="The last position of each sequence (batches are left-padded, so it is seq-1).")


# ----------------------------------------------------------------------------------------------
# Runtime shapes. Exported torch code builds masks and positions from sizes (arange(seq),
# ones(batch, past)); these ops carry such sizes as i64 scalars. Output dims that only a runtime
# value determines are declared in attrs as dim text ("past+seq") so inference stays symbolic.


def _dim_infer(types, attrs):
    _norm_axis(attrs["axis"], types[0].rank, "dim")
    return [TensorType(DType.I64, ())]


_define(Op.DIM, ["x"], {"axis": REQUIRED}, _dim_infer,
        lambda x, *, axis: torch.tensor(x.shape[axis], dtype=torch.int64),
        doc="x.shape[axis] as an i64 scalar.")


def _declared_dim(d, op: str) -> Dim:
    from flagc.ir.symbolic import parse_dim

    if isinstance(d, int):
        return d
    try:
        return parse_dim(str(d))
    except ValueError as exc:
        raise IRError(f"{op}: bad declared dim {d!r}: {exc}") from None


def _scalar_inputs(types, op: str):
    for t in types:
        if t is not None and (t.rank != 0 or t.dtype is not DType.I64):
            raise IRError(f"{op}: size inputs must be i64 scalars, got {t}")


def _range_infer(types, attrs):
    _scalar_inputs(types, "range")
    return [TensorType(DType.I64, (_declared_dim(attrs["length"], "range"),))]


_define(Op.RANGE, ["start", "end"], {"length": REQUIRED}, _range_infer,
        lambda start, end, *, length: torch.arange(int(start), int(end), dtype=torch.int64),
        doc="arange(start, end) of i64 scalars; `length` declares end-start as dim text.")


def _full_infer(types, attrs):
    _scalar_inputs(types, "full")
    shape = tuple(_declared_dim(d, "full") for d in attrs["shape"])
    if len(shape) != len(types):
        raise IRError(f"full: {len(types)} size inputs for declared shape {attrs['shape']}")
    return [TensorType(DType(attrs["dtype"]), shape)]


_define(Op.FULL, ["sizes*"], {"value": REQUIRED, "dtype": REQUIRED, "shape": REQUIRED},
        _full_infer,
        lambda *sizes, value, dtype, shape: torch.full([int(s) for s in sizes], value,
                                                       dtype=DType(dtype).torch),
        doc="A tensor filled with `value`, one i64 scalar size input per dim; `shape` declares "
            "the dims as text.")
_define(Op.CUMSUM, ["x"], {"axis": REQUIRED}, _same,
        lambda x, *, axis: torch.cumsum(x, dim=axis).to(x.dtype))


# Padding removal (passes/padding.py): the real tokens of a padded [batch, seq, ...] tensor as
# one [tokens, ...] tensor, row-major, and back (padding positions come back as zeros).
TOKENS = "tokens"


def _pack_infer(types, attrs):
    from flagc.ir.symbolic import sym

    x, mask = types
    if mask.rank != 2 or x.rank < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise IRError(f"pack_tokens: x {x} must start with the mask's dims {mask}")
    return [TensorType(x.dtype, (sym(TOKENS), *x.shape[2:]))]


def _unpack_infer(types, attrs):
    y, mask = types
    if mask.rank != 2 or y.rank < 1:
        raise IRError(f"unpack_tokens: y {y} and mask {mask} must be [tokens, ...] and [b, s]")
    return [TensorType(y.dtype, (*mask.shape, *y.shape[1:]))]


def _unpack_ref(y, mask):
    keep = mask.reshape(-1) != 0
    out = torch.zeros((keep.numel(), *y.shape[1:]), dtype=y.dtype)
    out[keep] = y
    return out.reshape(*mask.shape, *y.shape[1:])


_define(Op.PACK_TOKENS, ["x", "mask"], {}, _pack_infer,
        lambda x, mask: x.reshape(-1, *x.shape[2:])[mask.reshape(-1) != 0],
        doc="The rows of x [b, s, ...] where mask [b, s] is non-zero, as [tokens, ...].")
_define(Op.UNPACK_TOKENS, ["y", "mask"], {}, _unpack_infer, _unpack_ref,
        doc="pack_tokens undone: y [tokens, ...] scattered to [b, s, ...], zeros elsewhere.")


from flagc.ir import ops_quant  # noqa: E402,F401  (registers QLINEAR)
