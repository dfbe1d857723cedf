"""`flagc bench --compare OLD.json`: changes of flagc's ratios to its baselines between runs.

Only ratios are compared, never absolute times: a slower CI machine slows flagc and the
baselines alike, so their ratio holds, while a flagc regression lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flagc.errors import ConfigError

__all__ = ["parse_threshold", "ratios_of", "Change", "compare", "changes_markdown"]


def parse_threshold(text: str) -> float:
    """"10%" or "10" -> 0.10 (always percent, so "0.1" means 0.1%)."""
    raw = text.strip().rstrip("%").strip()
    try:
        pct = float(raw)
    except ValueError:
        raise ConfigError(f"--max-regression {text!r} is not a percentage; use e.g. 10%") from None
    if not 0 <= pct < 100:
        raise ConfigError(f"--max-regression {text!r} must be between 0% and 100%")
    return pct / 100.0


def ratios_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> ratio entry, over all artifacts of a result."""
    return {r["key"]: r for a in result.get("artifacts", []) for r in a.get("ratios", [])}


@dataclass(frozen=True)
class Change:
    """One ratio in the old and/or new run; `change` is new/old - 1."""

    key: str
    old: float | None
    new: float | None
    status: str  # "regressed", "improved", "same", "new", "gone"
    noisy: bool = False

    @property
    def change(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        return self.new / self.old - 1.0


def compare(old: dict[str, Any], new: dict[str, Any], max_regression: float) -> list[Change]:
    """Changes of every ratio; "regressed" where it fell by more than `max_regression`."""
    a, b = ratios_of(old), ratios_of(new)
    out = []
    for key in sorted(set(a) | set(b)):
        o, n = a.get(key), b.get(key)
        if o is None or n is None:
            out.append(Change(key, o and o["ratio"], n and n["ratio"], "new" if o is None
                              else "gone"))
            continue
        rel = n["ratio"] / o["ratio"] - 1.0
        status = ("regressed" if rel < -max_regression else
                  "improved" if rel > max_regression else "same")
        out.append(Change(key, o["ratio"], n["ratio"], status,
                          bool(o.get("noisy") or n.get("noisy"))))
    return out


def changes_markdown(changes: list[Change], max_regression: float) -> str:
    """The change table as Markdown (the CLI prints the same rows with rich)."""
    lines = [f"Ratio changes (flagc speedup over baseline; regression threshold "
             f"{max_regression:.0%})", "", "| ratio | old | new | change | status |",
             "|---|---|---|---|---|"]
    for c in changes:
        lines.append(f"| {c.key} | {_fmt(c.old)} | {_fmt(c.new)} | {_pct(c.change)} | "
                     f"{c.status}{' (noisy)' if c.noisy else ''} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1%}"
