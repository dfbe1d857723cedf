"""Decode-shaped fp16 GEMMs on one GPU: which weight layout and which onnxruntime op stream fastest.

A decode step at batch 1-8 is a chain of matrix-vector products, so its speed is the bandwidth
each GEMM reaches. This script times the 1.1 B LLaMA's projection shapes (gpu_llama_decode.py)
four ways, each as 16 distinct weights per run (more than L2 holds) replayed as a CUDA graph:

- onnxruntime MatMul, weight [K, N] (what flagc lowers Linear to)
- onnxruntime Gemm transB=1, weight [N, K] (PyTorch's own layout)
- the same two with onnxruntime's tunable GEMMs on (provider options tunable_op_*)
- PyTorch x @ W[K, N] and F.linear(x, W[N, K]) (cuBLAS as PyTorch calls it)

and prints microseconds per GEMM and the bandwidth it reached.

    python benchmarks/gpu_gemv_layout.py --json out.json     # on the GPU host, onnxruntime-gpu
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# (name, K, N): q|k|v, o, gate|up, down, LM head of the 1.1 B LLaMA
SHAPES = (("qkv", 2048, 2560), ("o", 2048, 2048), ("gate_up", 2048, 11264),
          ("down", 5632, 2048), ("lm_head", 2048, 32000))
COPIES = 16


def onnx_model(k: int, n: int, m: int, gemm: bool, copies: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(copies):
        w = (rng.standard_normal((n, k) if gemm else (k, n)) * 0.02).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        if gemm:
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1))
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, [m, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT16, [m, k])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime since 1.14 reads
    return model.SerializeToString()


def time_ort(k: int, n: int, m: int, gemm: bool, tunable: bool, reps: int) -> float:
    import onnxruntime as ort

    opts = {"enable_cuda_graph": "1"}
    if tunable:
        opts.update(tunable_op_enable="1", tunable_op_tuning_enable="1")
    so = ort.SessionOptions()
    sess = ort.InferenceSession(onnx_model(k, n, m, gemm, COPIES), so,
                                providers=[("CUDAExecutionProvider", opts)])
    x = ort.OrtValue.ortvalue_from_numpy(np.ones((m, k), np.float16), "cuda", 0)
    ys = [ort.OrtValue.ortvalue_from_numpy(np.zeros((m, n), np.float16), "cuda", 0)
          for _ in range(COPIES)]
    b = sess.io_binding()
    b.bind_ortvalue_input("x", x)
    for i, y in enumerate(ys):
        b.bind_ortvalue_output(f"y{i}", y)
    for _ in range(5):
        sess.run_with_iobinding(b)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run_with_iobinding(b)
        best = min(best, (time.perf_counter() - t) / reps / COPIES)
    return best


def time_torch(k: int, n: int, m: int, linear: bool, reps: int) -> float:
    import torch
    import torch.nn.functional as F

    ws = [torch.randn((n, k) if linear else (k, n), device="cuda", dtype=torch.float16) * 0.02
          for _ in range(COPIES)]
    x = torch.ones(m, k, device="cuda", dtype=torch.float16)

    def step():
        return [F.linear(x, w) if linear else x @ w for w in ws]

    step()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
        with torch.cuda.graph(g):
            step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps / COPIES)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-ort", action="store_true", help="PyTorch rows only")
    args = ap.parse_args(argv)
    ways = [("torch x@W[K,N]", lambda k, n, m: time_torch(k, n, m, False, args.reps)),
            ("torch linear W[N,K]", lambda k, n, m: time_torch(k, n, m, True, args.reps))]
    if not args.no_ort:
        ways += [("ort MatMul W[K,N]", lambda k, n, m: time_ort(k, n, m, False, False, args.reps)),
                 ("ort Gemm transB W[N,K]",
                  lambda k, n, m: time_ort(k, n, m, True, False, args.reps)),
                 ("ort MatMul tunable", lambda k, n, m: time_ort(k, n, m, False, True, args.reps)),
                 ("ort Gemm transB tunable",
                  lambda k, n, m: time_ort(k, n, m, True, True, args.reps))]
    rows = []
    print("| way | shape | batch | us/GEMM | GB/s |")
    print("|---|---|---|---|---|")
    for m in [int(b) for b in args.batches.split(",")]:
        for name, k, n in SHAPES:
            for way, fn in ways:
                try:
                    sec = fn(k, n, m)
                except Exception as exc:  # one failing way must not hide the others
                    print(f"| {way} | {name} | {m} | failed: {str(exc)[:80]} | |")
                    continue
                gbs = 2 * k * n / sec / 1e9
                rows.append(dict(way=way, shape=name, k=k, n=n, batch=m, us=sec * 1e6, gbs=gbs))
                print(f"| {way} | {name} {k}x{n} | {m} | {sec * 1e6:.1f} | {gbs:.0f} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
