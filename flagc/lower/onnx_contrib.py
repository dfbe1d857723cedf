"""onnxruntime's com.microsoft fused kernels for IR transformer ops (targets with contrib_ops).

Each function returns False when the node needs something the kernel lacks; the caller then
falls back to the standard-ONNX lowering in onnx_ops.py.
"""

from __future__ import annotations

import numpy as np

from flagc.ir.graph import Node
from flagc.ir.types import DType
from flagc.lower.onnx_emit import ONNX_DTYPE

__all__ = ["gqa_attention", "mha_attention", "rotary_embedding"]

MS = "com.microsoft"
NEG_INF_F32 = float(np.finfo(np.float32).min)


def _gqa_supported(node: Node, ins) -> bool:
    a = node.attrs
    q, k, v = node.inputs[:3]
    return (a["mask"] in ("causal", "bidirectional") and ins[6] is None and ins[7] is None
            and q.shape[3] == k.shape[3] == v.shape[3]
            and q.dtype in (DType.F32, DType.F16, DType.BF16)
            and not (a["mask"] == "bidirectional" and ins[3] is not None))


def _lengths(ctx, node, ins):
    """(seqlens_k [b] int32, total_sequence_length scalar int32), shared by all layers.

    flagc's cache is uniform across the batch (left padding), so every row's total length is
    past + seq; padded keys are hidden by the attention bias instead."""
    em = ctx.em
    q, past, mask = ins[0], ins[3], ins[5]
    key = ("gqa-lengths", past is None, mask)
    if key in em.cache:
        return em.cache[key]
    q_shape = em.op("Shape", [q])
    seq = em.op("Slice", [q_shape, em.i64(1), em.i64(2), em.i64(0)])
    if mask is not None:
        total = em.op("Slice", [em.op("Shape", [mask]), em.i64(1), em.i64(2), em.i64(0)])
    elif past is not None:
        past_len = em.op("Slice", [em.op("Shape", [past]), em.i64(2), em.i64(3), em.i64(0)])
        total = em.op("Add", [past_len, seq])
    else:
        total = seq
    batch = em.op("Slice", [q_shape, em.i64(0), em.i64(1), em.i64(0)])
    total32 = em.op("Cast", [total], to=ONNX_DTYPE[DType.I32])
    seqlens = em.op("Expand", [em.op("Sub", [total32, em.const(np.array([1], np.int32))]), batch])
    scalar = em.op("Squeeze", [total32, em.i64(0)])
    em.cache[key] = (seqlens, scalar, seq)
    return em.cache[key]


def _padding_bias(ctx, node, ins, seq, dtype):
    """[b, 1, s, T] additive bias hiding padded keys (0 where attention_mask is 1)."""
    em = ctx.em
    mask = ins[5]
    key = ("gqa-bias", mask, dtype)
    if key in em.cache:
        return em.cache[key]
    valid = em.op("Cast", [mask], to=ONNX_DTYPE[DType.BOOL])
    neg = float(np.finfo(np.float16).min) if dtype is DType.F16 else NEG_INF_F32
    bias = em.op("Where", [valid, em.const(np.array(0.0, np.float32)),
                           em.const(np.array(neg, np.float32))])
    bias = em.op("Unsqueeze", [bias, em.i64(1, 2)])  # [b, 1, 1, T]
    # The kernel wants the query axis spelled out: add zeros of shape [1, 1, s, 1].
    zeros_shape = em.op("Concat", [em.i64(1, 1), seq, em.i64(1)], axis=0)
    zeros = em.op("ConstantOfShape", [zeros_shape],
                  value=_tensor(np.array([0.0], np.float32)))
    bias = em.op("Add", [bias, zeros])  # [b, 1, s, T]
    if dtype is not DType.F32:
        bias = em.op("Cast", [bias], to=ONNX_DTYPE[dtype])
    em.cache[key] = bias
    return bias


def _tensor(arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr)


def gqa_attention(ctx, node, ins, outs) -> bool:
    if not _gqa_supported(node, ins):
        return False
    em, a = ctx.em, node.attrs
    q, k, v, past_k, past_v, mask = ins[:6]
    q3, k3, v3 = (ctx.heads_flat(node.inputs[i], ins[i]) for i in range(3))
    seqlens, total, seq = _lengths(ctx, node, ins)
    bias = _padding_bias(ctx, node, ins, seq, node.inputs[0].dtype) if mask is not None else None
    inputs = [q3, k3, v3, past_k, past_v, seqlens, total, None, None, None, bias]
    em.op("GroupQueryAttention", inputs, [outs[0], outs[1], outs[2]], domain=MS,
          num_heads=int(a["num_heads"]), kv_num_heads=int(a["kv_heads"]),
          scale=float(a["scale"]), causal=int(a["mask"] == "causal"))
    return True


