"""`--plot FILE.png`: decode tokens/s against context length, latency against batch size.

One line per engine (per artifact: the baselines are measured next to each artifact). The
function returns what it drew — axes titles and line labels, read back from matplotlib's own
artists — and that record goes into the JSON, so tests and readers can check the plot without
looking at pixels.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["plot_result"]


def _series(result: dict[str, Any], workload: str, x: str, fixed: str,
            stat: str) -> dict[str, list[tuple[int, float]]]:
    """label -> [(x, median)] at the most common value of `fixed` (the sweep's other axis)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for art in result["artifacts"]:
        ms = [m for m in art["measurements"] if m["point"]["workload"] == workload]
        if not ms:
            continue
        # The sweep along x is the set of points sharing the most common value of the other dim.
        common = Counter(m["point"][fixed] for m in ms).most_common(1)[0][0]
        labels = {e["name"]: e["label"] for e in art["engines"]}
        for m in ms:
            if m["point"][fixed] != common:
                continue
            label = f"{labels.get(m['engine'], m['engine'])} [{art['id']}]"
            out.setdefault(label, []).append((m["point"][x], m["stats"][stat]["median"]))
    return {k: sorted(v) for k, v in out.items()}


def plot_result(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draw the two panels into `path` (PNG) and return {"file", "axes": [...]}."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    panels = [
        ("decode tokens/s vs context length", "prompt tokens", "decode tok/s per sequence",
         [_series(result, "decode", "seq", "batch", "decode_tok_s")]),
        ("latency vs batch size", "batch size", "ms (encoder: forward; decoder: ttft)",
         [_series(result, "encoder", "batch", "seq", "latency_ms"),
          _series(result, "decode", "batch", "seq", "ttft_ms")]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    record = []
    for ax, (title, xlabel, ylabel, series_list) in zip(axes, panels):
        for series in series_list:
            for label, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ys = [y for ln in ax.get_lines() for y in ln.get_ydata() if y > 0]
        if ys and max(ys) / min(ys) > 20:  # engines an order of magnitude apart stay readable
            ax.set_yscale("log")
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no measurements", ha="center", va="center",
                    transform=ax.transAxes)
        record.append({"title": title, "xlabel": xlabel, "ylabel": ylabel,
                       "lines": [ln.get_label() for ln in ax.get_lines()]})
    fig.suptitle(f"flagc bench ({result['settings']['suite']}, {result['settings']['device']}, "
                 f"{result['settings']['threads']} threads)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return {"file": str(path), "axes": record}
