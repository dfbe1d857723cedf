"""Measurement helpers: summaries with spread, foreign CPU load, and peak RSS.

A shared machine drifts 5-10% between runs (see the baselines' README), so every summary keeps
min, median, max and the spread, and every measured block records how much CPU other processes
used meanwhile, to flag noisy numbers instead of hiding them.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

__all__ = ["summarize", "summarize_rate", "CpuWatch", "PeakRss", "is_noisy", "peak_rss_method"]

NOISE_SPREAD = 0.10  # median more than 10% above min: the anchors' noise rule
NOISE_OTHER_CORES = 0.15  # other processes used more than 0.15 core during the block


def summarize(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """min / median / max / n / spread_pct of `values` multiplied by `scale`."""
    xs = sorted(v * scale for v in values)
    med = statistics.median(xs)
    spread = 100.0 * (med - xs[0]) / xs[0] if xs[0] > 0 else 0.0
    return {
        "median": round(med, digits),
        "min": round(xs[0], digits),
        "max": round(xs[-1], digits),
        "n": len(xs),
        "spread_pct": round(spread, 1),
    }


def summarize_rate(seconds: list[float], digits: int = 2) -> dict[str, Any]:
    """Rates (1/s) from per-item times: the median rate is 1/median time, the best is 1/min."""
    xs = sorted(seconds)
    med = statistics.median(xs)
    best, worst = 1.0 / xs[0], 1.0 / xs[-1]
    return {
        "median": round(1.0 / med, digits),
        "min": round(worst, digits),
        "max": round(best, digits),
        "n": len(xs),
        "spread_pct": round(100.0 * (best - 1.0 / med) / (1.0 / med), 1),
    }


def is_noisy(stat: dict[str, Any], cpu: dict[str, Any] | None) -> bool:
    """The anchors' rule: spread over 10% or more than 0.15 core used by other processes."""
    if stat["spread_pct"] > 100 * NOISE_SPREAD:
        return True
    return bool(cpu) and cpu.get("other_procs_cores", 0.0) > NOISE_OTHER_CORES


def _cpu_counters() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process), or None
    where /proc/stat is missing (non-Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    clk = os.sysconf("SC_CLK_TCK")
    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / clk  # user nice system irq softirq
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


class CpuWatch:
    """Context manager: CPU cores used by other processes (averaged) during the block."""

    def __enter__(self) -> CpuWatch:
        self.result: dict[str, Any] | None = None
        self._c0 = _cpu_counters()
        return self

    def __exit__(self, *exc: object) -> None:
        c1 = _cpu_counters()
        if self._c0 is None or c1 is None:
            return
        wall = max(c1[0] - self._c0[0], 1e-9)
        own = (c1[2] - self._c0[2]) / wall
        other = max(0.0, (c1[1] - self._c0[1]) / wall - own)
        self.result = {"other_procs_cores": round(other, 3), "own_cores": round(own, 3),
                       "wall_s": round(wall, 3)}


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    # Writing "5" to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); it lets us
    # measure each engine's peak in one process without a sampling thread.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_method() -> str | None:
    """How `PeakRss` measures here: "vmhwm", "psutil-sampling", or None (cannot)."""
    if _read_hwm() is not None and _reset_hwm():
        return "vmhwm"
    return "psutil-sampling" if _rss_bytes() is not None else None


class PeakRss:
    """Context manager: peak resident memory during the block, and its rise over the start.

    Uses the kernel's VmHWM (reset at entry) where possible, else samples psutil's RSS every
    5 ms in a thread, else records nothing (`result` stays None and the report says so).
    """

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self._method = peak_rss_method()

    def __enter__(self) -> PeakRss:
        self._start = _rss_bytes() if self._method == "psutil-sampling" else None
        if self._method == "vmhwm":
            _reset_hwm()
            self._start = _read_hwm()
        elif self._method == "psutil-sampling":
            self._peak = self._start or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        if self._method == "vmhwm":
            peak = _read_hwm()
        elif self._method == "psutil-sampling":
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes() or 0)
        else:
            return
        mb = 1024 * 1024
        self.result = {"peak_rss_mb": round(peak / mb, 1),
                       "peak_rise_mb": round((peak - (self._start or 0)) / mb, 1),
                       "method": self._method}
