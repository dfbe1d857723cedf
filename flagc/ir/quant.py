"""Quantization numerics shared by the quantize pass (numpy, at write time) and QLINEAR's reference
implementation (torch, in the interpreter).

One weight format for every scheme, the one onnxruntime's MatMulNBits reads, so lowering copies
bytes instead of converting them:
    codes        u8 [N, n_blocks, block * bits / 8]   unsigned codes packed low-first along K,
                                                       K zero-padded up to n_blocks * block
    scales       f32 [N, n_blocks]
    zero_points  u8 [N, ceil(n_blocks * bits / 8)]    packed like the codes; absent = 2**(bits-1)
    offsets      f32 [N, n_blocks]                    optional; absent = 0
    w[n, k] = (code[n, k] - zero_point[n, k // block]) * scale[n, k // block]
              + offset[n, k // block]
Per-channel int8 is the special case n_blocks = 1, block = K. Offsets carry checkpoints already
quantized with a float minimum per block (GGUF Q4_1: w = d * q + m), which an integer zero point
can only approximate (`exact_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["QuantScheme", "quantize_weight", "dequantize_weight", "fake_quant_activation",
           "ACT_QUANT", "BLOCK_SIZES", "n_blocks", "codes_shape", "zero_points_cols",
           "gptq_quantize", "exact_grid"]

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits needs a power of two >= 16
ACT_QUANT = ("none", "tensor", "block")  # activations: float, dynamic per-tensor u8, per-block s8


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 4 or 8
    block: int  # elements per scale along K; 0 = one block per output channel
    symmetric: bool

    def block_for(self, k: int) -> int:
        return self.block or k

    def describe(self) -> str:
        where = f"block {self.block}" if self.block else "per-channel"
        return f"int{self.bits} {where} {'symmetric' if self.symmetric else 'asymmetric'}"


def n_blocks(k: int, block: int) -> int:
    return -(-k // block)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """u8 codes [..., L] -> packed [..., L * bits / 8], low bits first (L even for 4 bits)."""
    if bits == 8:
        return codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_weight(w: np.ndarray, scheme: QuantScheme, importance: Optional[np.ndarray] = None):
    """Round-to-nearest quantization of a [N, K] float weight -> (codes, scales, zero_points|None).

    4 bits: each block's scale (and zero point) is the one of a small candidate set around the
    min/max fit that minimizes the block's squared error, weighted per input feature by
    `importance` (e.g. mean x**2 of calibration activations) when given. Rounding stays to
    nearest; only the grid moves. Plain min/max wastes levels on a block's outlier and, with an
    integer zero point, shifts the whole block when the grid is offset.
    Symmetric 8-bit: amax/127, so int8 tables quantized the same way (GGUF Q8_0, absmax int8
    checkpoints) come back exactly.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    block = scheme.block_for(k)
    nb = n_blocks(k, block)
    h = None if importance is None else np.asarray(importance, np.float32).reshape(-1)
    if nb * block != k:
        w = np.concatenate([w, np.zeros((n, nb * block - k), np.float32)], axis=1)
        if h is not None:
            h = np.concatenate([h, np.zeros(nb * block - k, np.float32)])
    wb = w.reshape(n, nb, block)
    hb = None if h is None else h.reshape(1, nb, block)
    qmax = (1 << scheme.bits) - 1
    mid = 1 << (scheme.bits - 1)
    if scheme.bits == 8 and scheme.symmetric:
        scales = (np.abs(wb).max(-1) / (mid - 1)).astype(np.float32)
        zp = np.full(scales.shape, mid, np.float32)
    else:
        scales = np.empty((n, nb), np.float32)
        zp = np.empty((n, nb), np.float32)
        rows = max(1, (1 << 22) // (nb * block))  # bound the search's temporaries
        for r in range(0, n, rows):
            scales[r:r + rows], zp[r:r + rows] = _search(wb[r:r + rows], hb, scheme, qmax, mid)
    safe = np.where(scales == 0, 1, scales)[..., None]
    codes = np.clip(np.round(wb / safe) + zp[..., None], 0, qmax).astype(np.uint8)
    zero_points = None
    if not scheme.symmetric:
        z = zp.astype(np.uint8)
        if scheme.bits == 4 and nb % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zero_points = np.ascontiguousarray(_pack(z, scheme.bits))
    return np.ascontiguousarray(_pack(codes, scheme.bits)), np.ascontiguousarray(scales), \
        zero_points


_SCALE_STEPS = np.linspace(0.84, 1.16, 9)  # 18 candidates per block: cost vs. error


def _search(wb: np.ndarray, hb, scheme: QuantScheme, qmax: int, mid: int):
    """Per block (scale, zero point) minimizing the (weighted) squared error among candidates.

    torch, not numpy: its elementwise kernels use every intra-op thread, and the search is the
    bulk of a 4-bit build's time (18 candidates per block)."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(wb))
    h = None if hb is None else torch.from_numpy(np.ascontiguousarray(hb))
    if scheme.symmetric:
        idx = w.abs().argmax(-1, keepdim=True)
        base = torch.gather(w, -1, idx)[..., 0] / -mid  # onnxruntime's: peak -> -mid
        lo = None
    else:
        lo = torch.clamp(w.amin(-1), max=0.0)
        base = (torch.clamp(w.amax(-1), min=0.0) - lo) / qmax
    best_err = best_s = best_z = None
    for step in _SCALE_STEPS if scheme.bits == 4 else (1.0,):
        s = base * float(step)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        if lo is None:
            zs = [torch.full_like(s, float(mid))]
        else:
            z0 = -lo / safe
            zs = [torch.clamp(torch.floor(z0), 0, qmax), torch.clamp(torch.ceil(z0), 0, qmax)]
        r = torch.round(w / safe[..., None])
        for z in zs:
            d = (torch.clamp(r + z[..., None], 0, qmax) - z[..., None]) * s[..., None] - w
            d.mul_(d)
            err = (d if h is None else d.mul_(h)).sum(-1)
            if best_err is None:
                best_err, best_s, best_z = err, s, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, s, best_s)
                best_z = torch.where(better, z, best_z)
    return best_s.numpy(), best_z.numpy()


def _unpack(packed, bits: int, length: int):
    """torch u8 [..., L * bits / 8] -> int codes [..., length]."""
    import torch

    p = packed.to(torch.int32)
    if bits == 8:
        return p[..., :length]
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)[..., :length]


def dequantize_weight(codes, scales, zero_points, *, bits: int, k: int, offsets=None):
    """torch: the [N, K] float32 weight the codes stand for."""
    import torch

    n, nb, blob = codes.shape
    block = blob * 8 // bits
    q = _unpack(codes, bits, block * nb).reshape(n, nb, block).float()
    if zero_points is None:
        z = torch.full((n, nb, 1), float(1 << (bits - 1)))
    else:
        z = _unpack(zero_points, bits, nb).float().reshape(n, nb, 1)
    w = (q - z) * scales.float().reshape(n, nb, 1)
    if offsets is not None:
        w = w + offsets.float().reshape(n, nb, 1)
    return w.reshape(n, nb * block)[:, :k]


def exact_grid(w: np.ndarray, bits: int, block: int, rows: int = 4096):
    """(codes, scales, zero_points, offsets) that give back w [N, K] to float32 rounding, when
    every block of `block` weights along K holds values min + scale * q with integer q in
    [0, 2**bits) and its maximum at q = 2**bits - 1 (a checkpoint quantized that way: GGUF
    Q4_1 blocks of 32 are w = d * q + m); None as soon as one block is not on such a grid
    (K not a multiple of `block` included). Zero points are 0: w = code * scale + offset."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % block:
        return None
    nb, qmax = k // block, (1 << bits) - 1
    codes = np.empty((n, nb, block), np.uint8)
    scales = np.empty((n, nb), np.float32)
    offsets = np.empty((n, nb), np.float32)
    for lo_row in range(0, n, rows):
        wb = w[lo_row:lo_row + rows].astype(np.float64).reshape(-1, nb, block)
        lo, hi = wb.min(-1), wb.max(-1)
        scale = (hi - lo) / qmax
        q = np.rint((wb - lo[..., None]) / np.where(scale == 0, 1.0, scale)[..., None])
        err = np.abs(lo[..., None] + q * scale[..., None] - wb)
        # float32 rounding of the checkpoint's own d * q + m, with room for a few ulps
        tol = 8 * np.finfo(np.float32).eps * np.maximum(np.abs(lo), np.abs(hi))
        if (err > tol[..., None]).any():
            return None
        rows_here = slice(lo_row, lo_row + wb.shape[0])
        codes[rows_here], scales[rows_here], offsets[rows_here] = q, scale, lo
    zero_points = np.zeros((n, zero_points_cols(nb, bits)), np.uint8)
    return np.ascontiguousarray(_pack(codes, bits)), scales, zero_points, offsets


def fake_quant_activation(x, mode: str, block: int):
    """torch: x as the int8 kernels see it. 'tensor': onnxruntime's DynamicQuantizeLinear (u8,
    asymmetric, one scale per tensor); 'block': MatMulNBits accuracy_level 4 (s8, symmetric,
    one scale per `block` elements along K); 'none': x itself."""
    import torch

    if mode == "none":
        return x
    xf = x.float()
    if mode == "tensor":
        lo = torch.clamp(xf.min(), max=0.0)
        hi = torch.clamp(xf.max(), min=0.0)
        scale = (hi - lo) / 255.0
        if float(scale) == 0.0:
            return x
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        q = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
        return ((q - zp) * scale).to(x.dtype)
    k = xf.shape[-1]
    nb = n_blocks(k, block)
    pad = nb * block - k
    xp = torch.nn.functional.pad(xf, (0, pad)).reshape(*xf.shape[:-1], nb, block)
    scale = xp.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(xp / torch.where(scale == 0, torch.ones_like(scale), scale))
    out = (torch.clamp(q, -127, 127) * scale).reshape(*xf.shape[:-1], nb * block)[..., :k]
    return out.to(x.dtype)


def codes_shape(n: int, k: int, scheme: QuantScheme) -> tuple[int, int, int]:
    block = scheme.block_for(k)
    return (n, n_blocks(k, block), block * scheme.bits // 8)


def zero_points_cols(n_blk: int, bits: int) -> int:
    return -(-n_blk * bits // 8)


def gptq_quantize(w: np.ndarray, scheme: QuantScheme, hessian, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) on the block grid the scale search picks:
    columns are rounded in order and each rounding error is spread over the not yet rounded
    columns through the inverse Hessian of the layer's calibration inputs (H = X^T X), so the
    layer's *output* error shrinks rather than each weight's. Same return as quantize_weight."""
    import torch

    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    block = scheme.block_for(k)
    h = torch.as_tensor(hessian, dtype=torch.float64).clone()
    _, scales, zero_points = quantize_weight(w, scheme, importance=np.diag(h.numpy()))
    nb = n_blocks(k, block)
    mid = 1 << (scheme.bits - 1)
    qmax = (1 << scheme.bits) - 1
    if zero_points is None:
        z = torch.full((n, nb), float(mid), dtype=torch.float64)
    else:
        z = torch.from_numpy(zero_points).to(torch.int32)
        z = (z if scheme.bits == 8 else torch.stack((z & 0xF, z >> 4), -1).flatten(-2))
        z = z[:, :nb].to(torch.float64)
    s = torch.from_numpy(scales).to(torch.float64)
    W = torch.from_numpy(w).to(torch.float64)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    Q = torch.empty((n, nb * block), dtype=torch.float64)
    Q[:, k:] = z[:, -1:].expand(n, nb * block - k)  # padding codes the zero point: weight 0
    for i1 in range(0, k, 128):
        i2 = min(i1 + 128, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            b = (i1 + i) // block
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s[:, b]) + z[:, b], 0, qmax)
            Q[:, i1 + i] = q
            e = (col - (q - z[:, b]) * s[:, b]) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    codes = Q.to(torch.uint8).numpy().reshape(n, nb, block)
    return np.ascontiguousarray(_pack(codes, scheme.bits)), scales, zero_points
