"""Every op's ONNX lowering against its reference implementation (the interpreter), through
onnxruntime with graph optimizations off, plus the pytorch_model.bin checkpoint path."""

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import flagc
from flagc.ir import Builder, DType, Graph, Op, TensorType, interpret, sym, verify
from flagc.lower.onnx_model import lower_to_onnx
from flagc.lower.targets import get_target

B, S, P = sym("batch"), sym("seq"), sym("past")
F32 = DType.F32
RNG = np.random.default_rng(0)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _run_both(g: Graph, feeds: dict, tmp_path) -> None:
    verify(g)
    ref = {k: v.numpy() for k, v in interpret(g, feeds).items()}
    path = str(tmp_path / "m.onnx")
    lower_to_onnx(g, get_target("onnx-fp32"), path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    got = dict(zip(g.outputs, sess.run(list(g.outputs), feeds)))
    for k in g.outputs:
        assert got[k].shape == ref[k].shape, k
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


UNARY_CASES = [Op.NEG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL, Op.EXP, Op.LOG, Op.ABS, Op.COS, Op.SIN,
               Op.TANH, Op.ERF, Op.SIGMOID, Op.RELU, Op.SILU]


def test_elementwise_ops(tmp_path):
    g = Graph("ew")
    x = g.add_input("x", TensorType(F32, (B, 5)))
    y = g.add_input("y", TensorType(F32, (1, 5)))
    b = Builder(g)
    pos = b.emit(Op.ADD, [b.emit(Op.ABS, [x]), b.emit(Op.CONSTANT, [], value=np.array(0.5,
                                                                                 np.float32))])
    for op in UNARY_CASES:
        g.outputs[op.value] = b.emit(op, [pos])
    for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAXIMUM):
        g.outputs[op.value] = b.emit(op, [x, y])
    g.outputs["pow"] = b.emit(Op.POW, [pos, y])
    less = b.emit(Op.LESS, [x, y])
    g.outputs["where"] = b.emit(Op.WHERE, [less, x, y])
    g.outputs["gelu"] = b.emit(Op.GELU, [x])
    g.outputs["gelu_tanh"] = b.emit(Op.GELU, [x], approximate="tanh")
    g.outputs["cast"] = b.emit(Op.CAST, [b.emit(Op.CAST, [x], dtype="i64")], dtype="f32")
    _run_both(g, {"x": f32(3, 5), "y": f32(1, 5)}, tmp_path)


def test_linear_norms_reductions_and_shapes(tmp_path):
    g = Graph("mix")
    x = g.add_input("x", TensorType(F32, (B, S, 8)))
    ids = g.add_input("ids", TensorType(DType.I64, (B, S)))
    w = g.add_constant_weight("w", f32(6, 8))
    bias = g.add_constant_weight("bias", f32(6))
    gamma, beta = g.add_constant_weight("gamma", f32(8)), g.add_constant_weight("beta", f32(8))
    table = g.add_constant_weight("table", f32(11, 8))
    b = Builder(g)
    g.outputs["linear"] = b.emit(Op.LINEAR, [x, w, bias])
    g.outputs["linear_nobias"] = b.emit(Op.LINEAR, [x, w])
    g.outputs["layer_norm"] = b.emit(Op.LAYER_NORM, [x, gamma, beta], eps=1e-5)
    g.outputs["rms_norm"] = b.emit(Op.RMS_NORM, [x, gamma], eps=1e-6, offset=1.0)
    g.outputs["softmax"] = b.emit(Op.SOFTMAX, [x], axis=1)
    g.outputs["sum"] = b.emit(Op.REDUCE_SUM, [x], axes=[1, 2], keepdims=False)
    g.outputs["mean"] = b.emit(Op.REDUCE_MEAN, [x], axes=[-1])
    g.outputs["max"] = b.emit(Op.REDUCE_MAX, [x], axes=[0])
    g.outputs["embedding"] = b.emit(Op.EMBEDDING, [ids, table])
    g.outputs["gather"] = b.emit(Op.GATHER, [x, b.emit(Op.CONSTANT, [], value=np.array(
        [2, 0], np.int64))], axis=2)
    heads = b.emit(Op.RESHAPE, [x], shape=[0, 0, 2, -1])
    g.outputs["transpose"] = b.emit(Op.TRANSPOSE, [heads], perm=[0, 2, 1, 3])
    g.outputs["matmul"] = b.emit(Op.MATMUL, [heads, b.emit(Op.TRANSPOSE, [heads],
                                                           perm=[0, 1, 3, 2])])
    g.outputs["concat"] = b.emit(Op.CONCAT, [x, x], axis=1)
    g.outputs["slice"] = b.emit(Op.SLICE, [x], axis=2, start=1, end=-2)
    a, c = b.emit(Op.SPLIT, [x], axis=2, sizes=[3, 5])
    g.outputs["split_a"], g.outputs["split_c"] = a, c
    un = b.emit(Op.UNSQUEEZE, [x], axes=[1])
    g.outputs["unsqueeze"] = un
    g.outputs["squeeze"] = b.emit(Op.SQUEEZE, [un], axes=[1])
    g.outputs["expand"] = b.emit(Op.EXPAND, [un], shape=[-1, 3, -1, -1])
    g.outputs["last_token"] = b.emit(Op.LAST_TOKEN, [x])
    _run_both(g, {"x": f32(2, 4, 8), "ids": RNG.integers(0, 11, (2, 4))}, tmp_path)