def rotary_embedding(ctx, node, ins, outs) -> bool:
    x = node.inputs[0]
    b, s, h, d = x.shape
    if not isinstance(h, int) or not isinstance(d, int) or \
            x.dtype not in (DType.F32, DType.F16, DType.BF16):
        return False
    em = ctx.em
    x3 = ctx.heads_flat(x, ins[0])
    y3 = em.op("RotaryEmbedding", [x3, ins[1], ins[2], ins[3]], domain=MS,
               interleaved=int(bool(node.attrs["interleaved"])), num_heads=h,
               rotary_embedding_dim=int(node.attrs["rotary_dim"]))
    em.op("Reshape", [y3, em.i64(0, 0, h, d)], outs)
    ctx.flat[node.outputs[0]] = y3
    return True


def _mha_supported(node: Node, ins) -> bool:
    a = node.attrs
    q, k, v = node.inputs[:3]
    bias = node.inputs[6] if len(node.inputs) > 6 else None
    return (a["mask"] == "bidirectional" and ins[3] is None and ins[5] is None
            and ins[7] is None and a["num_heads"] == a["kv_heads"]
            and q.dtype in (DType.F32, DType.F16)
            and (bias is None or (bias.rank == 4 and bias.shape[1] == 1)))


def _packed_projection(ctx, node: Node):
    """(x, weight [in, 3*hidden], bias) when q/k/v are reshaped thirds of one biased linear
    (the merged q/k/v projection) that nothing else reads; else None."""
    from flagc.ir.ops import Op

    parts = []
    for i in range(3):
        r = node.inputs[i].producer
        if r is None or r.op is not Op.RESHAPE or r.inputs[0].producer is None:
            return None
        parts.append(r.inputs[0])
    split = parts[0].producer
    if split.op is not Op.SPLIT or [p.producer for p in parts] != [split] * 3 or \
            list(split.outputs) != parts or len(set(split.attrs["sizes"])) != 1:
        return None
    lin = split.inputs[0].producer
    if lin is None or lin.op is not Op.LINEAR or len(lin.inputs) < 3 or lin.inputs[2] is None \
            or lin.inputs[1].kind != "weight" or lin.inputs[2].kind != "weight":
        return None
    if node.inputs[0].dtype is not DType.F32:  # the CPU kernel is fp32 only
        return None
    return (ctx.name(lin.inputs[0]), ctx.transposed_weight(lin.inputs[1]),
            ctx.name(lin.inputs[2]))


def mha_attention(ctx, node, ins, outs) -> bool:
    """Encoder self-attention (no cache, all heads distinct) on MultiHeadAttention; a padding
    bias shared by the heads is passed as attention_bias."""
    if not _mha_supported(node, ins):
        return False
    em, a = ctx.em, node.attrs
    packed = _packed_projection(ctx, node)
    q3, k3, v3 = (ctx.heads_flat(node.inputs[i], ins[i]) for i in range(3))
    bias = ins[6]
    if bias is not None and node.inputs[6].shape[2] == 1:
        key = ("mha-bias", bias)
        if key not in em.cache:  # the kernel wants [b|1, 1, s, T]: spell out the query axis
            rows = packed[0] if packed is not None else q3  # (not the split: it may go unread)
            seq = em.op("Slice", [em.op("Shape", [rows]), em.i64(1), em.i64(2), em.i64(0)])
            zeros = em.op("ConstantOfShape", [em.op("Concat", [em.i64(1, 1), seq, em.i64(1)],
                                                    axis=0)],
                          value=_tensor(np.array([0.0], node.inputs[6].dtype.numpy)))
            em.cache[key] = em.op("Add", [bias, zeros])
        bias = em.cache[key]
    if packed is not None:
        # q, k, v are the thirds of one linear: the Attention kernel runs that GEMM itself and
        # writes heads-first directly (no split, no q/k/v transposes); the linear goes unread.
        x, weight_t, qkv_bias = packed
        em.op("Attention", [x, weight_t, qkv_bias, None, None, bias], [outs[0]], domain=MS,
              num_heads=int(a["num_heads"]), scale=float(a["scale"]))
    else:
        em.op("MultiHeadAttention", [q3, k3, v3, None, None, bias], [outs[0]], domain=MS,
              num_heads=int(a["num_heads"]), scale=float(a["scale"]))
    # The presents of an encoder attention are its keys/values, heads first (rarely read).
    for i in (1, 2):
        if ctx.is_used(node.outputs[i]):
            em.op("Transpose", [ins[i]], [outs[i]], perm=[0, 2, 1, 3])
    return True
