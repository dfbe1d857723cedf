"""Running a benchmark: per artifact, load the flagc engine and its baselines, time every
workload point with repetitions interleaved across engines, and turn medians into ratios.

Interleaving (one repetition of each engine in turn, in a rotating order) means that the drift
of a shared machine hits every engine alike, so the ratios stay meaningful when the absolute
numbers move by 5-10% between runs.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flagc.bench import adapter
from flagc.bench.base import DECODE, ENCODER, BenchEngine, Point, Skip
from flagc.bench.baselines import BaselineContext, create_baseline
from flagc.bench.meta import run_meta
from flagc.bench.schema import SCHEMA_ID
from flagc.bench.stats import CpuWatch, PeakRss, is_noisy, summarize, summarize_rate
from flagc.bench.suites import Suite
from flagc.bench.workloads import find_tokenizer, make_inputs
from flagc.errors import FlagcError

__all__ = ["Options", "run_bench", "points_for", "RATIO_METRICS", "DEFINITIONS"]

# ratio metric -> the per-engine statistic it divides; every one is a time (lower is better),
# so ratio = baseline median / flagc median is flagc's speedup (> 1: flagc is faster).
RATIO_METRICS = {ENCODER: {"latency": "latency_ms"},
                 DECODE: {"ttft": "ttft_ms", "decode": "decode_ms_per_token"}}

DEFINITIONS = {
    "latency": "encoder: wall time of one forward over the padded batch (inputs pre-tokenized)",
    "ttft": "wall time from the generate call until the first new token is on the host "
            "(prompt prefill + first argmax + setup)",
    "decode": "(time of last token - time of first token) / (new tokens - 1), per sequence; "
              "decode_tok_s = 1 / that",
    "ratio": "baseline median / flagc median of the metric's time: flagc's speedup, > 1 means "
             "flagc is faster; ratio_best uses the minima",
    "peak_rss": "rise of the process's peak RSS from just before the engine's load through its "
                "load and first run at the largest point",
    "noisy": "median more than 10% (ttft 20%) above the minimum, or other processes used more "
             "than 0.15 core during the point's measurement",
}


@dataclass
class Options:
    """Everything a run needs besides the artifact list (validated by the CLI)."""

    suite: Suite
    baselines: list[str]
    cache_dir: Path
    batches: list[int] | None = None
    seqs: list[int] | None = None
    new_tokens: int | None = None
    threads: int = 2
    device: str = "cpu"
    warmup: int | None = None
    reps: int | None = None
    seed: int = 0
    command: str = field(default_factory=lambda: " ".join(sys.argv))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def points_for(workload: str, opts: Options) -> list[Point]:
    """The suite's points, or those the --batch / --prompt-len lists ask for.

    With only one list given, the other dimension is the suite's anchor point (its first)."""
    base = opts.suite.encoder_points if workload == ENCODER else opts.suite.decoder_points
    new = (opts.new_tokens or opts.suite.new_tokens) if workload == DECODE else 0
    if opts.batches or opts.seqs:
        b0, s0 = base[0] if base else (1, 32)
        pairs = [(b, s) for b in (opts.batches or [b0]) for s in (opts.seqs or [s0])]
    else:
        pairs = list(base)
    return [Point(workload, b, s, new) for b, s in pairs]


