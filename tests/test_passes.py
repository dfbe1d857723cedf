"""Every pass: a golden IR test (inline expected text; FLAGC_ACCEPT=1 rewrites it) and a numeric
test (the reference interpreter before vs after the pass on random inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagc.errors import ConfigError
from flagc.ir.graph import WeightSource
from flagc.ir.interpreter import interpret
from flagc.ir.symbolic import eval_dim
from flagc.ir.text import parse_graph, print_graph
from flagc.passes import PassContext, run_pipeline
from flagc.passes.manager import PassError, PASSES
from golden import check_golden


def _with_weights(graph, seed=0):
    rng = np.random.default_rng(seed)
    for name, v in graph.weights.items():
        shape = tuple(int(d) for d in v.shape)
        data = (rng.standard_normal(shape) * 0.5 + (1.0 if len(shape) == 1 else 0.0))
        arr = data.astype(v.dtype.numpy)
        graph.weight_sources[name] = WeightSource(lambda a=arr: a, origin=name)
    return graph


def _feeds(graph, seed=1):
    rng = np.random.default_rng(seed)
    sizes = {"batch": 2, "seq": 5, "past": 3}
    feeds = {}
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else eval_dim(d, sizes) for d in v.shape]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_and_compare(text: str, passes: list[str], atol: float = 1e-5):
    """Parse, run `passes`, check the numbers did not change; returns the printed result."""
    graph = _with_weights(parse_graph(text))
    feeds = _feeds(graph)
    before = interpret(graph, feeds)
    ctx = PassContext()
    run_pipeline(graph, passes, ctx)
    after = interpret(graph, feeds)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=atol, rtol=1e-5)
    return print_graph(graph), ctx


RMS_TRACED = """
graph rms (
  %x: f32[batch, seq, 8]
) weights (
  @w: f32[8]
) {
  %0 = constant() {value=array(f32, [], [2.0])} : f32[]
  %1 = pow(%x, %0) : f32[batch, seq, 8]
  %2 = reduce_mean(%1) {axes=[-1], keepdims=true} : f32[batch, seq, 1]
  %3 = constant() {value=array(f32, [], [1e-06])} : f32[]
  %4 = add(%2, %3) : f32[batch, seq, 1]
  %5 = rsqrt(%4) : f32[batch, seq, 1]
  %6 = mul(%x, %5) : f32[batch, seq, 8]
  %7 = mul(@w, %6) : f32[batch, seq, 8]
  return y=%7
}
"""


def test_fuse_rms_norm():
    out, _ = run_and_compare(RMS_TRACED, ["fuse-norms"])
    check_golden("rms", out, """
        graph rms (
          %x: f32[batch, seq, 8]
        ) weights (
          @w: f32[8]
        ) {
          %0 = rms_norm(%x, @w) {eps=9.999999974752427e-07, offset=0.0} : f32[batch, seq, 8]
          return y=%0
        }
    """)


LAYER_NORM_TRACED = """
graph ln (
  %x: f32[batch, seq, 8]
) weights (
  @w: f32[8]
  @b: f32[8]
) {
  %0 = reduce_mean(%x) {axes=[-1], keepdims=true} : f32[batch, seq, 1]
  %1 = sub(%x, %0) : f32[batch, seq, 8]
  %2 = mul(%1, %1) : f32[batch, seq, 8]
  %3 = reduce_mean(%2) {axes=[-1], keepdims=true} : f32[batch, seq, 1]
  %4 = constant() {value=array(f32, [], [1e-12])} : f32[]
  %5 = add(%3, %4) : f32[batch, seq, 1]
  %6 = sqrt(%5) : f32[batch, seq, 1]
  %7 = div(%1, %6) : f32[batch, seq, 8]
  %8 = mul(%7, @w) : f32[batch, seq, 8]
  %9 = add(%8, @b) : f32[batch, seq, 8]
  return y=%9
}
"""


def test_fuse_layer_norm():
    out, _ = run_and_compare(LAYER_NORM_TRACED, ["fuse-norms"])
    check_golden("layer_norm", out, """
        graph ln (
          %x: f32[batch, seq, 8]
        ) weights (
          @w: f32[8]
          @b: f32[8]
        ) {
          %0 = reduce_mean(%x) {axes=[-1], keepdims=true} : f32[batch, seq, 1]
          %1 = sub(%x, %0) : f32[batch, seq, 8]
          %2 = rms_norm(%1, @w) {eps=9.999999960041972e-13, offset=0.0} : f32[batch, seq, 8]
          %3 = add(%2, @b) : f32[batch, seq, 8]
          return y=%3
        }
    """)


ACTIVATIONS_TRACED = """
graph act (
  %x: f32[batch, 8]
) {
  %0 = constant() {value=array(f32, [], [1.4142135623730951])} : f32[]
  %1 = div(%x, %0) : f32[batch, 8]
  %2 = erf(%1) : f32[batch, 8]
  %3 = constant() {value=array(f32, [], [1.0])} : f32[]
  %4 = add(%3, %2) : f32[batch, 8]
  %5 = constant() {value=array(f32, [], [0.5])} : f32[]
  %6 = mul(%x, %5) : f32[batch, 8]
  %7 = mul(%6, %4) : f32[batch, 8]
  %8 = pow(%7, %3) : f32[batch, 8]
  %9 = constant() {value=array(f32, [], [3.0])} : f32[]
  %10 = pow(%8, %9) : f32[batch, 8]
  %11 = constant() {value=array(f32, [], [0.044715])} : f32[]
  %12 = mul(%11, %10) : f32[batch, 8]
  %13 = add(%8, %12) : f32[batch, 8]
  %14 = constant() {value=array(f32, [], [0.7978845608028654])} : f32[]
  %15 = mul(%14, %13) : f32[batch, 8]
  %16 = tanh(%15) : f32[batch, 8]
  %17 = add(%16, %3) : f32[batch, 8]
  %18 = mul(%5, %8) : f32[batch, 8]
  %19 = mul(%18, %17) : f32[batch, 8]
  %20 = sigmoid(%19) : f32[batch, 8]
  %21 = mul(%20, %19) : f32[batch, 8]
  return y=%21
}
"""


def test_fuse_activations():
    # erf GELU, then (after a pow by 1 the cleanup leaves alone) tanh GELU, then SiLU.
    out, _ = run_and_compare(ACTIVATIONS_TRACED, ["fuse-activations", "dce"])
    check_golden("activations", out, """
        graph act (
          %x: f32[batch, 8]
        ) weights (
        ) {
          %0 = constant() {value=array(f32, [], [1.0])} : f32[]
          %1 = gelu(%x) {approximate="none"} : f32[batch, 8]
          %2 = pow(%1, %0) : f32[batch, 8]
          %3 = gelu(%2) {approximate="tanh"} : f32[batch, 8]
          %4 = silu(%3) : f32[batch, 8]
          return y=%4
        }
    """)


LINEAR_TRACED = """
graph lin (
  %x: f32[batch, seq, 8]
) weights (
  @w: f32[6, 8]
  @b: f32[6]
  @conv: f32[6, 4]
) {
  %0 = transpose(@w) {perm=[1, 0]} : f32[8, 6]
  %1 = matmul(%x, %0) : f32[batch, seq, 6]
  %2 = add(%1, @b) : f32[batch, seq, 6]
  %3 = matmul(%2, @conv) : f32[batch, seq, 4]
  return y=%3
}
"""


def test_fuse_linear():
    out, _ = run_and_compare(LINEAR_TRACED, ["fuse-linear"])
    check_golden("linear", out, """
        graph lin (
          %x: f32[batch, seq, 8]
        ) weights (
          @w: f32[6, 8]
          @b: f32[6]
          @conv.T: f32[4, 6]
        ) {
          %0 = linear(%x, @w, @b) : f32[batch, seq, 6]
          %1 = linear(%0, @conv.T) : f32[batch, seq, 4]
          return y=%1
        }
    """)


ATTENTION_TRACED = """
graph attn (
  %q: f32[batch, seq, 2, 4]
  %k: f32[batch, seq, 2, 4]
  %v: f32[batch, seq, 2, 4]
  %mask: f32[batch, 1, 1, seq]
) {
  %0 = transpose(%q) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 4]
  %1 = transpose(%k) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 4]
  %2 = transpose(%1) {perm=[0, 1, 3, 2]} : f32[batch, 2, 4, seq]
  %3 = matmul(%0, %2) : f32[batch, 2, seq, seq]
  %4 = constant() {value=array(f32, [], [2.0])} : f32[]
  %5 = div(%3, %4) : f32[batch, 2, seq, seq]
  %6 = add(%5, %mask) : f32[batch, 2, seq, seq]
  %7 = softmax(%6) {axis=-1} : f32[batch, 2, seq, seq]
  %8 = transpose(%v) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 4]
  %9 = matmul(%7, %8) : f32[batch, 2, seq, 4]
  %10 = transpose(%9) {perm=[0, 2, 1, 3]} : f32[batch, seq, 2, 4]
  %11 = reshape(%10) {shape=[0, 0, 8]} : f32[batch, seq, 8]
  return y=%11
}
"""


def test_fuse_attention_from_matmul_chain():
    out, _ = run_and_compare(ATTENTION_TRACED, ["canonicalize", "fuse-attention",
                                                "canonicalize"])
    check_golden("attention", out, """
        graph attn (
          %q: f32[batch, seq, 2, 4]
          %k: f32[batch, seq, 2, 4]
          %v: f32[batch, seq, 2, 4]
          %mask: f32[batch, 1, 1, seq]
        ) weights (
        ) {
          %0, %1, %2 = attention(%q, %k, %v, _, _, _, %mask) {kv_heads=2, mask="bidirectional", num_heads=2, scale=0.5} : f32[batch, seq, 8], f32[batch, 2, seq, 4], f32[batch, 2, seq, 4]
          return y=%0
        }
    """)


CACHED_ATTENTION_TRACED = """
graph cached (
  %qh: f32[batch, 4, seq, 4]
  %kh: f32[batch, 2, seq, 4]
  %vh: f32[batch, 2, seq, 4]
  %past_k: f32[batch, 2, past, 4]
  %past_v: f32[batch, 2, past, 4]
  %bias: f32[batch, 1, seq, past+seq]
) {
  %0 = concat(%past_k, %kh) {axis=2} : f32[batch, 2, past+seq, 4]
  %1 = concat(%past_v, %vh) {axis=2} : f32[batch, 2, past+seq, 4]
  %2 = unsqueeze(%0) {axes=[2]} : f32[batch, 2, 1, past+seq, 4]
  %3 = expand(%2) {shape=[0, 0, 2, 0, 0]} : f32[batch, 2, 2, past+seq, 4]
  %4 = reshape(%3) {shape=[0, 4, -1, 4]} : f32[batch, 4, past+seq, 4]
  %5 = unsqueeze(%1) {axes=[2]} : f32[batch, 2, 1, past+seq, 4]
  %6 = expand(%5) {shape=[0, 0, 2, 0, 0]} : f32[batch, 2, 2, past+seq, 4]
  %7 = reshape(%6) {shape=[0, 4, -1, 4]} : f32[batch, 4, past+seq, 4]
  %8 = transpose(%4) {perm=[0, 1, 3, 2]} : f32[batch, 4, 4, past+seq]
  %9 = matmul(%qh, %8) : f32[batch, 4, seq, past+seq]
  %10 = constant() {value=array(f32, [], [0.5])} : f32[]
  %11 = mul(%9, %10) : f32[batch, 4, seq, past+seq]
  %12 = add(%11, %bias) : f32[batch, 4, seq, past+seq]
  %13 = softmax(%12) {axis=-1} : f32[batch, 4, seq, past+seq]
  %14 = matmul(%13, %7) : f32[batch, 4, seq, 4]
  %15 = transpose(%14) {perm=[0, 2, 1, 3]} : f32[batch, seq, 4, 4]
  %16 = reshape(%15) {shape=[0, 0, 16]} : f32[batch, seq, 16]
  return y=%16, present.0.key=%0, present.0.value=%1
}
"""


def test_fuse_cached_attention_with_grouped_heads():
    out, _ = run_and_compare(CACHED_ATTENTION_TRACED, ["fuse-attention", "canonicalize", "dce"])
    check_golden("cached-attention", out, """
        graph cached (
          %qh: f32[batch, 4, seq, 4]
          %kh: f32[batch, 2, seq, 4]
          %vh: f32[batch, 2, seq, 4]
          %past_k: f32[batch, 2, past, 4]
          %past_v: f32[batch, 2, past, 4]
          %bias: f32[batch, 1, seq, past+seq]
        ) weights (
        ) {
          %0 = transpose(%qh) {perm=[0, 2, 1, 3]} : f32[batch, seq, 4, 4]
          %1 = transpose(%kh) {perm=[0, 2, 1, 3]} : f32[batch, seq, 2, 4]
          %2 = transpose(%vh) {perm=[0, 2, 1, 3]} : f32[batch, seq, 2, 4]
          %3, %4, %5 = attention(%0, %1, %2, %past_k, %past_v, _, %bias) {kv_heads=2, mask="bidirectional", num_heads=4, scale=0.5} : f32[batch, seq, 16], f32[batch, 2, past+seq, 4], f32[batch, 2, past+seq, 4]
          return y=%3, present.0.key=%4, present.0.value=%5
        }
    """)


ROTARY_TRACED = """
graph rope (
  %x: f32[batch, 2, seq, 4]
  %position_ids: i64[batch, seq]
) {
  %0 = cast(%position_ids) {dtype="f32"} : f32[batch, seq]
  %1 = unsqueeze(%0) {axes=[2]} : f32[batch, seq, 1]
  %2 = constant() {value=array(f32, [2], [1.0, 0.01])} : f32[2]
  %3 = mul(%1, %2) : f32[batch, seq, 2]
  %4 = concat(%3, %3) {axis=2} : f32[batch, seq, 4]
  %5 = cos(%4) : f32[batch, seq, 4]
  %6 = sin(%4) : f32[batch, seq, 4]
  %7 = unsqueeze(%5) {axes=[1]} : f32[batch, 1, seq, 4]
  %8 = mul(%x, %7) : f32[batch, 2, seq, 4]
  %9 = slice(%x) {axis=3, start=2} : f32[batch, 2, seq, 2]
  %10 = neg(%9) : f32[batch, 2, seq, 2]
  %11 = slice(%x) {axis=3, end=2, start=0} : f32[batch, 2, seq, 2]
  %12 = concat(%10, %11) {axis=3} : f32[batch, 2, seq, 4]
  %13 = unsqueeze(%6) {axes=[1]} : f32[batch, 1, seq, 4]
  %14 = mul(%12, %13) : f32[batch, 2, seq, 4]
  %15 = add(%8, %14) : f32[batch, 2, seq, 4]
  return y=%15
}
"""


def test_fuse_rotary_into_table_lookups():
    graph = _with_weights(parse_graph(ROTARY_TRACED))
    feeds = _feeds(graph)
    feeds["position_ids"] = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int64)
    before = interpret(graph, feeds)
    ctx = PassContext(options={"max_seq": 16})
    stats = run_pipeline(graph, ["fuse-rotary", "canonicalize", "dce"], ctx)
    torch.testing.assert_close(interpret(graph, feeds)["y"], before["y"], atol=1e-5, rtol=1e-5)
    assert stats[0].rewrites == {"rotary": 1}
    check_golden("rotary", print_graph(graph), """
        graph rope (
          %x: f32[batch, 2, seq, 4]
          %position_ids: i64[batch, seq]
        ) weights (
          @rope.a6c629e7.cos: f32[16, 2]
          @rope.a6c629e7.sin: f32[16, 2]
        ) {
          %0 = transpose(%x) {perm=[0, 2, 1, 3]} : f32[batch, seq, 2, 4]
          %1 = rotary(%0, %position_ids, @rope.a6c629e7.cos, @rope.a6c629e7.sin) {interleaved=false, rotary_dim=4} : f32[batch, seq, 2, 4]
          %2 = transpose(%1) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 4]
          return y=%2
        }
    """)


def test_fuse_rotary_needs_max_seq():
    graph = _with_weights(parse_graph(ROTARY_TRACED))
    ctx = PassContext()
    run_pipeline(graph, ["fuse-rotary"], ctx)
    assert ctx.declined == {"rotary: no max_seq to size the cos/sin tables": 1}


RESIDUAL = """
graph res (
  %x: f32[batch, 8]
  %h: f32[batch, 8]
) weights (
  @w: f32[8]
  @w2: f32[8]
) {
  %0 = add(%h, %x) : f32[batch, 8]
  %1 = rms_norm(%0, @w) {eps=1e-05} : f32[batch, 8]
  %2 = add(%0, %1) : f32[batch, 8]
  %3 = rms_norm(%2, @w2) {eps=1e-05} : f32[batch, 8]
  return y=%3
}
"""


def test_fuse_residual_norm_chains():
    out, _ = run_and_compare(RESIDUAL, ["fuse-residual-norm"])
    check_golden("residual", out, """
        graph res (
          %x: f32[batch, 8]
          %h: f32[batch, 8]
        ) weights (
          @w: f32[8]
          @w2: f32[8]
        ) {
          %0, %1 = add_norm(%h, %x, @w) {eps=1e-05, kind="rms"} : f32[batch, 8], f32[batch, 8]
          %2, %3 = add_norm(%1, %0, @w2) {eps=1e-05, kind="rms"} : f32[batch, 8], f32[batch, 8]
          return y=%2
        }
    """)


PROJECTIONS = """
graph proj (
  %x: f32[batch, 8]
) weights (
  @q: f32[8, 8]
  @k: f32[4, 8]
  @v: f32[4, 8]
  @o: f32[8, 8]
) {
  %0 = linear(%x, @q) : f32[batch, 8]
  %1 = linear(%x, @k) : f32[batch, 4]
  %2 = linear(%x, @v) : f32[batch, 4]
  %3 = concat(%0, %1, %2) {axis=-1} : f32[batch, 16]
  %4 = linear(%0, @o) : f32[batch, 8]
  return y=%3, z=%4
}
"""


def test_merge_projections():
    out, _ = run_and_compare(PROJECTIONS, ["merge-projections"])
    check_golden("projections", out, """
        graph proj (
          %x: f32[batch, 8]
        ) weights (
          @o: f32[8, 8]
          @q+k+v: f32[16, 8]
        ) {
          %0 = linear(%x, @q+k+v) : f32[batch, 16]
          %1, %2, %3 = split(%0) {axis=-1, sizes=[8, 4, 4]} : f32[batch, 8], f32[batch, 4], f32[batch, 4]
          %4 = concat(%1, %2, %3) {axis=-1} : f32[batch, 16]
          %5 = linear(%1, @o) : f32[batch, 8]
          return y=%4, z=%5
        }
    """)


CLEANUP = """
graph clean (
  %x: f32[batch, 4, 6]
) {
  %0 = constant() {value=array(f32, [2], [1.0, 2.0])} : f32[2]
  %1 = constant() {value=array(f32, [2], [3.0, 4.0])} : f32[2]
  %2 = add(%0, %1) : f32[2]
  %3 = reshape(%x) {shape=[0, 4, 6]} : f32[batch, 4, 6]
  %4 = transpose(%3) {perm=[0, 2, 1]} : f32[batch, 6, 4]
  %5 = transpose(%4) {perm=[0, 2, 1]} : f32[batch, 4, 6]
  %6 = cast(%5) {dtype="f32"} : f32[batch, 4, 6]
  %7 = reshape(%6) {shape=[0, 24]} : f32[batch, 24]
  %8 = reshape(%7) {shape=[0, 2, 12]} : f32[batch, 2, 12]
  %9 = exp(%x) : f32[batch, 4, 6]
  %10 = exp(%x) : f32[batch, 4, 6]
  %11 = add(%9, %10) : f32[batch, 4, 6]
  %12 = sub(%11, %9) : f32[batch, 4, 6]
  %13 = constant() {value=array(f32, [], [1.0])} : f32[]
  %14 = mul(%12, %13) : f32[batch, 4, 6]
  return a=%2, b=%8, c=%14
}
"""


def test_cleanup_passes():
    out, _ = run_and_compare(CLEANUP, ["fold-constants", "canonicalize", "cse", "dce"])
    check_golden("cleanup", out, """
        graph clean (
          %x: f32[batch, 4, 6]
        ) weights (
        ) {
          %0 = constant() {value=array(f32, [2], [4.0, 6.0])} : f32[2]
          %1 = reshape(%x) {shape=[0, 2, 12]} : f32[batch, 2, 12]
          %2 = exp(%x) : f32[batch, 4, 6]
          %3 = add(%2, %2) : f32[batch, 4, 6]
          %4 = sub(%3, %2) : f32[batch, 4, 6]
          return a=%0, b=%1, c=%4
        }
    """)


def test_unknown_pass_is_named():
    graph = parse_graph(RMS_TRACED)
    with pytest.raises(ConfigError, match="unknown pass.*'no-such-pass'"):
        run_pipeline(graph, ["no-such-pass"])


def test_verifier_names_a_pass_that_breaks_the_ir():
    def drop_first(graph, ctx):  # removes a node others read: invalid IR
        graph.nodes = graph.nodes[1:]
        return {"dropped": 1}

    PASSES["test-breaks-ir"] = drop_first
    try:
        with pytest.raises(PassError, match="pass 'test-breaks-ir' produced invalid IR"):
            run_pipeline(parse_graph(RMS_TRACED), ["test-breaks-ir"])
    finally:
        del PASSES["test-breaks-ir"]


def test_check_names_the_pass_that_changes_numbers():
    from flagc.ir.ops import Op

    def wrong_eps(graph, ctx):
        for i, n in enumerate(graph.nodes):
            if n.op is Op.RMS_NORM:
                graph.nodes[i] = type(n)(n.op, n.inputs, {**n.attrs, "eps": 10.0}, n.outputs)
        return {"broken": 1}

    PASSES["test-wrong-eps"] = wrong_eps
    try:
        graph = _with_weights(parse_graph(RMS_TRACED))
        with pytest.raises(PassError, match="pass 'test-wrong-eps' changed output 'y'"):
            run_pipeline(graph, ["fuse-norms", "test-wrong-eps"], check=True)
    finally:
        del PASSES["test-wrong-eps"]


def test_dump_ir_writes_one_file_per_pass(tmp_path):
    graph = _with_weights(parse_graph(RMS_TRACED))
    stats = run_pipeline(graph, ["canonicalize", "fuse-norms", "dce"], dump_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-input.ir", "01-canonicalize.ir", "02-fuse-norms.ir", "03-dce.ir"]
    assert parse_graph((tmp_path / "02-fuse-norms.ir").read_text()).nodes[0].op.value == \
        "rms_norm"
    assert [s.name for s in stats] == ["canonicalize", "fuse-norms", "dce"]
    assert stats[1].rewrites == {"rms_norm": 1} and stats[2].nodes_after == 1


@pytest.mark.parametrize("target", ["onnx-fp32", "trt-fp32"])
@pytest.mark.parametrize("case", ["attention", "residual", "projections", "layer_norm",
                                  "cached_attention"])
def test_fused_graphs_lower_and_match(case, target, tmp_path):
    """Fused ops run in onnxruntime (contrib kernels and the standard-ONNX forms) as the
    interpreter computes them."""
    import onnxruntime as ort

    from flagc.lower.onnx_model import lower_to_onnx
    from flagc.lower.targets import TARGETS

    text = {"attention": ATTENTION_TRACED, "residual": RESIDUAL, "projections": PROJECTIONS,
            "layer_norm": LAYER_NORM_TRACED, "cached_attention": CACHED_ATTENTION_TRACED}[case]
    graph = _with_weights(parse_graph(text))
    run_pipeline(graph, ["canonicalize", "fuse-norms", "fuse-attention", "canonicalize",
                         "fuse-residual-norm", "merge-projections", "dce"])
    feeds = _feeds(graph)
    if case == "attention":  # a padding mask: 0 for valid keys, a large negative otherwise
        feeds["mask"] = np.where(np.arange(5) < 3, 0.0, -1e9).astype(np.float32)[
            None, None, None, :].repeat(2, axis=0)
    ref = interpret(graph, feeds)
    path = str(tmp_path / "m.onnx")
    lower_to_onnx(graph, TARGETS[target], path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = dict(zip(graph.outputs, sess.run(list(graph.outputs), feeds)))
    for k in graph.outputs:
        np.testing.assert_allclose(got[k], ref[k].numpy(), rtol=1e-5, atol=1e-5, err_msg=k)


PACKED_QKV = """
graph packed (
  %x: f32[batch, seq, 8]
  %bias: f32[batch, 1, 1, seq]
) weights (
  @wqkv: f32[24, 8]
  @bqkv: f32[24]
) {
  %0 = linear(%x, @wqkv, @bqkv) : f32[batch, seq, 24]
  %1, %2, %3 = split(%0) {axis=-1, sizes=[8, 8, 8]} : f32[batch, seq, 8], f32[batch, seq, 8], f32[batch, seq, 8]
  %4 = reshape(%1) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %5 = reshape(%2) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %6 = reshape(%3) {shape=[0, 0, 2, 4]} : f32[batch, seq, 2, 4]
  %7, %8, %9 = attention(%4, %5, %6, _, _, _, %bias) {kv_heads=2, mask="bidirectional", num_heads=2, scale=0.5} : f32[batch, seq, 8], f32[batch, 2, seq, 4], f32[batch, 2, seq, 4]
  return y=%7
}
"""


def test_merged_projection_attention_runs_on_the_attention_kernel(tmp_path):
    import onnx
    import onnxruntime as ort

    from flagc.lower.onnx_model import lower_to_onnx
    from flagc.lower.targets import TARGETS

    graph = _with_weights(parse_graph(PACKED_QKV))
    feeds = _feeds(graph)
    feeds["bias"] = np.where(np.arange(5) < 4, 0.0, -1e9).astype(np.float32)[
        None, None, None, :].repeat(2, axis=0)
    ref = interpret(graph, feeds)["y"].numpy()
    path = str(tmp_path / "m.onnx")
    lower_to_onnx(graph, TARGETS["onnx-fp32"], path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "Attention" in ops and "Split" not in ops and "MatMul" not in ops
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
