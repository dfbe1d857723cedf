"""Shared types of `flagc bench`: workload points, the engine interface, and the skip signal.

Every engine that is timed (the flagc artifact and each baseline) implements `BenchEngine`; the
runner only talks to that interface, so baselines never need special cases in the runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Point", "BenchEngine", "Skip", "ENCODER", "DECODE"]

ENCODER = "encoder"
DECODE = "decode"


@dataclass(frozen=True)
class Point:
    """One workload shape.

    Attributes:
        workload: "encoder" (one forward over a padded batch) or "decode" (greedy generation).
        batch: sequences per call.
        seq: encoder sequence length (padded), or decoder prompt length in tokens.
        new_tokens: tokens generated per sequence (decode only, else 0).
    """

    workload: str
    batch: int
    seq: int
    new_tokens: int = 0

    @property
    def key(self) -> str:
        """Stable text name, used in JSON keys, tables and `--compare` (never parsed back)."""
        if self.workload == ENCODER:
            return f"encoder b{self.batch} s{self.seq}"
        return f"decode b{self.batch} p{self.seq} n{self.new_tokens}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Skip(Exception):
    """Raised by an engine factory or loader when it cannot run here (package missing, wrong
    task, no source weights). The runner reports the reason as "skipped"; nothing is faked."""


class BenchEngine:
    """One thing that can be timed on a workload point.

    Subclasses set `name` (the engine name in reports: "flagc", "transformers", ...) and
    `label` (what exactly runs, e.g. "ORT optimizer fp32 (bert fusions)"), and implement
    `load`, `run` and optionally `close`. `details` collects facts worth recording (dtype,
    attention implementation, paths of exported models).
    """

    name: str = "engine"
    label: str = ""

    def __init__(self) -> None:
        self.details: dict[str, Any] = {}

    def load(self) -> None:
        """Load or build everything needed; raise `Skip` when that is impossible here."""

    def run(self, point: Point, inputs: Any) -> dict[str, float]:
        """Run the workload once and return its raw timings in seconds.

        Encoder: {"latency_s"}. Decode: {"ttft_s", "decode_s_per_token", "total_s",
        "new_tokens"} where ttft is the wall time from the call until the first new token is
        available and decode is (time of last token - time of first) / (new tokens - 1).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Drop references to models and sessions so their memory can be released."""
