"""Model hub downloads for `from_pretrain`: fetch `download_path/model_name/` when it is not local.

Configuration:
    FLAGC_HUB_URL   the hub endpoint, e.g. `http://hub.internal:8080` (or pass `hub_url=`).
    FLAGC_OFFLINE=1 forbids all network access; a model that is not already complete locally is a
                    HubError saying what is missing.

Hub protocol (plain HTTP(S), version 1):
    GET {hub}/api/models/{model_name}
        200 with a JSON array (or an object `{"files": [...]}`) of entries
        `{"path": "config.json", "size": 1234, "sha256": "<64 hex>"}`; `sha256` is optional, other
        keys are ignored. `path` is a relative POSIX path inside the model folder ('/'-separated
        segments of [A-Za-z0-9._+=@-], no '.', '..', absolute paths or backslashes). 404 means the
        hub has no such model. `model_name` may itself contain '/' (`org/model`).
    GET {hub}/models/{model_name}/{path}
        the file's bytes. Servers should honour `Range: bytes=N-` with 206 and a
        `Content-Range: bytes N-{size-1}/{size}`; a 200 to a Range request is accepted and the file
        is restarted from byte 0. Content-Length, when sent, must agree with the listed size.
    Any other answer (bad JSON, wrong types, unsafe paths, duplicate paths, 4xx) is a HubError that
    quotes what was received. Drops, timeouts and 5xx are retried with exponential backoff.

On disk, for `download_path/model_name/`:
    <file>.part                 bytes received so far; a retry resumes from its size.
    <file>                      appears (atomic rename) only after its size and sha256 check out.
    .flagc_incomplete           present while a download is running or after one failed, so a
                                half-filled folder never passes as a user-provided local model.
    .flagc_complete.json        written last (atomically): the listing and the verified files.
    ../.flagc_locks/<model_name>.lock  cross-process lock: one process downloads, the rest wait
                                and then find the folder complete.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import filelock

from flagc.errors import HubError
from flagc.models import hub_local, hub_transfer
from flagc.models.hub_local import COMPLETE_MARKER, INCOMPLETE_MARKER, is_model_complete
from flagc.models.hub_protocol import (
    HubFile,
    normalize_hub_url,
    validate_model_name,
    validate_rel_path,
)

__all__ = [
    "COMPLETE_MARKER",
    "INCOMPLETE_MARKER",
    "download_model",
    "is_model_complete",
    "is_offline",
    "model_lock",
    "resolve_model_dir",
]

log = logging.getLogger("flagc.hub")

LOCKS_DIR = ".flagc_locks"
# Bounded so a wedged peer (e.g. a lock on a hung network filesystem) ends in an error, yet long
# enough for a peer to fetch a multi-GB model over a slow link.
LOCK_TIMEOUT_S = 6 * 3600.0
# Read at call time so tests (and impatient users) can swap in a faster policy.
RETRY = hub_transfer.DEFAULT_RETRY


def is_offline() -> bool:
    """True when FLAGC_OFFLINE asks for no network access (1/true/yes/on)."""
    return os.environ.get("FLAGC_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_lock(download_path: str | os.PathLike, model_name: str) -> filelock.FileLock:
    """The cross-process lock guarding `download_path/model_name/` (kept outside that folder)."""
    validate_model_name(model_name)
    lock_file = Path(download_path) / LOCKS_DIR / f"{model_name}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(lock_file, timeout=LOCK_TIMEOUT_S)


def download_model(
    model_name: str,
    download_path: str | Path = "./checkpoints",
    hub_url: str | None = None,
    files: list[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Make `download_path/model_name/` hold the model's hub files, downloading what is missing.

    Args:
        model_name: the hub's name for the model (`GLM-large-ch`, `org/model`).
        download_path: parent folder of model folders.
        hub_url: hub endpoint; defaults to the FLAGC_HUB_URL environment variable.
        files: only these listed paths (default: every file the hub lists).
        progress: show a rich progress bar on stderr (only when stderr is a terminal).
        timeout: seconds for connecting and for each read before the attempt counts as failed.

    Returns:
        The model folder `download_path/model_name`.

    Raises:
        HubError: offline with files missing, no hub configured, unknown model (404), a bad hub
            answer, a digest/size mismatch, or a network failure that outlived the retries.
    """
    validate_model_name(model_name)
    wanted = None if files is None else sorted({validate_rel_path(f, "files=") for f in files})
    model_dir = Path(download_path) / model_name
    if hub_local.missing_files(model_dir, wanted) == []:
        return model_dir
    if is_offline():
        if hub_local.hand_placed(model_dir, wanted):
            return model_dir
        raise _offline_error(model_name, model_dir, wanted)
    url = normalize_hub_url(_configured_hub_url(hub_url, model_name, model_dir))
    with _locked(download_path, model_name):
        # A peer may have completed the folder while this process waited for the lock.
        if hub_local.missing_files(model_dir, wanted) == []:
            return model_dir
        listing = hub_transfer.fetch_listing(url, model_name, timeout, RETRY)
        selected = _select(listing, wanted, url, model_name)
        _download_selected(url, model_name, model_dir, listing, selected, progress, timeout)
    return model_dir


