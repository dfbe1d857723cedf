"""Progress bars for long phases (download, weight conversion, lowering, engine build).

Quiet when `FLAGC_QUIET=1`, when `set_quiet(True)` was called (`--quiet`), or when stderr is not a
terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

__all__ = ["progress", "phase", "set_quiet", "is_quiet"]

_quiet = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def is_quiet() -> bool:
    return _quiet or os.environ.get("FLAGC_QUIET") == "1" or not sys.stderr.isatty()


class _Task:
    def __init__(self, prog, task_id):
        self._prog, self._id = prog, task_id

    def advance(self, n: float = 1, description: str | None = None) -> None:
        if self._prog is not None:
            kw = {"description": description} if description else {}
            self._prog.update(self._id, advance=n, **kw)


@contextmanager
def progress(description: str, total: float | None, unit: str = "tensors") -> Iterator[_Task]:
    """`with progress("lowering", n) as p: ... p.advance()`; a no-op when quiet."""
    if is_quiet():
        yield _Task(None, None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn()]
    if unit == "bytes":
        from rich.progress import DownloadColumn

        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TextColumn(unit), _rate_column(unit)]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as prog:
        yield _Task(prog, prog.add_task(description, total=total))


def _rate_column(unit: str):
    """Items per second, for bars that count tensors, layers or passes."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            text = "" if speed is None else f"{speed:.1f} {unit}/s"
            return Text(text, style="progress.data.speed")

    return RateColumn()


@contextmanager
def phase(description: str) -> Iterator[None]:
    """A phase with no countable steps (graph capture, engine build): a spinner and the elapsed
    time, so a long silent phase still shows that it is alive; a no-op when quiet."""
    if is_quiet():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=1)
        yield
        prog.update(task, completed=1)
