"""Teacher-forced decode parity of flagc's decode paths against transformers, per step.

Greedy agreement on random weights is fragile (near-tied logits flip on fp16 noise), so this
compares logits instead: the prompt and then a fixed continuation are fed step by step through
each flagc path, and every step's logits are compared with transformers fp32 on the same tokens
(one full-sequence forward). transformers fp16 eager is measured the same way, as the scale of
"fp16 noise".

Paths: `dynamic` (artifact without decode graphs: growing KV tensors), `shared` (the artifact
with decode graphs, every step through the dynamic graph over the shared max-length KV buffer),
`static` (the same artifact, one-token steps through the static decode graph: a CUDA graph on
cuda), `static-kernels` (an onnx-fp16 artifact built with --kernels flagc: the static graph
multiplies with flagc's own CUDA kernels; not with --tiny, whose target is onnx-fp32).

    python benchmarks/gpu_decode_parity.py --work /tmp/gpuw            # on the GPU host
    python benchmarks/gpu_decode_parity.py --tiny --work /tmp/tinyp    # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import gpu_llama_decode as bench  # the sibling script (python puts its folder on sys.path)
import numpy as np


def flagc_logits(loaded, prompts: list[list[int]], forced: np.ndarray) -> np.ndarray:
    """[batch, steps + 1, vocab]: logits after the prompt, then after each forced token."""
    dec = loaded.decoder
    steps = forced.shape[1]
    out = [np.array(dec.prefill(prompts, 0, len(prompts[0]) + steps), dtype=np.float32)]
    for t in range(steps):
        out.append(np.array(dec.append(forced[:, t]), dtype=np.float32))
    return np.stack(out, axis=1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import transformers

    import flagc

    device = "cpu" if args.tiny else "cuda"
    target = "onnx-fp32" if args.tiny else "onnx-fp16"
    config = bench.TINY if args.tiny else bench.FULL
    work = args.work or os.path.join("out", "gpu-parity")
    model_dir = os.path.join(work, "model")
    bench.save_model(model_dir, config)
    max_seq = args.prompt_len + args.steps + 1
    graphs = os.path.join(work, f"{target}-parity-graphs")
    plain = os.path.join(work, f"{target}-parity-plain")
    flagc.build(model_dir, target, graphs, max_seq=max_seq, max_batch=args.batch,
                decode_graphs=[args.batch])
    flagc.build(model_dir, target, plain, max_seq=max_seq, max_batch=args.batch)
    kernels = os.path.join(work, f"{target}-parity-kernels")
    if target == "onnx-fp16":
        flagc.build(model_dir, target, kernels, max_seq=max_seq, max_batch=args.batch,
                    decode_graphs=[args.batch], kernels="flagc")

    rng = np.random.default_rng(1)
    ids = rng.integers(3, config["vocab_size"], (args.batch, args.prompt_len + args.steps))
    prompts = ids[:, : args.prompt_len].tolist()
    forced = ids[:, args.prompt_len:]

    def hf_logits(dtype) -> np.ndarray:
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(device).eval()
        with torch.inference_mode():
            t = torch.as_tensor(ids, device=device)
            logits = model(t).logits[:, args.prompt_len - 1:].float().cpu().numpy()
        del model
        return logits  # [batch, steps + 1, vocab]

    ref = hf_logits(torch.float32)
    results = {"fp16 eager (transformers)": hf_logits(torch.float16)} if not args.tiny else {}
    results["dynamic"] = flagc_logits(flagc.load(plain, device=device), prompts, forced)
    results["shared"] = flagc_logits(flagc.load(graphs, device=device, static_decode=False),
                                     prompts, forced)
    results["static"] = flagc_logits(flagc.load(graphs, device=device), prompts, forced)
    if target == "onnx-fp16":
        results["static-kernels"] = flagc_logits(flagc.load(kernels, device=device), prompts,
                                                 forced)

    report = {}
    top_ref = ref.argmax(-1)
    fp16 = results.get("fp16 eager (transformers)")
    top_fp16 = fp16.argmax(-1) if fp16 is not None else top_ref
    for name, got in results.items():
        diff = np.abs(got - ref)
        report[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                        "prefill_max_abs": float(diff[:, 0].max()),
                        "top1_agree": float((got.argmax(-1) == top_ref).mean()),
                        "top1_agree_fp16": float((got.argmax(-1) == top_fp16).mean())}
    print(f"teacher-forced logits vs transformers fp32, batch {args.batch}, "
          f"{args.prompt_len}-token prompt, {args.steps} steps, {device}")
    print("| path | max abs | mean abs | prefill max abs | top-1 = fp32 | top-1 = fp16 eager |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['max_abs']:.4g} | {r['mean_abs']:.4g} | "
              f"{r['prefill_max_abs']:.4g} | {100 * r['top1_agree']:.1f}% | "
              f"{100 * r['top1_agree_fp16']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
