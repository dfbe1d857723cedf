"""HTTP transfers for the flagc hub: the listing request and resumable, verified file downloads.

urllib only (no `requests` dependency). Every network failure ends up either as a `_Transient`
(dropped connection, timeout, HTTP 5xx: retried with backoff, resuming from the `.part` file) or as
a `HubError` whose message names the URL and says what was received.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import flagc
from flagc.errors import HubError
from flagc.models.hub_protocol import (
    MAX_LISTING_BYTES,
    HubFile,
    file_url,
    listing_url,
    parse_listing,
)

__all__ = [
    "DEFAULT_RETRY",
    "RetryPolicy",
    "fetch_file",
    "fetch_listing",
    "local_file_matches",
    "part_path",
    "sha256_file",
]

log = logging.getLogger("flagc.hub")

_CHUNK = 1024 * 1024
_USER_AGENT = f"flagc/{flagc.__version__}"


@dataclass(frozen=True)
class RetryPolicy:
    """How often a transient failure (drop, timeout, 5xx) is retried, and how long to back off.

    Attempt k (0-based) that fails waits `min(backoff_s * 2**k, max_backoff_s)` before the next.
    """

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number `attempt` (0-based)."""
        return min(self.backoff_s * (2**attempt), self.max_backoff_s)


DEFAULT_RETRY = RetryPolicy()


class _Transient(Exception):
    """A failure worth retrying; `str()` is the user-facing reason."""


class _RestartFile(_Transient):
    """The partial file cannot be resumed (416, bad Content-Range): retry from byte 0."""


ProgressFn = Callable[[int], None]  # called with the number of bytes of the file now on disk


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _open(url: str, timeout: float, not_found: str, headers: dict[str, str] | None = None):
    """GET `url` and return the response, mapping every failure to _Transient or HubError.

    Args:
        url: the full URL.
        timeout: seconds for the connect and for each socket read.
        not_found: the message for an HTTP 404 (only the caller knows whether a model or a file
            is missing).
        headers: extra request headers (Range).
    """
    # identity: a compressed body would break both Range offsets and the size check.
    all_headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
    request = urllib.request.Request(url, headers=all_headers, method="GET")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        body = _read_error_body(exc)
        raise _status_error(exc.code, exc.reason, url, not_found, body) from None
    except urllib.error.URLError as exc:
        raise _url_error(exc.reason, url, timeout) from None
    except TimeoutError:
        raise _Transient(
            f"timed out after {timeout:g} s waiting for an answer from {url}"
        ) from None
    except (ConnectionError, http.client.HTTPException) as exc:
        # RemoteDisconnected and friends: the server dropped us before the status line.
        raise _Transient(f"connection to {url} dropped: {type(exc).__name__}: {exc}") from None


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    """The first bytes of an HTTP error body (hubs often explain themselves there)."""
    try:
        return exc.read(300).decode("utf-8", errors="replace").strip()
    except Exception:  # the body of an error page is a nicety; never mask the status with it
        return ""
    finally:
        exc.close()


def _status_error(code: int, reason: str, url: str, not_found: str, body: str) -> Exception:
    """Map an HTTP error status to HubError (client errors) or _Transient (5xx)."""
    detail = f": {body!r}" if body else ""
    if code == 404:
        return HubError(f"{not_found} (GET {url} answered 404 Not Found)")
    if code == 416:
        return _RestartFile(f"{url} answered 416 Range Not Satisfiable to a resume request")
    if code >= 500:
        return _Transient(f"hub server error: GET {url} answered HTTP {code} {reason}{detail}")
    return HubError(f"GET {url} answered HTTP {code} {reason}{detail}")


