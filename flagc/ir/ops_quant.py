"""QLINEAR: a linear layer whose weight is stored quantized (flagc.ir.quant's format).

Registered into the one op registry (flagc.ir.ops imports this module at its end). The reference
dequantizes the weight and, when `act_quant` says the target's kernel quantizes activations,
rounds the input the same way, so the interpreter predicts what onnxruntime computes.
"""

from __future__ import annotations

import torch.nn.functional as F

from flagc.errors import IRError
from flagc.ir.ops import REQUIRED, Op, _define, _require_float
from flagc.ir.quant import ACT_QUANT, dequantize_weight, fake_quant_activation, n_blocks, \
    zero_points_cols
from flagc.ir.types import DType, TensorType


def _qlinear_infer(types, attrs):
    x, codes, scales, zp, bias, offsets = types
    bits, k = attrs["bits"], attrs["k"]
    _require_float(x, "qlinear")
    if bits not in (4, 8):
        raise IRError(f"qlinear: bits must be 4 or 8, got {bits}")
    if attrs["act_quant"] not in ACT_QUANT:
        raise IRError(f"qlinear: act_quant must be one of {ACT_QUANT}, got {attrs['act_quant']!r}")
    if x.shape[-1] != k:
        raise IRError(f"qlinear: input features {x.shape[-1]} != k={k}")
    if codes.dtype is not DType.U8 or codes.rank != 3:
        raise IRError(f"qlinear: codes must be u8 [N, n_blocks, blob], got {codes}")
    n, nb, blob = codes.shape
    block = blob * 8 // bits
    if nb != n_blocks(k, block):
        raise IRError(f"qlinear: {nb} blocks of {block} do not cover k={k} (codes {codes})")
    if scales.dtype is not DType.F32 or scales.shape != (n, nb):
        raise IRError(f"qlinear: scales must be f32[{n}, {nb}], got {scales}")
    if zp is not None and (zp.dtype is not DType.U8
                           or zp.shape != (n, zero_points_cols(nb, bits))):
        raise IRError(f"qlinear: zero_points must be u8[{n}, {zero_points_cols(nb, bits)}], "
                      f"got {zp}")
    if bias is not None and (bias.rank != 1 or bias.shape[0] != n):
        raise IRError(f"qlinear: bias must be [{n}], got {bias}")
    if offsets is not None and (offsets.dtype is not DType.F32 or offsets.shape != (n, nb)):
        raise IRError(f"qlinear: offsets must be f32[{n}, {nb}], got {offsets}")
    return [TensorType(x.dtype, x.shape[:-1] + (n,))]


def _t_qlinear(x, codes, scales, zp=None, bias=None, offsets=None, *, bits, k, act_quant):
    w = dequantize_weight(codes, scales, zp, bits=bits, k=k).to(x.dtype)
    block = codes.shape[2] * 8 // bits
    xq = fake_quant_activation(x, act_quant, block)
    y = F.linear(xq, w, None if bias is None else bias.to(x.dtype))
    if offsets is not None:  # as lowered: the block sums of the float x times the offsets
        sums = x.reshape(*x.shape[:-1], k // block, block).sum(-1)
        y = y + sums @ offsets.to(x.dtype).T
    return y


_define(Op.QLINEAR, ["x", "codes", "scales", "zero_points?", "bias?", "offsets?"],
        {"bits": REQUIRED, "k": REQUIRED, "act_quant": "none"}, _qlinear_infer, _t_qlinear,
        doc="y = x @ dequant(codes, scales, zero_points, offsets).T + bias; codes u8 [N, "
            "n_blocks, block*bits/8] packed low-first (onnxruntime MatMulNBits layout), scales "
            "f32 [N, n_blocks], zero points packed u8 (absent: 2**(bits-1)), offsets f32 "
            "[N, n_blocks] added per block (absent: 0). act_quant: 'none', 'tensor' (dynamic u8 "
            "per tensor) or 'block' (s8 per weight block).")