def resolve_model_dir(
    model_name: str,
    download_path: str | Path = "./checkpoints",
    *,
    hub_url: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """The local model folder if it is usable as is, else the folder after `download_model`.

    A folder counts as usable when a completed hub download says so, or, for folders put there by
    hand, when it has config.json and complete weights (every shard of an index, or at least one
    non-empty weight file) and no download is in progress or failed there.
    """
    validate_model_name(model_name)
    model_dir = Path(download_path) / model_name
    if hub_local.is_model_complete(model_dir):
        return model_dir
    return download_model(
        model_name, download_path, hub_url=hub_url, progress=progress, timeout=timeout
    )


def _configured_hub_url(hub_url: str | None, model_name: str, model_dir: Path) -> str:
    """The explicit hub_url, else FLAGC_HUB_URL, else a HubError explaining both options."""
    url = hub_url if hub_url is not None else os.environ.get("FLAGC_HUB_URL")
    if not url:
        raise HubError(
            f"model {model_name!r} is not complete in {model_dir} and no hub is configured: "
            "set FLAGC_HUB_URL or pass hub_url=, or put the model files there"
        )
    return url


def _offline_error(model_name: str, model_dir: Path, wanted: list[str] | None) -> HubError:
    """The HubError for FLAGC_OFFLINE=1 when the model is not (completely) local."""
    missing = hub_local.missing_files(model_dir, wanted)
    if missing is None and wanted is not None:
        missing = [p for p in wanted if not (model_dir / p).is_file()]
    if missing:
        what = f"missing {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
    elif not model_dir.is_dir():
        what = "the folder does not exist"
    elif (model_dir / hub_local.INCOMPLETE_MARKER).exists():
        what = "an earlier download did not finish"
    else:
        what = "no completed download there and no config.json + weights"
    return HubError(
        f"FLAGC_OFFLINE=1 forbids downloading model {model_name!r} and {model_dir} is not "
        f"complete ({what}); unset FLAGC_OFFLINE or copy the model files there"
    )


@contextmanager
def _locked(download_path: str | Path, model_name: str) -> Iterator[None]:
    """Hold the model's lock, logging when another process has it (parallel ranks)."""
    lock = model_lock(download_path, model_name)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("waiting for another process downloading %s (lock %s)", model_name, lock.lock_file)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise HubError(
                f"waited {LOCK_TIMEOUT_S:g} s for lock {lock.lock_file} on model {model_name!r}; "
                "another process holds it (a stuck download?)"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _select(
    listing: list[HubFile], wanted: list[str] | None, url: str, model_name: str
) -> list[HubFile]:
    """The listed files to fetch: all, or the requested subset (every name must be listed)."""
    if wanted is None:
        return listing
    by_path = {f.path: f for f in listing}
    unknown = [p for p in wanted if p not in by_path]
    if unknown:
        raise HubError(
            f"model {model_name!r} on hub {url} has no file(s) {unknown}; "
            f"it lists {sorted(by_path)}"
        )
    return [by_path[p] for p in wanted]


def _download_selected(
    url: str,
    model_name: str,
    model_dir: Path,
    listing: list[HubFile],
    selected: list[HubFile],
    progress: bool,
    timeout: float,
) -> None:
    """Fetch what is not already in place, then record completion (marker last)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    # Written before any file lands, removed only after the marker: a crash in between leaves a
    # folder that neither the marker nor the config.json+weights heuristic accepts.
    (model_dir / hub_local.INCOMPLETE_MARKER).touch()
    todo = [f for f in selected if not _already_in_place(model_dir, f)]
    with _progress_bar(progress, sum(f.size for f in todo)) as report:
        done = 0
        for f in todo:
            on_bytes = _file_progress(report, f"{model_name}/{f.path}", done)
            hub_transfer.fetch_file(url, model_name, model_dir, f, timeout, on_bytes, RETRY)
            done += f.size
    hub_local.write_complete_marker(model_dir, model_name, url, listing, selected)
    (model_dir / hub_local.INCOMPLETE_MARKER).unlink(missing_ok=True)


def _already_in_place(model_dir: Path, hub_file: HubFile) -> bool:
    """True when `hub_file` is on disk: trusted from the marker, else size- and digest-checked."""
    target = model_dir / hub_file.path
    recorded = {f.path: f for f in hub_local.read_marker_files(model_dir) or []}
    if recorded.get(hub_file.path) == hub_file and target.is_file():
        # Verified before its rename by an earlier download; re-hashing GBs here would be waste.
        return target.stat().st_size == hub_file.size
    return hub_transfer.local_file_matches(target, hub_file)


def _file_progress(
    report: Callable[[str, int], None], path: str, offset: int
) -> Callable[[int], None]:
    """Turn a file's bytes-on-disk count into the overall count the progress bar shows."""
    return lambda n: report(path, offset + n)


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str, int], None]]:
    """Yield `report(description, bytes_done)`; a rich bar on a terminal, a no-op otherwise."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if not enabled or not console.is_terminal or total == 0:
        yield lambda description, done: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("download", total=total)
        yield lambda description, done: bar.update(task, description=description, completed=done)
