"""A local flagc model hub for tests: a real ThreadingHTTPServer on 127.0.0.1, ephemeral port.

Serves the protocol documented in `flagc.models.hub` from an in-memory dict
`{model_name: {path: bytes}}`, records every request, and has knobs for the failures a real hub
shows (all attributes, changeable while the server runs):

    drop_after       close the connection after K body bytes on the first GET of each file
    ignore_range     answer Range requests with 200 and the whole file
    wrong_digest     paths whose listed sha256 is wrong
    omit_digest      list no sha256 at all
    delay_listing_s  sleep before answering a listing (bounded, stops with the server)
    delay_file_s     sleep before answering a file
    listing_json     serve this JSON-able object as every listing instead of the real one
    listing_raw      serve these raw bytes as every listing (malformed JSON)
    file_status      {path: HTTP status} answered instead of the file (e.g. 503)

Usage:
    with HubServer({"tiny": {"config.json": b"{}"}}) as hub:
        download_model("tiny", tmp_path, hub_url=hub.url)
        assert len(hub.file_requests("tiny", "config.json")) == 1

Also here: `silent_server()` (accepts TCP connections, never answers) and `hold_lock`, a
multiprocessing target, which must live in an importable module for `spawn`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

__all__ = ["HubServer", "Request", "hold_lock", "silent_server"]

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    """One request the hub received, and the status it answered (0 if it never answered)."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    dropped: bool = False


@dataclass
class HubServer:
    """An in-memory hub; use as a context manager (`start()` / `stop()` also work)."""

    models: dict[str, dict[str, bytes]]
    drop_after: int | None = None
    ignore_range: bool = False
    wrong_digest: set[str] = field(default_factory=set)
    omit_digest: bool = False
    delay_listing_s: float = 0.0
    delay_file_s: float = 0.0
    listing_json: Any = None
    listing_raw: bytes | None = None
    file_status: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the running hub, e.g. http://127.0.0.1:40123."""
        assert self._server is not None, "HubServer is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        """Bind 127.0.0.1 on an ephemeral port and serve in a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake sleeping handlers, stop serving, close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection -------------------------------------------------------------------------

    def file_requests(self, model: str, path: str) -> list[Request]:
        """Requests for one file, in arrival order."""
        target = f"/models/{model}/{path}"
        with self._lock:
            return [r for r in self.requests if r.path == target]

    def listing_requests(self, model: str) -> list[Request]:
        """Requests for one model's listing, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == f"/api/models/{model}"]

    # -- used by the handler ----------------------------------------------------------------

    def _record(self, request: Request) -> int:
        """Store `request`; return how many earlier requests had the same path."""
        with self._lock:
            earlier = sum(1 for r in self.requests if r.path == request.path)
            self.requests.append(request)
            return earlier

    def _sleep(self, seconds: float) -> None:
        """Sleep, but return at once when the server stops (keeps shutdown fast)."""
        self._stopping.wait(seconds)

    def _listing_body(self, model: str) -> bytes:
        if self.listing_raw is not None:
            return self.listing_raw
        if self.listing_json is not None:
            return json.dumps(self.listing_json).encode()
        entries = []
        for path, data in self.models[model].items():
            entry: dict[str, Any] = {"path": path, "size": len(data)}
            if not self.omit_digest:
                digest_of = b"not the file" if path in self.wrong_digest else data
                entry["sha256"] = hashlib.sha256(digest_of).hexdigest()
            entries.append(entry)
        return json.dumps(entries).encode()

    def _split_file_path(self, rest: str) -> tuple[str, str] | None:
        """'{model}/{path}' -> (model, path); model names may contain '/', longest wins."""
        for model in sorted(self.models, key=len, reverse=True):
            if rest.startswith(model + "/") and rest[len(model) + 1 :] in self.models[model]:
                return model, rest[len(model) + 1 :]
        return None


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the HubServer stored on the server object."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        request = Request("GET", path, dict(self.headers.items()))
        earlier = self.hub._record(request)
        if path.startswith("/api/models/"):
            self._listing(request, path[len("/api/models/") :])
        elif path.startswith("/models/") and (found := self.hub._split_file_path(path[8:])):
            self._file(request, *found, first=earlier == 0)
        else:
            self._send(request, 404, b'{"error": "not found"}', "application/json")

    def _send(self, request: Request, status: int, body: bytes, ctype: str, extra=()) -> None:
        request.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _listing(self, request: Request, model: str) -> None:
        self.hub._sleep(self.hub.delay_listing_s)
        if model not in self.hub.models:
            self._send(request, 404, b'{"error": "no such model"}', "application/json")
            return
        self._send(request, 200, self.hub._listing_body(model), "application/json")

    def _file(self, request: Request, model: str, path: str, first: bool) -> None:
        hub = self.hub
        hub._sleep(hub.delay_file_s)
        if path in hub.file_status:
            status = hub.file_status[path]
            self._send(request, status, f"forced {status}".encode(), "text/plain")
            return
        data = full = hub.models[model][path]
        start, status, extra = 0, 200, []
        match = _RANGE_RE.match(self.headers.get("Range", ""))
        if match and not hub.ignore_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                self._send(request, 416, b"", "text/plain", [("Content-Range", f"*/{len(data)}")])
                return
            data = data[start : end + 1]
            status = 206
            extra = [("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(full)}")]
        if first and hub.drop_after is not None and hub.drop_after < len(data):
            self._send_then_drop(request, status, data, extra)
            return
        self._send(request, status, data, "application/octet-stream", extra)

    def _send_then_drop(self, request: Request, status: int, data: bytes, extra) -> None:
        """Promise the whole body, send `drop_after` bytes, then cut the connection."""
        request.status, request.dropped = status, True
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data[: self.hub.drop_after])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Yield the URL of a 127.0.0.1 socket that accepts connections but never answers.

    The kernel completes the TCP handshake from the listen backlog, so a client connects fine and
    then waits for a status line that never comes: a hung hub.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def hold_lock(lock_file: str, seconds: float, ready) -> None:
    """multiprocessing target: hold a model's download lock for `seconds`; `ready.set()` once held.

    Takes the lock file path (from `flagc.models.hub.model_lock(...).lock_file`) rather than
    importing flagc, so a `spawn` child starts in a fraction of a second.
    """
    import filelock

    with filelock.FileLock(lock_file):
        ready.set()
        time.sleep(seconds)
