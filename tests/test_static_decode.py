"""Static decode graphs (--decode-graphs): the fixed-shape one-token step that the CUDA runtime
replays as a CUDA graph. On the CPU the same graphs run without capture, so every property but
the capture itself is checked here: the graph's contract, no shape arithmetic left after
onnxruntime's folding, the same logits and tokens as the dynamic graph and transformers
(padding, beams, a resumed chat), and the errors."""

import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import flagc
from flagc.cli import app
from flagc.errors import ConfigError, LoweringError
from flagc.runtimes.decoder import CachedDecoder

MAX_SEQ = 64


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("static") / "llama")
    flagc.build(tiny_llama, "onnx-fp32", out, max_seq=MAX_SEQ, max_batch=4,
                decode_graphs=[2, 1])
    return out


def _signature(path):
    m = onnx.load(path, load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return ({i.name: dims(i) for i in m.graph.input}, {o.name: dims(o) for o in m.graph.output})


def test_manifest_and_the_static_graph_contract(artifact):
    model = flagc.load(artifact)
    m = model.manifest
    assert m["static_decode"] == {
        "graphs": {"1": "decode-b1.onnx", "2": "decode-b2.onnx"},
        "dense_graphs": {"1": "decode-b1-dense.onnx", "2": "decode-b2-dense.onnx"},
        "greedy_graphs": {"1": "decode-b1-greedy.onnx", "2": "decode-b2-greedy.onnx"},
        "greedy_dense_graphs": {"1": "decode-b1-dense-greedy.onnx",
                                "2": "decode-b2-dense-greedy.onnx"},
        "greedy_screen": {"device": "cpu", "bits": 8, "block": 32, "candidates": 32},
        "length_input": "cache_length"}
    assert m["kv_cache"]["shared_buffer"] is True
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "decode-b1.onnx",
                               "decode-b2.onnx", "decode-b1-dense.onnx", "decode-b2-dense.onnx",
                               "decode-b1-greedy.onnx", "decode-b2-greedy.onnx",
                               "decode-b1-dense-greedy.onnx", "decode-b2-dense-greedy.onnx",
                               "greedy-screen.data"}
    # the weights are written once, in model.onnx.data, which every graph names
    sizes = {f: os.path.getsize(os.path.join(artifact, f)) for f in m["files"]}
    assert all(sizes[f] < sizes["model.onnx.data"] / 4 for f in m["files"]
               if f.endswith(".onnx")), sizes
    for kind in ("greedy_graphs", "greedy_dense_graphs"):  # no logits: the screen's outputs
        ins, outs = _signature(os.path.join(artifact, m["static_decode"][kind]["2"]))
        assert "logits" not in outs and outs["greedy_certified"] == []
        assert outs["greedy_token"] == [2, 1] and ins["cache_length"] == [2]
    for file in ("decode-b2.onnx", "decode-b2-dense.onnx"):  # one contract for both variants
        ins, outs = _signature(os.path.join(artifact, file))
        assert ins == {"input_ids": [2, 1], "attention_mask": [2, MAX_SEQ],
                       "position_ids": [2, 1],
                       **{f"past_key_values.{i}.{k}": [2, 2, MAX_SEQ, 16]
                          for i in range(2) for k in ("key", "value")},
                       "cache_length": [2]}
        assert outs == {"logits": [2, 1, 128], "greedy_token": [2, 1],
                        "greedy_logit": [2, 1, 1], "next_cache_length": [2],
                        **{f"present.{i}.{k}": [2, 2, MAX_SEQ, 16]
                           for i in range(2) for k in ("key", "value")}}


