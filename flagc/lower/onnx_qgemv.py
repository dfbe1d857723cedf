"""Static decode graphs on flagc's CPU quantized products: MatMulNBits -> `ai.flagc.QGemv`.

A decode step multiplies one activation row (a few at batch > 1) by every weight once, so on
the CPU it runs at the speed weights stream from memory. onnxruntime's MatMulNBits streams
SmolLM2's int4 weights at ~10 GB/s on this 2-core machine; flagc's QGemv
(runtimes/kernels/qgemv.cc: 16 rows interleaved per tile, float16 scale and offset per block
of 32 beside the codes) at ~15 of the ~20 GB/s the memory gives (a decode step's 120 int4
products and 8-bit head: ~6.0 ms against ~8.5-10.8 ms). Rewrites, in a static decode graph:

    MatMulNBits(x, B, scales[, zero_points][, -, bias])           [accuracy_level 4]
        [-> Add(., MatMul(ReduceSum(Reshape(x)), offsets^T))]      (quant_exact_grid offsets)
        [-> Split(F, F) -> silu(gate) * up]                         (a gated MLP, F % 16 = 0)
    =>  QGemv(x, packed[, bias][, gated=1])

for 4- and 8-bit codes in blocks of a multiple of 32 with float32 scales. The weight
w = (q - z) s + o of each block is re-expressed as d q + m with d = s, m = o - z s in float16
(exact for GGUF Q4_1 / Q8_0 grids, whose scales and minima are float16; other scales move a
weight by ~2^-11 of its block's largest); the activations are quantized to int8 per block of
32 as MatMulNBits' accuracy_level 4 does (offsets included: QGemv computes the rounded
activations times the exact weights, the QLINEAR reference's product, where the MatMulNBits
lowering adds the offsets' term from unrounded x). A weight whose scales float16 cannot hold
(overflow, or underflow that moves a weight by more than 2^-8 of its block's largest) keeps
its MatMulNBits. The packed weights are written once, to `decode-qgemv.data` beside the
graphs, and shared by every static graph (the kernel copies them into huge pages at session
load); the dynamic graph (prefill, many rows) keeps MatMulNBits' GEMM.

A (Skip)SimplifiedLayerNormalization read only by a QGemv then moves into it (the residual add
and RMSNorm before the product; the residual sum its second output): two onnxruntime ops fewer
per layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.lower.onnx_decode_gemv import gated_tail
from flagc.lower.onnx_kernel_rewrite import DOMAIN, commit_rewrites, only_reader_lookup, \
    readers_of
from flagc.lower.onnx_stream import DerivedWeights

__all__ = ["DATA_FILE", "QGemvWeights", "use_qgemv", "pack_qgemv", "TILE_ROWS", "BLOCK"]

DATA_FILE = "decode-qgemv.data"
TILE_ROWS = 16
BLOCK = 32
_MS = "com.microsoft"
_MAX_ERROR = 2.0 ** -8  # float16 rounding of d and m, relative to a block's weights


def pack_qgemv(codes: np.ndarray, d: np.ndarray, m: np.ndarray, bits: int) -> np.ndarray:
    """codes u8 [N, K] (unpacked, < 2**bits), d and m [N, ceil(K / 32)] float16 ->
    the packed layout of runtimes/kernels/qgemv.cc: u8 [ceil(N / 16), nb, record]."""
    n, k = codes.shape
    nb, tiles = -(-k // BLOCK), -(-n // TILE_ROWS)
    q = np.zeros((tiles * TILE_ROWS, nb * BLOCK), np.uint8)
    q[:n, :k] = codes
    q = q.reshape(tiles, TILE_ROWS, nb, BLOCK).transpose(0, 2, 1, 3)  # [tile, block, row, 32]
    if bits == 4:
        q = q[..., :16] | (q[..., 16:] << 4)  # byte i: element i low, element 16 + i high
    quads = q.reshape(tiles, nb, TILE_ROWS, -1, 4).transpose(0, 1, 3, 2, 4)  # [.., quad, row, 4]
    scales = []
    for v in (d, m):
        full = np.zeros((tiles * TILE_ROWS, nb), np.float16)
        full[:n] = v
        scales.append(np.ascontiguousarray(
            full.reshape(tiles, TILE_ROWS, nb).transpose(0, 2, 1)).view(np.uint8))
    return np.ascontiguousarray(np.concatenate(
        [quads.reshape(tiles, nb, -1), *scales], axis=-1))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' low-first packing along the last axis -> one code per element."""
    if bits == 8:
        return packed
    return np.stack((packed & 15, packed >> 4), axis=-1).reshape(*packed.shape[:-1], -1)


