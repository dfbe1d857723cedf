"""Which onnxruntime CPU kernel should an int8 linear lower to? One-node models, 2 threads,
interleaved repetitions, times relative to fp32 MatMul on the same shape.

Candidates for per-channel int8 weights (the onnx-int8 scheme):
  fp32                  MatMul on the float weight (the reference)
  DynamicQuantizeMatMul com.microsoft: quantizes A (u8 per tensor) inside, s8 B per column
  DQL+MatMulIntToFloat  DynamicQuantizeLinear -> com.microsoft MatMulIntegerToFloat
  DQL+MatMulInteger     standard ONNX: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
  MatMulNBits8/acc4     8-bit blocks of 128, int8 compute (AVX512-VNNI / AMX)
Shapes: MiniLM b8 x s128 (M = 1024) projections and a SmolLM2 decode step (M = 1).

    python benchmarks/quant_kernels.py [--reps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

SHAPES = [(1024, 384, 1152), (1024, 384, 1536), (1024, 1536, 384), (1, 576, 1536)]


def _session(nodes, inits, k, n):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TP.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("Y", TP.FLOAT, ["m", n])], inits)
    m = helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def candidates(k: int, n: int, rng):
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.round(w / scale).astype(np.int8)
    t = numpy_helper.from_array
    out = {"fp32": _session([helper.make_node("MatMul", ["A", "W"], ["Y"])], [t(w, "W")], k, n)}
    out["DynamicQuantizeMatMul"] = _session(
        [helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"],
                          domain="com.microsoft")], [t(q, "B"), t(scale, "S")], k, n)
    dql = helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"])
    out["DQL+MatMulIntToFloat"] = _session(
        [dql, helper.make_node("MatMulIntegerToFloat", ["Aq", "B", "As", "S", "Az"], ["Y"],
                               domain="com.microsoft")], [t(q, "B"), t(scale, "S")], k, n)
    out["DQL+MatMulInteger"] = _session(
        [dql, helper.make_node("MatMulInteger", ["Aq", "B", "Az"], ["I"]),
         helper.make_node("Cast", ["I"], ["F"], to=TP.FLOAT),
         helper.make_node("Mul", ["As", "S"], ["AS"]),
         helper.make_node("Mul", ["F", "AS"], ["Y"])], [t(q, "B"), t(scale, "S")], k, n)
    if k % 128 == 0:
        nb = k // 128
        wb = w.T.reshape(n, nb, 128)
        s8 = (np.abs(wb).max(-1) / 127).astype(np.float32)
        codes = (np.round(wb / s8[..., None]) + 128).astype(np.uint8)
        out["MatMulNBits8/acc4"] = _session(
            [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                              K=k, N=n, bits=8, block_size=128, accuracy_level=4)],
            [t(codes, "B"), t(s8, "S")], k, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average at start: {os.getloadavg()}")
    print("| M x K x N | kernel | median us | vs fp32 (median ratio) |")
    print("|---|---|---|---|")
    for m, k, n in SHAPES:
        sessions = candidates(k, n, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        reps = max(10, a.reps // max(1, m // 64))
        times = {name: [] for name in sessions}
        for name, s in sessions.items():
            for _ in range(3):
                s.run(None, {"A": x})
        for _ in range(reps):  # interleaved: drift hits every kernel alike
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"A": x})
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["fp32"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {m}x{k}x{n} | {name} | {med * 1e6:.1f} | {med / base:.2f} |")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