def _optimized_ops(path, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(path, opts)
    model = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def test_no_shape_arithmetic_survives_onnxruntime_folding(artifact, tmp_path):
    """CUDA graphs need every node on the GPU: nothing that computes shapes on the host."""
    ops = _optimized_ops(os.path.join(artifact, "decode-b1.onnx"), tmp_path)
    assert not set(ops) & {"Shape", "Slice", "Concat", "Expand", "ConstantOfShape", "Squeeze",
                           "Range"}, ops
    # the one Reshape (the greedy pick to input_ids' shape) has a constant shape
    model = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    assert [n.input[1] in inits for n in model.graph.node if n.op_type == "Reshape"] == [True]
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4


def test_the_dense_graph_packs_qkv_and_rotary_into_the_attention(artifact, tmp_path):
    """Per layer: norm, qkv, attention, o, norm, gate|up, split, silu, mul, down."""
    ops = _optimized_ops(os.path.join(artifact, "decode-b1-dense.onnx"), tmp_path)
    assert ops == {"Gather": 1, "SimplifiedLayerNormalization": 1,
                   "SkipSimplifiedLayerNormalization": 4, "MatMul": 9,
                   "GroupQueryAttention": 2, "Split": 2, "QuickGelu": 2, "Mul": 2,
                   "ArgMax": 1, "GatherElements": 1, "Reshape": 1, "Add": 1}
    m = onnx.load(os.path.join(artifact, "decode-b1-dense.onnx"), load_external_data=False)
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input)[1:3] == ["", ""] and list(gqa.input)[5:9] == [
        "cache_length", "static_decode.total_length", "rope.cos", "rope.sin"]
    assert {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")} \
        == {"do_rotary": 1, "rotary_interleaved": 0}


def test_weights_in_external_data_are_shared_not_read(artifact, tmp_path):
    """Big models keep weights in model.onnx.data: the static graphs point at the same file
    (nothing copied, nothing read) and give the same logits."""
    from flagc.lower.onnx_static import write_static_decodes

    m = onnx.load(os.path.join(artifact, "model.onnx"))
    onnx.save_model(m, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    data_size = os.path.getsize(tmp_path / "model.onnx.data")
    written = write_static_decodes(str(tmp_path / "model.onnx"), [1], MAX_SEQ)
    for name in (written["graphs"]["1"], written["dense_graphs"]["1"]):
        assert os.path.getsize(tmp_path / name) < 20_000  # graph only
        a = ort.InferenceSession(str(tmp_path / name))
        b = ort.InferenceSession(os.path.join(artifact, name))
        rng = np.random.default_rng(0)
        feeds = {"input_ids": np.array([[7]]), "position_ids": np.array([[3]]),
                 "attention_mask": np.r_[np.ones(4, np.int64), np.zeros(MAX_SEQ - 4, np.int64)
                                         ][None], "cache_length": np.array([3], np.int32)}
        feeds.update({i.name: rng.standard_normal((1, 2, MAX_SEQ, 16)).astype(np.float32)
                      for i in a.get_inputs() if i.name.startswith("past_")})
        np.testing.assert_allclose(a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0],
                                   atol=1e-6)
    assert os.path.getsize(tmp_path / "model.onnx.data") == data_size


def _teacher_forced(model, prompts, forced):
    dec = model.decoder
    out = [dec.prefill(prompts, 0, max(map(len, prompts)) + forced.shape[1]).copy()]
    for t in range(forced.shape[1]):
        out.append(dec.append(forced[:, t]).copy())
    return np.stack(out, 1)


def test_static_steps_equal_the_dynamic_graph_with_padding(artifact):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # row 1 is left-padded
    forced = np.random.default_rng(0).integers(3, 128, (2, 12))
    static = flagc.load(artifact)
    dynamic = flagc.load(artifact, static_decode=False)
    ours = _teacher_forced(static, prompts, forced)
    assert set(static.decoder._static) == {(2, False, False)}  # padding: the general graph
    assert dynamic.decoder._static_files == {False: {}, True: {}}
    np.testing.assert_allclose(ours, _teacher_forced(dynamic, prompts, forced), atol=1e-5)


def test_dense_steps_equal_the_dynamic_graph_without_padding(artifact):
    prompts = [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]]
    forced = np.random.default_rng(1).integers(3, 128, (2, 12))
    static = flagc.load(artifact)
    ours = _teacher_forced(static, prompts, forced)
    assert set(static.decoder._static) == {(2, True, False)}
    ref = _teacher_forced(flagc.load(artifact, static_decode=False), prompts, forced)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_greedy_tokens_equal_transformers(artifact, tiny_llama):
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = [5, 17, 99, 3, 42]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    model = flagc.load(artifact)
    got = model.generate(prompt, max_new_tokens=24, min_new_tokens=24)
    assert got.token_ids == ref
    # the greedy variant (LM head screened), EOS kept out by its bias input
    assert set(model.decoder._static) == {(1, True, True)}
    screen = got.timings["greedy_screen"]
    assert screen["certified"] + screen["full_head"] == 23


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]],  # padded rows
                                     [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]],  # dense graph
                                     [[4, 5, 6]]])
