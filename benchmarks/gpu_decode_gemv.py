"""flagc's decode GEMV kernels (runtimes/kernels/decode_gemv.cu) against cuBLAS, on one GPU.

For each projection shape of the 1.1 B LLaMA (gpu_llama_decode.py) at 1 and 8 activation rows:
the kernel's result against PyTorch's (max abs difference), and microseconds per product of
    flagc     flagc_decode_gemv on a [N, K] weight (the gated form for gate|up)
    cublas    F.linear on the same weight (for gate|up: F.linear, chunk, F.silu, mul)
each as 16 distinct weights per CUDA graph (more than L2 holds), replayed; bandwidth = weight
bytes / time.

    python benchmarks/gpu_decode_gemv.py --json out.json     # on the GPU host (nvcc, PyTorch)
"""

from __future__ import annotations

import argparse
import ctypes
import json

SHAPES = (("qkv", 2048, 2560, False), ("o", 2048, 2048, False),
          ("gate_up", 2048, 11264, True), ("down", 5632, 2048, False),
          ("lm_head", 2048, 32000, False))
COPIES = 16


def load_library(defines: str = ""):
    """flagc's library, or with `defines` ("UNROLL=4,WARPS=4") the kernel file alone compiled
    with those tuning macros (FLAGC_GEMV_*), to compare variants."""
    import os
    import subprocess
    import tempfile

    from flagc.runtimes import kernels

    if not defines:
        return ctypes.CDLL(kernels.library_path())
    src = os.path.join(os.path.dirname(kernels.__file__), "decode_gemv.cu")
    out = os.path.join(tempfile.mkdtemp(), "variant.so")
    flags = [f"-DFLAGC_GEMV_{d}" for d in defines.split(",")]
    subprocess.run([kernels.find_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                    "-gencode", "arch=compute_90,code=sm_90", *flags, src, "-o", out], check=True)
    return ctypes.CDLL(out)


def timed(fn, reps: int = 50) -> float:
    """Seconds per call of fn() (which runs COPIES products) captured into a CUDA graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps / COPIES)
    return best


def main() -> None:
    import torch
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--rows", default="1,8", help="activation rows to time, comma-separated")
    ap.add_argument("--variants", default="", help="tuning variants to compare, e.g. "
                    "'UNROLL=4,WARPS=8;UNROLL=8,WARPS=4' (default: the library as built)")
    args = ap.parse_args()
    variants = args.variants.split(";") if args.variants else [""]
    libs = {v: load_library(v) for v in variants}
    torch.manual_seed(0)
    rows_out = []
    for name, k, n, gated in SHAPES:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(COPIES)]
        for m, variant in [(m, v) for m in map(int, args.rows.split(",")) for v in variants]:
            lib = libs[variant]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            n_out = n // 2 if gated else n
            ys = [torch.empty(m, n_out, device="cuda", dtype=torch.float16) for _ in ws]

            def ours():
                stream = torch.cuda.current_stream().cuda_stream
                for w, y in zip(ws, ys):
                    rc = lib.flagc_decode_gemv(ctypes.c_void_p(x.data_ptr()),
                                               ctypes.c_void_p(w.data_ptr()), None,
                                               ctypes.c_void_p(y.data_ptr()),
                                               ctypes.c_int64(m), ctypes.c_int64(n),
                                               ctypes.c_int64(k), ctypes.c_int(int(gated)),
                                               ctypes.c_void_p(stream))
                    assert rc == 0, rc

            def reference(w):
                h = F.linear(x, w)
                if gated:
                    g, u = h.chunk(2, dim=-1)
                    h = F.silu(g) * u
                return h

            def cublas():
                for w, y in zip(ws, ys):
                    reference(w)

            ours()
            torch.cuda.synchronize()
            err = max(float((ys[i] - reference(ws[i])).abs().max()) for i in range(2))
            scale = float(reference(ws[0]).abs().max())
            t_ours, t_ref = timed(ours), timed(cublas)
            nbytes = n * k * 2
            row = {"shape": name, "k": k, "n": n, "rows": m, "variant": variant,
                   "max_abs_err": err,
                   "ref_max_abs": scale, "flagc_us": t_ours * 1e6, "cublas_us": t_ref * 1e6,
                   "flagc_tb_s": nbytes / t_ours / 1e12, "cublas_tb_s": nbytes / t_ref / 1e12}
            rows_out.append(row)
            print(f"{name:8s} {variant:18s} m={m} K={k:5d} N={n:5d}  flagc {t_ours * 1e6:6.2f} us "
                  f"({row['flagc_tb_s']:.2f} TB/s)  cublas {t_ref * 1e6:6.2f} us "
                  f"({row['cublas_tb_s']:.2f} TB/s)  max|err| {err:.2e} of {scale:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
