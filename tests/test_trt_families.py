"""trt-fp16 engines for tiny BERT, GPT-2, T5 and GLM (torch.export frontend), built on the CPU by
TensorRT for RTX (LLaMA, the DSL path, is covered by test_trt.py). Each build is checked through
its manifest and refused when damaged; the engines cannot run without an Ampere+ GPU.

Most of each build's time is the torch.export capture, not TensorRT (about 2 s per engine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import flagc
from flagc.errors import ArtifactError

trt = pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="TensorRT for RTX is not installed (pip install 'flagc[trt]'); CI installs it")
transformers = pytest.importorskip("transformers")

GLM_FIXTURE = Path(__file__).parent / "fixtures" / "glm"
TASKS = {"bert": "embedding", "gpt2": "text-generation", "t5": "seq2seq", "glm": "seq2seq"}
DECODERS = {"gpt2", "t5", "glm"}


def _save(family: str, folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    if family == "glm":  # FlagAI-style folder: flat config + FlagAI tensor names
        cfg = json.loads((GLM_FIXTURE / "config.json").read_text())["config"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "glm"}))
        shutil.copy(GLM_FIXTURE / "weights.safetensors", folder / "model.safetensors")
        return folder
    T = transformers
    model = {
        "bert": lambda: T.BertModel(T.BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=1,
            bos_token_id=1)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    }[family]()
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(TASKS))
def family_build(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"trt-{family}")
    src = _save(family, root / "src")
    out = root / "art"
    flagc.build(str(src), "trt-fp16", str(out), max_seq=64, max_batch=4, task=TASKS[family])
    return family, out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_family_manifest(family_build):
    family, out = family_build
    m = _manifest(out)
    t = m["tensorrt"]
    assert m["target"]["name"] == "trt-fp16" and m["engine"] == "engine.plan"
    assert t["flavor"] == "tensorrt-rtx" and t["version"] == trt.__version__
    assert t["strongly_typed"] and t["precision"]["compute"] == "fp16"
    assert {"8.0", "8.6", "8.9", "12.0"} <= set(t["compute_capabilities"])
    engines = {"engine.plan": t, **{c["engine"]: c for c in t.get("companions", {}).values()}}
    for name, info in engines.items():
        data = (out / name).read_bytes()
        assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
        prof = info["profiles"][0]
        for p in prof.values():
            assert all(a <= b <= c for a, b, c in zip(p["min"], p["opt"], p["max"]))
            assert p["max"][0] == 4  # max_batch
    names = {s["name"] for s in m["io"]["inputs"]}
    assert set(t["profiles"][0]) == names
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".onnx") == []
    if family in DECODERS:
        io = {s["name"]: s["dtype"] for s in m["io"]["inputs"] + m["io"]["outputs"]}
        kv = {io[k] for k in io if k.startswith(("past_key_values.", "present."))}
        # fp16 unless the precision plan kept attention in fp32 (then the cache follows it)
        kept = [k for k in m["precision_plan"].get("kept_fp32", []) if k["op"] == "attention"]
        want = "f32" if kept else "f16"
        assert kv == {want}  # one type for the whole cache: present is bound as the next past
        assert m["kv_cache"]["dtype"] == {"f16": "float16", "f32": "float32"}[want]
    if family == "t5":
        assert m["encoder"]["engine"] == "encoder.plan" and (out / "encoder.plan").is_file()
        assert t["companions"]["encoder"]["precision"]["compute"] == "fp16"
        assert t["profiles"][0]["encoder_attention_mask"]["max"] == [4, 64]
    if family == "glm":
        assert t["profiles"][0]["position_ids"]["max"] == [4, 2, 64]  # 2-D positions
    if family == "bert":
        assert t["profiles"][0]["token_type_ids"]["opt"] == [1, 64]  # an encoder: mid-length


def test_family_damaged_engine_is_refused(family_build, tmp_path):
    family, out = family_build
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    victim = copy / ("encoder.plan" if family == "t5" else "engine.plan")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 17])
    with pytest.raises(ArtifactError, match=rf"{victim.name} is truncated"):
        flagc.load(str(copy))
    victim.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    with pytest.raises(ArtifactError, match=rf"{victim.name} is corrupt"):
        flagc.load(str(copy))


def test_t5_two_engine_runtime_generates_like_transformers(tmp_path, monkeypatch):
    """T5's encoder.plan + engine.plan through the TensorRT runtime classes (companion role,
    seq2seq loop), each over an onnxruntime stand-in of its own kept ONNX; trt-fp32 so the
    tokens must equal transformers' greedy output."""
    import torch
    from trt_standin import OrtContext

    import flagc.runtimes.trt_engine as trt_engine

    src = _save("t5", tmp_path / "src")
    out = tmp_path / "art"
    monkeypatch.setenv("FLAGC_TRT_KEEP_ONNX", "1")
    flagc.build(str(src), "trt-fp32", str(out), max_seq=32, max_batch=2, task="seq2seq")
    assert {"trt.onnx", "encoder.trt.onnx", "encoder.plan"} <= {p.name for p in out.iterdir()}

    class StandIn(trt_engine.TrtEngine):
        def __init__(self, folder, manifest, device="cpu", threads=None, role=None):
            info = manifest["tensorrt"] if role is None else \
                manifest["tensorrt"]["companions"][role]
            onnx_path = os.path.join(folder, ("trt" if role is None else f"{role}.trt") + ".onnx")
            self._setup(manifest, OrtContext(onnx_path, info), torch.device("cpu"), role)
            self.device_id = 0

    monkeypatch.setattr(trt_engine, "TrtEngine", StandIn)
    model = flagc.load(str(out))
    assert isinstance(model.engine, StandIn)
    sources = [[5, 9, 13, 2, 1], [7, 3, 1]]
    ours = model.generate(sources, max_new_tokens=6, min_new_tokens=6)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(src)).eval()
    for s, r in zip(sources, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([s]), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False)
        assert r.token_ids == ref[0, 1:].tolist()
