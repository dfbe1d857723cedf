"""fp16 / bf16 precision planning: the plan, its golden IR, and artifacts against transformers
within the tolerance table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flagc
from flagc.errors import ConfigError
from flagc.ir.interpreter import interpret
from flagc.ir.text import parse_graph, print_graph
from flagc.passes import PassContext, run_pipeline
from golden import check_golden
from test_passes import _feeds, _with_weights
from tolerances import TOLERANCE

SMALL = """
graph small (
  %x: f32[batch, 8]
  %past: f32[batch, 8]
) weights (
  @w: f32[8, 8]
  @g: f32[8]
) {
  %0 = linear(%x, @w) : f32[batch, 8]
  %1 = add(%0, %past) : f32[batch, 8]
  %2 = rms_norm(%1, @g) {eps=1e-05} : f32[batch, 8]
  %3 = exp(%2) : f32[batch, 8]
  %4 = reduce_sum(%3) {axes=[-1], keepdims=true} : f32[batch, 1]
  %5 = div(%3, %4) : f32[batch, 8]
  return y=%5, present.0.key=%1
}
"""


def test_fp16_plan_keeps_overflowing_ops_in_fp32():
    graph = _with_weights(parse_graph(SMALL))
    feeds = _feeds(graph)
    before = interpret(graph, feeds)
    ctx = PassContext()
    run_pipeline(graph, ["precision-fp16"], ctx)
    after = interpret(graph, feeds)
    check_golden("fp16-plan", print_graph(graph), """
        graph small (
          %x: f16[batch, 8]
          %past: f16[batch, 8]
        ) weights (
          @w: f16[8, 8]
          @g: f16[8]
        ) {
          %0 = linear(%x, @w) : f16[batch, 8]
          %1 = add(%0, %past) : f16[batch, 8]
          %2 = rms_norm(%1, @g) {eps=1e-05, offset=0.0} : f16[batch, 8]
          %3 = cast(%2) {dtype="f32"} : f32[batch, 8]
          %4 = exp(%3) : f32[batch, 8]
          %5 = reduce_sum(%4) {axes=[-1], keepdims=true} : f32[batch, 1]
          %6 = cast(%4) {dtype="f16"} : f16[batch, 8]
          %7 = cast(%5) {dtype="f16"} : f16[batch, 1]
          %8 = div(%6, %7) : f16[batch, 8]
          %9 = cast(%8) {dtype="f32"} : f32[batch, 8]
          return y=%9, present.0.key=%1
        }
    """)
    torch.testing.assert_close(after["y"].float(), before["y"], atol=2e-3, rtol=2e-2)
    plan = ctx.plan
    assert plan["dtype"] == "f16" and plan["calibration"].startswith("interpreter")
    assert [k["op"] for k in plan["kept_fp32"]] == ["exp", "reduce_sum"]
    assert all("overflows" in k["reason"] for k in plan["kept_fp32"])


def test_fp16_plan_is_range_aware():
    graph = _with_weights(parse_graph(SMALL))
    ctx = PassContext(options={"fp16_limit": 1e-3})  # every value "overflows" this limit
    run_pipeline(graph, ["precision-fp16"], ctx)
    reasons = [k["reason"] for k in ctx.plan["kept_fp32"]]
    assert any("calibrated magnitude" in r for r in reasons)
    assert ctx.plan["counts"]["nodes in reduced precision"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp16_artifact_matches_transformers(family, tiny_llama, tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_llama if family == "llama" else tiny_qwen2
    tol = TOLERANCE["onnx-fp16"]
    built = flagc.build(folder, "onnx-fp16", str(tmp_path / "a"), check=True)
    assert built["kv_cache"]["dtype"] == "float16"
    assert built["io"]["outputs"][0]["dtype"] == "f32"  # logits stay fp32 for sampling
    assert built["precision_plan"]["counts"]["weights converted"] > 0
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    engine = flagc.load(str(tmp_path / "a"))
    logits = engine.forward(input_ids=ids.numpy())["logits"]
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    assert np.abs(logits - ref).max() <= tol["max_abs"] * np.abs(ref).max() * 10
    cos = (logits * ref).sum(-1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= tol["cosine"]
    got = engine.generate([ids[0].tolist()], max_new_tokens=tol["greedy"])[0].token_ids
    want = hf.generate(ids, max_new_tokens=tol["greedy"], do_sample=False)[0, 12:].tolist()
    assert got == want


def test_bf16_graph_within_tolerance_and_lowered(tiny_llama, tmp_path):
    import onnx

    built = flagc.build(tiny_llama, "onnx-bf16", str(tmp_path / "b"))
    assert built["kv_cache"]["dtype"] == "bfloat16"
    assert built["precision_plan"]["calibration"].startswith("skipped: bf16")
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    init_types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert init_types == {onnx.TensorProto.BFLOAT16}


def test_unknown_precision_is_refused():
    from flagc.passes.precision import plan_precision

    with pytest.raises(ConfigError, match="precision 'fp8'"):
        plan_precision(parse_graph(SMALL), PassContext(), "fp8")


@pytest.mark.parametrize("family", ["gpt2", "glm"])
def test_traced_decoders_keep_the_whole_cache_in_fp16(family, tmp_path):
    """A past input first read by a shape op, and GLM's additive mask (fp32 min), must not pin
    the cache or the attention to fp32."""
    from test_trt_families import TASKS, _save

    src = _save(family, tmp_path / "src")
    built = flagc.build(str(src), "onnx-fp16", str(tmp_path / "a"), task=TASKS[family])
    io = built["io"]
    caches = [x["dtype"] for x in io["inputs"] + io["outputs"]
              if x["name"].startswith(("past_key_values.", "present."))]
    assert caches and set(caches) == {"f16"}
    assert not [k for k in built["precision_plan"]["kept_fp32"] if k["op"] == "attention"]
