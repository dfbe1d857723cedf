"""TensorRT targets on a machine without a GPU: TensorRT for RTX parses and builds strongly typed
engines on the CPU, so every TensorRT target is proven to build; the engine cannot run here.

What runs here instead:
- the manifest each build writes (flavor, version, compute capabilities, profiles, digest, io);
- the refusals: truncated / corrupt engine.plan, no CUDA device;
- the exact ONNX each engine was built from (kept with FLAGC_TRT_KEEP_ONNX=1), run by onnxruntime
  against the fp32 artifact: fp16 conversion and int8 Q/DQ numerics;
- the TensorRT runtime's binding and KV plumbing, over an execution context stand-in that runs
  that ONNX with onnxruntime through the same raw tensor addresses.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import flagc
from flagc.errors import ArtifactError, RuntimeInputError
from trt_standin import OrtContext

trt = pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="TensorRT for RTX is not installed (pip install 'flagc[trt]'); CI installs it")

MAX_SEQ, MAX_BATCH = 64, 4


def _build(src, target, out, keep_onnx=False, **kw):
    old = os.environ.get("FLAGC_TRT_KEEP_ONNX")
    os.environ["FLAGC_TRT_KEEP_ONNX"] = "1" if keep_onnx else "0"
    try:
        return flagc.build(src, target, out, max_seq=MAX_SEQ, max_batch=MAX_BATCH, **kw)
    finally:
        if old is None:
            os.environ.pop("FLAGC_TRT_KEEP_ONNX")
        else:
            os.environ["FLAGC_TRT_KEEP_ONNX"] = old


@pytest.fixture(scope="module")
def llama_builds(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    out = {t: str(root / t) for t in ("onnx-fp32", "trt-fp32", "trt-fp16", "trt-int8")}
    flagc.build(tiny_llama, "onnx-fp32", out["onnx-fp32"], max_seq=MAX_SEQ, max_batch=MAX_BATCH)
    _build(tiny_llama, "trt-fp16", out["trt-fp16"])  # as users build it: engine only
    for t in ("trt-fp32", "trt-int8"):
        _build(tiny_llama, t, out[t], keep_onnx=True)
    out["trt-fp16-onnx"] = str(root / "trt-fp16-onnx")
    _build(tiny_llama, "trt-fp16", out["trt-fp16-onnx"], keep_onnx=True)
    return out


def _manifest(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


# ---- manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["trt-fp32", "trt-fp16", "trt-int8"])
def test_manifest_describes_the_engine(llama_builds, target):
    import hashlib

    folder = llama_builds[target if target != "trt-fp16" else "trt-fp16"]
    m = _manifest(folder)
    assert m["engine"] == "engine.plan" and m["target"]["name"] == target
    assert m["target"]["backend"] == "tensorrt"
    t = m["tensorrt"]
    assert t["flavor"] == "tensorrt-rtx" and t["version"] == trt.__version__
    assert t["strongly_typed"] is True
    # TensorRT-RTX: Ampere and later, never Hopper (sm_90)
    assert {"8.0", "8.6", "8.9", "12.0"} <= set(t["compute_capabilities"])
    assert "9.0" not in t["compute_capabilities"]
    with open(os.path.join(folder, "engine.plan"), "rb") as f:
        data = f.read()
    assert t["bytes"] == len(data) and t["sha256"] == hashlib.sha256(data).hexdigest()
    prof = t["profiles"][0]
    assert set(prof) == {s["name"] for s in m["io"]["inputs"]}
    assert prof["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [MAX_BATCH, MAX_SEQ]}
    assert prof["attention_mask"]["max"] == [MAX_BATCH, MAX_SEQ]
    assert prof["past_key_values.0.key"]["min"] == [1, 2, 0, 16]
    assert prof["past_key_values.0.key"]["max"] == [MAX_BATCH, 2, MAX_SEQ - 1, 16]
    for p in prof.values():
        assert all(a <= b <= c for a, b, c in zip(p["min"], p["opt"], p["max"]))
    float_dtype = "f16" if target == "trt-fp16" else "f32"
    io = {s["name"]: s["dtype"] for s in m["io"]["inputs"] + m["io"]["outputs"]}
    assert io["present.1.value"] == io["past_key_values.0.key"] == float_dtype
    # the precision plan may keep the logits head in fp32; the manifest says what the engine has
    assert io["logits"] in ({"f16", "f32"} if target == "trt-fp16" else {"f32"})
    assert io["logits"] == {s["name"]: s["dtype"] for s in t["io"]["outputs"]}["logits"]
    assert io["input_ids"] == "i64"
    assert m["kv_cache"]["dtype"] == ("float16" if target == "trt-fp16" else "float32")
    assert t["io"]["inputs"][0]["name"] == "input_ids"


def test_engine_only_artifact_holds_no_onnx(llama_builds):
    folder = llama_builds["trt-fp16"]
    names = sorted(os.listdir(folder))
    assert names == ["engine.plan", "manifest.json"]  # the tiny model has no tokenizer files
    m = _manifest(folder)
    assert m["files"] == ["engine.plan"] and m["tensorrt"]["onnx"]["kept"] == []
    assert m["tensorrt"]["precision"]["compute"] == "fp16"


def test_int8_manifest_records_quantization(llama_builds):
    p = _manifest(llama_builds["trt-int8"])["tensorrt"]["precision"]
    # 2 layers x (merged qkv, o, merged gate/up, down) + lm_head, or unmerged: 7 per layer + 1
    assert p["quantized_linears"] >= 9
    assert all(v > 0 for v in p["activation_amax"].values())


# ---- refusals -----------------------------------------------------------------------------------
@pytest.fixture()
def damaged(llama_builds, tmp_path):
    folder = str(tmp_path / "art")
    shutil.copytree(llama_builds["trt-fp16"], folder)
    path = os.path.join(folder, "engine.plan")
    with open(path, "rb") as f:
        data = f.read()
    return folder, path, data


def test_truncated_plan_is_refused(damaged):
    folder, path, data = damaged
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"engine\.plan is truncated: \d+ bytes, the manifest "
                                             r"records \d+"):
        flagc.load(path)


def test_corrupt_plan_is_refused(damaged):
    folder, path, data = damaged
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(ArtifactError, match=r"engine\.plan is corrupt: sha256"):
        flagc.load(folder)


def test_cli_run_refuses_a_corrupt_plan_by_name(damaged):
    from typer.testing import CliRunner

    from flagc.cli import app

    folder, path, data = damaged
    with open(path, "wb") as f:
        f.write(data[:100])
    res = CliRunner().invoke(app, ["run", path, "--ids", "1,2,3", "-n", "2"])
    assert res.exit_code != 0
    assert "truncated" in res.output and "engine.plan" in res.output


def test_without_cuda_the_error_names_the_gpus_and_tensorrt(llama_builds):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-GPU message cannot be provoked")
    with pytest.raises(RuntimeInputError) as err:
        flagc.load(os.path.join(llama_builds["trt-fp16"], "engine.plan"))
    msg = str(err.value)
    assert f"tensorrt-rtx {trt.__version__}" in msg
    assert "8.0, 8.6, 8.9, 12.0" in msg and "no CUDA device" in msg


def test_unsupported_gpu_is_named(llama_builds, monkeypatch):
    import torch

    from flagc.runtimes.trt_engine import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    info = _manifest(llama_builds["trt-fp16"])["tensorrt"]
    with pytest.raises(RuntimeInputError, match=r"NVIDIA H200 with compute capability 9\.0\. "
                                                 r"TensorRT-RTX does not support this GPU"):
        check_device(info, "cuda")


def test_version_mismatch_is_named(llama_builds):
    from flagc.runtimes.trt_engine import load_flavor

    info = dict(_manifest(llama_builds["trt-fp16"])["tensorrt"], version="0.9.0.1")
    with pytest.raises(RuntimeInputError, match=r"built by tensorrt-rtx 0\.9\.0\.1.*installed "
                                                 r"tensorrt-rtx is"):
        load_flavor(info)


# ---- numerics of the ONNX the engines were built from -------------------------------------------
def _ort_logits(path, ids, dtype):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row: the fp32 mask island must keep it finite
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((ids.shape[0], 2, 0, 16), dtype)
    return sess.run(["logits"], feeds)[0]


def _check_fp16_onnx(path, fp32_artifact):
    import onnx

    model = onnx.load(path)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.input) + list(model.graph.output)}
    assert types["past_key_values.0.key"] == types["present.1.value"] == f16
    assert types["logits"] in (f16, f32)
    big = [t for t in model.graph.initializer if np.prod(t.dims) > 1024]
    assert big and all(t.data_type == f16 for t in big)
    casts_to_f32 = [n for n in model.graph.node if n.op_type == "Cast"
                    and n.attribute[0].i == f32]
    assert casts_to_f32  # fp32 islands exist
    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    ref = _ort_logits(os.path.join(fp32_artifact, "model.onnx"), ids, np.float32)
    got = _ort_logits(path, ids, np.float16)
    assert np.isfinite(got).all()  # also the left-padded row: the mask stays finite
    # padded query positions (row 0, first 3) are garbage by contract: compare real tokens only
    err = np.abs(got.astype(np.float32) - ref)
    err[0, :3] = 0
    assert err.max() < 2e-2 * max(1.0, np.abs(ref).max()), err.max()


def test_fp16_onnx_the_engine_was_built_from_matches_fp32(llama_builds):
    _check_fp16_onnx(os.path.join(llama_builds["trt-fp16-onnx"], "trt.onnx"),
                     llama_builds["onnx-fp32"])


def test_trt_fp16_converter_fallback_numerics_and_engine(llama_builds, tmp_path):
    """flagc.lower.onnx_trt_fp16 (used when the graph reaches lowering without a precision plan)."""
    import onnx

    from flagc.lower.trt_build import build_engine
    from flagc.lower.onnx_trt_fp16 import convert_to_fp16

    m = _manifest(llama_builds["trt-fp32"])
    path = str(tmp_path / "fp16.onnx")
    onnx.save(convert_to_fp16(onnx.load(os.path.join(llama_builds["trt-fp32"], "trt.onnx"))),
              path)
    onnx.checker.check_model(path, full_check=True)
    _check_fp16_onnx(path, llama_builds["onnx-fp32"])
    info = build_engine(path, str(tmp_path / "engine.plan"), m["tensorrt"]["profiles"][0])
    dtypes = {s["name"]: s["dtype"] for s in info["io"]["inputs"] + info["io"]["outputs"]}
    assert dtypes["past_key_values.0.key"] == dtypes["logits"] == "f16"


def test_int8_onnx_has_qdq_and_stays_close(llama_builds):
    import onnx

    path = os.path.join(llama_builds["trt-int8"], "trt.onnx")
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
            and len(t.dims) == 2]
    assert len(int8) >= 9
    ids = np.random.default_rng(1).integers(0, 128, (2, 9))
    ref = _ort_logits(os.path.join(llama_builds["onnx-fp32"], "model.onnx"), ids, np.float32)
    got = _ort_logits(path, ids, np.float32)
    err = np.abs(got - ref)
    err[0, :3] = 0  # padded positions
    rel = err.max() / np.abs(ref).max()
    assert 0 < rel < 0.15, rel  # quantized (not identical), yet close


# ---- the runtime's binding and KV plumbing, over an onnxruntime stand-in context ----------------
def test_runtime_plumbing_generates_like_onnxruntime(llama_builds):
    import torch

    from flagc.runtimes.model import LoadedModel
    from flagc.runtimes.trt_engine import TrtEngine

    folder = llama_builds["trt-fp32"]
    m = _manifest(folder)
    engine = TrtEngine.from_context(m, OrtContext(os.path.join(folder, "trt.onnx"), m["tensorrt"]),
                                    torch.device("cpu"))
    model = LoadedModel(folder, m, engine)
    ref = flagc.load(llama_builds["onnx-fp32"])
    prompts = [[5, 17, 99, 3], list(range(20, 31))]
    ours = model.generate(prompts, max_new_tokens=12)
    theirs = ref.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    ids = np.random.default_rng(2).integers(0, 128, (2, 7))
    np.testing.assert_allclose(model.forward(ids)["logits"], ref.forward(ids)["logits"],
                               atol=1e-4)
    assert engine.run_calls > 0


def test_runtime_refuses_shapes_outside_the_profile(llama_builds):
    import torch

    from flagc.runtimes.trt_engine import TrtEngine

    folder = llama_builds["trt-fp32"]
    m = _manifest(folder)
    engine = TrtEngine.from_context(m, OrtContext(os.path.join(folder, "trt.onnx"), m["tensorrt"]),
                                    torch.device("cpu"))
    ids = np.zeros((MAX_BATCH + 1, 3), np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((MAX_BATCH + 1, 2, 0, 16), np.float32)
    with pytest.raises(RuntimeInputError, match=r"refused input 'input_ids' of shape \(5, 3\): "
                                                 r"outside the engine's optimization profile"):
        engine.run(feeds)


# ---- profiles -----------------------------------------------------------------------------------
def test_profiles_for_an_encoder_tune_for_mid_length_sequences():
    from flagc.lower.trt_profiles import profile_shapes

    prof = profile_shapes([{"name": "input_ids", "shape": ["batch", "seq"]},
                           {"name": "token_type_ids", "shape": ["batch", "seq"]}], 8, 512)
    assert prof["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [8, 512]}


def test_cli_inspect_shows_the_engine(llama_builds):
    from typer.testing import CliRunner

    from flagc.cli import app

    res = CliRunner().invoke(app, ["inspect", os.path.join(llama_builds["trt-fp16"],
                                                           "engine.plan")])
    assert res.exit_code == 0, res.output
    assert "past_key_values.0.key: f16[batch, 2, past, 16]" in res.output
    assert f"tensorrt   tensorrt-rtx {trt.__version__}, strongly typed fp16" in res.output
    assert "compute capability 8.0, 8.6, 8.9, 12.0" in res.output


def test_engine_build_reports_progress(llama_builds, tmp_path, monkeypatch):
    """TensorRT's build phases reach flagc's progress bar (phase names as its label)."""
    import contextlib

    import flagc.lower.trt_build as trt_build

    seen = []

    class Task:
        def advance(self, n=1, description=None):
            seen.append((n, description))

    @contextlib.contextmanager
    def fake_progress(description, total, unit="tensors"):
        seen.append((0, description))
        yield Task()

    monkeypatch.setattr(trt_build, "progress", fake_progress)
    m = _manifest(llama_builds["trt-fp32"])
    trt_build.build_engine(os.path.join(llama_builds["trt-fp32"], "trt.onnx"),
                           str(tmp_path / "e.plan"), m["tensorrt"]["profiles"][0])
    labels = [d for _, d in seen if d]
    assert labels[0] == "building TensorRT engine (tensorrt-rtx)"
    assert any(d.startswith("TensorRT: ") for d in labels[1:])
    assert sum(n for n, _ in seen) > 0  # steps completed
