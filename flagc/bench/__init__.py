"""`flagc bench`: flagc artifacts timed side by side with baselines, reported as ratios.

Public surface: `run_bench` / `Options` (measure), `compare` (ratios between runs),
`plot_result`, `to_markdown`, the result schema (`RESULT_SCHEMA`, `check_result`), the suite and
baseline tables, and `register` for the CLI. Heavy imports (torch, onnxruntime, matplotlib)
happen only when a function needs them.
"""

from __future__ import annotations

from flagc.bench.baselines import BASELINES
from flagc.bench.command import register
from flagc.bench.compare import compare, parse_threshold
from flagc.bench.plot import plot_result
from flagc.bench.report import to_markdown
from flagc.bench.runner import Options, run_bench
from flagc.bench.schema import RESULT_SCHEMA, SCHEMA_ID, check_result, validate
from flagc.bench.suites import SUITES

__all__ = [
    "BASELINES",
    "Options",
    "RESULT_SCHEMA",
    "SCHEMA_ID",
    "SUITES",
    "check_result",
    "compare",
    "parse_threshold",
    "plot_result",
    "register",
    "run_bench",
    "to_markdown",
    "validate",
]
