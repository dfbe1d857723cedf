"""flagc's own decode kernels (runtimes/kernels) and `--kernels flagc` static graphs.

DecodeAttention (CPU) replaces onnxruntime's GroupQueryAttention in the dense static graphs of
float32 targets: checked against numpy, and the artifact's tokens against the same artifact
on onnxruntime's kernels.
The library holds a CUDA and a CPU implementation of ai.flagc.DecodeGemv with the same rounding;
CI has CUDA's compiler but no GPU, so here the library is compiled for real, the CPU op is
checked against numpy, and the rewritten static decode graphs run through the CPU op (the
runtime itself sends CPU steps to the dynamic graph instead) and must give the tokens of the same
artifact built on onnxruntime's kernels. The CUDA kernel's numbers are checked on the GPU host
(benchmarks/gpu_decode_gemv.py, gpu_decode_parity.py)."""

import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import flagc
from flagc.errors import ConfigError, ResourceError
from flagc.runtimes import kernels

pytestmark = pytest.mark.skipif(kernels.find_nvcc() is None and kernels.find_cxx() is None,
                                reason="no compiler for flagc's kernels here")


def _on_cpu_kernels(folder):
    """The artifact loaded so that its CUDA-kernel static graphs run through the CPU op."""
    model = flagc.load(folder)
    model.manifest["custom_ops"]["device"] = "cpu"
    return model


def _gemv_session(w, b=None, gated=0, x_shape=(2, 3, 64)):
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    inits = [numpy_helper.from_array(w, "w")] + (
        [numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node("DecodeGemv", inputs, ["y"], domain="ai.flagc", gated=gated)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT16, list(x_shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT16, None)], inits)
    return _session_with_kernels(graph)


