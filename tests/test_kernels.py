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


# -- QGemv: block-quantized products of the int4 / 8-bit decode graphs (CPU) -----------------

def _qgemv_session(packed, n, k, bits, bias=None, gated=0, rows=1):
    inits = [numpy_helper.from_array(packed, "p")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
    node = helper.make_node("QGemv", ["x", "p"] + (["b"] if bias is not None else []), ["y"],
                            domain="ai.flagc", N=n, K=k, bits=bits, gated=gated)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [rows, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return _session_with_kernels(graph)


def _qgemv_reference(x, codes, d, m, bias=None, gated=False):
    """numpy: x quantized to int8 per block of 32 (scale amax / 127, round half even), times
    w = d * q + m, in float64."""
    rows, k = x.shape
    nb = -(-k // 32)
    xp = np.zeros((rows, nb * 32), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(rows, nb, 32)
    sx = np.abs(xb).max(-1) / np.float32(127)
    xq = np.rint(xb / np.where(sx == 0, 1, sx)[..., None]) * sx[..., None]
    q = np.zeros((codes.shape[0], nb * 32))
    q[:, :k] = codes
    w = (d.astype(np.float64)[..., None] * q.reshape(-1, nb, 32)
         + m.astype(np.float64)[..., None]).reshape(-1, nb * 32)
    y = xq.reshape(rows, -1).astype(np.float64) @ w.T + (0 if bias is None else bias)
    if gated:
        gate, up = np.split(y, 2, axis=1)
        y = gate / (1 + np.exp(-gate)) * up
    return y


def _random_qgemv(rng, n, k, bits):
    nb = -(-k // 32)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    d = (rng.random((n, nb)) * 0.02 + 1e-3).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.1 * (1 << bits) / 16).astype(np.float16)
    return codes, d, m


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,n,k,bias,gated", [
    (1, 40, 72, False, 0), (3, 33, 64, True, 0), (5, 16, 96, False, 0), (4, 96, 576, True, 0),
    (1, 64, 72, False, 1), (3, 96, 64, True, 1), (6, 32, 40, True, 1)])
def test_qgemv_matches_numpy(bits, rows, n, k, bias, gated):
    from flagc.lower.onnx_qgemv import pack_qgemv

    rng = np.random.default_rng(rows * 100 + n + bits)
    codes, d, m = _random_qgemv(rng, n, k, bits)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :8] = 0  # a block partly zero, and (K = 40, 72) a partial last block
    sess = _qgemv_session(pack_qgemv(codes, d, m, bits), n, k, bits, b, gated, rows)
    got = sess.run(None, {"x": x})[0]
    want = _qgemv_reference(x, codes, d, m, b, gated)
    assert got.shape == (rows, n // 2 if gated else n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("skip,sum_out", [(True, True), (True, False), (False, False)])
def test_qgemv_reads_the_norm_before_it(skip, sum_out):
    """With Gamma (and Skip) QGemv multiplies RMSNorm(X + Skip) * Gamma, as onnxruntime's
    SkipSimplifiedLayerNormalization computes it, and returns X + Skip as its output 1."""
    from flagc.lower.onnx_qgemv import pack_qgemv

    rng = np.random.default_rng(7)
    rows, n, k, eps = 3, 48, 72, 1e-5
    codes, d, m = _random_qgemv(rng, n, k, 4)
    gamma = rng.standard_normal(k).astype(np.float32)
    inits = [numpy_helper.from_array(pack_qgemv(codes, d, m, 4), "p"),
             numpy_helper.from_array(gamma, "g")]
    node = helper.make_node("QGemv", ["x", "p", "", "s" if skip else "", "g"],
                            ["y"] + (["sum"] if sum_out else []), domain="ai.flagc", N=n, K=k,
                            bits=4, epsilon=eps)
    inputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [rows, k])
              for v in (["x", "s"] if skip else ["x"])]
    outputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, None)
               for v in (["y", "sum"] if sum_out else ["y"])]
    sess = _session_with_kernels(helper.make_graph([node], "g", inputs, outputs, inits))
    x, s = (rng.standard_normal((rows, k)).astype(np.float32) for _ in range(2))
    got = sess.run(None, {"x": x, "s": s} if skip else {"x": x})
    h = x + s if skip else x
    normed = h / np.sqrt((h.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * gamma
    want = _qgemv_reference(normed.astype(np.float32), codes, d, m)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if sum_out:
        np.testing.assert_array_equal(got[1], h)


def test_qgemv_reads_a_huge_page_copy_of_constant_weights():
    """A constant weight is copied once, at session load, into 2 MB pages (weight_arena.cc);
    weights fed as an input are read in place: the same products either way, and sessions
    come and go (copies carved from shared chunks, unmapped with their last kernel)."""
    from flagc.lower.onnx_qgemv import pack_qgemv

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    for _ in range(3):
        weights = [pack_qgemv(*_random_qgemv(rng, n, 96, 4), 4) for n in (48, 1000, 16)]
        nodes = [helper.make_node("QGemv", ["x", f"p{i}"], [f"y{i}"], domain="ai.flagc",
                                  N=n, K=96, bits=4) for i, n in enumerate((48, 1000, 16))]
        outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                   for i in range(3)]
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 96])
        constant = _session_with_kernels(helper.make_graph(
            nodes, "g", [x_info], outputs,
            [numpy_helper.from_array(w, f"p{i}") for i, w in enumerate(weights)]))
        fed = _session_with_kernels(helper.make_graph(
            nodes, "g", [x_info] + [helper.make_tensor_value_info(
                f"p{i}", TensorProto.UINT8, list(w.shape)) for i, w in enumerate(weights)],
            outputs))
        got = constant.run(None, {"x": x})
        want = fed.run(None, {"x": x, **{f"p{i}": w for i, w in enumerate(weights)}})
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        del constant, fed


