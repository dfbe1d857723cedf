"""The greedy variant of static decode graphs (flagc/lower/onnx_greedy_screen.py): the LM head
screened at 8 bits, the pick proved exact or redone on the full float32 head.

The proof rests on onnxruntime's int8 activation rounding (per block of 32, amax / 127, to
nearest): the first test holds its kernel to the bound on adversarial inputs, so an onnxruntime
that rounds differently fails here instead of picking wrong tokens."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import flagc
from flagc.cli import app
from flagc.errors import RuntimeInputError
from flagc.lower.onnx_greedy_screen import (CANDIDATES, DATA_FILE, GREEDY_BIAS,
                                            GREEDY_CERTIFIED, ScreenWeights, use_greedy_screen)
from flagc.lower.onnx_static import CACHE_LENGTH, GREEDY_LOGIT, GREEDY_TOKEN, _add_greedy_outputs
from flagc.runtimes.static_decode import static_graphs

K, V = 64, 512


def _head_model(folder, w, batch=2, tied=False):
    """x [batch, 1, K] -> MatMul(W [K, V]) -> logits + the plain greedy outputs, as a static
    decode graph ends; with `tied`, a [V, K] table equal to W's transpose (an embedding)."""
    w = w.astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "head.T"], ["logits"])], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, K]),
         helper.make_tensor_value_info(CACHE_LENGTH, TensorProto.INT32, [batch])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, V])],
        [numpy_helper.from_array(w, "head.T")])
    if tied:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "embed"))
        g.node.append(helper.make_node("Gather", ["embed", "ids"], ["emb"]))
        g.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 1]))
        g.output.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, 1, K]))
    _add_greedy_outputs(g, g.output[0])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    # the screen writes beside the graph, like the static graphs' model.onnx.data
    onnx.save(model, os.path.join(folder, "head.onnx"), save_as_external_data=True,
              location="head.data", size_threshold=0)
    return onnx.load(os.path.join(folder, "head.onnx"), load_external_data=False)


def _screened(tmp_path, w, batch=2, expose=(), tied=False):
    model = _head_model(str(tmp_path), w, batch, tied)
    assert use_greedy_screen(model, ScreenWeights(str(tmp_path)), GREEDY_TOKEN, GREEDY_LOGIT)
    for name in expose:  # internal values, for the bound checks
        model.graph.output.append(helper.make_tensor_value_info(
            f"greedy_screen.{name}", TensorProto.FLOAT, [batch, 1, V]))
    path = str(tmp_path / "screened.onnx")
    onnx.save(model, path)
    onnx.checker.check_model(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]), model


def _run(sess, x, bias=None, ids=None):
    batch = x.shape[0]
    feeds = {"x": x.astype(np.float32), CACHE_LENGTH: np.zeros(batch, np.int32),
             GREEDY_BIAS: np.zeros((batch, 1, V), np.float32) if bias is None else bias}
    if ids is not None:
        feeds["ids"] = ids
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _weights(rng):
    """Embedding-like rows of different norms, a few outlier weights."""
    w = rng.standard_normal((K, V)) * rng.uniform(0.02, 0.1, V)
    w[rng.integers(0, K, 20), rng.integers(0, V, 20)] *= 25
    return w


def _inputs(rng, batch, kind):
    if kind == "normal":
        return rng.standard_normal((batch, 1, K))
    if kind == "outliers":  # a few huge features, as after a final RMSNorm
        x = rng.standard_normal((batch, 1, K))
        x[..., rng.integers(0, K, 3)] *= 60
        return x
    if kind == "halves":  # values on the int8 grid's rounding midpoints
        x = (rng.integers(-127, 128, (batch, 1, K)) + 0.5) / 127.0
        x[..., ::32] = 1.0  # each block's amax: scale exactly 1/127
        return x
    return rng.standard_normal((batch, 1, K)) * 10.0 ** rng.uniform(-3, 3, (batch, 1, K))


@pytest.mark.parametrize("kind", ["normal", "outliers", "halves", "scales"])
def test_onnxruntime_8bit_scores_stay_within_the_bound(tmp_path, kind):
    rng = np.random.default_rng(len(kind))
    w = _weights(rng)
    sess, _ = _screened(tmp_path, w, batch=4, expose=("scores", "bound"))
    for _ in range(5):
        x = _inputs(rng, 4, kind)
        out = _run(sess, x)
        exact = x.astype(np.float32).astype(np.float64) @ w.astype(np.float32)
        err = np.abs(out["greedy_screen.scores"] - exact)
        assert (err <= out["greedy_screen.bound"]).all(), (err / out["greedy_screen.bound"]).max()
        # and not vacuous: the bound is within a small multiple of the actual error
        assert out["greedy_screen.bound"].mean() < 50 * err.mean()


def test_picks_equal_the_full_float32_argmax(tmp_path):
    rng = np.random.default_rng(7)
    w = _weights(rng)
    sess, model = _screened(tmp_path, w, batch=2)
    outs = {o.name for o in model.graph.output}
    assert "logits" not in outs and {GREEDY_TOKEN, GREEDY_LOGIT, GREEDY_CERTIFIED} <= outs
    certified = 0
    for _ in range(40):
        x = _inputs(rng, 2, "outliers")
        out = _run(sess, x)
        logits = (x.astype(np.float32) @ w.astype(np.float32))[:, 0]
        want = logits.argmax(-1)
        assert out[GREEDY_TOKEN].reshape(-1).tolist() == want.tolist()
        np.testing.assert_allclose(out[GREEDY_LOGIT].reshape(-1),
                                   logits[np.arange(2), want], rtol=1e-5)
        certified += bool(out[GREEDY_CERTIFIED])
    assert certified >= 30  # the full head is the exception


