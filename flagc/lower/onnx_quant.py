"""QLINEAR -> onnxruntime's quantized CPU kernels (com.microsoft; onnxruntime targets only).

- weight blocks (int4, and 8-bit blocks) -> MatMulNBits; its B/scales/zero_points layout is the
  IR's, so the initializers are written as they are. act_quant 'block' is accuracy_level 4: int8
  compute (AVX512-VNNI / AMX) with the activations quantized per block.
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


def lower_qlinear(ctx, node: Node, ins, outs) -> None:
    if not ctx.contrib_ops:
        raise LoweringError(f"qlinear ({node.name or 'unnamed'}): quantized linears need "
                            f"onnxruntime's com.microsoft kernels; this target has none")
    em = ctx.em
    x, codes, scales, zp, bias = ins
    a = node.attrs
    bits, k = a["bits"], a["k"]
    c = node.inputs[1]
    n, nb, blob = (int(d) for d in c.shape)
    block = blob * 8 // bits
    # int8 per channel (one block of K) with dynamic or no activation quantization takes the
    # int8 GEMM kernels; everything else (int4, 8-bit blocks) is MatMulNBits.
    per_channel_int8 = bits == 8 and nb == 1 and block == k and a["act_quant"] != "block"
    if not per_channel_int8:
        em.op("MatMulNBits", [x, codes, scales, zp, None, bias], outs, domain=MS, K=k, N=n,
              bits=bits, block_size=block, accuracy_level=4 if a["act_quant"] == "block" else 0)
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