def test_qgemv_errors_name_the_shapes():
    from flagc.lower.onnx_qgemv import pack_qgemv

    rng = np.random.default_rng(0)
    packed = pack_qgemv(*_random_qgemv(rng, 32, 64, 4), 4)
    sess = _qgemv_session(packed, 48, 64, 4)  # N says 48 rows: three tiles, packed has two
    with pytest.raises(Exception, match=r"QGemv: packed weights \[2, 2, 320\] must be "
                                        r"\[3, 2, 320\] for N = 48, K = 64, bits = 4"):
        sess.run(None, {"x": np.ones((1, 64), np.float32)})
    with pytest.raises(Exception, match="gated=1 needs N \\(48\\) to be gate rows then up"):
        _qgemv_session(packed, 48, 64, 4, gated=1)
    node = helper.make_node("QGemv", ["x", "p", "", "s"], ["y"], domain="ai.flagc", N=32, K=64,
                            bits=4)
    sess = _session_with_kernels(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 64])
                      for v in ("x", "s")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "p")]))
    with pytest.raises(Exception, match="QGemv: Skip needs Gamma"):
        sess.run(None, {"x": np.ones((1, 64), np.float32), "s": np.ones((1, 64), np.float32)})


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, False), (4, 64, False),
                                                  (4, 128, True), (8, 32, True)])
