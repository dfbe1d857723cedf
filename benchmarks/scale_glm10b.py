"""Scale benchmark: build GLM-10b-ch's configuration with random weights, measure, load, check.

For each target the build runs as `flagc build --random-weights` in a child process whose peak
RSS (the whole process tree, polled with psutil) and wall time are recorded, with the artifact's
size on disk. Then the artifact of the last target that fits in memory (int4 by default) is loaded
and one forward pass over a short prompt must give finite logits. Outputs are deleted afterwards
(a 10B fp16 artifact is ~20 GB) unless --keep.

    python benchmarks/scale_glm10b.py                       # GLM-10b-ch, onnx-fp16 + onnx-int4
    python benchmarks/scale_glm10b.py --model /path/cfg-folder --targets onnx-fp32 --out /tmp/x

Issue 8's bar: peak RSS <= 6 GiB per build on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil

GIB = 2**30


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children (the build may spawn helpers)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _partial_bytes(out: str) -> int:
    """Bytes a running build has written so far (its temp folder beside `out`)."""
    parent, base = os.path.split(os.path.abspath(out))
    total = 0
    for entry in os.listdir(parent):
        if entry.startswith(f".{base}.flagc-tmp-"):
            folder = os.path.join(parent, entry)
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return total


def measured_build(model: str, target: str, out: str, seed: int, extra: list[str],
                   time_limit: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "flagc.cli", "build", "-m", model, "--random-weights",
           "--seed", str(seed), "-t", target, "-o", out, "-q", *extra]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    peak, written, stopped = 0, 0, False
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        if time_limit and time.perf_counter() - t0 > time_limit and not stopped:
            written = _partial_bytes(out)
            child.terminate()  # flagc turns SIGTERM into a clean interrupt (temp folder removed)
            stopped = True
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    log = child.stdout.read()
    result = {"target": target, "command": " ".join(["flagc", *cmd[3:]]), "rc": child.returncode,
              "peak_rss_bytes": peak, "seconds": round(seconds, 1)}
    if stopped:
        result["error"] = f"stopped at the --time-limit of {time_limit:.0f} s"
        result["partial_bytes_written"] = written
        return result
    if child.returncode != 0:
        result["error"] = log.strip().splitlines()[-1] if log.strip() else "no output"
        return result
    files = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    result["files"] = files
    result["size_bytes"] = sum(files.values())
    return result


_NP = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}


def prompt_feeds(io_inputs: list[dict], ids: list[int]) -> dict[str, np.ndarray]:
    """Inputs for one prompt with an empty cache, from the artifact's declared IO. The runtime's
    forward() covers plain decoders; GLM's step also takes [batch, 2, seq] positions (position,
    block position) and its mask is the per-sequence prefix length."""
    seq = len(ids)
    feeds = {}
    for spec in io_inputs:
        name, shape, dtype = spec["name"], spec["shape"], _NP[spec["dtype"]]
        if name == "input_ids":
            feeds[name] = np.array([ids], dtype=dtype)
        elif name == "position_ids":
            pos = np.arange(seq, dtype=dtype)[None]
            feeds[name] = np.stack([pos[0], np.zeros(seq, dtype)])[None] if len(shape) == 3 \
                else pos
        elif name == "attention_mask":
            feeds[name] = np.array([seq], dtype) if len(shape) == 1 else np.ones((1, seq), dtype)
        elif name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype)
        else:  # token_type_ids and the like
            feeds[name] = np.zeros((1, seq), dtype)
    return feeds


def finite_logits(folder: str, prompt_ids: list[int]) -> dict:
    """Load the artifact and run one forward pass over the prompt; logits must be finite."""
    import flagc

    t0 = time.perf_counter()
    model = flagc.load(folder, threads=psutil.cpu_count())
    loaded = time.perf_counter() - t0
    vocab = int(model.manifest.get("vocab_size") or 2**31)
    feeds = prompt_feeds(model.manifest["io"]["inputs"], [i % vocab for i in prompt_ids])
    logits = np.asarray(model.engine.run(feeds, ["logits"])["logits"], dtype=np.float32)
    rss = psutil.Process().memory_info().rss
    return {"artifact": folder, "logits_shape": list(logits.shape),
            "finite": bool(np.isfinite(logits).all()),
            "logits_abs_max": float(np.abs(logits).max()), "load_seconds": round(loaded, 1),
            "forward_seconds": round(time.perf_counter() - t0 - loaded, 1), "rss_bytes": rss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GLM-10b-ch", help="zoo name or folder with config.json")
    ap.add_argument("--targets", nargs="+", default=["onnx-fp16", "onnx-int4"])
    ap.add_argument("--out", default="/tmp/flagc-scale", help="where artifacts are written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", default=None,
                    help="target whose artifact is loaded for the logits check (default: last)")
    ap.add_argument("--prompt-ids", default="5,17,230,42,7,99,1000,3")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--budget-gib", type=float, default=6.0, help="peak RSS bar per build")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop a build after this many seconds and report it as partial")
    ap.add_argument("build_args", nargs="*", help="extra `flagc build` flags (after --)")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    usage = shutil.disk_usage(args.out)
    mem = psutil.virtual_memory()
    report = {"model": args.model, "host": {"cpus": psutil.cpu_count(),
                                            "ram_bytes": mem.total,
                                            "available_bytes": mem.available,
                                            "disk_free_bytes": usage.free,
                                            "load_average": list(os.getloadavg())},
              "builds": []}
    check_target = args.check or args.targets[-1]
    check_result = None
    for target in args.targets:
        out = os.path.join(args.out, f"{os.path.basename(args.model.rstrip('/'))}-{target}")
        r = measured_build(args.model, target, out, args.seed, args.build_args, args.time_limit)
        r["within_budget"] = r["peak_rss_bytes"] <= args.budget_gib * GIB
        report["builds"].append(r)
        _print_build(r)
        if r["rc"] == 0 and target == check_target:
            ids = [int(t) for t in args.prompt_ids.split(",")]
            check_result = finite_logits(out, ids)
            print(f"  logits {check_result['logits_shape']} finite={check_result['finite']} "
                  f"(max |x| {check_result['logits_abs_max']:.3g}; load "
                  f"{check_result['load_seconds']} s, forward {check_result['forward_seconds']} s)",
                  flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    report["logits_check"] = check_result
    report["host"]["load_average_after"] = list(os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = all(b["rc"] == 0 and b["within_budget"] for b in report["builds"])
    ok = ok and check_result is not None and check_result["finite"]
    return 0 if ok else 1


def _print_build(r: dict) -> None:
    if r["rc"] != 0:
        partial = (f", {r['partial_bytes_written'] / GIB:.2f} GiB written"
                   if "partial_bytes_written" in r else "")
        print(f"{r['target']}: FAILED (rc {r['rc']}) after {r['seconds']} s: {r.get('error')}"
              f" (peak RSS so far {r['peak_rss_bytes'] / GIB:.2f} GiB{partial})", flush=True)
        return
    print(f"{r['target']}: peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, {r['seconds']} s, "
          f"{r['size_bytes'] / GIB:.2f} GiB on disk "
          f"({', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in r['files'].items())})  "
          f"[{r['command']}]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
