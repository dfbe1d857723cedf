"""1.1 B LLaMA decode on one GPU: flagc (onnxruntime CUDA, onnx-fp16) vs transformers, one run.

Workload (issue 6; same as ../shared/baselines/gpu_anchor.py): a LLaMA-architecture model of
~1.1 B parameters (22 layers, hidden 2048, 32 heads / 4 KV heads, FFN 5632, vocab 32000) with
seeded random weights saved by transformers (`LlamaForCausalLM(config).half().save_pretrained`),
batch 1 and batch 8, a 128-token prompt, 256 greedy new tokens (EOS suppressed).

Engines, measured in this one process on the same weights and prompts:
- flagc: `flagc.build(folder, "onnx-fp16", out)`, `flagc.load(out, device="cuda").generate(...)`
- flagc-kernels: the same with `kernels="flagc"` (static decode graphs of up to 4 rows
  multiply with flagc's own CUDA kernels, runtimes/kernels; larger batches as flagc)
- transformers eager (DynamicCache)
- transformers with a static cache + torch.compile (transformers compiles the forward itself
  once `generation_config.cache_implementation = "static"`, as in the anchor)

Decode tokens/s per sequence = (N - 1) / (t(N new tokens) - t(1 new token)), medians over
`--reps`, the anchor's definition for every engine, so prefill cancels out. Also printed: the
memory-bandwidth bound (GPU memory bandwidth / weight bytes read per token, all parameters as in
the anchor) and each engine's share of it, and greedy agreement of flagc with transformers fp16
eager over the first 32 tokens of every row.

    python benchmarks/gpu_llama_decode.py                 # H100 / H200, needs onnxruntime-gpu
    python benchmarks/gpu_llama_decode.py --tiny          # small config on the CPU (smoke check)

On the GPU host onnxruntime-gpu comes from ../shared/gpu/install-ort-gpu.sh (source it first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
AGREE = 32  # greedy tokens that must equal transformers fp16
# Peak HBM bandwidth (bytes/s) by device-name fragment, most specific first (NVIDIA datasheets).
BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
             ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12), ("L40S", 0.864e12),
             ("RTX 4090", 1.008e12), ("RTX 5090", 1.792e12))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small config; defaults to the CPU and "
                    "onnx-fp32 so it runs anywhere")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--target", default=None, help="flagc target (default onnx-fp16; "
                    "onnx-fp32 with --tiny)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", default=None,
                    help="flagc (static decode graphs: CUDA graphs on cuda), flagc-kernels "
                         "(the same on flagc's CUDA kernels; onnx-fp16 only), flagc-dynamic, "
                         "eager, compile (default: all that the target allows)")
    ap.add_argument("--work", default=None, help="folder for the model and artifact "
                    "(reused when present; default out/gpu-llama[-tiny])")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth in GB/s (default: datasheet value for the GPU, "
                         "measured copy bandwidth on the CPU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="also break flagc's decode step down: graph replay alone, one "
                         "decoder step (input copies, KV bookkeeping, logits copy), one greedy "
                         "decoder step (the argmax picked on the device), generate")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.target = args.target or ("onnx-fp32" if args.tiny else "onnx-fp16")
    args.work = args.work or os.path.join("out", "gpu-llama-tiny" if args.tiny else "gpu-llama")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.engines = [e.strip() for e in (args.engines or ",".join(
        ("flagc", "flagc-kernels", "flagc-dynamic", "eager", "compile")
        if args.target == "onnx-fp16" else ("flagc", "flagc-dynamic", "eager", "compile")))
        .split(",") if e.strip()]
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 48)
        args.prompt_len = min(args.prompt_len, 32)
    return args


# ---- setup --------------------------------------------------------------------------------------
def save_model(folder: str, config: dict) -> None:
    """Seeded random weights, saved in fp16 the way the issue says (transformers does it)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.half().save_pretrained(folder)


def build_flagc(model_dir: str, target: str, out: str, max_seq: int, batches: list[int],
                kernels: str = "onnxruntime") -> float:
    """Build once (reused when the artifact has the same target, limits, decode graphs and
    kernels); returns seconds. Every measured batch size gets a static decode graph."""
    import flagc

    manifest = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            m = json.load(f)
        graphs = (m.get("static_decode") or {}).get("graphs", {})
        if (m["target"]["name"] == target and m["dims"]["max_seq"] == max_seq
                and m["dims"]["max_batch"] >= max(batches)
                and all(str(b) in graphs for b in batches)
                and bool(m.get("custom_ops")) == (kernels == "flagc")):
            return 0.0
    t = time.perf_counter()
    flagc.build(model_dir, target, out, max_seq=max_seq, max_batch=max(batches),
                decode_graphs=batches, kernels=kernels)
    return time.perf_counter() - t


