"""Markdown rendering of a bench result (`--markdown FILE`, and the CI copy)."""

from __future__ import annotations

from typing import Any

__all__ = ["to_markdown"]

NOISY = " ⚠"


def to_markdown(result: dict[str, Any]) -> str:
    """The whole result as Markdown: run facts, then one section per artifact."""
    meta, st = result["meta"], result["settings"]
    v, m = meta["versions"], meta["machine"]
    lines = [f"# flagc bench: suite {st['suite']} ({meta['date']})", "",
             f"Machine: {m.get('cpu')}, {m.get('nproc')} cores, {m.get('mem_gib')} GiB; "
             f"device {st['device']}, {st['threads']} threads (torch and onnxruntime); "
             f"flagc {v.get('flagc')}, torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, "
             f"onnxruntime {v.get('onnxruntime')}, onnxruntime-genai {v.get('onnxruntime-genai')}. "
             f"Run took {meta.get('wall_s')} s; load average {_load(meta)}.", "",
             f"Command: `{meta['command']}`", "",
             "Ratios are flagc's speedup over the baseline measured in the same run (> 1: flagc "
             "is faster); absolute times are for reading next to them, not on their own.", ""]
    for art in result["artifacts"]:
        lines += _artifact(art)
    lines.append("## Definitions\n")
    lines += [f"- {k}: {d}" for k, d in st["definitions"].items()]
    lines.append(f"- {NOISY.strip()} = noisy measurement")
    if result.get("plot"):
        lines.append(f"\nPlot: `{result['plot']['file']}`")
    if result["notes"]:
        lines.append("\n## Notes\n")
        lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _load(meta: dict[str, Any]) -> str:
    def fmt(x: Any) -> str:
        return "/".join(f"{v:.2f}" for v in x) if x else "?"

    return f"{fmt(meta.get('loadavg_start'))} → {fmt(meta.get('loadavg_end'))}"


def _artifact(art: dict[str, Any]) -> list[str]:
    out = [f"## {art['id']}", ""]
    if "error" in art or "skipped" in art:
        word = "error" if "error" in art else "skipped"
        return out + [f"{word}: {art.get('error') or art.get('skipped')} (`{art['path']}`)", ""]
    out += [f"`{art['path']}`: task {art.get('task')}, target {art.get('target')}, source "
            f"`{art.get('source')}`, inputs from {art.get('tokenizer')}.", "",
            "| engine | what runs | status | load s | peak RSS MB (rise) | note |",
            "|---|---|---|---|---|---|"]
    for e in art["engines"]:
        mem = e["memory"]
        mem_s = f"{mem['peak_rss_mb']} ({mem['peak_rise_mb']:+})" if mem else "—"
        out.append(f"| {e['name']} | {e['label']} | {e['status']} | {_or_dash(e['load_s'])} | "
                   f"{mem_s} | {e['note'] or ''} |")
    out.append("")
    if art["measurements"]:
        out += _measurements(art)
    if art["ratios"]:
        out += _ratio_table(art)
    return out


def _or_dash(x: Any) -> str:
    return "—" if x is None else str(x)


def _cell(stat: dict[str, Any], noisy: bool) -> str:
    return f"{stat['median']} (min {stat['min']}, ±{stat['spread_pct']}%){NOISY if noisy else ''}"


def _measurements(art: dict[str, Any]) -> list[str]:
    if art["workload"] == "encoder":
        out = ["| point | engine | latency ms median (min, spread) | tokens/s |",
               "|---|---|---|---|"]
        for m in art["measurements"]:
            s = m["stats"]
            out.append(f"| {m['key']} | {m['engine']} | {_cell(s['latency_ms'], m['noisy'])} | "
                       f"{s['tokens_per_s']} |")
    else:
        out = ["| point | engine | ttft ms median (min, spread) | decode tok/s per sequence "
               "median (best) | new tokens |", "|---|---|---|---|---|"]
        for m in art["measurements"]:
            s = m["stats"]
            rate = s["decode_tok_s"]
            out.append(f"| {m['key']} | {m['engine']} | {_cell(s['ttft_ms'], m['noisy'])} | "
                       f"{rate['median']} ({rate['max']}) | {s['new_tokens']} |")
    return out + [""]


def _ratio_table(art: dict[str, Any]) -> list[str]:
    baselines = list(dict.fromkeys(r["baseline"] for r in art["ratios"]))
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in art["ratios"]:
        point_key = r["key"].split(" | ")[1]
        cell = f"**{r['ratio']:.3f}** (best {r['ratio_best']:.3f}){NOISY if r['noisy'] else ''}"
        rows.setdefault((point_key, r["metric"]), {})[r["baseline"]] = cell
    out = ["| point | metric | " + " | ".join(f"flagc ÷ {b}" for b in baselines) + " |",
           "|---|---|" + "---|" * len(baselines)]
    for (point_key, metric), cells in rows.items():
        out.append(f"| {point_key} | {metric} | "
                   + " | ".join(cells.get(b, "—") for b in baselines) + " |")
    return out + [""]
