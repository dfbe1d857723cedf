"""Run a `flagc bench` suite into dated files and compare with the previous run of that suite.

    python benchmarks/bench_suite.py [--suite cpu] [--out benchmarks/results] [--max-regression 10%]
        [-- extra flagc bench flags, e.g. --reps 3 --baseline transformers]

Writes OUT/<suite>-<machine>-<date>.{json,md,png}. When an earlier JSON of the same suite and
machine exists in OUT, the new run is compared with the newest one (`flagc bench --compare`),
and this script exits with its status: 1 when a ratio to a baseline fell by more than the
threshold. Only ratios are compared: absolute times on a shared machine drift 5-10%.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--max-regression", default="10%")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to flagc bench")
    a = ap.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"{a.suite}-{platform.node() or 'host'}-"
    previous = sorted(a.out.glob(f"{stem}*.json"))
    base = a.out / (stem + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    cmd = [sys.executable, "-m", "flagc.cli", "bench", "--suite", a.suite,
           "--json", f"{base}.json", "--markdown", f"{base}.md", "--plot", f"{base}.png", *extra]
    if previous:
        cmd += ["--compare", str(previous[-1]), "--max-regression", a.max_regression]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