def _session_with_kernels(graph):
    """A CPU session of the one-graph model `graph`, able to run flagc's ops."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.flagc", 1)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    kernels.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _reference(x, w, b, gated):
    h = x.astype(np.float32) @ w.T.astype(np.float32)
    if b is not None:
        h = h + b.astype(np.float32)
    if not gated:
        return h.astype(np.float16)
    half = w.shape[0] // 2
    g = h[..., :half].astype(np.float16).astype(np.float32)
    silu = (g / (1 + np.exp(-g))).astype(np.float16)
    return silu * h[..., half:].astype(np.float16)  # fp16 x fp16, rounded once


@pytest.mark.parametrize("gated,bias", [(0, False), (0, True), (1, False), (1, True)])
def test_decode_gemv_cpu_op_matches_numpy(gated, bias):
    rng = np.random.default_rng(gated * 2 + bias)
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float16)
    b = (rng.standard_normal(48) * 0.1).astype(np.float16) if bias else None
    x = rng.standard_normal((2, 3, 64)).astype(np.float16)
    y = _gemv_session(w, b, gated).run(None, {"x": x})[0]
    assert y.shape == (2, 3, 24 if gated else 48)
    want = _reference(x, w, b, gated)
    # summation order differs from numpy's: at most one fp16 step of the result
    np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert (y == want).mean() > 0.95


def test_decode_gemv_errors_name_the_shapes():
    w = np.zeros((4, 8), np.float16)
    with pytest.raises(Exception, match=r"DecodeGemv: X \[2, 5\] and W \[4, 8\] do not multiply"):
        _gemv_session(w, x_shape=(2, 5)).run(None, {"x": np.zeros((2, 5), np.float16)})
    with pytest.raises(Exception, match=r"gated=1 needs W's rows to be gate rows then up rows"):
        _gemv_session(np.zeros((3, 8), np.float16), gated=1, x_shape=(1, 8)).run(
            None, {"x": np.zeros((1, 8), np.float16)})
    with pytest.raises(Exception, match=r"B \[3\] must be \[4\]"):
        _gemv_session(w, np.zeros(3, np.float16), x_shape=(1, 8)).run(
            None, {"x": np.zeros((1, 8), np.float16)})
    with pytest.raises(Exception, match="attribute gated must be 0 or 1"):
        _gemv_session(w, gated=2, x_shape=(1, 8))


def test_library_is_compiled_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGC_CACHE", str(tmp_path))
    path = kernels.library_path()
    assert path.startswith(str(tmp_path)) and os.path.basename(path) == "libflagc_kernels.so"
    before = os.stat(path).st_mtime_ns
    assert kernels.library_path() == path and os.stat(path).st_mtime_ns == before
    assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".so")] == [
        "libflagc_kernels.so"]  # no temporary left behind


def test_missing_compilers_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGC_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(ResourceError, match="need CUDA's compiler: no nvcc"):
        kernels.library_path(cuda=True)
    assert os.path.isfile(kernels.library_path())  # the CPU op alone, from the C++ compiler
    monkeypatch.setattr(kernels, "find_cxx", lambda: None)
    with pytest.raises(ResourceError, match="need a C\\+\\+ compiler"):
        kernels.library_path()


def _on_both_kernels(model, root, target, **kw):
    """{kernels: artifact folder} of `model` built on onnxruntime's kernels and on flagc's."""
    out = {}
    for kind in ("onnxruntime", "flagc"):
        out[kind] = str(root / kind)
        flagc.build(model, target, out[kind], max_seq=64, kernels=kind, **kw)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    return _on_both_kernels(tiny_llama, tmp_path_factory.mktemp("kernels"), "onnx-fp16",
                            max_batch=8, decode_graphs=[1, 2, 8])


def _ops(path):
    return Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def test_static_graphs_of_up_to_four_rows_use_decode_gemv(artifacts):
    art = artifacts["flagc"]
    m = flagc.load(art).manifest
    small = ["decode-b1.onnx", "decode-b1-dense.onnx", "decode-b2.onnx", "decode-b2-dense.onnx"]
    assert m["custom_ops"] == {"domain": "ai.flagc", "device": "cuda", "files": small}
    assert "decode-gemv.data" in m["files"]
    assert "custom_ops" not in flagc.load(artifacts["onnxruntime"]).manifest
    # per layer: q|k|v, o, gated gate|up, down; plus the LM head; nothing of the MLP left
    ops = _ops(os.path.join(art, "decode-b1-dense.onnx"))
    assert ops["DecodeGemv"] == 2 * 4 + 1
    assert not {"MatMul", "Split", "Sigmoid"} & set(ops)
    model = onnx.load(os.path.join(art, "decode-b1-dense.onnx"), load_external_data=False)
    gated = [n for n in model.graph.node if n.op_type == "DecodeGemv"
             and any(a.name == "gated" and a.i == 1 for a in n.attribute)]
    assert len(gated) == 2
    # the [N, K] weights live once in decode-gemv.data, shared by the four graphs
    gemv_weights = {t.name for t in model.graph.initializer if t.name.endswith(".nk")}
    other = onnx.load(os.path.join(art, "decode-b2.onnx"), load_external_data=False)
    assert gemv_weights == {t.name for t in other.graph.initializer if t.name.endswith(".nk")}
    assert _ops(os.path.join(art, "decode-b8.onnx"))["DecodeGemv"] == 0  # cuBLAS is faster


@pytest.mark.parametrize("prompts", [[9, 8, 7, 6], [[9, 8, 7, 6], [5, 4, 3, 2]],
                                     [[9, 8, 7, 6], [5, 4]], [[1, 2, 3]] * 3])
def test_generation_equals_onnxruntime_kernels(artifacts, prompts):
    kw = dict(max_new_tokens=16, min_new_tokens=16)
    ours = _on_cpu_kernels(artifacts["flagc"]).generate(prompts, **kw)
    ref = flagc.load(artifacts["onnxruntime"]).generate(prompts, **kw)

    def ids(r):
        return r.token_ids if hasattr(r, "token_ids") else [x.token_ids for x in r]

    assert ids(ours) == ids(ref)


def test_on_the_cpu_the_cuda_kernel_graphs_give_way_to_the_dynamic_graph(artifacts):
    model = flagc.load(artifacts["flagc"])
    with pytest.warns(RuntimeWarning, match="built with flagc's cuda kernels .* not for cpu; "
                                            "those decode steps go through the dynamic graph"):
        out = model.generate([9, 8, 7, 6], max_new_tokens=8, min_new_tokens=8)
    assert model.decoder._static_files == {False: {(8, False): "decode-b8.onnx",
                                                   (8, True): "decode-b8-dense.onnx"},
                                           True: {}}  # fp16 head: no greedy screen
    ref = flagc.load(artifacts["onnxruntime"]).generate([9, 8, 7, 6], max_new_tokens=8,
                                                        min_new_tokens=8)
    assert out.token_ids == ref.token_ids


def test_linear_bias_folds_into_the_kernel(tiny_qwen2, tmp_path):
    out = str(tmp_path / "qwen2")
    flagc.build(tiny_qwen2, "onnx-fp16", out, max_seq=64, max_batch=2, decode_graphs=[1],
                kernels="flagc")
    model = onnx.load(os.path.join(out, "decode-b1.onnx"), load_external_data=False)
    with_bias = [n for n in model.graph.node if n.op_type == "DecodeGemv" and len(n.input) == 3]
    assert len(with_bias) == 2  # q|k|v of both layers (Qwen2's projections with bias)
    kw = dict(max_new_tokens=12, min_new_tokens=12)
    ref = flagc.load(out, static_decode=False).generate([5, 6, 7], **kw)
    assert _on_cpu_kernels(out).generate([5, 6, 7], **kw).token_ids == ref.token_ids


@pytest.mark.parametrize("target,kw,match", [
    ("onnx-bf16", dict(decode_graphs=[1]), "serve onnx-fp16, onnx-fp32, onnx-int8, onnx-int4"),
    ("onnx-fp32", {}, "add --decode-graphs"),
    ("onnx-fp16", {}, "add --decode-graphs"),
])
def test_kernels_option_errors(tiny_llama, tmp_path, target, kw, match):
    with pytest.raises(ConfigError, match=match):
        flagc.build(tiny_llama, target, str(tmp_path / "x"), kernels="flagc", **kw)
    with pytest.raises(ConfigError, match="must be 'onnxruntime' or 'flagc'"):
        flagc.build(tiny_llama, "onnx-fp16", str(tmp_path / "y"), kernels="cutlass",
                    decode_graphs=[1])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_cli_builds_with_flagc_kernels_and_names_bad_values(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from flagc.cli import app

    out = str(tmp_path / "cli")
    res = CliRunner().invoke(app, ["build", "-m", tiny_llama, "-o", out, "-t", "onnx-fp16",
                                   "--max-seq", "64", "--decode-graphs", "1",
                                   "--kernels", "flagc"])
    assert res.exit_code == 0, res.output
    assert flagc.load(out).manifest["custom_ops"]["files"] == ["decode-b1.onnx",
                                                              "decode-b1-dense.onnx"]
    res = CliRunner().invoke(app, ["build", "-m", tiny_llama, "-o", str(tmp_path / "bad"),
                                   "-t", "onnx-fp16", "--decode-graphs", "1",
                                   "--kernels", "triton"])
    assert res.exit_code == 1 and "--kernels must be 'onnxruntime' or 'flagc'" in res.output


# ---- DecodeAttention (CPU) ---------------------------------------------------------------------
H, KV, D, SEQ, POS = 6, 2, 32, 24, 40


def _attention_session(interleaved=0, scale=0.0):
    node = helper.make_node("DecodeAttention", ["qkv", "pk", "pv", "cl", "cos", "sin"],
                            ["y", "k", "v"], domain="ai.flagc", num_heads=H, kv_num_heads=KV,
                            scale=scale, rotary_interleaved=interleaved)
    rng = np.random.default_rng(9)
    angles = rng.random((POS, D // 2)) * 3
    cache = [2, KV, SEQ, D]
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [2, 1, (H + 2 * KV) * D]),
         helper.make_tensor_value_info("pk", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("pv", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("cl", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, H * D]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, cache)],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")])
    return _session_with_kernels(graph), np.cos(angles), np.sin(angles)


def _attention_reference(qkv, pk, pv, lengths, cos, sin, interleaved, scale):
    def rot(x, p):
        if interleaved:
            a, b = x[0::2], x[1::2]
            out = np.empty_like(x)
            out[0::2], out[1::2] = a * cos[p] - b * sin[p], b * cos[p] + a * sin[p]
            return out
        a, b = x[: D // 2], x[D // 2:]
        return np.concatenate([a * cos[p] - b * sin[p], b * cos[p] + a * sin[p]])

    k, v = pk.astype(np.float64), pv.astype(np.float64)
    y = np.zeros((2, H * D))
    for row, p in enumerate(lengths):
        x = qkv[row, 0].astype(np.float64)
        for g in range(KV):
            k[row, g, p] = rot(x[(H + g) * D:(H + g + 1) * D], p)
            v[row, g, p] = x[(H + KV + g) * D:(H + KV + g + 1) * D]
        for h in range(H):
            g = h // (H // KV)
            s = k[row, g, :p + 1] @ rot(x[h * D:(h + 1) * D], p) * (scale or D ** -0.5)
            w = np.exp(s - s.max())
            y[row, h * D:(h + 1) * D] = (w / w.sum()) @ v[row, g, :p + 1]
    return y.reshape(2, 1, H * D), k, v


@pytest.mark.parametrize("interleaved,scale", [(0, 0.0), (1, 0.0), (0, 0.3)])
def test_decode_attention_matches_numpy_in_a_shared_cache(interleaved, scale):
    sess, cos, sin = _attention_session(interleaved, scale)
    rng = np.random.default_rng(interleaved)
    qkv = rng.standard_normal((2, 1, (H + 2 * KV) * D)).astype(np.float32)
    pk, pv = (rng.standard_normal((2, KV, SEQ, D)).astype(np.float32) for _ in range(2))
    lengths = np.array([3, SEQ - 1], np.int32)  # the last slot of the cache too
    want_y, want_k, want_v = _attention_reference(qkv, pk, pv, lengths, cos, sin, interleaved,
                                                  scale)
    # past and present bound to one buffer (the static graphs' way): written in place
    keys, values = (ort.OrtValue.ortvalue_from_numpy(a.copy()) for a in (pk, pv))
    b = sess.io_binding()
    b.bind_cpu_input("qkv", qkv)
    b.bind_cpu_input("cl", lengths)
    b.bind_ortvalue_input("pk", keys)
    b.bind_ortvalue_input("pv", values)
    b.bind_ortvalue_output("k", keys)
    b.bind_ortvalue_output("v", values)
    b.bind_output("y")
    sess.run_with_iobinding(b)
    np.testing.assert_allclose(b.get_outputs()[-1].numpy(), want_y, atol=2e-5)
    np.testing.assert_allclose(keys.numpy(), want_k, atol=2e-5)
    np.testing.assert_allclose(values.numpy(), want_v, atol=0)
    # separate outputs: the past is carried over first
    y, k, v = sess.run(None, {"qkv": qkv, "pk": pk, "pv": pv, "cl": lengths})
    np.testing.assert_allclose(y, want_y, atol=2e-5)
    np.testing.assert_allclose(k, want_k, atol=2e-5)


def test_decode_attention_refuses_a_cache_without_room():
    sess, _, _ = _attention_session()
    qkv = np.zeros((2, 1, (H + 2 * KV) * D), np.float32)
    cache = np.zeros((2, KV, SEQ, D), np.float32)
    with pytest.raises(Exception, match="DecodeAttention: a cache_length leaves no slot below "
                                        "max_seq 24"):
        sess.run(None, {"qkv": qkv, "pk": cache, "pv": cache,
                        "cl": np.array([1, SEQ], np.int32)})


@pytest.fixture(scope="module")
def cpu_attention(tiny_llama, tmp_path_factory):
    return _on_both_kernels(tiny_llama, tmp_path_factory.mktemp("cpu_attention"), "onnx-fp32",
                            max_batch=4, decode_graphs=[1, 2])


def test_float32_dense_graphs_attend_with_decode_attention(cpu_attention):
    manifest = flagc.load(cpu_attention["flagc"]).manifest
    assert manifest["custom_ops"] == {"domain": "ai.flagc", "device": "cpu", "files": [
        "decode-b1-dense.onnx", "decode-b1-dense-greedy.onnx", "decode-b2-dense.onnx",
        "decode-b2-dense-greedy.onnx"]}
    for file in manifest["custom_ops"]["files"]:
        ops = _ops(os.path.join(cpu_attention["flagc"], file))
        assert ops["DecodeAttention"] == 2 and "GroupQueryAttention" not in ops
    assert _ops(os.path.join(cpu_attention["flagc"], "decode-b1.onnx"))["GroupQueryAttention"]


@pytest.mark.parametrize("prompts,kw", [
    ([9, 8, 7, 6], {}), ([9, 8, 7, 6], {"min_new_tokens": 12}),
    ([[9, 8, 7, 6], [5, 4, 3, 2]], {}), ([[9, 8, 7, 6, 5], [4, 3]], {}),
    ([9, 8, 7, 6], {"temperature": 0.9, "seed": 3}), ([9, 8, 7, 6], {"num_beams": 2})])
def test_cpu_attention_generates_onnxruntimes_tokens(cpu_attention, prompts, kw):
    ours = flagc.load(cpu_attention["flagc"]).generate(prompts, max_new_tokens=12, **kw)
    ref = flagc.load(cpu_attention["onnxruntime"]).generate(prompts, max_new_tokens=12, **kw)

    def ids(r):
        return [x.token_ids for x in r] if isinstance(r, list) else r.token_ids

    assert ids(ours) == ids(ref)
