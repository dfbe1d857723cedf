"""The `flagc bench` command (typer). Thin: parse and validate flags, then call the runner.

`register(app)` adds it to flagc's CLI app. Exit codes: 0 done, 1 `--compare` found a
regression, 2 bad input (flags, artifact, result file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flagc.bench.baselines import BASELINES
from flagc.bench.compare import Change, compare, parse_threshold
from flagc.bench.schema import SCHEMA_ID, check_result, validate, RESULT_SCHEMA
from flagc.bench.suites import SUITES
from flagc.errors import ConfigError, FlagcError

__all__ = ["register", "bench"]


def register(app: typer.Typer) -> None:
    """Add the `bench` command to `app`."""
    app.command("bench")(bench)


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if not text:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected N or a comma list such as 1,2,4") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: values must be positive integers")
    return values


def _baselines(values: Optional[list[str]], default: tuple[str, ...]) -> list[str]:
    if not values:
        return list(default)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise ConfigError(f"--baseline {', '.join(bad)}: unknown; choose from "
                          f"{', '.join(BASELINES)} or none")
    return list(dict.fromkeys(names))


def _read_result(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read a bench result ({e})") from None
    errors = validate(data, RESULT_SCHEMA)
    if errors:
        raise ConfigError(f"{flag} {path} is not a {SCHEMA_ID} result: {errors[0]}")
    return data


def _is_result_file(path: Path) -> bool:
    """A results JSON (rather than an artifact): `--compare OLD.json NEW.json` compares files."""
    if path.suffix != ".json" or path.name == "manifest.json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("schema") == SCHEMA_ID
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never a half-written report


def bench(
    artifacts: Annotated[Optional[list[Path]], typer.Argument(
        help="artifact folders (or their engine files); none: build the suite's own. With "
             "--compare, a results JSON here is compared without running anything.")] = None,
    suite: Annotated[Optional[str], typer.Option(
        help=f"suite: {', '.join(SUITES)} (default: cpu, or gpu with --device cuda)")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(
        help=f"baselines to run alongside: {', '.join(BASELINES)}, or none; repeat the flag "
             "or give a comma list (default: the suite's)")] = None,
    batch: Annotated[Optional[str], typer.Option(help="batch size(s): N or N,N,...")] = None,
    prompt_len: Annotated[Optional[str], typer.Option(
        help="decoder prompt length / encoder sequence length(s): N or N,N,...")] = None,
    new_tokens: Annotated[Optional[int], typer.Option(min=2, help="greedy new tokens")] = None,
    threads: Annotated[int, typer.Option(min=1, help="intra-op threads for torch and ORT")] = 2,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="warm-up runs per point")] = None,
    reps: Annotated[Optional[int], typer.Option(min=1, help="measured runs per point")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the result")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="write a Markdown report")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write a PNG plot")] = None,
    compare_to: Annotated[Optional[Path], typer.Option(
        "--compare", help="an earlier result JSON to compare ratios with")] = None,
    max_regression: Annotated[str, typer.Option(
        help="fail --compare when a ratio fell by more than this")] = "10%",
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="where suites build sources and artifacts and baselines cache their exports "
             "(default $FLAGC_BENCH_CACHE or ~/.cache/flagc/bench)")] = None,
) -> None:
    """Benchmark artifacts side by side with baselines; report ratios, compare runs."""
    try:
        code = _bench(**locals())
    except FlagcError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)


def _bench(artifacts: Optional[list[Path]], suite: Optional[str],
           baseline: Optional[list[str]], batch: Optional[str], prompt_len: Optional[str],
           new_tokens: Optional[int], threads: int, device: Optional[str], warmup: Optional[int],
           reps: Optional[int], json_out: Optional[Path], markdown: Optional[Path],
           plot: Optional[Path], compare_to: Optional[Path], max_regression: str,
           cache_dir: Optional[Path]) -> int:
    artifacts = list(artifacts or [])
    threshold = parse_threshold(max_regression)
    old = _read_result(compare_to, "--compare") if compare_to else None
    if old is not None and len(artifacts) == 1 and _is_result_file(artifacts[0]):
        return _report_compare(old, _read_result(artifacts[0], "NEW"), threshold)
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose cpu or cuda")
    if suite is None:
        if not artifacts:
            raise ConfigError("nothing to measure: give ARTIFACT folders or --suite "
                              f"({', '.join(SUITES)})")
        suite = "gpu" if device == "cuda" else "cpu"
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: unknown; choose from {', '.join(SUITES)}")
    chosen = SUITES[suite]
    from flagc.bench.runner import Options, run_bench

    opts = Options(
        suite=chosen, baselines=_baselines(baseline, chosen.baselines),
        cache_dir=cache_dir or Path(os.environ.get("FLAGC_BENCH_CACHE",
                                                   Path.home() / ".cache" / "flagc" / "bench")),
        batches=_int_list(batch, "--batch"), seqs=_int_list(prompt_len, "--prompt-len"),
        new_tokens=new_tokens, threads=threads, device=device or chosen.device,
        warmup=warmup, reps=reps)
    result = run_bench(artifacts, opts)
    if plot:
        from flagc.bench.plot import plot_result

        result["plot"] = plot_result(result, plot)
    check_result(result)  # a result that breaks its own schema is a flagc bug: fail loudly
    if json_out:
        _write(json_out, json.dumps(result, indent=1))
    if markdown:
        from flagc.bench.report import to_markdown

        _write(markdown, to_markdown(result))
    _print_summary(result)
    return _report_compare(old, result, threshold) if old is not None else 0


def _print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for art in result["artifacts"]:
        if "error" in art or "skipped" in art:
            console.print(f"[bold]{art['id']}[/]: {art.get('error') or art.get('skipped')}")
            continue
        for e in art["engines"]:
            if e["status"] != "ok":
                console.print(f"{art['id']}: {e['name']} {e['status']}: {e['note']}")
        if not art["ratios"]:
            continue
        table = Table(title=f"{art['id']}: flagc speedup (baseline median / flagc median)")
        for col in ("point", "metric", "baseline", "ratio", "best"):
            table.add_column(col)
        for r in art["ratios"]:
            table.add_row(r["key"].split(" | ")[1], r["metric"], r["baseline"],
                          f"{r['ratio']:.3f}" + (" ⚠" if r["noisy"] else ""),
                          f"{r['ratio_best']:.3f}")
        console.print(table)


def _report_compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> int:
    from rich.console import Console
    from rich.table import Table

    changes: list[Change] = compare(old, new, threshold)
    table = Table(title=f"ratio changes (fail below -{threshold:.0%})")
    for col in ("ratio", "old", "new", "change", "status"):
        table.add_column(col)
    style = {"regressed": "red", "improved": "green"}
    for c in changes:
        table.add_row(c.key, "—" if c.old is None else f"{c.old:.3f}",
                      "—" if c.new is None else f"{c.new:.3f}",
                      "—" if c.change is None else f"{c.change:+.1%}",
                      f"[{style.get(c.status, 'white')}]{c.status}[/]"
                      + (" (noisy)" if c.noisy else ""))
    console = Console(width=160)
    console.print(table)
    regressed = [c for c in changes if c.status == "regressed"]
    if regressed:
        console.print(f"{len(regressed)} ratio(s) fell by more than {threshold:.0%}")
        return 1
    if not any(c.old is not None and c.new is not None for c in changes):
        console.print("no ratio is in both results: nothing was compared")
    return 0