def _url_error(reason: object, url: str, timeout: float) -> Exception:
    """Map a URLError's reason (an OSError or a string) to HubError or _Transient."""
    host = _netloc(url)
    if isinstance(reason, ConnectionRefusedError):
        return HubError(
            f"connection refused by {host} for {url}: is the hub running and is FLAGC_HUB_URL "
            "(or hub_url=) right?"
        )
    if isinstance(reason, TimeoutError):
        return _Transient(f"timed out after {timeout:g} s connecting to {host} for {url}")
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return _Transient(f"connection to {host} dropped for {url}: {reason}")
    if isinstance(reason, OSError) and type(reason).__name__ == "gaierror":
        return HubError(f"cannot resolve hub host {host!r} for {url}: {reason}")
    return HubError(f"cannot reach {url}: {reason}")


def _with_retries(action: Callable[[], object], what: str, policy: RetryPolicy):
    """Run `action`, retrying `_Transient` failures per `policy`; HubError passes through."""
    last: _Transient | None = None
    for attempt in range(policy.attempts):
        try:
            return action()
        except _Transient as exc:
            last = exc
            if attempt + 1 < policy.attempts:
                delay = policy.delay(attempt)
                log.info("%s: %s; retrying in %.2g s", what, exc, delay)
                time.sleep(delay)
    raise HubError(f"{last} (gave up on {what} after {policy.attempts} attempts)")


def fetch_listing(
    hub_url: str, model_name: str, timeout: float, policy: RetryPolicy = DEFAULT_RETRY
) -> list[HubFile]:
    """GET and validate the file listing of `model_name` (see the protocol in flagc.models.hub)."""
    url = listing_url(hub_url, model_name)
    not_found = f"model {model_name!r} not found on hub {hub_url}; check the model name"

    def attempt() -> bytes:
        with _open(url, timeout, not_found) as resp:
            if resp.status != 200:
                raise HubError(f"GET {url} answered HTTP {resp.status}, expected 200 with JSON")
            try:
                body = resp.read(MAX_LISTING_BYTES + 1)
            except TimeoutError:
                raise _Transient(f"timed out after {timeout:g} s reading {url}") from None
            except (ConnectionError, http.client.HTTPException) as exc:
                raise _Transient(f"connection dropped while reading {url}: {exc!r}") from None
        if len(body) > MAX_LISTING_BYTES:
            raise HubError(f"hub listing {url} is larger than {MAX_LISTING_BYTES} bytes")
        return body

    body = _with_retries(attempt, f"listing of {model_name!r}", policy)
    return parse_listing(body, url)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB shards need no RAM."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def part_path(final: Path) -> Path:
    """Where the bytes of `final` accumulate until they are complete and verified."""
    return final.with_name(final.name + ".part")