@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 8), (False, 4), (True, 8), (True, 4)])
def test_rotary(tmp_path, interleaved, rotary_dim):
    g = Graph("rope")
    x = g.add_input("x", TensorType(F32, (B, S, 3, 8)))
    pos = g.add_input("pos", TensorType(DType.I64, (B, S)))
    ang = np.outer(np.arange(32), 1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim))
    cos = g.add_constant_weight("cos", np.cos(ang).astype(np.float32))
    sin = g.add_constant_weight("sin", np.sin(ang).astype(np.float32))
    g.outputs["y"] = Builder(g).emit(Op.ROTARY, [x, pos, cos, sin], rotary_dim=rotary_dim,
                                     interleaved=interleaved)
    _run_both(g, {"x": f32(2, 5, 3, 8), "pos": np.array([[0, 1, 2, 3, 4], [0, 0, 7, 8, 9]])},
              tmp_path)


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
def test_attention_with_cache_padding_and_bias(tmp_path, kind):
    g = Graph("attn")
    q = g.add_input("q", TensorType(F32, (B, S, 4, 8)))
    k = g.add_input("k", TensorType(F32, (B, S, 2, 8)))
    v = g.add_input("v", TensorType(F32, (B, S, 2, 8)))
    pk = g.add_input("pk", TensorType(F32, (B, 2, P, 8)))
    pv = g.add_input("pv", TensorType(F32, (B, 2, P, 8)))
    mask = g.add_input("mask", TensorType(DType.I64, (B, P + S)))
    bias = g.add_input("bias", TensorType(F32, (1, 4, S, P + S)))
    inputs = [q, k, v, pk, pv, mask, bias]
    feeds = {"q": f32(2, 3, 4, 8), "k": f32(2, 3, 2, 8), "v": f32(2, 3, 2, 8),
             "pk": f32(2, 2, 4, 8), "pv": f32(2, 2, 4, 8),
             "mask": np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),
             "bias": f32(1, 4, 3, 7)}
    if kind == "prefix":
        inputs.append(g.add_input("prefix", TensorType(DType.I64, (B,))))
        feeds["prefix"] = np.array([5, 2])
    out, pres_k, pres_v = Builder(g).emit(Op.ATTENTION, inputs, num_heads=4, kv_heads=2,
                                          scale=0.3, mask=kind)
    g.outputs.update(out=out, present_k=pres_k, present_v=pres_v)
    _run_both(g, feeds, tmp_path)


def test_pytorch_model_bin_checkpoint(tiny_llama, tmp_path):
    import shutil

    import transformers
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(tiny_llama, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    out = str(tmp_path / "art")
    flagc.build(str(folder), "onnx-fp32", out)
    ids = np.array([[4, 8, 15, 16, 23, 42]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(flagc.load(out).forward(ids)["logits"] - ref).max() < 1e-4


def test_residual_layer_norm_stays_unfused_on_the_cpu(tmp_path, tiny_bert):
    """Residual + LayerNorm lowers to Add + LayerNormalization, not onnxruntime's
    SkipLayerNormalization (3-4x slower on the CPU), and onnxruntime's own optimizer does not
    fuse the pair back; the embeddings still match transformers."""
    from collections import Counter

    import onnx

    folder, hf = tiny_bert
    for packed in (True, False):
        art = str(tmp_path / f"art{packed}")
        flagc.build(folder, "onnx-fp32", art, task="embedding",
                    pass_options={"pack_tokens": packed})
        path = os.path.join(art, "model.onnx")
        opts = ort.SessionOptions()  # onnxruntime's default (all) optimizations, as flagc runs
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(path, opts)
        for model in (path, str(tmp_path / "opt.onnx")):
            ops = Counter(n.op_type for n in onnx.load(model).graph.node)
            assert ops["LayerNormalization"] == 5 and not ops["SkipLayerNormalization"], ops
        ids = np.random.default_rng(0).integers(1, 100, (2, 9))
        got = flagc.load(art).forward(ids)["last_hidden_state"]
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_cpu_sessions_keep_add_layer_norm_unfused(tmp_path, monkeypatch):
    """With static shapes onnxruntime's optimizer fuses Add + LayerNormalization into the slow
    CPU SkipLayerNormalization; flagc's CPU engines disable that fusion."""
    from collections import Counter

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from flagc.runtimes.ort_engine import CPU_DISABLED_OPTIMIZERS, OrtEngine

    shape = [2, 4, 8]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "r"], ["s"]),
         helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "r")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.ones(8, np.float32), "g"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))

    def fused_ops(disabled):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(tmp_path / "m.onnx"), opts, disabled_optimizers=disabled)
        return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)

    assert fused_ops([])["SkipLayerNormalization"] == 1  # onnxruntime's default
    assert fused_ops(list(CPU_DISABLED_OPTIMIZERS))["LayerNormalization"] == 1
    seen = {}
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    OrtEngine(str(tmp_path), {"engine": "m.onnx"}, "cpu")
    assert seen["disabled_optimizers"] == list(CPU_DISABLED_OPTIMIZERS)
