"""QLINEAR -> onnxruntime's quantized CPU kernels (com.microsoft; onnxruntime targets only).

- weight blocks (int4, and 8-bit blocks) -> MatMulNBits; its B/scales/zero_points layout is the
  IR's, so the initializers are written as they are. act_quant 'block' is accuracy_level 4: int8
  compute (AVX512-VNNI / AMX) with the activations quantized per block. Float offsets per block
  (an exact checkpoint grid, passes/quantize.py quant_exact_grid), which MatMulNBits cannot
  take at speed, add a second term: the block sums of x [.., n_blocks] times the offsets
  [n_blocks, N] (a small float MatMul).
- per-channel int8 with dynamic activations ('tensor') -> DynamicQuantizeMatMul, B as s8 [K, N]
  (codes - 128, transposed at write time).
- per-channel int8 weight-only ('none') -> Cast * scale + MatMul (int8 on disk, fp32 compute).
"""

from __future__ import annotations

import numpy as np

from flagc.errors import LoweringError
from flagc.ir.graph import Node
from flagc.ir.types import DType
from flagc.lower.onnx_emit import ONNX_DTYPE

__all__ = ["lower_qlinear"]

MS = "com.microsoft"


def _s8_kn(load, k: int):
    """codes u8 [N, 1, K] -> signed s8 [K, N] (the zero point 128 subtracted)."""
    def fn():
        codes = np.asarray(load())
        return np.ascontiguousarray((codes[:, 0, :k].astype(np.int16) - 128).astype(np.int8).T)
    return fn


def _flat_scales(load):
    return lambda: np.ascontiguousarray(np.asarray(load()).reshape(-1))


def _offsets_term(ctx, node: Node, x: str, nb: int, block: int) -> str:
    """block sums of x times the offsets: sum_b offset[n, b] * sum_{i in block b} x[i]."""
    em, k = ctx.em, node.attrs["k"]
    if nb * block != k:
        raise LoweringError(f"qlinear ({node.name or 'unnamed'}): offsets need K = {k} to be "
                            f"a multiple of the block {block}")
    rank = node.inputs[0].rank
    blocks = em.op("Reshape", [x, em.i64(*([0] * (rank - 1)), nb, block)])
    sums = em.op("ReduceSum", [blocks, em.i64(-1)], keepdims=0)
    src = node.inputs[5].name
    load = ctx.weight_loaders[src]
    off = em.weight(src + ".T", DType.F32, (nb, node.inputs[1].shape[0]),
                    lambda: np.ascontiguousarray(np.asarray(load()).T))
    return em.op("MatMul", [sums, off])


def lower_qlinear(ctx, node: Node, ins, outs) -> None:
    if not ctx.contrib_ops:
        raise LoweringError(f"qlinear ({node.name or 'unnamed'}): quantized linears need "
                            f"onnxruntime's com.microsoft kernels; this target has none")
    em = ctx.em
    x, codes, scales, zp, bias, offsets = ins
    a = node.attrs
    bits, k = a["bits"], a["k"]
    c = node.inputs[1]
    n, nb, blob = (int(d) for d in c.shape)
    block = blob * 8 // bits
    # int8 per channel (one block of K) with dynamic or no activation quantization takes the
    # int8 GEMM kernels; everything else (int4, 8-bit blocks) is MatMulNBits.
    per_channel_int8 = bits == 8 and nb == 1 and block == k and a["act_quant"] != "block"
    if not per_channel_int8:
        main = em.op("MatMulNBits", [x, codes, scales, zp, None, bias],
                     outs if offsets is None else 1, domain=MS, K=k, N=n, bits=bits,
                     block_size=block, accuracy_level=4 if a["act_quant"] == "block" else 0)
        if offsets is not None:
            em.op("Add", [main, _offsets_term(ctx, node, x, nb, block)], outs)
        return
    if zp is not None:
        raise LoweringError(f"qlinear ({node.name or 'unnamed'}): per-channel int8 lowers "
                            f"only symmetric (no zero points)")
    w = em.weight(c.name + ".s8", DType.I8, (k, n), _s8_kn(ctx.weight_loaders[c.name], k))
    s = em.weight(node.inputs[2].name + ".flat", DType.F32, (n,),
                  _flat_scales(ctx.weight_loaders[node.inputs[2].name]))
    if a["act_quant"] == "tensor":
        em.op("DynamicQuantizeMatMul", [x, w, s, None, bias], outs, domain=MS)
        return
    # Cast * scale, not DequantizeLinear: onnxruntime rewrites DequantizeLinear -> MatMul into
    # a kernel that also quantizes the activations; this form folds to an fp32 weight at load.
    deq = em.op("Mul", [em.op("Cast", [w], to=ONNX_DTYPE[DType.F32]), s])
    if bias is None:
        em.op("MatMul", [x, deq], outs)
    else:
        em.op("Add", [em.op("MatMul", [x, deq]), bias], outs)