def run_bench(artifacts: list[Path], opts: Options,
              log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Benchmark `artifacts` (or the suite's own, built first) and return the result dict
    (the JSON document described by `flagc.bench.schema.RESULT_SCHEMA`)."""
    t0 = time.time()
    try:
        import torch

        torch.set_num_threads(opts.threads)  # ORT sessions get the same count
    except ImportError:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "meta": run_meta(opts),
        "settings": {"suite": opts.suite.name, "baselines": list(opts.baselines),
                     "threads": opts.threads, "device": opts.device,
                     "warmup": opts.warmup, "reps": opts.reps, "seed": opts.seed,
                     "definitions": DEFINITIONS},
        "artifacts": [], "notes": [], "plot": None,
    }
    if not artifacts:
        from flagc.bench.prepare import suite_artifacts

        artifacts, notes = suite_artifacts(opts.suite, opts.cache_dir, log)
        result["notes"] += notes
    seen: set[str] = set()
    for path in artifacts:
        rec = run_artifact(Path(path), opts, log)
        if rec["id"] in seen:  # two artifacts of one model and target: keep ids unique
            rec["id"] = f"{rec['id']}@{Path(path).name}"
        seen.add(rec["id"])
        result["artifacts"].append(rec)
    noisy = [f"{a['id']} {m['engine']} {m['key']}" for a in result["artifacts"]
             for m in a["measurements"] if m["noisy"]]
    if noisy:
        result["notes"].append("noisy timings (prefer ratio_best): " + ", ".join(noisy))
    result["meta"]["wall_s"] = round(time.time() - t0, 2)
    result["meta"]["loadavg_end"] = list(os.getloadavg())
    return result


def run_artifact(path: Path, opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure one artifact and its baselines; failures are recorded, never raised."""
    rec: dict[str, Any] = {"id": path.name, "path": str(path), "engines": [],
                           "measurements": [], "ratios": []}
    try:
        folder, manifest = adapter.read_manifest(path)
        rec.update({k: manifest.get(k) for k in ("model", "family", "task")})
        rec["target"] = adapter.target_name(manifest)
        rec["id"] = f"{manifest.get('model') or folder.name}/{rec['target']}"
        rec["workload"] = adapter.workload_of(manifest)
    except (FlagcError, Skip) as e:
        rec["error" if isinstance(e, FlagcError) else "skipped"] = str(e)
        log(f"{path}: {e}")
        return rec
    src = adapter.source_path(manifest, folder)
    rec["source"] = str(src) if src else None
    ctx = BaselineContext(manifest, folder, src, rec["workload"], opts.device, opts.threads,
                          opts.cache_dir)
    engines: list[BenchEngine] = [adapter.FlagcEngine(folder, manifest, opts.device, opts.threads)]
    for name in opts.baselines:
        try:
            engines.append(create_baseline(name, ctx))
        except Skip as e:
            rec["engines"].append(_entry(name, name, "skipped", str(e)))
            log(f"{rec['id']}: baseline {name} skipped: {e}")
    tok = find_tokenizer(folder, src if src and src.is_dir() else None,
                         manifest.get("vocab_size"))
    rec["tokenizer"] = tok.kind
    points = points_for(rec["workload"], opts)
    inputs = {p: make_inputs(p, tok, opts.seed) for p in points}
    largest = max(points, key=lambda p: p.batch * (p.seq + p.new_tokens))
    live = _load_all(engines, largest, inputs[largest], rec, log)
    if not any(e.name == "flagc" for e in live):
        # Baseline times without flagc's are no result (only ratios are): spare the machine.
        for entry in rec["engines"]:
            if entry["status"] == "ok":
                entry.update(status="skipped", note="not measured: the flagc engine failed")
        live = []
    try:
        for p in points:
            _measure_point(p, inputs[p], live, rec, opts, log)
    finally:
        for e in engines:
            e.close()
        gc.collect()
    rec["ratios"] = _ratios(rec)
    return rec


def _entry(name: str, label: str, status: str, note: str | None) -> dict[str, Any]:
    return {"name": name, "label": label, "status": status, "note": note,
            "load_s": None, "memory": None, "details": {}}


def _load_all(engines: list[BenchEngine], largest: Point, inp: Any, rec: dict[str, Any],
              log: Callable[[str], None]) -> list[BenchEngine]:
    """Load each engine and run it once at the largest point, inside a peak-RSS window."""
    live = []
    order = list(rec["engines"])  # skipped ones first; loaded ones follow in table order
    rec["engines"] = []
    for e in engines:
        entry = _entry(e.name, e.label or e.name, "ok", None)
        try:
            with PeakRss() as mem:
                t = time.perf_counter()
                e.load()
                entry["load_s"] = round(time.perf_counter() - t, 3)
                e.run(largest, inp)
            entry["memory"] = mem.result
            live.append(e)
        except Skip as s:
            entry.update(status="skipped", note=str(s))
        except Exception as x:  # an engine that fails is reported, the others still run
            entry.update(status="error", note=f"{type(x).__name__}: {str(x)[:800]}")
            traceback.print_exc(file=sys.stderr)
        entry["label"] = e.label or e.name
        entry["details"] = dict(e.details)
        rec["engines"].append(entry)
        log(f"{rec['id']}: {e.name} {entry['status']}"
            + (f" ({entry['note']})" if entry["note"] else f", loaded in {entry['load_s']} s"))
    rec["engines"] += order
    return live


def _measure_point(p: Point, inp: Any, live: list[BenchEngine], rec: dict[str, Any],
                   opts: Options, log: Callable[[str], None]) -> None:
    warmup = opts.warmup if opts.warmup is not None else opts.suite.warmup.get(p.workload, 1)
    reps = opts.reps if opts.reps is not None else opts.suite.reps.get(p.workload, 5)
    ok = []
    for e in live:
        try:
            for _ in range(warmup):
                e.run(p, inp)
            ok.append(e)
        except Exception as x:
            _fail(rec, e, x)
    samples: dict[str, list[dict[str, float]]] = {e.name: [] for e in ok}
    with CpuWatch() as cpu:
        for r in range(reps):
            k = r % len(ok) if ok else 0
            for e in ok[k:] + ok[:k]:  # rotate so no engine always follows the same one
                if e.name in samples:
                    try:
                        samples[e.name].append(e.run(p, inp))
                    except Exception as x:
                        _fail(rec, e, x)
                        del samples[e.name]
    for name, runs in samples.items():
        stats = _stats(p, runs)
        main = stats["latency_ms"] if p.workload == ENCODER else stats["decode_ms_per_token"]
        noisy = is_noisy(main, cpu.result) or (
            p.workload == DECODE and stats["ttft_ms"]["spread_pct"] > 20)
        rec["measurements"].append({"engine": name, "key": p.key, "point": p.to_json(),
                                    "stats": stats, "noisy": noisy, "cpu": cpu.result})
        log(f"{rec['id']} {p.key} {name}: " + ", ".join(
            f"{k} {v['median']}" for k, v in stats.items() if isinstance(v, dict)))


def _fail(rec: dict[str, Any], e: BenchEngine, x: Exception) -> None:
    for entry in rec["engines"]:
        if entry["name"] == e.name:
            entry.update(status="error", note=f"{type(x).__name__}: {str(x)[:800]}")
    traceback.print_exc(file=sys.stderr)


def _stats(p: Point, runs: list[dict[str, float]]) -> dict[str, Any]:
    if p.workload == ENCODER:
        lat = summarize([r["latency_s"] for r in runs], 1e3)
        return {"latency_ms": lat,
                "tokens_per_s": round(p.batch * p.seq / (lat["median"] / 1e3), 1)}
    dec = [r["decode_s_per_token"] for r in runs]
    return {"ttft_ms": summarize([r["ttft_s"] for r in runs], 1e3),
            "decode_ms_per_token": summarize(dec, 1e3),
            "decode_tok_s": summarize_rate(dec),
            "total_s": summarize([r["total_s"] for r in runs]),
            "new_tokens": int(min(r["new_tokens"] for r in runs))}


def _ratios(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """flagc's speedup over each baseline, per point and metric (see DEFINITIONS["ratio"])."""
    by = {(m["engine"], m["key"]): m for m in rec["measurements"]}
    out = []
    for m in rec["measurements"]:
        if m["engine"] == "flagc":
            continue
        mine = by.get(("flagc", m["key"]))
        if mine is None:
            continue
        for metric, stat in RATIO_METRICS[rec["workload"]].items():
            base, ours = m["stats"][stat], mine["stats"][stat]
            out.append({"key": f"{rec['id']} | {m['key']} | {metric} vs {m['engine']}",
                        "baseline": m["engine"], "point": m["point"], "metric": metric,
                        "ratio": round(base["median"] / ours["median"], 4),
                        "ratio_best": round(base["min"] / ours["min"], 4),
                        "noisy": bool(m["noisy"] or mine["noisy"])})
    return out