def test_the_device_greedy_pick_equals_the_host_argmax(artifact, prompts):
    """The static graphs' greedy_token / greedy_logit outputs: the first maximum of the
    (float32) logits and its value, step after step of a greedy continuation."""
    picker, ref = flagc.load(artifact).decoder, flagc.load(artifact).decoder
    reserve = max(map(len, prompts)) + 10
    tokens = picker.prefill(prompts, 0, reserve).argmax(-1)
    ref.prefill(prompts, 0, reserve)
    for _ in range(8):
        got, got_logit = picker.append_greedy(tokens)
        logits = ref.append(tokens)
        assert logits.dtype == np.float32  # cast in the graph, not on the host
        want = logits.argmax(-1)
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
        np.testing.assert_allclose(got_logit, logits[np.arange(len(want)), want], atol=1e-6)
        np.testing.assert_allclose(picker.last_logits(), logits, atol=1e-6)  # still there
        tokens = got
    assert all(step.has_greedy for step in picker._static.values()) and picker._static
    assert picker.static_step(len(prompts)) in picker._static.values()
    assert picker.static_step(3) is None


def test_steps_that_feed_themselves_mix_with_host_fed_steps(artifact):
    """A greedy step leaves its pick and the next length in the other input pair; feeding that
    pick copies nothing, feeding another token (forced, or after a logits step) copies it."""
    prompts = [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]]
    static, ref = flagc.load(artifact).decoder, flagc.load(artifact, static_decode=False).decoder
    tokens = static.prefill(prompts, 0, 30).argmax(-1)
    ref.prefill(prompts, 0, 30)
    forced = np.random.default_rng(3).integers(3, 128, (12, 2))
    for i in range(12):
        feed = forced[i] if i % 3 == 2 else tokens
        want = ref.append(feed)
        if i % 4 == 3:  # the logits path: the pick stays unread on the device
            got = static.append(feed)
            tokens = got.argmax(-1)
        else:
            tokens, _ = static.append_greedy(feed)
            got = static.last_logits()
        np.testing.assert_allclose(got, want, atol=1e-5)
    step = static._static[(2, True, False)]
    assert {parity for _, parity in step._bindings} == {0, 1}
    # a new batch on the same step: the held length (and pick) belong to the old one
    tokens = static.prefill([[40, 41, 42], [43, 44, 45]], 0, 30).argmax(-1)
    ref.prefill([[40, 41, 42], [43, 44, 45]], 0, 30)
    for _ in range(3):
        want = ref.append(tokens)
        tokens, _ = static.append_greedy(tokens)
        np.testing.assert_allclose(static.last_logits(), want, atol=1e-5)
    assert static._static[(2, True, False)] is step


def test_greedy_generation_picks_on_the_device_and_penalties_do_not(artifact):
    """Greedy steps (also with stop tokens suppressed by min_new_tokens) take the device's
    pick; a repetition penalty (which must see every logit) goes through the logits; the
    tokens equal the dynamic graph's either way."""
    model, dynamic = flagc.load(artifact), flagc.load(artifact, static_decode=False)
    calls = Counter()
    for name in ("append", "append_greedy"):
        method = getattr(model.decoder, name)
        setattr(model.decoder, name, lambda ids, _m=method, _n=name, **kw: (
            calls.update([_n]), _m(ids, **kw))[1])
    for kw in ({}, {"min_new_tokens": 12}, {"repetition_penalty": 1.3}):
        calls.clear()
        out = model.generate([9, 8, 7, 6], max_new_tokens=12, **kw)
        assert out.token_ids == dynamic.generate([9, 8, 7, 6], max_new_tokens=12,
                                                 **kw).token_ids
        used = "append" if "repetition_penalty" in kw else "append_greedy"
        assert calls == {used: len(out.token_ids) - 1}, (kw, calls)


