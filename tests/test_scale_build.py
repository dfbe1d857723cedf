"""Issue 8 (scale): real builds in child processes.

- A ~500M-parameter LLaMA with random weights (nothing on disk but config.json) builds with a peak
  RSS under 2 x its largest layer plus a fixed overhead: weights stream one tensor at a time
  (holding the model would be ~2 GB here, far above the bound).
- A build killed half-way (SIGTERM, then SIGKILL, once the temp folder and its weight file have
  appeared) leaves no artifact, and the next build into the same folder succeeds and leaves no
  temp folder behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

# ~0.49 B parameters (24 layers of 1280 wide, untied 32k vocab): ~2 GB of float32 weights.
MID_LLAMA = {"model_type": "llama", "hidden_size": 1280, "intermediate_size": 3456,
             "num_hidden_layers": 24, "num_attention_heads": 20, "num_key_value_heads": 4,
             "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}
# Interpreter + torch + onnx + numpy (~0.25 GB measured), the graph, protobufs, allocator slack.
# The interpreter, torch, onnx and onnxruntime imported by the child. Measured peaks: 0.46-0.54 GB
# run alone, up to 1.0 GB inside the full suite on a loaded CI machine; holding the model would
# take 1.9 GB more, so the bound still tells streaming from not streaming.
FIXED_OVERHEAD = 800 * 2**20

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import flagc
    from flagc.api import plan
    cfg, out, target = sys.argv[1:4]
    p = plan(cfg, target, out, random_weights=True)
    r = flagc.build(cfg, target, out, random_weights=True, seed=0)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "largest_layer": p.largest_layer, "estimate": p.peak_memory,
                      "parameters": r["graph"]["parameters"], "files": r["files"]}))
""")


def _config(tmp_path, config) -> str:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _child(cfg: str, out: str, target: str = "onnx-fp32") -> subprocess.Popen:
    env = dict(os.environ, FLAGC_QUIET="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, cfg, out, target], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _temp_folders(parent) -> list[str]:
    return [e for e in os.listdir(parent) if ".flagc-tmp-" in e or e.endswith(".flagc-old")]


def test_mid_sized_random_build_streams_weights(tmp_path):
    cfg = _config(tmp_path, MID_LLAMA)
    out = tmp_path / "out"
    r = _finish(_child(cfg, str(out)))
    assert 4.5e8 < r["parameters"] < 5.5e8
    data = out / "model.onnx.data"
    assert r["files"] == ["model.onnx", "model.onnx.data"]
    assert data.stat().st_size > 1.9e9  # the whole model really went through this process
    layer_name, layer_bytes = r["largest_layer"]
    bound = 2 * layer_bytes + FIXED_OVERHEAD
    assert r["peak"] < bound, (f"peak RSS {r['peak'] / 2**20:.0f} MiB exceeds 2 x largest "
                               f"layer ({layer_name}: {layer_bytes / 2**20:.0f} MiB) + "
                               f"{FIXED_OVERHEAD / 2**20:.0f} MiB")
    assert r["peak"] < r["estimate"]  # the plan's estimate is an upper bound
    assert _temp_folders(tmp_path) == []


def _wait_for_lowering(parent, child, timeout=300.0) -> str:
    """The temp folder's path once its weight file has data (lowering has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, child.stderr.read()[-3000:]
        for entry in _temp_folders(parent):
            data = os.path.join(parent, entry, "model.onnx.data")
            if os.path.exists(data) and os.path.getsize(data) > 50 * 2**20:
                return os.path.join(parent, entry)
        time.sleep(0.05)
    raise AssertionError("the build never started writing weights")


def test_killed_build_leaves_nothing_and_next_build_succeeds(tmp_path):
    # ~0.24 B parameters: long enough to be caught half-way, quick to rebuild.
    cfg = _config(tmp_path, dict(MID_LLAMA, num_hidden_layers=8))
    out = tmp_path / "out"

    child = _child(cfg, str(out))
    tmp = _wait_for_lowering(str(tmp_path), child)
    child.send_signal(signal.SIGTERM)  # caught: the build removes its own temp folder
    child.wait(timeout=120)
    assert child.returncode != 0
    assert not out.exists() and not os.path.exists(tmp)
    assert _temp_folders(tmp_path) == []

    child = _child(cfg, str(out))
    tmp = _wait_for_lowering(str(tmp_path), child)
    child.kill()  # SIGKILL: uncatchable, the temp folder stays behind, unlocked
    child.wait(timeout=60)
    assert not out.exists()
    assert _temp_folders(tmp_path) == [os.path.basename(tmp)]

    r = _finish(_child(cfg, str(out)))
    assert r["files"] == ["model.onnx", "model.onnx.data"]
    assert (out / "manifest.json").is_file()
    assert _temp_folders(tmp_path) == []  # the dead build's folder was cleaned up