def fetch_file(
    hub_url: str,
    model_name: str,
    model_dir: Path,
    hub_file: HubFile,
    timeout: float,
    on_progress: ProgressFn,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> None:
    """Download one listed file into `model_dir`, resuming any `.part`, then verify and place it.

    The final name appears only after size (and sha256 when listed) match; on a digest mismatch
    the `.part` is deleted and HubError names the file and both digests.
    """
    url = file_url(hub_url, model_name, hub_file.path)
    final = model_dir / hub_file.path
    part = part_path(final)
    part.parent.mkdir(parents=True, exist_ok=True)

    def attempt() -> None:
        try:
            _fetch_once(url, part, hub_file, model_name, timeout, on_progress)
        except _RestartFile:
            part.unlink(missing_ok=True)
            raise

    _with_retries(attempt, f"{model_name}/{hub_file.path}", policy)
    _verify_and_place(part, final, hub_file, model_name, url)


def _fetch_once(
    url: str,
    part: Path,
    hub_file: HubFile,
    model_name: str,
    timeout: float,
    on_progress: ProgressFn,
) -> None:
    """One GET of the missing tail of `part`; raises _Transient when the stream breaks off."""
    if hub_file.size == 0:
        part.touch()  # nothing to fetch; an empty file still goes through verify-and-rename
        return
    have = part.stat().st_size if part.exists() else 0
    if have > hub_file.size:  # left over from a different version of the file
        part.unlink()
        have = 0
    if have == hub_file.size:
        return  # everything is on disk already; verification decides whether it is right
    headers = {"Range": f"bytes={have}-"} if have else {}
    not_found = f"file {hub_file.path!r} of model {model_name!r} is listed but not served"
    with _open(url, timeout, not_found, headers) as resp:
        have = _start_offset(resp, have, url, hub_file)
        _check_length(resp, have, url, hub_file)
        on_progress(have)
        with open(part, "ab" if have else "wb") as out:
            _copy_body(resp, out, have, url, hub_file, timeout, on_progress)


def _start_offset(resp, have: int, url: str, hub_file: HubFile) -> int:
    """The byte offset the response body starts at: `have` for a 206, 0 when Range was ignored."""
    if resp.status == 200:
        if have:
            log.info("%s ignored Range: bytes=%d-; restarting the file from byte 0", url, have)
        return 0
    if resp.status == 206 and have:
        content_range = resp.headers.get("Content-Range", "")
        expected = f"bytes {have}-{hub_file.size - 1}/"
        if not content_range.startswith(expected):
            raise _RestartFile(
                f"{url} answered 206 with Content-Range {content_range!r}, expected {expected}..."
            )
        return have
    raise HubError(f"GET {url} answered HTTP {resp.status}, expected 200 (or 206 to a Range)")


def _check_length(resp, have: int, url: str, hub_file: HubFile) -> None:
    """A Content-Length that disagrees with the listed size is a hub error, not a short read."""
    length = resp.headers.get("Content-Length")
    if length is None:
        return  # chunked: the byte count is checked while copying
    if not length.isdigit() or have + int(length) != hub_file.size:
        raise HubError(
            f"{url}: Content-Length {length!r} from byte {have} disagrees with the listed size "
            f"{hub_file.size} of {hub_file.path!r}"
        )


def _copy_body(resp, out, have: int, url: str, hub_file: HubFile, timeout: float, on_progress):
    """Append the body to `out`, flushing as it goes so a drop keeps what arrived for the resume."""
    while have < hub_file.size:
        try:
            # One byte more than needed would reveal a body longer than listed.
            chunk = resp.read(min(_CHUNK, hub_file.size - have + 1))
        except TimeoutError:
            raise _Transient(
                f"timed out after {timeout:g} s reading {url} at byte {have}"
            ) from None
        except (ConnectionError, http.client.HTTPException) as exc:
            # IncompleteRead is what a dropped connection looks like when Content-Length was sent.
            raise _Transient(
                f"connection dropped reading {url} at byte {have} of {hub_file.size}: "
                f"{type(exc).__name__}"
            ) from None
        if not chunk:
            raise _Transient(f"{url} ended at byte {have} of {hub_file.size}")
        if have + len(chunk) > hub_file.size:
            raise _RestartFile(f"{url} sent more than the listed {hub_file.size} bytes")
        out.write(chunk)
        out.flush()
        have += len(chunk)
        on_progress(have)
    # Durable before the rename in _verify_and_place, so a power cut cannot leave a short file
    # under its final name.
    os.fsync(out.fileno())


def _verify_and_place(part: Path, final: Path, hub_file: HubFile, model_name: str, url: str):
    """Check size and digest of `part`, then atomically rename it to `final`."""
    size = part.stat().st_size
    if size != hub_file.size:
        part.unlink()
        raise HubError(
            f"{model_name}/{hub_file.path}: downloaded {size} bytes from {url}, "
            f"the hub listing says {hub_file.size}; the partial file was deleted"
        )
    if hub_file.sha256 is not None:
        got = sha256_file(part)
        if got != hub_file.sha256:
            part.unlink()
            raise HubError(
                f"sha256 mismatch for {model_name}/{hub_file.path} from {url}: "
                f"expected {hub_file.sha256}, got {got}; the partial file was deleted "
                "(the hub's copy or its listing is corrupt)"
            )
    os.replace(part, final)


def local_file_matches(final: Path, hub_file: HubFile) -> bool:
    """True when `final` already holds exactly the listed file (size, and sha256 when listed)."""
    if not final.is_file() or final.stat().st_size != hub_file.size:
        return False
    return hub_file.sha256 is None or sha256_file(final) == hub_file.sha256
