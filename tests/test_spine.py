"""End to end on random LLaMA / Qwen2: checkpoint -> IR -> onnx-fp32 -> onnxruntime, against
transformers (the numerical oracle)."""

import json
import os

import numpy as np
import pytest
import torch

import flagc
from flagc.cli import app


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tiny_llama, tiny_qwen2, tmp_path_factory):
    src = tiny_llama if request.param == "llama" else tiny_qwen2
    out = str(tmp_path_factory.mktemp("art") / request.param)
    flagc.build(src, "onnx-fp32", out, custom=os.path.join("examples", "llama.py")
                if request.param == "llama" else None)
    return src, out


def _hf(src):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(src).eval()


def test_full_sequence_logits_match_transformers(built):
    src, out = built
    engine = flagc.load(out)
    ids = np.random.default_rng(0).integers(0, 128, (2, 11))
    ours = engine.forward(ids)["logits"]
    with torch.no_grad():
        ref = _hf(src)(torch.from_numpy(ids)).logits.numpy()
    assert ours.shape == ref.shape == (2, 11, 128)
    assert np.abs(ours - ref).max() < 1e-4


def test_greedy_32_tokens_with_kv_cache_equal_transformers_generate(built):
    src, out = built
    prompt = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        ref = _hf(src).generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                min_new_tokens=32)
    result = flagc.load(out).generate(prompt, max_new_tokens=32)
    assert result.token_ids == ref[0, len(prompt):].tolist()
    assert len(result.token_ids) == 32
    assert result.finish_reason == "length"
    # Each decode step ran one session call: the cache, not the prompt, was re-fed.
    assert result.timings["session_runs"] == 32


def test_left_padded_batch_equals_single_runs(built):
    _, out = built
    engine = flagc.load(out)
    prompts = [[1, 2, 3], list(range(10, 27)), [9] * 40]
    batch = engine.generate(prompts, max_new_tokens=12)
    for p, r in zip(prompts, batch):
        assert r.token_ids == engine.generate(p, max_new_tokens=12).token_ids


def test_manifest_describes_the_artifact(built):
    src, out = built
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["target"] == {"name": "onnx-fp32", "backend": "onnxruntime", "precision": "fp32",
                           "opset": 17}
    assert m["kv_cache"]["layers"] == 2 and m["kv_cache"]["kv_heads"] == 2
    assert m["kv_cache"]["head_dim"] == 16
    names = [i["name"] for i in m["io"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    outs = {o["name"]: o["shape"] for o in m["io"]["outputs"]}
    assert outs["present.0.key"] == ["batch", "2", "past+seq", "16"]
    assert m["vocab_size"] == 128 and m["dims"]["max_seq"] == 256
    assert len(m["source"]["hash"]) == 16 and m["flagc_version"] == flagc.__version__


def test_onnx_model_is_checker_clean_with_named_dims(built):
    import onnx

    _, out = built
    model = onnx.load(os.path.join(out, "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


def test_cli_run_json_and_inspect(built):
    from typer.testing import CliRunner

    _, out = built
    runner = CliRunner()
    res = runner.invoke(app, ["run", os.path.join(out, "model.onnx"), "--ids", "5,17,99",
                              "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["token_ids"] == flagc.load(out).generate([5, 17, 99], max_new_tokens=4).token_ids
    res = runner.invoke(app, ["inspect", out])
    assert res.exit_code == 0 and "past_key_values.0.key: f32[batch, 2, past, 16]" in res.output
    assert "KiB per token" in res.output


def test_external_data_path_keeps_parity(tiny_qwen2, tmp_path):
    from flagc.checkpoints.source import open_model_source
    from flagc.dsl.custom import build_custom_graph, builtin_model_class
    from flagc.lower.onnx_model import lower_to_onnx
    from flagc.lower.targets import get_target
    import onnxruntime as ort

    src = open_model_source(tiny_qwen2)
    g, _ = build_custom_graph(builtin_model_class("qwen2"), src.config, src.weights)
    path = str(tmp_path / "m.onnx")
    files = lower_to_onnx(g, get_target("onnx-fp32"), path, external_threshold=0)
    assert files == ["m.onnx", "m.onnx.data"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.array([[3, 4, 5]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(3)[None]}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    logits = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = _hf(tiny_qwen2)(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4


def test_cli_models_lists_families_targets_and_hub_names():
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0
    assert "graph DSL model types: llama, mistral, qwen2" in res.output
    assert "onnx-fp32," in res.output and "GLM-large-ch" in res.output
