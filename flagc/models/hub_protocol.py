"""The flagc hub protocol: URLs, and strict validation of what a hub answers.

See `flagc.models.hub` for the protocol description. Everything a hub sends is untrusted: the
listing is parsed with `json.loads` only, every field is type-checked, and every path is checked to
stay inside the model folder before it is ever joined onto a local path.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

from flagc.errors import HubError

__all__ = [
    "HubFile",
    "MAX_LISTING_BYTES",
    "file_url",
    "listing_url",
    "normalize_hub_url",
    "parse_listing",
    "validate_model_name",
    "validate_rel_path",
]

# A listing is a few KB even for a 100-shard model; a cap keeps a broken hub from exhausting memory.
MAX_LISTING_BYTES = 16 * 1024 * 1024

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# Segment characters allowed in model names and file paths: what HF/FlagAI names use, nothing that
# a shell, URL or filesystem would interpret specially.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._+=@-]+")
# Names flagc itself writes inside a model folder; a hub must not be able to overwrite them.
RESERVED_SUFFIXES = (".part",)
RESERVED_NAMES = frozenset({".flagc_complete.json", ".flagc_incomplete"})


@dataclass(frozen=True)
class HubFile:
    """One file of a model as listed by the hub.

    Attributes:
        path: POSIX path relative to the model folder (validated: no `..`, not absolute).
        size: exact size in bytes.
        sha256: lowercase hex digest, or None when the hub does not list one.
    """

    path: str
    size: int
    sha256: str | None = None

    def to_json(self) -> dict:
        """The listing-entry form of this file (used for the completion marker)."""
        entry: dict = {"path": self.path, "size": self.size}
        if self.sha256 is not None:
            entry["sha256"] = self.sha256
        return entry


def normalize_hub_url(hub_url: str) -> str:
    """Return `hub_url` without a trailing slash; only http(s) is accepted.

    urllib would happily open `file://` or `ftp://` URLs, so a hub URL from an environment
    variable is checked before it is used for anything.
    """
    if not isinstance(hub_url, str) or not hub_url.strip():
        raise HubError(f"hub URL is empty ({hub_url!r}); set FLAGC_HUB_URL or pass hub_url=")
    parsed = urllib.parse.urlsplit(hub_url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise HubError(
            f"hub URL {hub_url!r} is not an http(s) URL with a host; "
            "expected something like http://hub.example.com:8080"
        )
    if parsed.query or parsed.fragment:
        raise HubError(f"hub URL {hub_url!r} must not have a query string or fragment")
    return hub_url.strip().rstrip("/")


def _check_segments(text: str, what: str) -> None:
    """Raise HubError unless `text` is '/'-separated safe segments, none of them '.' or '..'."""
    if not text or text.startswith("/") or text.endswith("/"):
        raise HubError(f"{what} {text!r} must be a relative path without leading/trailing '/'")
    for segment in text.split("/"):
        if segment in ("", ".", ".."):
            raise HubError(f"{what} {text!r} has an empty, '.' or '..' segment (path traversal)")
        if not _SEGMENT_RE.fullmatch(segment):
            raise HubError(
                f"{what} {text!r}: segment {segment!r} has characters outside [A-Za-z0-9._+=@-]"
            )


def validate_model_name(model_name: str) -> str:
    """Check that a model name is safe both as a URL part and as a folder under download_path."""
    if not isinstance(model_name, str):
        raise HubError(f"model name must be a str, got {type(model_name).__name__}")
    _check_segments(model_name, "model name")
    return model_name


def validate_rel_path(path: object, where: str) -> str:
    """Check one listed file path; `where` names the listing entry for the error message."""
    if not isinstance(path, str):
        raise HubError(f"{where}: 'path' must be a string, got {type(path).__name__} {path!r}")
    if "\\" in path or "\x00" in path or re.match(r"^[A-Za-z]:", path):
        # Backslashes and drive letters would escape the folder on Windows even if they are
        # harmless on POSIX; a hub has no reason to send them.
        raise HubError(f"{where}: path {path!r} has a backslash, NUL or drive letter")
    if path.startswith("/"):
        raise HubError(f"{where}: path {path!r} is absolute; listed paths must be relative")
    _check_segments(path, f"{where}: path")
    name = path.rsplit("/", 1)[-1]
    if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
        raise HubError(f"{where}: path {path!r} collides with a name flagc uses for bookkeeping")
    return path


def listing_url(hub_url: str, model_name: str) -> str:
    """`GET` this URL for the JSON file listing of `model_name`."""
    return f"{hub_url}/api/models/{urllib.parse.quote(model_name, safe='/')}"


def file_url(hub_url: str, model_name: str, path: str) -> str:
    """`GET` this URL (optionally with `Range`) for one file of `model_name`."""
    quoted = urllib.parse.quote(f"{model_name}/{path}", safe="/")
    return f"{hub_url}/models/{quoted}"


def _snippet(body: bytes, limit: int = 200) -> str:
    """A short printable excerpt of a hub answer, for error messages."""
    text = body[:limit].decode("utf-8", errors="replace")
    return repr(text) + (" ..." if len(body) > limit else "")


def _parse_entry(entry: object, index: int, url: str) -> HubFile:
    """Validate one listing entry: {"path": str, "size": int >= 0, "sha256"?: 64 hex chars}."""
    where = f"hub listing {url} entry [{index}]"
    if not isinstance(entry, dict):
        raise HubError(f"{where}: expected an object, got {type(entry).__name__} {entry!r:.200}")
    missing = [key for key in ("path", "size") if key not in entry]
    if missing:
        raise HubError(f"{where}: missing key(s) {missing}; received {entry!r:.200}")
    path = validate_rel_path(entry["path"], where)
    size = entry["size"]
    # bool is an int subclass; `"size": true` is a malformed answer, not a 1-byte file.
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise HubError(f"{where} ({path}): 'size' must be an integer >= 0, got {size!r}")
    sha256 = entry.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise HubError(f"{where} ({path}): 'sha256' must be 64 hex characters, got {sha256!r}")
        sha256 = sha256.lower()
    # Unknown keys are ignored on purpose: a newer hub may add fields (mtime, lfs ...) without
    # breaking older clients; only the fields flagc relies on are held to a strict type.
    return HubFile(path=path, size=size, sha256=sha256)


def parse_listing(body: bytes, url: str) -> list[HubFile]:
    """Parse and validate the body of `GET {hub}/api/models/{name}`.

    Accepts a JSON array of entries, or an object `{"files": [...]}`. Raises HubError saying what
    was received when the body is not that shape.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(
            f"hub listing {url} is not valid JSON ({exc}); received {_snippet(body)}"
        ) from None
    if isinstance(data, dict) and "files" in data:
        data = data["files"]
    if not isinstance(data, list):
        raise HubError(
            f'hub listing {url}: expected a JSON array of files (or {{"files": [...]}}), '
            f"received {type(data).__name__}: {_snippet(body)}"
        )
    if not data:
        raise HubError(f"hub listing {url} lists no files; the model is empty on the hub")
    files = [_parse_entry(entry, i, url) for i, entry in enumerate(data)]
    seen: set[str] = set()
    for f in files:
        # Case-folded so a listing cannot make two entries write one file on macOS/Windows.
        key = f.path.lower()
        if key in seen:
            raise HubError(f"hub listing {url} lists {f.path!r} twice")
        seen.add(key)
    _check_no_file_dir_clash(files, url)
    return files


def _check_no_file_dir_clash(files: list[HubFile], url: str) -> None:
    """Reject listings where one entry is a file and another uses it as a folder (`a` and `a/b`)."""
    paths = {f.path for f in files}
    for f in files:
        parts = f.path.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in paths:
                raise HubError(
                    f"hub listing {url}: {prefix!r} is listed as a file and as the folder of "
                    f"{f.path!r}"
                )
