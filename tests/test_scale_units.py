"""Issue 8 (scale) unit tests: random weights, the build plan and its refusal, stale-build cleanup,
streamed weight writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from flagc.errors import ConfigError, ResourceError

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}


def _config_folder(tmp_path, config=TINY_LLAMA, name="cfg") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


# ---- random weights ------------------------------------------------------------------------

def test_random_weights_are_seeded_per_tensor_and_order_independent():
    from flagc.checkpoints.random_store import RandomWeightStore

    shapes = {"a.weight": (64, 32), "b.weight": (16, 8), "norm.weight": (32,), "a.bias": (64,)}
    s1, s2 = RandomWeightStore(shapes, seed=3), RandomWeightStore(shapes, seed=3)
    b_first = s2.source("b.weight").load()  # other order, other store: same values
    a1 = s1.source("a.weight").load()
    assert np.array_equal(a1, s2.source("a.weight").load())
    assert np.array_equal(b_first, s1.source("b.weight").load())
    assert not np.array_equal(a1, RandomWeightStore(shapes, seed=4).source("a.weight").load())
    assert a1.dtype == np.float32 and a1.shape == (64, 32)
    assert abs(float(a1.std()) - 0.02) < 0.004 and abs(float(a1.mean())) < 0.005
    assert np.array_equal(s1.source("norm.weight").load(), np.ones(32, np.float32))
    assert np.array_equal(s1.source("a.bias").load(), np.zeros(64, np.float32))
    assert s1.info("a.weight") == ("float32", (64, 32))


def test_random_source_for_zoo_name_reads_no_weights():
    from flagc.checkpoints.random_store import random_model_source

    src = random_model_source("GLM-10b-ch", seed=1)
    assert src.kind == "random" and src.config["hidden_size"] == 4096
    total = sum(int(np.prod(s)) for s in src.weights.shapes().values())
    assert 9.5e9 < total < 10.5e9  # GLM-10b-ch: 48 layers x 4096, 50048 vocab
    assert src.source_hash() != random_model_source("GLM-10b-ch", seed=2).source_hash()


def test_random_source_errors_name_the_culprit(tmp_path):
    from flagc.checkpoints.random_store import random_model_source
    from flagc.errors import CheckpointError

    with pytest.raises(ConfigError, match="neither a folder with config.json nor a zoo hub"):
        random_model_source("no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        random_model_source(str(tmp_path / "empty"))


def test_random_weight_build_runs_and_is_reproducible(tmp_path):
    import flagc

    cfg = _config_folder(tmp_path)
    r1 = flagc.build(cfg, "onnx-fp32", str(tmp_path / "a"), random_weights=True, seed=7)
    r2 = flagc.build(cfg, "onnx-fp32", str(tmp_path / "b"), random_weights=True, seed=7)
    r3 = flagc.build(cfg, "onnx-fp32", str(tmp_path / "c"), random_weights=True, seed=8)
    assert r1["source"]["kind"] == "random"
    assert r1["source"]["hash"] == r2["source"]["hash"] != r3["source"]["hash"]
    model = flagc.load(r1.path)
    logits = model.forward(np.array([[1, 5, 9, 2]]))["logits"]
    assert logits.shape == (1, 4, 128) and np.isfinite(logits).all()
    other = flagc.load(r2.path).forward(np.array([[1, 5, 9, 2]]))["logits"]
    np.testing.assert_array_equal(logits, other)


# ---- the plan --------------------------------------------------------------------------------

def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from flagc.cli import app

    cfg = _config_folder(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["build", "-m", cfg, "--random-weights", "-o", str(out),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    for key in ("random weights, seed 0", "graph DSL LlamaModel", "passes", "precision",
                "model.onnx", "manifest.json", "peak memory", "disk", "ok"):
        assert key in res.output, key
    assert not out.exists() and os.listdir(tmp_path) == ["cfg"]


def test_plan_sizes_follow_target_precision(tmp_path):
    import flagc.api as api

    cfg = _config_folder(tmp_path)
    fp32 = api.plan(cfg, "onnx-fp32", str(tmp_path / "o"), random_weights=True)
    fp16 = api.plan(cfg, "onnx-fp16", str(tmp_path / "o"), random_weights=True)
    int4 = api.plan(cfg, "onnx-int4", str(tmp_path / "o"), random_weights=True)
    assert fp32.parameters == fp16.parameters > 0
    assert fp32.disk > fp16.disk > int4.disk
    assert fp32.largest_tensor[0] == "model.embed_tokens.weight"
    assert fp32.largest_tensor[1] == 128 * 64 * 4


def test_build_refuses_before_starting_when_memory_is_short(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import flagc
    import flagc.build_plan as build_plan
    from flagc.cli import app

    cfg = _config_folder(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(build_plan, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(ResourceError, match=r"refused before starting: it needs ~.* of memory"):
        flagc.build(cfg, "onnx-fp32", str(out), random_weights=True)
    res = CliRunner().invoke(app, ["build", "-m", cfg, "--random-weights", "-o", str(out),
                                   "--dry-run"])
    assert res.exit_code == 1 and "DOES NOT FIT" in res.output
    assert "refused before starting" in res.output
    assert sorted(os.listdir(tmp_path)) == ["cfg"]  # no output, no temp folder
    res = CliRunner().invoke(app, ["build", "-m", cfg, "--random-weights", "-o", str(out),
                                   "--force", "-q"])
    assert res.exit_code == 0, res.output  # --force overrides the estimate


def test_build_refuses_when_disk_is_short(tmp_path, monkeypatch):
    import flagc
    import flagc.build_plan as build_plan

    cfg = _config_folder(tmp_path)
    monkeypatch.setattr(build_plan, "free_disk", lambda path: 1000)
    with pytest.raises(ResourceError, match=r"writes ~.* but .* has 1000 B free"):
        flagc.build(cfg, "onnx-fp32", str(tmp_path / "out"), random_weights=True)


# ---- kill safety ---------------------------------------------------------------------------

def test_next_build_removes_dead_builds_temp_folders_but_not_live_ones(tmp_path):
    from flagc.artifact import staged_folder
    from flagc.build_cleanup import hold_build_lock

    out = tmp_path / "m"
    dead = tmp_path / ".m.flagc-tmp-999999999-abc"  # no such pid, nobody holds its lock
    dead.mkdir()
    (dead / "model.onnx.data").write_bytes(b"x" * 100)
    live = tmp_path / ".other.flagc-tmp-1-live"
    live.mkdir()
    os.utime(live, (0, 0))
    with hold_build_lock(str(live)):  # a build still running (this process holds the lock)
        with staged_folder(str(out)) as tmp:
            (open(os.path.join(tmp, "manifest.json"), "w")).write("{}")
        assert not dead.exists()
        assert live.exists()
    assert sorted(os.listdir(tmp_path)) == [".other.flagc-tmp-1-live", "m"]
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o700)  # a normal folder, not mkdtemp's


def test_sigterm_during_staging_removes_the_temp_folder(tmp_path):
    out = tmp_path / "m"
    code = textwrap.dedent(f"""
        import os, sys, time
        from flagc.artifact import staged_folder
        with staged_folder({str(out)!r}) as tmp:
            open(os.path.join(tmp, "model.onnx.data"), "wb").write(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    tmp = child.stdout.readline().strip()
    assert os.path.isdir(tmp)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=30)
    assert child.returncode != 0
    assert not os.path.exists(tmp) and not out.exists()
    assert os.listdir(tmp_path) == []


