"""flagc's own decode kernels (runtimes/kernels) and `--kernels flagc` static graphs.

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


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    out = {}
    for kind in ("onnxruntime", "flagc"):
        out[kind] = str(root / kind)
        flagc.build(tiny_llama, "onnx-fp16", out[kind], max_seq=64, max_batch=8,
                    decode_graphs=[1, 2, 8], kernels=kind)
    return out


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
    ("onnx-fp32", dict(decode_graphs=[1]), "take fp16 weights; build with --target onnx-fp16"),
    ("onnx-int4", dict(decode_graphs=[1]), "take fp16 weights; build with --target onnx-fp16"),
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
