"""Tests for flagc.models.hub against a real local HTTP hub (tests/hub_server.py).

Only 127.0.0.1 traffic; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from hub_server import HubServer, hold_lock, silent_server

from flagc.errors import HubError
from flagc.models import hub as hub_mod
from flagc.models.hub import (
    COMPLETE_MARKER,
    INCOMPLETE_MARKER,
    download_model,
    is_model_complete,
    model_lock,
    resolve_model_dir,
)
from flagc.models.hub_transfer import RetryPolicy

_rng = random.Random(0)
WEIGHTS = bytes(_rng.getrandbits(8) for _ in range(300_000))
TINY = {
    "config.json": json.dumps({"model_type": "tiny", "hidden_size": 8}).encode(),
    "model.safetensors": WEIGHTS,
    "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
}
FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No hub or offline setting leaks in; no proxy for 127.0.0.1; retries without long sleeps."""
    for var in ("FLAGC_OFFLINE", "FLAGC_HUB_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(hub_mod, "RETRY", FAST_RETRY)


@pytest.fixture
def hub():
    with HubServer({"tiny": dict(TINY), "org/other": {"config.json": b"{}"}}) as server:
        yield server


def _assert_exact(model_dir: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (model_dir / path).read_bytes() == data, path
    assert not list(model_dir.rglob("*.part"))


def test_download_writes_exact_files_and_marker(hub, tmp_path, capsys):
    model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=True)
    assert model_dir == tmp_path / "tiny"
    _assert_exact(model_dir, TINY)
    assert (model_dir / COMPLETE_MARKER).is_file()
    assert not (model_dir / INCOMPLETE_MARKER).exists()
    assert is_model_complete(model_dir)
    # progress=True but stderr is not a terminal under pytest: no bar output.
    assert capsys.readouterr().err == ""

    before = len(hub.requests)
    assert download_model("tiny", tmp_path, hub_url=hub.url) == model_dir
    assert resolve_model_dir("tiny", tmp_path, hub_url=hub.url) == model_dir
    assert len(hub.requests) == before, "a complete folder must not touch the network"


def test_corrupt_marker_means_recheck_not_load(hub, tmp_path):
    model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    (model_dir / COMPLETE_MARKER).write_text("{truncated")
    (model_dir / "model.safetensors").write_bytes(b"garbage")  # stale or tampered file
    assert not is_model_complete(model_dir)
    resolve_model_dir("tiny", tmp_path, hub_url=hub.url, progress=False)
    _assert_exact(model_dir, TINY)
    # Files whose digest still matched were kept, only the bad one was fetched again.
    assert len(hub.file_requests("tiny", "config.json")) == 1
    assert len(hub.file_requests("tiny", "model.safetensors")) == 2


def test_hub_url_from_env_and_nested_model_name(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGC_HUB_URL", hub.url + "/")
    model_dir = resolve_model_dir("org/other", tmp_path, progress=False)
    assert model_dir == tmp_path / "org" / "other"
    assert (model_dir / "config.json").read_bytes() == b"{}"


def test_resume_after_mid_file_drop(hub, tmp_path):
    hub.drop_after = 100_000
    model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    _assert_exact(model_dir, TINY)
    first, second = hub.file_requests("tiny", "model.safetensors")
    assert first.dropped and "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    assert second.status == 206


def test_resume_from_part_left_by_earlier_process(hub, tmp_path):
    part = tmp_path / "tiny" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS[:123_456])
    model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    _assert_exact(model_dir, TINY)
    (only,) = hub.file_requests("tiny", "model.safetensors")
    assert only.headers["Range"] == "bytes=123456-"


def test_server_ignoring_range_restarts_file(hub, tmp_path):
    hub.drop_after, hub.ignore_range = 100_000, True
    model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    _assert_exact(model_dir, TINY)  # no duplicated prefix
    first, second = hub.file_requests("tiny", "model.safetensors")
    assert second.headers["Range"] == "bytes=100000-" and second.status == 200


def test_bad_digest_rejected_and_nothing_loadable(hub, tmp_path, monkeypatch):
    hub.wrong_digest = {"model.safetensors"}
    with pytest.raises(HubError) as info:
        download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    message = str(info.value)
    assert "sha256 mismatch" in message and "tiny/model.safetensors" in message
    assert hashlib.sha256(b"not the file").hexdigest() in message  # expected (listed)
    assert hashlib.sha256(WEIGHTS).hexdigest() in message  # got
    model_dir = tmp_path / "tiny"
    assert not (model_dir / "model.safetensors").exists()
    assert not list(model_dir.rglob("*.part"))
    assert not (model_dir / COMPLETE_MARKER).exists()
    # config.json may have landed, but the folder must not pass as a loadable model.
    assert not is_model_complete(model_dir)
    monkeypatch.setenv("FLAGC_OFFLINE", "1")
    with pytest.raises(HubError, match="FLAGC_OFFLINE"):
        resolve_model_dir("tiny", tmp_path)


def test_waits_for_lock_held_by_another_process(hub, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    lock_file = str(model_lock(tmp_path, "tiny").lock_file)
    holder = ctx.Process(target=hold_lock, args=(lock_file, 1.0, ready))
    holder.start()
    try:
        assert ready.wait(20), "lock holder did not start"
        start = time.monotonic()
        model_dir = download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
        waited = time.monotonic() - start
    finally:
        holder.join(20)
    assert holder.exitcode == 0
    assert waited >= 0.5, f"download did not wait for the lock ({waited:.2f} s)"
    _assert_exact(model_dir, TINY)
    for path in TINY:
        assert len(hub.file_requests("tiny", path)) == 1, path


def test_concurrent_downloads_fetch_once(hub, tmp_path):
    """Ranks racing for one model: one downloads, the others wait on the lock and reuse it.

    Threads suffice here: filelock uses flock, which excludes separate open files even within one
    process (the cross-process case is test_waits_for_lock_held_by_another_process).
    """
    hub.delay_file_s = 0.1  # make the downloads overlap
    results: list[object] = []

    def rank() -> None:
        try:
            results.append(download_model("tiny", tmp_path, hub_url=hub.url, progress=False))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [tmp_path / "tiny"] * 3
    _assert_exact(tmp_path / "tiny", TINY)
    assert len(hub.listing_requests("tiny")) == 1
    for path in TINY:
        assert len(hub.file_requests("tiny", path)) == 1, path


def test_unknown_model_is_404_error(hub, tmp_path):
    with pytest.raises(HubError) as info:
        download_model("no-such-model", tmp_path, hub_url=hub.url, progress=False)
    message = str(info.value)
    assert "no-such-model" in message and hub.url in message and "404" in message
    assert len(hub.listing_requests("no-such-model")) == 1, "404 must not be retried"


@pytest.mark.parametrize(
    "knob, value, expected",
    [
        ("listing_raw", b"{not json", "not valid JSON"),
        ("listing_raw", b"\xff\xfe", "not valid JSON"),
        ("listing_json", {"model": "tiny"}, "expected a JSON array"),
        ("listing_json", [], "lists no files"),
        ("listing_json", ["config.json"], "expected an object"),
        ("listing_json", [{"path": "config.json"}], "missing key"),
        ("listing_json", [{"path": "config.json", "size": "12"}], "'size' must be an integer"),
        ("listing_json", [{"path": "config.json", "size": True}], "'size' must be an integer"),
        ("listing_json", [{"path": "config.json", "size": -1}], "'size' must be an integer"),
        ("listing_json", [{"path": 7, "size": 1}], "'path' must be a string"),
        ("listing_json", [{"path": "a", "size": 1, "sha256": "xyz"}], "64 hex"),
        ("listing_json", [{"path": "a", "size": 1}, {"path": "a", "size": 1}], "twice"),
    ],
)
def test_malformed_listing_rejected(hub, tmp_path, knob, value, expected):
    setattr(hub, knob, value)
    with pytest.raises(HubError, match=expected) as info:
        download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    assert "/api/models/tiny" in str(info.value)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    "path",
    [
        "../evil",
        "a/../../evil",
        "/etc/passwd",
        "a//b",
        "./config.json",
        "C:evil",
        "a\\..\\evil",
        "",
        "x.part",
        ".flagc_complete.json",
    ],
)
def test_unsafe_listing_path_rejected(hub, tmp_path, path):
    hub.listing_json = [{"path": "config.json", "size": 2}, {"path": path, "size": 4}]
    with pytest.raises(HubError, match="path"):
        download_model("tiny", tmp_path / "ckpt", hub_url=hub.url, progress=False)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "ckpt" / "tiny").exists(), "nothing may be written for a bad listing"
    assert not hub.file_requests("tiny", "config.json")


