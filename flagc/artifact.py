"""The artifact format: one self-describing folder, written atomically.

    OUT/
      model.onnx [+ model.onnx.data]   or engine.plan
      manifest.json                    what it is and how to run it (see `make_manifest`)
      tokenizer.json, flagc_tokenizer.json

`staged_folder` writes into a hidden temp folder beside OUT and renames it into place only when
everything succeeded, so a failed or interrupted build leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from flagc.errors import ArtifactError

__all__ = ["staged_folder", "read_manifest", "resolve_artifact", "MANIFEST", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@contextmanager
def staged_folder(output: str, overwrite: bool = True) -> Iterator[str]:
    """Yield a temp folder; on success it replaces `output`, on any error it is removed.

    SIGTERM / SIGHUP raise KeyboardInterrupt while the folder is open, so a kill cleans up like
    Ctrl-C. A SIGKILL cannot be caught: the temp folder stays, locked by nobody, and the next
    build into the same parent folder removes it (see `flagc.build_cleanup`).
    """
    from flagc.build_cleanup import hold_build_lock, interrupt_on_signals, remove_stale_builds

    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(output) and not overwrite:
        raise ArtifactError(f"{output} exists (pass --overwrite to replace it)")
    remove_stale_builds(output)
    with interrupt_on_signals():
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.flagc-tmp-{os.getpid()}-",
                               dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the artifact is a normal folder
        with hold_build_lock(tmp):
            try:
                yield tmp
                _replace(tmp, output)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, output: str) -> None:
    if os.path.exists(output):
        if not os.path.isfile(os.path.join(output, MANIFEST)) and os.listdir(output):
            raise ArtifactError(f"{output} exists and is not a flagc artifact; refusing to "
                                "replace it")
        trash = output + ".flagc-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(output, trash)
        os.rename(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, output)


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")


def resolve_artifact(path: str) -> str:
    """The artifact folder for a folder path or for the engine file inside one."""
    path = os.path.abspath(os.path.expanduser(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such artifact folder or engine file")
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        raise ArtifactError(f"{folder}: no {MANIFEST} (not a flagc artifact; build one with "
                            "`flagc build`)")
    return folder


def read_manifest(path: str) -> tuple[str, dict[str, Any]]:
    folder = resolve_artifact(path)
    mpath = os.path.join(folder, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath}: corrupt manifest: {exc}") from exc
    for key in ("format_version", "target", "engine", "io"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks {key!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format version {manifest['format_version']} is newer "
                            f"than this flagc understands ({FORMAT_VERSION}); upgrade flagc")
    engine = os.path.join(folder, manifest["engine"])
    if not os.path.isfile(engine):
        raise ArtifactError(f"{folder}: engine file {manifest['engine']} is missing")
    return folder, manifest