# ---- streamed writing ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_writer_matches_a_plain_copy(tmp_path, dtype):
    from flagc.lower.onnx_stream import write_array

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 257)).astype(np.float32)
    for arr in (a, a.T, a[::2], a.reshape(3, 100, 257)):
        path = tmp_path / "w.bin"
        with open(path, "wb") as f:
            f.write(b"head")
            n = write_array(arr, dtype, f, block_bytes=4096)  # many blocks and tiles
            f.write(b"tail")
        expected = np.ascontiguousarray(arr.astype(dtype)).tobytes()
        assert path.read_bytes() == b"head" + expected + b"tail"
        assert n == len(expected)


# ---- checkpoint reads ----------------------------------------------------------------------

def test_safetensors_reads_match_and_leave_no_map_behind(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from flagc.checkpoints.stores import open_weight_store

    path = str(tmp_path / "model.safetensors")
    tensors = {"a": torch.randn(33, 17).to(torch.bfloat16),
               "b": torch.randn(5, dtype=torch.float16), "c": torch.arange(7, dtype=torch.int64),
               "d": torch.randn(2, 3, 4), "e": torch.zeros(0, 4)}
    save_file(tensors, path)
    store = open_weight_store(path)
    expected = load_file(path)
    for name in tensors:
        got = store.tensor(name)
        assert got.dtype == expected[name].dtype and torch.equal(got, expected[name]), name
    np.testing.assert_array_equal(store.source("a").load(), expected["a"].float().numpy())
    del expected, got  # safetensors' own reader maps the file; only ours must not
    import gc

    gc.collect()
    assert store.tensor("d").shape == (2, 3, 4)
    with open("/proc/self/maps") as f:  # positioned reads: the file is not mapped
        assert path not in f.read()


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(" " + os.path.realpath(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_bin_checkpoint_reads_release_their_pages(tmp_path):
    import torch

    from flagc.checkpoints.stores import open_weight_store

    path = str(tmp_path / "pytorch_model.bin")
    tensors = {"big": torch.randn(1024, 2048).to(torch.bfloat16), "small": torch.arange(5)}
    torch.save(tensors, path)
    store = open_weight_store(path)
    for name in tensors:
        assert torch.equal(store.tensor(name), tensors[name]), name
    got = store.source("big").load()
    np.testing.assert_array_equal(got, tensors["big"].float().numpy())
    # 4 MiB of bf16 were read through the map; only edge pages may stay resident.
    assert _mapped_rss_kib(path) < 256