def test_qgemv_weights_compute_what_matmulnbits_computes(bits, block, symmetric):
    import torch

    from flagc.ir.quant import QuantScheme, dequantize_weight, quantize_weight
    from flagc.lower.onnx_qgemv import qgemv_weights

    rng = np.random.default_rng(bits + block)
    n, k = 48, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    codes, scales, zp = quantize_weight(w, QuantScheme(bits, block, symmetric))
    packed = qgemv_weights(codes, scales, zp, None, bits, k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = _qgemv_session(packed, n, k, bits, rows=3).run(None, {"x": x})[0]
    mnb = helper.make_node("MatMulNBits", ["x", "B", "s"] + (["z"] if zp is not None else []),
                           ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                           accuracy_level=4)
    inits = [numpy_helper.from_array(codes, "B"),
             numpy_helper.from_array(scales.reshape(-1), "s")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
    model = helper.make_model(helper.make_graph(
        [mnb], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # float16 scales move a weight by ~2^-12 of its step; activations are rounded alike
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= (2e-3 if block == 32 else 2e-2) * scale
    # the weight it packs is the codes' own weight up to float16 rounding of d and m
    exact = dequantize_weight(torch.from_numpy(codes), torch.from_numpy(scales),
                              None if zp is None else torch.from_numpy(zp), bits=bits,
                              k=k).numpy()
    q, d, m = _unpacked(packed, n, k, bits)
    packed_w = (d.astype(np.float32)[..., None] * q.reshape(n, -1, 32)
                + m.astype(np.float32)[..., None]).reshape(n, k)
    np.testing.assert_allclose(packed_w, exact, rtol=0, atol=2e-3 * np.abs(exact).max())
    assert np.abs(packed_w - exact).max() > 0  # (RTN scales are not float16 values)


def _unpacked(packed, n, k, bits):
    """(codes, d, m) back from the packed layout (the inverse of pack_qgemv)."""
    tiles, nb, _ = packed.shape
    code_bytes = 16 * 32 * bits // 8
    quads = packed[..., :code_bytes].reshape(tiles, nb, -1, 16, 4).transpose(0, 1, 3, 2, 4)
    quads = quads.reshape(tiles, nb, 16, -1)
    if bits == 4:
        quads = np.concatenate([quads & 15, quads >> 4], axis=-1)
    codes = quads.transpose(0, 2, 1, 3).reshape(tiles * 16, nb * 32)[:n, :k]
    scales = [np.ascontiguousarray(packed[..., code_bytes + 32 * i:code_bytes + 32 * (i + 1)])
              .view(np.float16).transpose(0, 2, 1).reshape(tiles * 16, nb)[:n]
              for i in (0, 1)]
    return codes, scales[0], scales[1]


@pytest.fixture(scope="module")
def int4_kernels(tiny_llama, tmp_path_factory):
    return _on_both_kernels(tiny_llama, tmp_path_factory.mktemp("int4_kernels"), "onnx-int4",
                            max_batch=4, decode_graphs=[1, 2])


def test_int4_static_graphs_multiply_with_qgemv(int4_kernels):
    art = int4_kernels["flagc"]
    manifest = flagc.load(art).manifest
    assert manifest["custom_ops"] == {"domain": "ai.flagc", "device": "cpu", "files": [
        "decode-b1.onnx", "decode-b1-dense.onnx", "decode-b2.onnx", "decode-b2-dense.onnx"]}
    assert "decode-qgemv.data" in manifest["files"]
    for file in manifest["custom_ops"]["files"]:
        ops = _ops(os.path.join(art, file))
        # per layer q|k|v, o, gated gate|up, down; the 8-bit LM head
        assert ops["QGemv"] == 2 * 4 + 1, file
        # the MLP's Split went too, and the norms before the products moved into them
        assert not {"MatMulNBits", "Sigmoid", "SkipSimplifiedLayerNormalization"} & set(ops)
        assert ops["Split"] == (0 if "dense" in file else 2), file  # (padded: q|k|v's split)
        nodes = onnx.load(os.path.join(art, file), load_external_data=False).graph.node
        # norms moved in: after attention and before each MLP (the first layer's input norm is
        # plain ops), and the final one before the head, whose residual sum nobody reads
        shapes = [(len(n.input), len(n.output)) for n in nodes if n.op_type == "QGemv"]
        assert shapes.count((5, 2)) == 3 and shapes[-1] == (5, 1), file
    assert _ops(os.path.join(art, "model.onnx"))["MatMulNBits"] == 9  # prefill keeps its GEMM
    packed = [{t.name for t in onnx.load(os.path.join(art, f), load_external_data=False)
               .graph.initializer if t.name.endswith(".qgemv")}
              for f in manifest["custom_ops"]["files"]]
    assert len(packed[0]) == 9 and all(p == packed[0] for p in packed)  # written once


@pytest.mark.parametrize("built", ["cpu_attention", "int4_kernels"])
@pytest.mark.parametrize("prompts,kw", [
    ([9, 8, 7, 6], {}), ([9, 8, 7, 6], {"min_new_tokens": 12}),
    ([[9, 8, 7, 6], [5, 4, 3, 2]], {}), ([[9, 8, 7, 6, 5], [4, 3]], {}),
    ([9, 8, 7, 6], {"temperature": 0.9, "seed": 3}), ([9, 8, 7, 6], {"num_beams": 2})])
def test_cpu_kernels_generate_onnxruntimes_tokens(request, built, prompts, kw):
    """Static graphs on DecodeAttention (float32) and on QGemv (int4) generate the tokens of
    the same model built on onnxruntime's kernels: greedy, stop tokens held back, padded and
    dense batches, sampling, beams."""
    artifacts = request.getfixturevalue(built)
    ours = flagc.load(artifacts["flagc"]).generate(prompts, max_new_tokens=12, **kw)
    ref = flagc.load(artifacts["onnxruntime"]).generate(prompts, max_new_tokens=12, **kw)

    def ids(r):
        return [x.token_ids for x in r] if isinstance(r, list) else r.token_ids

    assert ids(ours) == ids(ref)


@pytest.fixture(scope="module")
def grid_llama(tiny_llama, tmp_path_factory):
    """tiny_llama with every projection on a GGUF Q4_1 grid (w = d * q + m per block of 32,
    d and m float16), as SmolLM2's GGUF checkpoint is."""
    import shutil

    import safetensors.numpy

    folder = str(tmp_path_factory.mktemp("grid") / "llama")
    shutil.copytree(tiny_llama, folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            n, k = w.shape
            b = w.astype(np.float32).reshape(n, k // 32, 32)
            lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
            d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
            m = lo.astype(np.float16).astype(np.float32)
            q = np.clip(np.rint((b - m) / d), 0, 15)
            q[..., 0], q[..., 1] = 0, 15  # each block spans its grid
            tensors[name] = (d * q + m).reshape(n, k).astype(w.dtype)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return _on_both_kernels(folder, tmp_path_factory.mktemp("grid_kernels"), "onnx-int4",
                            max_batch=2, decode_graphs=[1, 2],
                            pass_options={"quant_exact_grid": True})


def test_exact_grid_offsets_fold_into_qgemv(grid_llama):
    """The offsets' term of an exact grid folds into QGemv's per-block offsets. QGemv computes
    the reference's product (x rounded per block) times the exact weights; the dynamic graph's
    MatMulNBits adds the offsets' term from unrounded x, so the two differ by activation
    rounding only: teacher-forced logits close, the same picks."""
    art = grid_llama["flagc"]
    layers = flagc.load(art).manifest["precision_plan"]["quantization"]["layers"]
    assert sum("exact grid" in v["scheme"] for v in layers.values()) == 8  # 4 merged x 2 layers
    ops = _ops(os.path.join(art, "decode-b1-dense.onnx"))
    assert ops["QGemv"] == 9 and not {"ReduceSum", "MatMulNBits", "MatMul"} & set(ops)
    assert _ops(os.path.join(art, "model.onnx"))["ReduceSum"] == 8  # the offsets' term
    static = flagc.load(art).decoder
    dynamic = flagc.load(art, static_decode=False).decoder
    prompts = [[9, 8, 7, 6, 5], [4, 3, 2, 1, 7]]
    static.prefill(prompts, 0, 20)
    dynamic.prefill(prompts, 0, 20)
    forced = np.random.default_rng(1).integers(3, 128, (12, 2))
    agree = 0
    for feed in forced:
        got, want = static.append(feed), dynamic.append(feed)
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
    assert agree >= 22  # of 24 picks


def test_qgemv_rewrite_folds_offsets_and_gating(tmp_path):
    """use_qgemv on MatMulNBits -> + offsets' term -> Split -> silu(gate) * up, as onnx_quant
    lowers an exact-grid gated MLP: one QGemv computing x (rounded per block) times the
    exact weights."""
    from flagc.lower.onnx_qgemv import QGemvWeights, use_qgemv

    rng = np.random.default_rng(5)
    n, k, nb = 64, 96, 3
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = (rng.random((n, nb)) * 0.05 + 0.01).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.4).astype(np.float16)
    packed_b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, nb, 16)
    inits = [numpy_helper.from_array(packed_b, "B"),
             numpy_helper.from_array(d.astype(np.float32).reshape(-1), "s"),
             numpy_helper.from_array(np.zeros((n, 2), np.uint8), "z"),
             numpy_helper.from_array(np.ascontiguousarray(m.astype(np.float32).T), "off"),
             numpy_helper.from_array(np.array([0, nb, 32], np.int64), "shape"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array([n // 2, n // 2], np.int64), "halves")]
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["main"],
                              domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                              accuracy_level=4),
             helper.make_node("Reshape", ["x", "shape"], ["blocks"]),
             helper.make_node("ReduceSum", ["blocks", "axes"], ["sums"], keepdims=0),
             helper.make_node("MatMul", ["sums", "off"], ["term"]),
             helper.make_node("Add", ["main", "term"], ["gate_up"]),
             helper.make_node("Split", ["gate_up", "halves"], ["gate", "up"], axis=-1),
             helper.make_node("Sigmoid", ["gate"], ["sig"]),
             helper.make_node("Mul", ["gate", "sig"], ["silu"]),
             helper.make_node("Mul", ["silu", "up"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    assert use_qgemv(model, QGemvWeights(str(tmp_path))) == 1
    (node,) = [x for x in model.graph.node if x.op_type == "QGemv"]
    assert list(node.input)[0] == "x" and list(node.output) == ["y"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == \
        {"N": n, "K": k, "bits": 4, "gated": 1}
    x = rng.standard_normal((2, k)).astype(np.float32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    opts = ort.SessionOptions()
    kernels.register(opts)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), opts,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = _qgemv_reference(x, codes, d, m, gated=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# -- PackedAttention: encoders' attention over packed tokens (CPU) ---------------------------

def _packed_attention_reference(qkv, cu, heads):
    width = qkv.shape[1] // 3
    d = width // heads
    out = np.zeros((qkv.shape[0], width))
    for b in range(len(cu) - 1):
        rows = slice(cu[b], cu[b + 1])
        for h in range(heads):
            q, k, v = (qkv[rows, i * width + h * d:i * width + (h + 1) * d].astype(np.float64)
                       for i in range(3))
            scores = q @ k.T / np.sqrt(d)
            p = np.exp(scores - scores.max(-1, keepdims=True)) if len(q) else scores
            out[rows, h * d:(h + 1) * d] = p / p.sum(-1, keepdims=True) @ v if len(q) else 0
    return out


def _packed_attention_session(heads):
    node = helper.make_node("PackedAttention", ["qkv", "cu"], ["y"], domain="ai.flagc",
                            num_heads=heads)
    return _session_with_kernels(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [None, None]),
                      helper.make_tensor_value_info("cu", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))


@pytest.mark.parametrize("heads,d,lengths", [(12, 32, [5, 0, 17, 3, 128]), (4, 64, [1, 33, 2]),
                                             (3, 48, [7, 16])])
def test_packed_attention_matches_numpy(heads, d, lengths):
    """Register tiles (head sizes 32 and 64) and the portable loop (48); empty sequences,
    single tokens, lengths off the 16-key tiles."""
    rng = np.random.default_rng(d)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = (rng.standard_normal((int(cu[-1]), 3 * heads * d)) * 2).astype(np.float32)
    got = _packed_attention_session(heads).run(None, {"qkv": qkv, "cu": cu})[0]
    want = _packed_attention_reference(qkv, cu, heads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_attention_names_bad_offsets():
    sess = _packed_attention_session(2)
    qkv = np.ones((5, 12), np.float32)
    with pytest.raises(Exception, match="cu_seqlens must rise from 0 to the 5 tokens; "
                                        "entry 1 is 7"):
        sess.run(None, {"qkv": qkv, "cu": np.array([0, 7, 5], np.int64)})
    with pytest.raises(Exception, match=r"QKV \[5, 12\] must be \[tokens, 3 \* 3 heads"):
        _packed_attention_session(3).run(None, {"qkv": qkv, "cu": np.array([0, 5], np.int64)})


@pytest.fixture(scope="module")
def bert_int8(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_int8")
    out = {}
    for kind in ("onnxruntime", "flagc"):
        out[kind] = str(root / kind)
        flagc.build(tiny_bert[0], "onnx-int8", out[kind], task="embedding", kernels=kind)
    return out


def test_encoders_attend_over_packed_tokens(bert_int8):
    """--kernels flagc on an int8 encoder: the q|k|v projection reads the packed tokens and
    PackedAttention replaces the scatter to padding, MultiHeadAttention and the gather back;
    the embeddings equal the onnxruntime-kernel artifact's at every real token."""
    art = bert_int8["flagc"]
    assert flagc.load(art).manifest["custom_ops"] == {"domain": "ai.flagc", "device": "cpu",
                                                      "files": ["model.onnx"]}
    ops = _ops(os.path.join(art, "model.onnx"))
    assert ops["PackedAttention"] == 2 and "MultiHeadAttention" not in ops
    assert ops["ScatterND"] == 1  # only the output's return to [batch, seq]
    ids = np.random.default_rng(0).integers(5, 100, (3, 20))
    mask = np.ones_like(ids)
    mask[1, 7:], mask[2, 1:] = 0, 0  # padded rows, one of a single token
    got = flagc.load(art).forward(ids, attention_mask=mask)["last_hidden_state"]
    want = flagc.load(bert_int8["onnxruntime"]).forward(ids, attention_mask=mask)
    want = want["last_hidden_state"]
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_kernels_flagc_names_what_it_cannot_serve(tiny_bert, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="this encoder's attention has no form flagc's"):
        flagc.build(tiny_bert[0], "onnx-fp32", str(tmp_path / "f"), task="embedding",
                    kernels="flagc")  # fp32: onnxruntime's fused Attention
    assert not os.path.exists(tmp_path / "f")
    with pytest.raises(ConfigError, match="serves a decoder's static decode graphs: add "
                                          "--decode-graphs"):
        flagc.build(tiny_llama, "onnx-int4", str(tmp_path / "d"), kernels="flagc")