def bandwidth(device: str, override_gbs: float | None) -> tuple[float, str]:
    """(bytes/s, where the number came from)."""
    if override_gbs:
        return override_gbs * 1e9, "--bandwidth-gbs"
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for frag, bw in BANDWIDTH:
            if frag in name:
                return bw, f"datasheet peak for {name}"
        return measured_copy_bandwidth(device), f"measured device copy on {name} (not in table)"
    return measured_copy_bandwidth(device), "measured host memory copy"


def measured_copy_bandwidth(device: str) -> float:
    import torch

    n = (1 << 28) if device.startswith("cuda") else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best  # read + write


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- engines ------------------------------------------------------------------------------------
def hf_runner(model, device: str) -> Callable:
    import torch

    def run(prompts, n):
        ids = torch.tensor(prompts, device=device)
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()

    return run


def flagc_runner(loaded) -> Callable:
    def run(prompts, n):
        t = time.perf_counter()
        res = loaded.generate(prompts, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t, [r.token_ids for r in res]

    return run


def decode_rate(run: Callable, prompts, n: int, reps: int,
                warmups: int = 1) -> tuple[float, list[list[int]]]:
    """Median (n-1) / (t(n) - t(1)) per sequence.

    Warm-up runs use exactly the timed lengths (1 and n new tokens): a static cache is sized by
    the generation length, so torch.compile / CUDA graphs compiled for other lengths would be
    recompiled inside the timed runs.
    """
    for _ in range(warmups):
        run(prompts, 1)
        run(prompts, n)
    rates, tokens = [], None
    for _ in range(reps):
        t1, _ = run(prompts, 1)
        tn, tokens = run(prompts, n)
        rates.append((n - 1) / max(tn - t1, 1e-9))
    return statistics.median(rates), tokens


def step_profile(loaded, prompts, rate: float, steps: int = 100) -> dict[str, float]:
    """Milliseconds per decode step at four levels (see --profile)."""
    import numpy as np

    dec = loaded.decoder
    steps = min(steps, loaded.manifest["dims"]["max_seq"] - len(prompts[0]) - 1)

    def per_step(advance) -> float:
        tok = np.asarray(dec.prefill(prompts, 0, len(prompts[0]) + steps + 1)).argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            tok = advance(tok)
        return (time.perf_counter() - t) / steps * 1e3

    out = {"generate": 1e3 / rate,
           "decoder_step": per_step(lambda tok: np.asarray(dec.append(tok)).argmax(-1)),
           "decoder_greedy_step": per_step(lambda tok: dec.append_greedy(tok)[0])}
    static = dec.static_step(len(prompts))
    if static is not None:  # replay the captured step as it stands, nothing else
        t = time.perf_counter()
        for _ in range(steps):
            static.replay()
        out["graph_replay"] = (time.perf_counter() - t) / steps * 1e3
    return out


def agreement(ours: list[list[int]], ref: list[list[int]], k: int = AGREE) -> int:
    """The smallest number of leading tokens (up to k) on which every row agrees."""
    worst = k
    for a, b in zip(ours, ref):
        same = 0
        for x, y in zip(a[:k], b[:k]):
            if x != y:
                break
            same += 1
        worst = min(worst, same)
    return worst


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    import transformers

    import flagc

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on an H100/H200, or pass --tiny for the CPU smoke check")
    if args.device.startswith("cuda") and any(e.startswith("flagc") for e in args.engines):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():  # fail before building
            sys.exit("flagc on cuda needs onnxruntime-gpu (CUDAExecutionProvider); on the GPU "
                     "host see ../shared/gpu/README.md (install-ort-gpu.sh), or leave flagc "
                     "out with --engines eager,compile")
    config = TINY if args.tiny else FULL
    model_dir = os.path.join(args.work, "model")
    arts = {"flagc": os.path.join(args.work, args.target),
            "flagc-kernels": os.path.join(args.work, args.target + "-flagc-kernels")}
    arts["flagc-dynamic"] = arts["flagc"]
    save_model(model_dir, config)
    max_seq = args.prompt_len + args.new_tokens
    build_s = 0.0
    for engine, kernels in (("flagc", "onnxruntime"), ("flagc-kernels", "flagc")):
        if engine in args.engines or (engine == "flagc" and "flagc-dynamic" in args.engines):
            build_s += build_flagc(model_dir, args.target, arts[engine], max_seq, args.batches,
                                   kernels)

    hf_dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=hf_dtype)
    hf = hf.to(args.device).eval()
    params = sum(p.numel() for p in hf.parameters())
    # every weight is read once per decode step (all parameters, as the anchor counts them)
    weight_bytes = params * (2 if "16" in args.target else 4)
    bw, bw_source = bandwidth(args.device, args.bandwidth_gbs)
    bound = bw / weight_bytes
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"

    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, config["vocab_size"], (b, args.prompt_len)).tolist()
               for b in args.batches}
    rates: dict[str, dict[int, float]] = {}
    tokens: dict[str, dict[int, list]] = {}
    profile: dict[str, dict[int, dict]] = {}

    for engine in FLAGC_ENGINES:
        if engine not in args.engines:
            continue
        loaded = flagc.load(arts[engine], device=args.device,
                            static_decode=engine != "flagc-dynamic")
        run = flagc_runner(loaded)
        for b in args.batches:
            rates.setdefault(engine, {})[b], tokens.setdefault(engine, {})[b] = \
                decode_rate(run, prompts[b], args.new_tokens, args.reps)
            if args.profile:
                profile.setdefault(engine, {})[b] = step_profile(loaded, prompts[b],
                                                                 rates[engine][b])
        del loaded
    for b in args.batches:  # the fp16 reference tokens, also when eager is not timed
        ref = hf_runner(hf, args.device)
        if "eager" in args.engines:
            rates.setdefault("eager", {})[b], tokens.setdefault("eager", {})[b] = \
                decode_rate(ref, prompts[b], args.new_tokens, args.reps)
        else:
            tokens.setdefault("eager", {})[b] = ref(prompts[b], AGREE)[1]
    if "compile" in args.engines:
        hf.generation_config.cache_implementation = "static"
        run = hf_runner(hf, args.device)
        for b in args.batches:
            rates.setdefault("compile", {})[b], _ = decode_rate(
                run, prompts[b], args.new_tokens, args.reps, warmups=2)  # compile, then graphs

    result = {
        "device": device_name, "target": args.target, "params": params,
        "reference": f"transformers {str(hf_dtype).removeprefix('torch.')} eager",
        "weight_bytes": weight_bytes, "bandwidth_Bps": bw, "bandwidth_source": bw_source,
        "bandwidth_bound_tok_s": bound, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "reps": args.reps, "flagc_build_s": round(build_s, 1),
        "decode_tok_s": {k: {str(b): v for b, v in d.items()} for k, d in rates.items()},
        "profile_ms": {k: {str(b): v for b, v in d.items()} for k, d in profile.items()},
        "agreement_first_32": {e: {str(b): agreement(tokens[e][b], tokens["eager"][b])
                                   for b in args.batches}
                               for e in FLAGC_ENGINES if e in tokens},
    }
    print(markdown(result, args.batches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


FLAGC_ENGINES = ("flagc", "flagc-kernels", "flagc-dynamic")
NAMES = {"flagc": "flagc ({target}, onnxruntime {ep}, static decode graph{graphs})",
         "flagc-kernels": "flagc ({target}, onnxruntime {ep} + flagc's CUDA kernels, static "
                          "decode graph{graphs})",
         "flagc-dynamic": "flagc ({target}, onnxruntime {ep}, dynamic graph)",
         "eager": "transformers eager",
         "compile": "transformers static cache + torch.compile"}


def markdown(r: dict, batches: list[int]) -> str:
    ep = "CUDA EP" if r["device"] != "CPU" else "CPU EP"
    rates = r["decode_tok_s"]
    hf_best = {b: max([rates[k][str(b)] for k in ("eager", "compile") if k in rates] or [0])
               for b in batches}
    lines = [
        f"LLaMA {r['params'] / 1e6:,.1f} M params, random weights "
        f"({r['weight_bytes'] / 1e9:.3f} GB as run), {r['prompt_len']}-token prompt, "
        f"{r['new_tokens']} greedy new tokens, median of {r['reps']}; device: {r['device']}",
        f"bandwidth bound: {r['bandwidth_Bps'] / 1e9:.0f} GB/s ({r['bandwidth_source']}) / "
        f"{r['weight_bytes'] / 1e9:.3f} GB per token = {r['bandwidth_bound_tok_s']:.1f} tok/s",
        "",
        "| engine | " + " | ".join(f"batch {b} tok/s per seq" for b in batches)
        + " | batch 1 % of bound | " + " | ".join(f"b{b} ÷ best transformers" for b in batches)
        + " |",
        "|---|" + "---|" * (2 * len(batches) + 1),
    ]
    for key, d in rates.items():
        name = NAMES[key].format(target=r["target"], ep=ep,
                                 graphs=" as CUDA graph" if ep == "CUDA EP" else "")
        cells = [f"{d[str(b)]:.1f}" for b in batches]
        pct = f"{100 * d[str(batches[0])] / r['bandwidth_bound_tok_s']:.1f}%" \
            if batches[0] == 1 else "—"
        ratios = [f"{d[str(b)] / hf_best[b]:.2f}×" if hf_best[b] else "—" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pct} | " + " | ".join(ratios)
                     + " |")
    for engine, counts in r["agreement_first_32"].items():
        agree = ", ".join(f"batch {b}: {n}/{AGREE}" for b, n in counts.items())
        lines += ["", f"{engine}: greedy tokens equal to {r['reference']} (leading tokens, "
                      f"worst row): {agree}"]
    for engine, per_batch in r.get("profile_ms", {}).items():
        for b, p in per_batch.items():
            parts = ", ".join(f"{k} {v:.3f}" for k, v in p.items())
            lines.append(f"profile {engine} batch {b} (ms per step): {parts}")
    if r["flagc_build_s"]:
        lines.append(f"flagc build ({r['target']}): {r['flagc_build_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