def test_beam_search_across_arena_swaps_equals_the_dynamic_graph(artifact):
    """Beam reorders move the cache between its two arenas: each arena has its own binding."""
    static, dynamic = flagc.load(artifact), flagc.load(artifact, static_decode=False)
    kw = dict(max_new_tokens=10, min_new_tokens=10, num_beams=2)
    ours = static.generate([9, 8, 7, 6], **kw)
    assert ours.token_ids == dynamic.generate([9, 8, 7, 6], **kw).token_ids
    step = static.decoder._static[(2, True, False)]
    assert {arena for arena, _ in step._bindings} == {0, 1}


def test_resumed_chat_keeps_the_cached_prefix(artifact):
    model = flagc.load(artifact)
    dec = model.decoder
    first = dec.prefill([[4, 5, 6, 7]], 0, 20)
    logits = dec.append(np.array([int(first.argmax())])).copy()
    again, fed = dec.resume([4, 5, 6, 7, int(first.argmax()), 30, 31], 20)
    fresh = flagc.load(artifact, static_decode=False).decoder
    ref = fresh.prefill([[4, 5, 6, 7, int(first.argmax()), 30, 31]], 0, 20)
    assert fed == 2
    np.testing.assert_allclose(again, ref, atol=1e-5)
    nxt = dec.append(np.array([int(again.argmax())]))
    np.testing.assert_allclose(nxt, fresh.append(np.array([int(ref.argmax())])), atol=1e-5)
    assert np.isfinite(logits).all()


def test_other_batch_sizes_fall_back_to_the_dynamic_graph(artifact):
    model = flagc.load(artifact)
    prompts = [[5, 6], [7, 8], [9, 10]]
    out = model.generate(prompts, max_new_tokens=6, min_new_tokens=6)
    ref = flagc.load(artifact, static_decode=False).generate(prompts, max_new_tokens=6,
                                                             min_new_tokens=6)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    assert model.decoder._static == {}


def test_cached_decoder_without_static_graphs_is_unchanged(artifact):
    model = flagc.load(artifact)
    dec = CachedDecoder(model.engine, {**model.manifest, "static_decode": None})
    assert dec._static_files == {False: {}, True: {}}


# ---- errors ------------------------------------------------------------------------------------
def test_decode_graphs_are_validated_before_any_weight_is_read(tiny_llama, tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(ConfigError, match="--decode-graphs batch 16 must be between 1 and "
                                          "--max-batch 8"):
        flagc.build(tiny_llama, "onnx-fp32", out, decode_graphs=[1, 16])
    with pytest.raises(ConfigError, match="--decode-graphs needs an onnxruntime target"):
        flagc.build(tiny_llama, "trt-fp16", out, decode_graphs=[1])
    assert not os.path.exists(out)
    res = CliRunner().invoke(app, ["build", "-m", tiny_llama, "-o", out, "--decode-graphs",
                                   "1,x"])
    assert res.exit_code == 1 and "--decode-graphs '1,x': expected comma-separated integers" \
        in res.output


def test_a_cache_outside_group_query_attention_is_refused(tmp_path):
    """GPT-2's traced attention reads its cache with ordinary ops: no static graph for it."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=128, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    out = str(tmp_path / "art")
    with pytest.raises(LoweringError, match="gpt2: --decode-graphs needs every KV cache tensor "
                                            "to go through onnxruntime's GroupQueryAttention"):
        flagc.build(str(tmp_path / "gpt2"), "onnx-fp32", out, decode_graphs=[1])
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["gpt2"]