def qgemv_weights(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                  offsets: np.ndarray | None, bits: int, k: int):
    """MatMulNBits' (B [N, nb, blob], scales, zero_points, offsets [N, nb]) -> the packed
    QGemv weight, or None when float16 cannot hold its scales (module docstring)."""
    n, nb, blob = b.shape
    block = blob * 8 // bits
    s = scales.astype(np.float32).reshape(n, nb)
    z = (np.full((n, nb), 1 << (bits - 1), np.float32) if zero_points is None
         else _unpack(zero_points.reshape(n, -1), bits)[:, :nb].astype(np.float32))
    m = -z * s if offsets is None else offsets.astype(np.float32).reshape(n, nb) - z * s
    d16, m16 = s.astype(np.float16), m.astype(np.float16)
    qmax = (1 << bits) - 1
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.abs(d16.astype(np.float32) - s) * qmax + np.abs(m16.astype(np.float32) - m)
    # each block's largest weight error against its largest weight (a typical block's, for
    # near-empty blocks): float16 keeps ~2^-11 of a value; overflow or underflow keep less
    reach = np.maximum(np.abs(m), np.abs(m + qmax * s))
    typical = float(np.median(reach[reach > 0])) if (reach > 0).any() else 0.0
    if not np.isfinite(err).all() or (err > _MAX_ERROR * np.maximum(reach, typical)).any():
        return None
    per = block // BLOCK  # a block of 64 or 128 is 2 or 4 blocks of 32 with the same d, m
    codes = _unpack(b, bits).reshape(n, nb * block)[:, :k]
    return pack_qgemv(codes, np.repeat(d16, per, axis=1)[:, :-(-k // BLOCK)],
                      np.repeat(m16, per, axis=1)[:, :-(-k // BLOCK)], bits)


class QGemvWeights(DerivedWeights):
    """Packed QGemv weights in DATA_FILE, once per MatMulNBits weight."""

    def __init__(self, folder: str):
        super().__init__(folder, DATA_FILE)
        self._refused: set[str] = set()

    def packed(self, b: TensorProto, scales: TensorProto, zero_points: TensorProto | None,
               offsets_t: TensorProto | None, bits: int, k: int) -> TensorProto | None:
        """The packed weight of MatMulNBits' (B, scales, zero points) and the exact grid's
        offsets^T [nb, N]; read and packed the first time only."""
        key = b.name + ".qgemv"
        if key in self._refused:
            return None
        if key not in self:
            def load(t):
                return None if t is None else numpy_helper.to_array(t, base_dir=self.folder)

            offsets = load(offsets_t)
            arr = qgemv_weights(load(b), load(scales), load(zero_points),
                                None if offsets is None else offsets.T, bits, k)
            if arr is None:
                self._refused.add(key)
                return None
            return self.get(key, lambda: arr, TensorProto.UINT8)
        return self.get(key, None, TensorProto.UINT8)


def use_qgemv(model: onnx.ModelProto, weights: QGemvWeights) -> int:
    """Rewrite `model`'s MatMulNBits (module docstring); returns how many became QGemv."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)  # one object per node: `replaced` is keyed by their ids
    producer = {o: n for n in nodes for o in n.output}
    consumers = readers_of(nodes)
    only_reader = only_reader_lookup(g, consumers)
    replaced: dict[int, onnx.NodeProto | None] = {}
    new_inits: dict[str, TensorProto] = {}
    for node in nodes:
        if node.op_type != "MatMulNBits" or node.domain != _MS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block, k, n = (int(attrs.get(a, 0)) for a in ("bits", "block_size", "K", "N"))
        inputs = list(node.input) + [""] * (6 - len(node.input))
        b, scales = inits.get(inputs[1]), inits.get(inputs[2])
        zero_points = inits.get(inputs[3]) if inputs[3] else None
        if (bits not in (4, 8) or block % BLOCK or int(attrs.get("accuracy_level", 0)) != 4
                or b is None or scales is None or scales.data_type != TensorProto.FLOAT
                or (inputs[3] and zero_points is None) or inputs[4] or len(node.input) > 6):
            continue
        out, absorbed, offsets_t = node.output[0], [], None
        tail = _offsets_tail(node, producer, only_reader, inits, n)
        if tail is not None:
            (term_nodes, offsets_t) = tail
            if int(offsets_t.dims[0]) != int(b.dims[1]):
                continue
            out, absorbed = term_nodes[0].output[0], term_nodes
        extra = {}
        gated = gated_tail(out, n, only_reader, consumers, inits) if n % 32 == 0 else None
        if gated is not None:
            (out, more), extra["gated"] = gated, 1
            absorbed += more
        packed = weights.packed(b, scales, zero_points, offsets_t, bits, k)
        if packed is None:
            continue
        new_inits[packed.name] = packed
        replaced[id(node)] = helper.make_node(
            "QGemv", [node.input[0], packed.name] + ([inputs[5]] if inputs[5] else []), [out],
            domain=DOMAIN, name=f"{node.name or out}.qgemv", N=n, K=k, bits=bits, **extra)
        for dead in absorbed:
            replaced[id(dead)] = None
    if not replaced:
        return 0
    commit_rewrites(model, nodes, replaced, new_inits)
    _fuse_norms(model)
    return sum(1 for v in replaced.values() if v is not None)


_NORMS = {("SkipSimplifiedLayerNormalization", _MS), ("SimplifiedLayerNormalization", "")}


def _fuse_norms(model: onnx.ModelProto) -> None:
    """QGemv reading (Skip)SimplifiedLayerNormalization's output, and nothing else reading it:
    the norm moves into the QGemv (inputs Skip, Gamma; the residual sum as its output 1)."""
    g = model.graph
    nodes = list(g.node)  # one object per node: identities below hold
    producer = {o: n for n in nodes for o in n.output}
    readers = readers_of(nodes)
    only_reader = only_reader_lookup(g, readers)
    graph_outputs = {o.name for o in g.output}
    dropped = set()
    for q in nodes:
        if q.op_type != "QGemv" or q.domain != DOMAIN:
            continue
        norm = producer.get(q.input[0])
        if norm is None or (norm.op_type, norm.domain) not in _NORMS \
                or only_reader(norm.output[0]) is not q:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        skip = norm.op_type.startswith("Skip")
        ins, outs = list(norm.input), list(norm.output) + [""] * 4
        stats = outs[1:3]  # mean / inverse std dev: must be unused
        if (skip and len(ins) > 3 and ins[3]) or int(attrs.get("axis", -1)) != -1 \
                or any(o and (o in graph_outputs or readers.get(o)) for o in stats):
            continue
        inputs = list(q.input) + [""] * (3 - len(q.input))
        del q.input[:]
        q.input.extend([ins[0], inputs[1], inputs[2], ins[1] if skip else "",
                        ins[2] if skip else ins[1]])
        if skip and outs[3] and (outs[3] in graph_outputs or readers.get(outs[3])):
            q.output.append(outs[3])  # the residual stream goes on
        q.attribute.append(helper.make_attribute("epsilon", float(attrs.get("epsilon", 1e-5))))
        dropped.add(id(norm))
    if dropped:
        commit_rewrites(model, nodes, dict.fromkeys(dropped), {})


def _offsets_tail(node, producer, only_reader, inits, n: int):
    """([Add, MatMul, ReduceSum, Reshape], offsets^T initializer) when `node`'s only reader
    adds the offsets term of onnx_quant._offsets_term (block sums of the same x times
    offsets^T [nb, N]) and nothing else reads the term's parts, else None."""
    add = only_reader(node.output[0])
    if add is None or add.op_type != "Add":
        return None
    term = producer.get(add.input[1] if add.input[0] == node.output[0] else add.input[0])
    if term is None or term.op_type != "MatMul" or only_reader(term.output[0]) is not add:
        return None
    sums = producer.get(term.input[0])
    reshape = producer.get(sums.input[0]) if sums is not None else None
    offsets = inits.get(term.input[1])
    if (sums is None or sums.op_type != "ReduceSum" or reshape is None
            or reshape.op_type != "Reshape" or reshape.input[0] != node.input[0]
            or only_reader(sums.output[0]) is not term
            or only_reader(reshape.output[0]) is not sums
            or offsets is None or len(offsets.dims) != 2 or int(offsets.dims[1]) != n):
        return None
    return [add, term, sums, reshape], offsets
