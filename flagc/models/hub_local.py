"""On-disk state of hub downloads: the completion marker, and when a model folder is loadable.

See `flagc.models.hub` for the layout. The marker is the only thing that makes a hub-managed folder
loadable; folders put together by hand are judged by config.json plus complete weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flagc.errors import CheckpointError, HubError
from flagc.models.hub_protocol import HubFile, parse_listing, validate_rel_path

__all__ = [
    "COMPLETE_MARKER",
    "INCOMPLETE_MARKER",
    "hand_placed",
    "is_model_complete",
    "missing_files",
    "read_marker",
    "read_marker_files",
    "write_complete_marker",
]

log = logging.getLogger("flagc.hub")

COMPLETE_MARKER = ".flagc_complete.json"
INCOMPLETE_MARKER = ".flagc_incomplete"

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_model_complete(model_dir: str | Path) -> bool:
    """True when `model_dir` is a loadable model folder (see `hub.resolve_model_dir`)."""
    model_dir = Path(model_dir)
    missing = missing_files(model_dir, None)
    if missing is not None:
        return not missing
    if (model_dir / COMPLETE_MARKER).exists() or (model_dir / INCOMPLETE_MARKER).exists():
        # Hub-managed but the marker is unreadable, or a download is running / failed: never
        # fall back to the hand-placed heuristic, which a half-written folder could satisfy.
        return False
    return (model_dir / "config.json").is_file() and _local_weights_complete(model_dir)


def hand_placed(model_dir: Path, wanted: list[str] | None) -> bool:
    """True for a folder without hub bookkeeping that already holds what is asked for."""
    if (model_dir / COMPLETE_MARKER).exists() or (model_dir / INCOMPLETE_MARKER).exists():
        return False  # hub-managed: only the marker decides
    if wanted is None:
        return is_model_complete(model_dir)
    return all((model_dir / p).is_file() for p in wanted)


def write_complete_marker(
    model_dir: Path, model_name: str, url: str, listing: list[HubFile], selected: list[HubFile]
) -> None:
    """Atomically write the marker: earlier verified files still in the listing, plus `selected`."""
    entries = {f.path: f for f in read_marker_files(model_dir) or []}
    current = {f.path: f for f in listing}
    # Keep earlier downloads only if the hub still lists them unchanged.
    verified = {p: f for p, f in entries.items() if current.get(p) == f}
    verified.update({f.path: f for f in selected})
    marker = {
        "format": 1,
        "model": model_name,
        "hub_url": url,
        "listing": [f.to_json() for f in listing],
        "files": [verified[p].to_json() for p in sorted(verified)],
    }
    tmp = model_dir / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, model_dir / COMPLETE_MARKER)


def read_marker(model_dir: Path) -> tuple[list[HubFile], list[HubFile]] | None:
    """(listing, verified files) from the completion marker, or None when absent or unreadable."""
    marker = model_dir / COMPLETE_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        listing = parse_listing(json.dumps(data["listing"]).encode(), str(marker))
        verified = parse_listing(json.dumps(data["files"]).encode(), str(marker))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, HubError) as exc:
        # A damaged marker only costs a re-check/re-download, never a wrong load.
        log.warning("ignoring unreadable download marker %s: %s", marker, exc)
        return None
    return listing, verified


def read_marker_files(model_dir: Path) -> list[HubFile] | None:
    """The verified files recorded in the marker, or None."""
    marker = read_marker(model_dir)
    return None if marker is None else marker[1]


def missing_files(model_dir: Path, wanted: list[str] | None) -> list[str] | None:
    """Paths still needed per the marker (`[]` = complete); None when there is no marker.

    With `wanted` None the whole hub listing recorded in the marker is needed. Only existence and
    size are checked here (cheap, on every load); digests were checked before the rename.
    """
    marker = read_marker(model_dir)
    if marker is None:
        return None
    listing, verified = marker
    have = {f.path: f for f in verified}
    needed = [f.path for f in listing] if wanted is None else wanted
    missing = []
    for path in needed:
        entry = have.get(path)
        target = model_dir / path
        if entry is None or not target.is_file() or target.stat().st_size != entry.size:
            missing.append(path)
    return missing


def _local_weights_complete(model_dir: Path) -> bool:
    """Heuristic for hand-placed folders: no `.part` files, and every indexed shard present."""
    if any(model_dir.rglob("*.part")):
        return False
    for index_name in _INDEX_FILES:
        index = model_dir / index_name
        if index.is_file():
            return all((model_dir / shard).is_file() for shard in _index_shards(index))
    return any(
        p.is_file() and p.stat().st_size > 0
        for pattern in _WEIGHT_GLOBS
        for p in model_dir.glob(pattern)
    )


def _index_shards(index: Path) -> set[str]:
    """Shard file names of a Hugging Face weight index; CheckpointError naming it when malformed."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid weight index ({exc!r})") from None
    for shard in shards:
        try:
            validate_rel_path(shard, str(index))
        except HubError as exc:  # same safety rules, but here the checkpoint is at fault
            raise CheckpointError(f"{index}: bad shard name: {exc}") from None
    return shards