def test_ties_fall_back_to_the_full_head_and_keep_the_first_maximum(tmp_path):
    rng = np.random.default_rng(3)
    w = _weights(rng)
    w[:, 300] = w[:, 100] = 3 * np.abs(w).max(1)  # two equal rows that win
    sess, _ = _screened(tmp_path, w, batch=1)
    x = np.abs(rng.standard_normal((1, 1, K)))
    out = _run(sess, x)
    assert not out[GREEDY_CERTIFIED] and out[GREEDY_TOKEN].item() == 100


def test_the_bias_keeps_tokens_from_being_picked(tmp_path):
    rng = np.random.default_rng(4)
    w = _weights(rng)
    sess, _ = _screened(tmp_path, w, batch=2)
    x = _inputs(rng, 2, "normal")
    logits = (x.astype(np.float32) @ w.astype(np.float32))[:, 0]
    first = logits.argmax(-1)
    bias = np.zeros((2, 1, V), np.float32)
    bias[..., first] = -np.inf  # both rows' winners, in every row
    out = _run(sess, x, bias)
    masked = logits.copy()
    masked[:, first] = -np.inf
    assert out[GREEDY_TOKEN].reshape(-1).tolist() == masked.argmax(-1).tolist()
    assert np.isfinite(out[GREEDY_LOGIT]).all()


def test_a_tied_head_gathers_from_the_embedding_and_writes_no_rows(tmp_path):
    rng = np.random.default_rng(5)
    w = _weights(rng)
    sess, model = _screened(tmp_path, w, batch=1, tied=True)
    names = {t.name for t in model.graph.initializer}
    assert "embed" in names and not any(n.endswith(".rows") for n in names)
    untied = tmp_path / "untied"
    untied.mkdir()
    _, other = _screened(untied, w, batch=1)
    assert any(n.endswith(".rows") for n in {t.name for t in other.graph.initializer})
    assert os.path.getsize(untied / DATA_FILE) == os.path.getsize(tmp_path / DATA_FILE) + K * V * 4
    x = _inputs(rng, 1, "outliers")
    out = _run(sess, x, ids=np.zeros((1, 1), np.int64))
    assert out[GREEDY_TOKEN].item() == int((x[0, 0].astype(np.float32) @ w).argmax())


def test_heads_of_other_forms_are_left_alone(tmp_path):
    w = _weights(np.random.default_rng(6))
    model = _head_model(str(tmp_path), w)
    model.graph.initializer[0].data_type = TensorProto.FLOAT16  # an fp16 head: not screened
    assert not use_greedy_screen(model, ScreenWeights(str(tmp_path)), GREEDY_TOKEN, GREEDY_LOGIT)
    assert "logits" in {o.name for o in model.graph.output}


# ---- the runtime ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("screen") / "llama")
    flagc.build(tiny_llama, "onnx-fp32", out, max_seq=64, max_batch=4, decode_graphs=[1, 2])
    return out


def test_greedy_generation_runs_the_screened_graph_with_the_dynamic_graphs_tokens(artifact):
    model, dynamic = flagc.load(artifact), flagc.load(artifact, static_decode=False)
    for kw in ({}, {"min_new_tokens": 16}):  # EOS kept out by the bias input
        out = model.generate([9, 8, 7, 6], max_new_tokens=16, **kw)
        assert out.token_ids == dynamic.generate([9, 8, 7, 6], max_new_tokens=16,
                                                 **kw).token_ids
        stats = out.timings["greedy_screen"]
        assert stats["certified"] + stats["full_head"] == len(out.token_ids) - 1
    assert set(model.decoder._static) == {(1, True, True)}
    sampled = model.generate([9, 8, 7, 6], max_new_tokens=4, temperature=0.8, seed=1)
    assert "greedy_screen" not in sampled.timings  # sampling needs every logit
    assert (1, True, False) in model.decoder._static


@pytest.mark.parametrize("prompts,dense", [([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], False),
                                           ([[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]], True)])
def test_batches_with_and_without_padding(artifact, prompts, dense):
    model, dynamic = flagc.load(artifact), flagc.load(artifact, static_decode=False)
    kw = dict(max_new_tokens=12, min_new_tokens=12)
    ours = model.generate(prompts, **kw)
    assert [r.token_ids for r in ours] == [r.token_ids for r in dynamic.generate(prompts, **kw)]
    assert set(model.decoder._static) == {(2, dense, True)}


def test_screened_steps_have_no_logits_to_give(artifact):
    dec = flagc.load(artifact).decoder
    first = dec.prefill([[4, 5, 6]], 0, 20).argmax(-1)
    dec.append_greedy(first, keep_logits=False)
    with pytest.raises(RuntimeInputError, match="screens the LM head and has no logits"):
        dec.last_logits()


def test_greedy_graphs_are_for_the_cpu_and_can_be_left_out(artifact, tiny_llama, tmp_path):
    manifest = flagc.load(artifact).manifest
    assert static_graphs(manifest, "cpu", greedy=True) == {
        (b, dense): f"decode-b{b}{'-dense' if dense else ''}-greedy.onnx"
        for b in (1, 2) for dense in (False, True)}
    assert static_graphs(manifest, "cuda", greedy=True) == {}  # `If` would leave the CUDA graph
    assert manifest["static_decode"]["greedy_screen"]["candidates"] == CANDIDATES
    out = str(tmp_path / "plain")
    res = CliRunner().invoke(app, ["build", "-m", tiny_llama, "-o", out, "--max-seq", "64",
                                   "--decode-graphs", "1", "--no-greedy-screen", "--quiet"])
    assert res.exit_code == 0, res.output
    plain = flagc.load(out).manifest
    assert "greedy_graphs" not in plain["static_decode"] and DATA_FILE not in plain["files"]