def test_offline_without_local_files(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGC_OFFLINE", "1")
    monkeypatch.setenv("FLAGC_HUB_URL", hub.url)
    with pytest.raises(HubError, match="FLAGC_OFFLINE=1") as info:
        download_model("tiny", tmp_path)
    assert str(tmp_path / "tiny") in str(info.value)
    assert hub.requests == []


def test_offline_with_local_files(hub, tmp_path, monkeypatch):
    download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    before = len(hub.requests)
    monkeypatch.setenv("FLAGC_OFFLINE", "1")
    assert download_model("tiny", tmp_path, hub_url=hub.url) == tmp_path / "tiny"
    assert resolve_model_dir("tiny", tmp_path) == tmp_path / "tiny"
    assert len(hub.requests) == before
    # A hand-placed folder (no hub bookkeeping) with config.json and weights also counts.
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "config.json").write_text("{}")
    (manual / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert resolve_model_dir("manual", tmp_path) == manual
    # ... but not one with a missing shard of its index.
    (manual / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00002-of-00002.bin"}})
    )
    with pytest.raises(HubError, match="FLAGC_OFFLINE"):
        resolve_model_dir("manual", tmp_path)


def test_timeout_against_silent_server(tmp_path):
    with silent_server() as url:
        start = time.monotonic()
        with pytest.raises(HubError, match="timed out after 0.2 s") as info:
            download_model("tiny", tmp_path, hub_url=url, progress=False, timeout=0.2)
        assert time.monotonic() - start < 5
    assert f"after {FAST_RETRY.attempts} attempts" in str(info.value)


def test_connection_refused(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with pytest.raises(HubError, match="connection refused") as info:
        download_model("tiny", tmp_path, hub_url=f"http://127.0.0.1:{port}", progress=False)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_server_error_retried_then_reported(hub, tmp_path):
    hub.file_status = {"model.safetensors": 503}
    with pytest.raises(HubError, match="HTTP 503") as info:
        download_model("tiny", tmp_path, hub_url=hub.url, progress=False)
    assert "model.safetensors" in str(info.value)
    assert len(hub.file_requests("tiny", "model.safetensors")) == FAST_RETRY.attempts
    assert not is_model_complete(tmp_path / "tiny")


def test_files_subset_and_unknown_file(hub, tmp_path):
    model_dir = download_model(
        "tiny", tmp_path, hub_url=hub.url, files=["config.json"], progress=False
    )
    assert (model_dir / "config.json").read_bytes() == TINY["config.json"]
    assert not (model_dir / "model.safetensors").exists()
    assert not is_model_complete(model_dir), "a subset is not the whole model"
    with pytest.raises(HubError, match="no file"):
        download_model("tiny", tmp_path, hub_url=hub.url, files=["nope.bin"], progress=False)
    # resolve_model_dir completes the folder, fetching only what is missing.
    resolve_model_dir("tiny", tmp_path, hub_url=hub.url, progress=False)
    _assert_exact(model_dir, TINY)
    assert len(hub.file_requests("tiny", "config.json")) == 1


def test_no_hub_configured_and_bad_url(tmp_path):
    with pytest.raises(HubError, match="FLAGC_HUB_URL"):
        download_model("tiny", tmp_path, progress=False)
    with pytest.raises(HubError, match="http"):
        download_model("tiny", tmp_path, hub_url="file:///etc", progress=False)
    with pytest.raises(HubError, match="model name"):
        download_model("../tiny", tmp_path, hub_url="http://127.0.0.1:1", progress=False)
    assert not os.listdir(tmp_path)
