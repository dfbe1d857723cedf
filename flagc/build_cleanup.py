"""Kill safety for builds: signals become KeyboardInterrupt, and dead builds' temp folders go away.

A build writes into `.NAME.flagc-tmp-PID-XXXX` beside its output (see `artifact.staged_folder`)
and holds an exclusive flock on that folder for as long as it runs. The kernel drops the lock when
the process dies, however it dies (SIGKILL, OOM killer, power loss aside), so the next build can
tell a dead build's leftovers from a live one's without trusting pids, which get reused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
from typing import Iterator

__all__ = ["hold_build_lock", "interrupt_on_signals", "remove_stale_builds", "TMP_PATTERN"]

TMP_PATTERN = re.compile(r"^\..+\.flagc-tmp-(\d+)-[^/]+$")
# mkdtemp and flock are two calls: a folder this young whose pid is alive may be a build that has
# not taken its lock yet.
_GRACE_SECONDS = 2.0

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, stale folders are only reported
    fcntl = None


@contextlib.contextmanager
def hold_build_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive flock on `folder` (a directory fd: the lock follows the inode, so it
    survives the rename into place)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(folder: str):
    """An fd holding the folder's lock, or None when a live build holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_builds(output: str) -> list[str]:
    """Delete temp folders of dead builds beside `output` (and a dead build's `.flagc-old`);
    returns the paths removed. Folders of live builds are left alone."""
    if fcntl is None:
        return []
    parent = os.path.dirname(os.path.abspath(output))
    removed, live = [], 0
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    for entry in entries:
        m = TMP_PATTERN.match(entry)
        path = os.path.join(parent, entry)
        if not m or not os.path.isdir(path):
            continue
        pid = int(m.group(1))
        try:
            young = time.time() - os.stat(path).st_mtime < _GRACE_SECONDS
        except OSError:
            continue
        if young and _pid_alive(pid):
            live += 1
            continue
        fd = _try_lock(path)
        if fd is None:
            live += 1
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    trash = os.path.abspath(output) + ".flagc-old"
    if not live and os.path.isdir(trash):  # a build killed between its two renames
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(trash)
    return removed


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (so `finally` and `except`
    cleanups run) instead of killing the process outright. Main thread only; signals someone set
    to be ignored (nohup) stay ignored, custom handlers stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
