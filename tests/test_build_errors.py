"""Bad input exits non-zero with a message naming the culprit, and leaves no output folder."""

import json
import os
import shutil

from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from flagc.cli import app


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _build(tmp_path, model, *extra):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["build", "--model", str(model), "-o", str(out), "-q", *extra])
    leftovers = [p for p in os.listdir(tmp_path) if "flagc-tmp" in p]
    return res, out, leftovers


def _assert_fails(res, out, leftovers, *fragments):
    assert res.exit_code == 1, res.output
    for frag in fragments:
        assert frag in res.output, res.output
    assert not out.exists()
    assert leftovers == []


def test_missing_tensor(tiny_llama, tmp_path):
    m = _copy(tiny_llama, tmp_path)
    tensors = load_file(str(m / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(m / "model.safetensors"))
    _assert_fails(*_build(tmp_path, m), "model.layers.1.mlp.up_proj.weight", "not found")


def test_tensor_of_wrong_shape(tiny_llama, tmp_path):
    m = _copy(tiny_llama, tmp_path)
    tensors = load_file(str(m / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.k_proj.weight"][:, :60].copy()
    save_file(tensors, str(m / "model.safetensors"))
    _assert_fails(*_build(tmp_path, m), "model.layers.0.self_attn.k_proj.weight",
                  "f32[32, 60]", "weight in-features 60")


def test_unknown_model_type(tiny_llama, tmp_path):
    m = _copy(tiny_llama, tmp_path)
    cfg = json.load(open(m / "config.json"))
    cfg["model_type"] = "mamba9"
    json.dump(cfg, open(m / "config.json", "w"))
    _assert_fails(*_build(tmp_path, m), "unknown model_type 'mamba9'")


def test_corrupt_safetensors(tiny_llama, tmp_path):
    m = _copy(tiny_llama, tmp_path)
    path = m / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_fails(*_build(tmp_path, m), "model.safetensors", "truncated")
    path.write_bytes(b"\xff" * 64)
    _assert_fails(*_build(tmp_path, m), "corrupt safetensors")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "trunc.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(12_000_000))
    _assert_fails(*_build(tmp_path, bad), "trunc.gguf")


def test_custom_file_without_model(tiny_llama, tmp_path):
    custom = tmp_path / "nomodel.py"
    custom.write_text("from flagc import ComputeGraph\nclass M(ComputeGraph):\n"
                      "    def build(self):\n        pass\n")
    _assert_fails(*_build(tmp_path, tiny_llama, "--custom", str(custom)), "nomodel.py",
                  "defines no __model__")


def test_unknown_target(tiny_llama, tmp_path):
    _assert_fails(*_build(tmp_path, tiny_llama, "--target", "onnx-fp64"),
                  "unknown target 'onnx-fp64'")


def test_prompt_longer_than_max_seq(tiny_llama, tmp_path):
    res, out, _ = _build(tmp_path, tiny_llama, "--max-seq", "16")
    assert res.exit_code == 0, res.output
    ids = ",".join(["3"] * 17)
    res = CliRunner().invoke(app, ["run", str(out), "--ids", ids, "-n", "2"])
    assert res.exit_code == 1
    assert "prompt of 17 tokens is longer than the artifact's max sequence length 16" in res.output


def test_failed_rebuild_keeps_previous_artifact(tiny_llama, tmp_path):
    res, out, _ = _build(tmp_path, tiny_llama)
    assert res.exit_code == 0
    before = (out / "manifest.json").read_text()
    res = CliRunner().invoke(app, ["build", "--model", str(tmp_path / "nope"), "-o", str(out)])
    assert res.exit_code == 1 and "neither a folder" in res.output
    assert (out / "manifest.json").read_text() == before


def test_invalid_sampling_value(tiny_llama, tmp_path):
    res, out, _ = _build(tmp_path, tiny_llama)
    res = CliRunner().invoke(app, ["run", str(out), "--ids", "1,2", "--temperature", "-1"])
    assert res.exit_code == 1 and "temperature" in res.output
