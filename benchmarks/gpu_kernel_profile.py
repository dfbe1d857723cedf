"""Where a flagc decode step spends GPU time: CUDA kernels of N decode steps, by kernel.

Runs the same 1.1 B LLaMA artifact as gpu_llama_decode.py (built there, reused), prefills one
prompt, then records `--steps` one-token steps with torch.profiler (CUPTI sees onnxruntime's
kernels too, also inside a replayed CUDA graph) and prints the kernels by total time, the GPU
busy time per step and the wall time per step.

    python benchmarks/gpu_kernel_profile.py --work /tmp/gpuw          # on the GPU host
"""

from __future__ import annotations

import argparse
import os
import time

import gpu_llama_decode as bench  # the sibling script (python puts its folder on sys.path)
import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join("out", "gpu-llama"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--static", type=int, default=1, help="0: the dynamic graph")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kernels", default="onnxruntime", choices=("onnxruntime", "flagc"),
                    help="flagc: the artifact built with flagc's CUDA kernels")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    import flagc

    suffix = "-flagc-kernels" if args.kernels == "flagc" else ""
    model_dir = os.path.join(args.work, "model")
    art = os.path.join(args.work, "onnx-fp16" + suffix)
    bench.save_model(model_dir, bench.FULL)
    bench.build_flagc(model_dir, "onnx-fp16", art, 128 + 256, [1, 8], args.kernels)
    loaded = flagc.load(art, device="cuda", static_decode=bool(args.static))
    dec = loaded.decoder
    prompts = np.random.default_rng(0).integers(3, 32000, (args.batch, 128)).tolist()
    tok = np.asarray(dec.prefill(prompts, 0, 128 + 3 * args.steps + 20)).argmax(-1)
    for _ in range(10):
        tok = np.asarray(dec.append(tok)).argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        tok = np.asarray(dec.append(tok)).argmax(-1)
    wall = (time.perf_counter() - t) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = np.asarray(dec.append(tok)).argmax(-1)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    busy = sum(getattr(e, attr) for e in events) / args.steps / 1e3
    print(f"batch {args.batch}, {'static' if args.static else 'dynamic'} graph: wall "
          f"{wall:.3f} ms/step, GPU kernels {busy:.3f} ms/step, "
          f"{sum(e.count for e in events) / args.steps:.0f} kernels/step")
    print("| kernel | calls/step | us/step | us/call |")
    print("|---|---|---|---|")
    for e in events[: args.top]:
        total = getattr(e, attr) / args.steps
        print(f"| {e.key[:90]} | {e.count / args.steps:.0f} | {total:.1f} | "
              f"{getattr(e, attr) / max(e.count, 1):.1f} |")


if __name__ == "__main__":
    main()
