"""The one aten -> IR mapping table used by the torch.export frontend.

`ATEN_TABLE` maps an aten overload packet (or a Python builtin applied to SymInts) to a
converter `fn(cx, *args, **kwargs)` that emits IR through the Converter `cx` and returns the
result: an IR Value, a SymVal (a symbolic int), a constant, or a tuple of those.

Converters emit primitive IR (matmul, add, softmax, ...) so the fusion passes see one form;
`layer_norm` is a single aten op and maps to LAYER_NORM directly. Bool logic is lowered through
i64 because onnxruntime has no bool Where/Mul kernels.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import numpy as np
import torch

from flagc.errors import IRError
from flagc.frontends.torch_export import SymVal, UnsupportedOpError, as_dim
from flagc.ir.graph import Value
from flagc.ir.ops import Op
from flagc.ir.symbolic import dim_div, dim_str
from flagc.ir.types import DType

__all__ = ["ATEN_TABLE", "lookup"]

aten = torch.ops.aten
ATEN_TABLE: dict[Any, Callable] = {}
INT64_MAX = 2**63 - 1


def lookup(target) -> Optional[Callable]:
    if target in ATEN_TABLE:
        return ATEN_TABLE[target]
    packet = getattr(target, "overloadpacket", None)
    return ATEN_TABLE.get(packet)


def _reg(*targets):
    def deco(fn):
        for t in targets:
            ATEN_TABLE[t] = fn
        return fn
    return deco


def _axis(d: int, rank: int) -> int:
    return d % rank if rank else 0


# ---- no-ops -------------------------------------------------------------------------------------
@_reg(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
      aten._assert_async)
def _ignore(cx, *args, **kwargs):
    return None


@_reg(aten.contiguous, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy)
def _identity(cx, x, *args, **kwargs):
    return x


@_reg(aten.dropout)
def _dropout(cx, x, p, train):
    if train and p > 0:
        raise UnsupportedOpError("dropout in training mode: export the module in eval()")
    return x


# ---- symbolic ints ------------------------------------------------------------------------------
@_reg(aten.sym_size)
def _sym_size(cx, x, d):
    dim = x.shape[_axis(d, x.type.rank)]
    if isinstance(dim, int):
        return dim
    return SymVal(dim, lambda: cx.emit(Op.DIM, [x], axis=_axis(d, x.type.rank)))


def _sym_arith(pyop, irop, dimop):
    def fn(cx, a, b):
        if not isinstance(a, SymVal) and not isinstance(b, SymVal):
            return pyop(a, b)
        dim = dimop(as_dim(a), as_dim(b))
        if dim is None:
            raise UnsupportedOpError(f"symbolic {pyop.__name__} of {a} and {b} is not an exact "
                                     "polynomial")
        if isinstance(dim, int):
            return dim
        return SymVal(dim, lambda: cx.emit(irop, [cx.sym_value(a), cx.sym_value(b)]))
    return fn


ATEN_TABLE[operator.add] = _sym_arith(operator.add, Op.ADD, lambda a, b: a + b)
ATEN_TABLE[operator.sub] = _sym_arith(operator.sub, Op.SUB, lambda a, b: a - b)
ATEN_TABLE[operator.mul] = _sym_arith(operator.mul, Op.MUL, lambda a, b: a * b)
ATEN_TABLE[operator.floordiv] = _sym_arith(operator.floordiv, Op.DIV, dim_div)


@_reg(operator.getitem)
def _getitem(cx, seq, i):
    return seq[i]


# ---- dtype --------------------------------------------------------------------------------------
@_reg(aten.to, aten._to_copy, aten.type_as)
def _to(cx, x, *args, **kwargs):
    return cx.cast(cx.value(x), cx.out_dtype())


# ---- elementwise --------------------------------------------------------------------------------
def _operands(cx, *xs, dtype: Optional[DType] = None):
    dtype = dtype or cx.out_dtype()
    return [cx.value(x, dtype) for x in xs]


def _binary(op: Op):
    def fn(cx, a, b, alpha=1, rounding_mode=None):
        x, y = _operands(cx, a, b)
        if alpha != 1:
            y = cx.emit(Op.MUL, [y, cx.value(alpha, y.dtype)])
        if rounding_mode is not None:
            raise UnsupportedOpError(f"division with rounding_mode={rounding_mode!r}")
        return cx.emit(op, [x, y])
    return fn


ATEN_TABLE[aten.add] = _binary(Op.ADD)
ATEN_TABLE[aten.sub] = _binary(Op.SUB)
ATEN_TABLE[aten.mul] = _binary(Op.MUL)
ATEN_TABLE[aten.div] = _binary(Op.DIV)
ATEN_TABLE[aten.maximum] = _binary(Op.MAXIMUM)


@_reg(aten.rsub)
def _rsub(cx, a, b, alpha=1):
    return _binary(Op.SUB)(cx, b, a, alpha)


@_reg(aten.pow)
def _pow(cx, a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool) and float(b) == 2.0:
        x = cx.value(a, cx.out_dtype())
        return cx.emit(Op.MUL, [x, x])  # exact, and what fusion passes look for
    x, y = _operands(cx, a, b)
    return cx.emit(Op.POW, [x, y])


@_reg(aten.minimum)
def _minimum(cx, a, b):
    x, y = _operands(cx, a, b)
    return cx.emit(Op.NEG, [cx.emit(Op.MAXIMUM, [cx.emit(Op.NEG, [x]), cx.emit(Op.NEG, [y])])])


@_reg(aten.clamp, aten.clamp_min, aten.clamp_max)
def _clamp(cx, x, min=None, max=None):
    v = cx.value(x, cx.out_dtype())
    if min is not None:
        v = cx.emit(Op.MAXIMUM, [v, cx.value(min, v.dtype)])
    if max is not None:
        v = _minimum(cx, v, cx.value(max, v.dtype))
    return v


def _unary(op: Op):
    def fn(cx, x):
        return cx.emit(op, [cx.value(x, cx.out_dtype())])
    return fn


for _packet, _op in {
    aten.neg: Op.NEG, aten.sqrt: Op.SQRT, aten.rsqrt: Op.RSQRT, aten.reciprocal: Op.RECIPROCAL,
    aten.exp: Op.EXP, aten.log: Op.LOG, aten.abs: Op.ABS, aten.cos: Op.COS, aten.sin: Op.SIN,
    aten.tanh: Op.TANH, aten.erf: Op.ERF, aten.sigmoid: Op.SIGMOID, aten.relu: Op.RELU,
    aten.silu: Op.SILU,
}.items():
    ATEN_TABLE[_packet] = _unary(_op)


@_reg(aten.gelu)
def _gelu(cx, x, approximate="none"):
    return cx.emit(Op.GELU, [cx.value(x)], approximate=approximate)


# ---- comparisons and bool logic (through i64: onnxruntime lacks bool Where / Mul) -------------
def _compare_operands(cx, a, b):
    dtypes = [x.dtype for x in (a, b) if isinstance(x, Value)]
    if any(isinstance(x, SymVal) for x in (a, b)):
        dtypes.append(DType.I64)
    dtype = _promote(dtypes, [x for x in (a, b) if not isinstance(x, (Value, SymVal))])
    return cx.value(a, dtype), cx.value(b, dtype)


def _promote(dtypes, scalars) -> DType:
    if any(d.is_float for d in dtypes):
        return next(d for d in dtypes if d.is_float)
    if any(isinstance(s, float) for s in scalars):
        return DType.F32
    if dtypes and all(d is DType.BOOL for d in dtypes) and all(isinstance(s, bool)
                                                                 for s in scalars):
        return DType.I64  # compare bools as integers
    ints = [d for d in dtypes if d is not DType.BOOL]
    return ints[0] if ints else DType.I64


def _not(cx, v: Value) -> Value:
    return cx.emit(Op.EQUAL, [cx.cast(v, DType.I64), cx.value(0)])


@_reg(aten.eq)
def _eq(cx, a, b):
    return cx.emit(Op.EQUAL, list(_compare_operands(cx, a, b)))


@_reg(aten.ne)
def _ne(cx, a, b):
    return _not(cx, _eq(cx, a, b))


@_reg(aten.lt)
def _lt(cx, a, b):
    return cx.emit(Op.LESS, list(_compare_operands(cx, a, b)))


@_reg(aten.gt)
def _gt(cx, a, b):
    return _lt(cx, b, a)


@_reg(aten.le)
def _le(cx, a, b):
    return _not(cx, _lt(cx, b, a))


@_reg(aten.ge)
def _ge(cx, a, b):
    return _not(cx, _lt(cx, a, b))


@_reg(aten.logical_not, aten.bitwise_not)
def _logical_not(cx, x):
    return _not(cx, cx.value(x))


def _logic(combine: Op):
    def fn(cx, a, b):
        x, y = cx.value(a, DType.I64), cx.value(b, DType.I64)
        return cx.cast(cx.emit(combine, [x, y]), DType.BOOL)  # nonzero -> True
    return fn


ATEN_TABLE[aten.__and__] = ATEN_TABLE[aten.logical_and] = ATEN_TABLE[aten.bitwise_and] = \
    _logic(Op.MUL)
ATEN_TABLE[aten.__or__] = ATEN_TABLE[aten.logical_or] = ATEN_TABLE[aten.bitwise_or] = \
    _logic(Op.ADD)


@_reg(aten.where)
def _where(cx, cond, a=None, b=None):
    if a is None:
        raise UnsupportedOpError("where(cond) with one argument (nonzero) has a data-dependent "
                                 "shape")
    dtype = cx.out_dtype()
    work = DType.I64 if dtype is DType.BOOL else dtype
    out = cx.emit(Op.WHERE, [cx.value(cond, DType.BOOL), cx.value(a, work), cx.value(b, work)])
    return cx.cast(out, dtype)


@_reg(aten.masked_fill)
def _masked_fill(cx, x, mask, value):
    return _where(cx, mask, value, x)


# ---- linear algebra, lookups, norms -------------------------------------------------------------
@_reg(aten.linear)
def _linear(cx, x, w, b=None):
    return cx.emit(Op.LINEAR, [cx.value(x), cx.value(w), None if b is None else cx.value(b)])


@_reg(aten.matmul, aten.mm, aten.bmm)
def _matmul(cx, a, b):
    return cx.emit(Op.MATMUL, [cx.value(a), cx.value(b)])


@_reg(aten.addmm)
def _addmm(cx, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise UnsupportedOpError(f"addmm with beta={beta}, alpha={alpha}")
    return cx.emit(Op.ADD, [cx.emit(Op.MATMUL, [cx.value(a), cx.value(b)]), cx.value(bias)])


@_reg(aten.embedding)
def _embedding(cx, weight, ids, *args):
    return cx.emit(Op.EMBEDDING, [cx.value(ids), cx.value(weight)])


@_reg(aten.layer_norm)
def _layer_norm(cx, x, normalized_shape, weight=None, bias=None, eps=1e-5, *args):
    x = cx.value(x)
    if len(normalized_shape) != 1:
        raise UnsupportedOpError(f"layer_norm over {list(normalized_shape)} (only the last dim)")
    if weight is None:
        weight = cx.constant(np.ones(normalized_shape, np.float32))
    return cx.emit(Op.LAYER_NORM, [x, cx.value(weight), None if bias is None else cx.value(bias)],
                   eps=float(eps))


@_reg(aten.softmax, aten._softmax)
def _softmax(cx, x, dim, *args, **kwargs):
    v = cx.value(x, cx.out_dtype())
    return cx.emit(Op.SOFTMAX, [v], axis=_axis(dim, v.type.rank))


def _reduce(op: Op):
    def fn(cx, x, dims=None, keepdim=False, dtype=None):
        v = cx.value(x, cx.out_dtype())
        rank = v.type.rank
        axes = list(range(rank)) if not dims else [_axis(d, rank) for d in dims]
        return cx.emit(op, [v], axes=axes, keepdims=bool(keepdim))
    return fn


ATEN_TABLE[aten.mean] = _reduce(Op.REDUCE_MEAN)
ATEN_TABLE[aten.sum] = _reduce(Op.REDUCE_SUM)
ATEN_TABLE[aten.amax] = _reduce(Op.REDUCE_MAX)


@_reg(aten.cumsum)
def _cumsum(cx, x, dim, dtype=None):
    v = cx.value(x, cx.out_dtype())
    return cx.emit(Op.CUMSUM, [v], axis=_axis(dim, v.type.rank))


@_reg(aten.scaled_dot_product_attention)
def _sdpa(cx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """softmax(q k^T * scale + mask) v as primitives; the attention fusion pass raises them."""
    if is_causal or enable_gqa:
        raise UnsupportedOpError("scaled_dot_product_attention with is_causal/enable_gqa: pass "
                                 "an explicit mask and repeated K/V")
    q, k, v = cx.value(q), cx.value(k), cx.value(v)
    rank = k.type.rank
    if scale is None:
        scale = 1.0 / math.sqrt(int(q.shape[-1]))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = cx.emit(Op.MATMUL, [q, cx.emit(Op.TRANSPOSE, [k], perm=perm)])
    if scale != 1.0:
        scores = cx.emit(Op.MUL, [scores, cx.value(float(scale), scores.dtype)])
    if attn_mask is not None:
        m = cx.value(attn_mask)
        if m.dtype is DType.BOOL:
            m = cx.emit(Op.WHERE, [m, cx.value(0.0, scores.dtype),
                                   cx.value(float(np.finfo(np.float32).min), scores.dtype)])
        scores = cx.emit(Op.ADD, [scores, cx.cast(m, scores.dtype)])
    probs = cx.emit(Op.SOFTMAX, [scores], axis=-1)
    return cx.emit(Op.MATMUL, [probs, v])


# ---- shapes -------------------------------------------------------------------------------------
@_reg(aten.reshape, aten.view, aten._unsafe_view)
def _reshape(cx, x, shape):
    v = cx.value(x)
    dims = [None if (isinstance(s, int) and s == -1) else as_dim(s) for s in shape]
    if tuple(dims) == tuple(v.shape):
        return v
    spec, unknown = [], []
    for i, d in enumerate(dims):
        if d is None:
            spec.append(-1)
            unknown.append(i)
        elif isinstance(d, int):
            spec.append(d)
        elif i < v.type.rank and v.shape[i] == d:
            spec.append(0)
        else:
            spec.append(-1)
            unknown.append(i)
    if len(unknown) > 1:
        raise UnsupportedOpError(
            f"reshape {v.type} -> [{', '.join('-1' if d is None else dim_str(d) for d in dims)}] "
            "needs more than one runtime size")
    return cx.emit(Op.RESHAPE, [v], shape=spec)


@_reg(aten.transpose)
def _transpose(cx, x, a, b):
    v = cx.value(x)
    rank = v.type.rank
    perm = list(range(rank))
    a, b = _axis(a, rank), _axis(b, rank)
    perm[a], perm[b] = perm[b], perm[a]
    return cx.emit(Op.TRANSPOSE, [v], perm=perm)


@_reg(aten.permute)
def _permute(cx, x, dims):
    v = cx.value(x)
    return cx.emit(Op.TRANSPOSE, [v], perm=[_axis(d, v.type.rank) for d in dims])


@_reg(aten.t)
def _t(cx, x):
    return _transpose(cx, x, 0, 1)


@_reg(aten.unsqueeze)
def _unsqueeze(cx, x, d):
    v = cx.value(x)
    return cx.emit(Op.UNSQUEEZE, [v], axes=[d % (v.type.rank + 1)])


@_reg(aten.squeeze)
def _squeeze(cx, x, dims=None):
    v = cx.value(x)
    if dims is None:
        axes = [i for i, d in enumerate(v.shape) if d == 1]
    else:
        dims = [dims] if isinstance(dims, int) else dims
        axes = [_axis(d, v.type.rank) for d in dims if v.shape[_axis(d, v.type.rank)] == 1]
    return cx.emit(Op.SQUEEZE, [v], axes=axes) if axes else v


@_reg(aten.expand)
def _expand(cx, x, sizes, implicit=False):
    v = cx.value(x)
    lead = len(sizes) - v.type.rank
    if lead:
        v = cx.emit(Op.UNSQUEEZE, [v], axes=list(range(lead)))
    spec, dynamic = [], False
    for i, s in enumerate(sizes):
        d = -1 if isinstance(s, int) and s == -1 else as_dim(s)
        if d == -1 or d == v.shape[i]:
            spec.append(0)
        elif isinstance(d, int):
            spec.append(d)
        else:
            spec.append(0)
            dynamic = True  # a 1 broadcast to a runtime size: done with FULL below
    if any(s != 0 for s in spec):
        v = cx.emit(Op.EXPAND, [v], shape=spec)
    if dynamic:
        target = [v.shape[i] if (isinstance(s, int) and s == -1) else s
                  for i, s in enumerate(sizes)]
        v = broadcast_to(cx, v, target)
    return v


def broadcast_to(cx, v: Value, sizes) -> Value:
    """v broadcast to runtime sizes (ints / SymVals / dims of v): WHERE(all-true, v, v)."""
    full = _full(cx, sizes, True, DType.BOOL)
    work = DType.I64 if v.dtype is DType.BOOL else v.dtype
    x = cx.cast(v, work)
    return cx.cast(cx.emit(Op.WHERE, [full, x, x]), v.dtype)


@_reg(aten.slice)
def _slice(cx, x, dim=0, start=None, end=None, step=1):
    v = cx.value(x)
    axis = _axis(dim, v.type.rank)
    if step != 1:
        raise UnsupportedOpError(f"slice with step {step}")
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    size = v.shape[axis]
    try:
        start, end = _static_index(start, size), _static_index(end, size)
    except UnsupportedOpError:
        # Runtime bounds (HF's position_ids[:, past:past+seq]): gather arange(start, end);
        # like torch, bounds are taken as in range (no clamping).
        length = as_dim(end) - as_dim(start)
        idx = cx.emit(Op.RANGE, [cx.sym_value(start), cx.sym_value(end)],
                      length=length if isinstance(length, int) else dim_str(length))
        return cx.emit(Op.GATHER, [v, idx], axis=axis)
    if start == 0 and end >= INT64_MAX:
        return v
    return cx.emit(Op.SLICE, [v], axis=axis, start=start, end=end)


def _static_index(i, size) -> int:
    """A slice bound as an int; a symbolic bound must be `size - k` (becomes -k)."""
    if not isinstance(i, SymVal):
        return int(i)
    rest = size - i.dim if not isinstance(size, int) or isinstance(i.dim, int) else None
    if isinstance(rest, int):
        return -rest if rest else INT64_MAX
    if i.dim == size:
        return INT64_MAX
    raise UnsupportedOpError(f"slice bound {dim_str(i.dim)} on a dim of size {dim_str(size)}")


@_reg(aten.select)
def _select(cx, x, dim, index):
    v = cx.value(x)
    axis = _axis(dim, v.type.rank)
    if isinstance(index, SymVal) or index < 0:
        raise UnsupportedOpError(f"select with index {index}")
    return cx.emit(Op.GATHER, [v, cx.value(int(index))], axis=axis)


@_reg(aten.index_select)
def _index_select(cx, x, dim, index):
    v = cx.value(x)
    return cx.emit(Op.GATHER, [v, cx.value(index)], axis=_axis(dim, v.type.rank))


@_reg(aten.index)
def _index(cx, x, indices):
    """x[..., idx, ...] with one index tensor (more need a gather_nd the IR does not have)."""
    v = cx.value(x)
    used = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if len(used) != 1:
        raise UnsupportedOpError(f"advanced indexing with {len(used)} index tensors")
    axis, idx = used[0]
    return cx.emit(Op.GATHER, [v, cx.value(idx, DType.I64)], axis=axis)


@_reg(aten.cat)
def _cat(cx, tensors, dim=0):
    dtype = cx.out_dtype()
    vals = [cx.value(t, dtype) for t in tensors]
    vals = [t for t in vals if not (t.type.rank == 1 and t.shape[0] == 0)]  # torch drops []
    if len(vals) == 1:
        return vals[0]
    return cx.emit(Op.CONCAT, vals, axis=_axis(dim, vals[0].type.rank))


@_reg(aten.split_with_sizes, aten.split)
def _split(cx, x, sizes, dim=0):
    v = cx.value(x)
    axis = _axis(dim, v.type.rank)
    if isinstance(sizes, int):
        total = v.shape[axis]
        if not isinstance(total, int):
            raise UnsupportedOpError(f"split of runtime-sized dim {dim_str(total)}")
        sizes = [sizes] * (total // sizes) + ([total % sizes] if total % sizes else [])
    outs = cx.emit(Op.SPLIT, [v], axis=axis, sizes=[int(s) for s in sizes])
    return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)


@_reg(aten.chunk)
def _chunk(cx, x, chunks, dim=0):
    v = cx.value(x)
    total = v.shape[_axis(dim, v.type.rank)]
    if not isinstance(total, int):
        raise UnsupportedOpError(f"chunk of runtime-sized dim {dim_str(total)}")
    each = -(-total // chunks)
    return _split(cx, v, each, dim)


# ---- creation with runtime sizes (constant sizes are folded before reaching the table) -------
def _full(cx, sizes, value, dtype: DType) -> Value:
    dims = [as_dim(s) if not isinstance(s, int) else s for s in sizes]
    inputs = [cx.sym_value(s) for s in sizes]
    return cx.emit(Op.FULL, inputs, value=value, dtype=dtype.value,
                   shape=[d if isinstance(d, int) else dim_str(d) for d in dims])


def _fill_value(value, dtype: DType):
    if dtype is DType.BOOL:
        return bool(value)
    return float(value) if dtype.is_float else int(value)


@_reg(aten.full)
def _full_op(cx, size, fill_value, **kwargs):
    dtype = cx.out_dtype()
    return _full(cx, size, _fill_value(fill_value, dtype), dtype)


@_reg(aten.zeros, aten.ones)
def _zeros_ones(cx, size, **kwargs):
    dtype = cx.out_dtype()
    one = str(cx.node.target).startswith("aten.ones")
    return _full(cx, size, _fill_value(1 if one else 0, dtype), dtype)


@_reg(aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty)
def _new(cx, x, size, fill_value=0, **kwargs):
    dtype = cx.out_dtype()
    value = 1 if str(cx.node.target).startswith("aten.new_ones") else fill_value
    return _full(cx, size, _fill_value(value, dtype), dtype)


@_reg(aten.zeros_like, aten.ones_like, aten.full_like)
def _like(cx, x, fill_value=None, **kwargs):
    v = cx.value(x)
    name = str(cx.node.target)
    value = 1 if name.startswith("aten.ones") else (0 if fill_value is None else fill_value)
    dtype = cx.out_dtype()
    sizes = [d if isinstance(d, int) else SymVal(d, lambda i=i: cx.emit(Op.DIM, [v], axis=i))
             for i, d in enumerate(v.shape)]
    return _full(cx, sizes, _fill_value(value, dtype), dtype)


@_reg(aten.arange)
def _arange(cx, *args, **kwargs):
    nums = [a for a in args if isinstance(a, (int, float, SymVal))]
    if len(nums) == 1:
        start, end, step = 0, nums[0], 1
    else:
        start, end = nums[0], nums[1]
        step = nums[2] if len(nums) > 2 else 1
    if step != 1:
        raise UnsupportedOpError(f"arange with runtime size and step {step}")
    length = as_dim(end) - as_dim(start)
    out = cx.emit(Op.RANGE, [cx.sym_value(start), cx.sym_value(end)],
                  length=length if isinstance(length, int) else dim_str(length))
    return cx.cast(out, cx.out_dtype())


# ---- guards -------------------------------------------------------------------------------------
def _check_table() -> None:
    for key in ATEN_TABLE:
        if key is None:
            raise IRError("ATEN_TABLE has a None key (an aten op missing in this torch build)")


_check_table()
