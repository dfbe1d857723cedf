"""pack-tokens (passes/padding.py): per-token ops of an encoder run on the real tokens only.
Golden IR, the interpreter and onnxruntime agree with the padded graph at every real token (and
give zeros at padding), decoders are left alone, and a zoo BERT matches transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flagc
from flagc.ir.graph import WeightSource
from flagc.ir.interpreter import interpret
from flagc.ir.text import parse_graph, print_graph
from flagc.passes import PassContext, run_pipeline
from golden import check_golden

ENCODER = """
graph enc (
  %ids: i64[batch, seq]
  %attention_mask: i64[batch, seq]
  %bias: f32[batch, 1, 1, seq]
) weights (
  @emb: f32[16, 8]
  @ln_w: f32[8]
  @ln_b: f32[8]
  @wqkv: f32[24, 8]
  @wo: f32[8, 8]
  @n_w: f32[8]
  @n_b: f32[8]
  @w1: f32[12, 8]
  @w2: f32[8, 12]
) {
  %0 = embedding(%ids, @emb) : f32[batch, seq, 8]
  %1 = layer_norm(%0, @ln_w, @ln_b) {eps=1e-05} : f32[batch, seq, 8]
  %2 = linear(%1, @wqkv) : f32[batch, seq, 24]
  %3, %4, %5 = split(%2) {axis=-1, sizes=[8, 8, 8]} : f32[batch, seq, 8], f32[batch, seq, 8], f32[batch, seq, 8]
  %6 = reshape(%3) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %7 = reshape(%4) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %8 = reshape(%5) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %9, %10, %11 = attention(%6, %7, %8, _, _, _, %bias) {kv_heads=2, mask="bidirectional", num_heads=2, scale=0.5} : f32[batch, seq, 8], f32[batch, 2, seq, 4], f32[batch, 2, seq, 4]
  %12 = linear(%9, @wo) : f32[batch, seq, 8]
  %13, %14 = add_norm(%1, %12, @n_w, @n_b) {eps=1e-05, kind="layer"} : f32[batch, seq, 8], f32[batch, seq, 8]
  %15 = linear(%13, @w1) : f32[batch, seq, 12]
  %16 = gelu(%15) {approximate="none"} : f32[batch, seq, 12]
  %17 = linear(%16, @w2) : f32[batch, seq, 8]
  %18 = add(%13, %17) : f32[batch, seq, 8]
  return hidden=%18
}
"""

LENGTHS = [5, 3]  # row 1 has two padding positions


def _graph():
    graph = parse_graph(ENCODER)
    rng = np.random.default_rng(0)
    for name, v in graph.weights.items():
        shape = tuple(int(d) for d in v.shape)
        arr = (rng.standard_normal(shape) * 0.5 + (1.0 if len(shape) == 1 else 0.0))
        graph.weight_sources[name] = WeightSource(lambda a=arr.astype(np.float32): a,
                                                  origin=name)
    return graph


def _feeds():
    mask = np.array([[1] * n + [0] * (5 - n) for n in LENGTHS], np.int64)
    ids = np.random.default_rng(1).integers(0, 16, (2, 5))
    bias = np.where(mask[:, None, None, :] != 0, 0.0, -1e9).astype(np.float32)
    return {"ids": ids, "attention_mask": mask, "bias": bias}


def test_golden_ir_and_interpreter_parity_at_real_tokens():
    graph = _graph()
    feeds = _feeds()
    before = interpret(graph, feeds)["hidden"].numpy()
    stats = run_pipeline(graph, ["pack-tokens"], PassContext())
    assert stats[0].rewrites == {"packed ops": 7}
    check_golden("pack_tokens", print_graph(graph), """
        graph enc (
          %ids: i64[batch, seq]
          %attention_mask: i64[batch, seq]
          %bias: f32[batch, 1, 1, seq]
        ) weights (
          @emb: f32[16, 8]
          @ln_w: f32[8]
          @ln_b: f32[8]
          @wqkv: f32[24, 8]
          @wo: f32[8, 8]
          @n_w: f32[8]
          @n_b: f32[8]
          @w1: f32[12, 8]
          @w2: f32[8, 12]
        ) {
          %0 = embedding(%ids, @emb) : f32[batch, seq, 8]
          %1 = pack_tokens(%0, %attention_mask) : f32[tokens, 8]
          %2 = layer_norm(%1, @ln_w, @ln_b) {eps=1e-05} : f32[tokens, 8]
          %3 = unpack_tokens(%2, %attention_mask) : f32[batch, seq, 8]
          %4 = linear(%3, @wqkv) : f32[batch, seq, 24]
          %5, %6, %7 = split(%4) {axis=-1, sizes=[8, 8, 8]} : f32[batch, seq, 8], f32[batch, seq, 8], f32[batch, seq, 8]
          %8 = reshape(%5) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
          %9 = reshape(%6) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
          %10 = reshape(%7) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
          %11, %12, %13 = attention(%8, %9, %10, _, _, _, %bias) {kv_heads=2, mask="bidirectional", num_heads=2, scale=0.5} : f32[batch, seq, 8], f32[batch, 2, seq, 4], f32[batch, 2, seq, 4]
          %14 = pack_tokens(%11, %attention_mask) : f32[tokens, 8]
          %15 = linear(%14, @wo) : f32[tokens, 8]
          %16, %17 = add_norm(%2, %15, @n_w, @n_b) {eps=1e-05, kind="layer"} : f32[tokens, 8], f32[tokens, 8]
          %18 = linear(%16, @w1) : f32[tokens, 12]
          %19 = gelu(%18) {approximate="none"} : f32[tokens, 12]
          %20 = linear(%19, @w2) : f32[tokens, 8]
          %21 = add(%16, %20) : f32[tokens, 8]
          %22 = unpack_tokens(%21, %attention_mask) : f32[batch, seq, 8]
          return hidden=%22
        }
    """)
    after = interpret(graph, feeds)["hidden"].numpy()
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(after[real], before[real], rtol=1e-5, atol=1e-5)
    assert not after[~real].any()  # padding positions come back as zeros


def test_the_packed_graph_runs_on_onnxruntime(tmp_path):
    import onnxruntime as ort

    from flagc.lower.onnx_model import lower_to_onnx
    from flagc.lower.targets import TARGETS

    graph = _graph()
    feeds = _feeds()
    run_pipeline(graph, ["pack-tokens"], PassContext())
    ref = interpret(graph, feeds)["hidden"].numpy()
    path = str(tmp_path / "m.onnx")
    lower_to_onnx(graph, TARGETS["onnx-fp32"], path)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["hidden"], feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # all real tokens (no padding) and a batch of one give the same answer as well
    feeds["attention_mask"][:] = 1
    feeds["bias"][:] = 0
    np.testing.assert_allclose(
        ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["hidden"], feeds)[0],
        interpret(graph, feeds)["hidden"].numpy(), rtol=1e-5, atol=1e-5)


def test_decoders_with_a_kv_cache_are_left_alone(tiny_llama, tmp_path):
    r = flagc.build(tiny_llama, "onnx-fp32", str(tmp_path / "a"), max_seq=64)
    stats = {p["name"]: p for p in r["build"]["passes"]}
    assert not stats["pack-tokens"]["rewrites"].get("packed ops")
    assert "pack_tokens" not in r["graph"]["ops"]
    assert "a KV cache" in str(r["build"]["declined_rewrites"])


@pytest.mark.parametrize("target", ["onnx-fp32", "onnx-int8"])
def test_zoo_bert_embedding_matches_transformers_at_real_tokens(tmp_path, tiny_bert, target):
    folder, hf = tiny_bert
    r = flagc.build(folder, target, str(tmp_path / "art"), task="embedding")
    # per layer one unpack (before attention) and one pack (after); the embeddings' sum packs
    assert r["graph"]["ops"]["unpack_tokens"] == 3
    ids = np.random.default_rng(0).integers(1, 100, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    out = flagc.load(str(tmp_path / "art")).forward(ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    got = out["last_hidden_state"]
    tol = 1e-4 if target == "onnx-fp32" else 0.15
    np.testing.assert_allclose(got[real], ref.last_hidden_state.numpy()[real], atol=tol)
    assert not got[~real].any()


def test_pack_tokens_can_be_turned_off():
    graph = _graph()
    ctx = PassContext(options={"pack_tokens": False})
    stats = run_pipeline(graph, ["pack-tokens"], ctx)
    assert not stats[0].rewrites.get("packed ops")
    assert "pack_tokens" not in print_graph(graph)
    assert "turned off" in str(ctx.declined)
