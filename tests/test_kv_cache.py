"""The KV cache: presents land in preallocated buffers, reorder/trim/resume keep the numbers,
host and device-style (onnxruntime kernel) copies agree, memory figures, limits."""

import os

import numpy as np
import pytest
from typer.testing import CliRunner

import flagc
from flagc.cli import app
from flagc.errors import RuntimeInputError
from flagc.runtimes.decoder import CachedDecoder
from flagc.runtimes.kv_cache import KVCache, KVLayout


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kv") / "llama")
    flagc.build(tiny_llama, "onnx-fp32", out, custom=os.path.join("examples", "llama.py"))
    return out


def _reference(model, prompt, extra):
    """Plain session.run with presents concatenated by the graph and fed back as numpy."""
    layout = KVLayout.from_manifest(model.manifest)
    ids = np.array([prompt])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(len(prompt))[None]}
    feeds.update(layout.empty(1))
    out = model.engine.run(feeds)
    logits = [out["logits"][:, -1]]
    for t in extra:
        n = feeds["attention_mask"].shape[1]
        feeds = {"input_ids": np.array([[t]]), "attention_mask": np.ones((1, n + 1), np.int64),
                 "position_ids": np.array([[n]])}
        for past, present in layout.names:
            feeds[past] = out[present]
        out = model.engine.run(feeds)
        logits.append(out["logits"][:, -1])
    return logits, out


def test_presents_are_written_into_the_preallocated_buffers(artifact):
    model = flagc.load(artifact)
    dec = CachedDecoder(model.engine, model.manifest)
    prompt, extra = [5, 17, 99, 3], [42, 7, 64]
    ref_logits, ref_out = _reference(model, prompt, extra)
    logits = [dec.prefill([prompt], 0, reserve=16)]
    storage, nbytes = dec.cache._storage, dec.cache.nbytes
    for t in extra:
        logits.append(dec.append(np.array([t])).copy())  # a view, valid until the next step
    assert dec.cache._storage is storage and dec.cache.nbytes == nbytes  # no reallocation
    assert nbytes == 2 * 4 * 1 * 2 * 16 * 16 * 4  # 2 arenas x 4 tensors x [1, 2, 16, 16] f32
    for ours, ref in zip(logits, ref_logits):
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert dec.cache.length == 7 and dec.cache.positions.tolist() == [7]
    for i, kind in [(0, "key"), (1, "value")]:
        np.testing.assert_allclose(dec.cache.tensor(f"past_key_values.{i}.{kind}"),
                                   ref_out[f"present.{i}.{kind}"], atol=1e-6)
    assert dec.cache.row_tokens(0) == prompt + extra


@pytest.mark.parametrize("kernel", [False, True], ids=["host", "ort-kernel"])
def test_reorder_and_trim_follow_rows_and_slots(artifact, kernel):
    model = flagc.load(artifact)
    dec = CachedDecoder(model.engine, model.manifest, kernel_copies=kernel)
    dec.prefill([[1, 2, 3], [9, 8, 7, 6, 5]], 0, reserve=12, rows=4)
    dec.append(np.array([11, 12]))
    cache = dec.cache
    before = {n: cache.tensor(n).copy() for n, _ in cache.layout.names}
    mask, pos = cache.mask[:2, :6].copy(), cache.positions.copy()
    dec.reorder(np.array([1, 1, 0, 1]))
    assert cache.rows == 4 and cache.positions.tolist() == [pos[1], pos[1], pos[0], pos[1]]
    np.testing.assert_array_equal(cache.mask[:4, :6], mask[[1, 1, 0, 1]])
    for name, old in before.items():
        np.testing.assert_array_equal(cache.tensor(name), old[[1, 1, 0, 1]])
    cache.trim(4)
    assert cache.length == 4 and cache.positions.tolist() == [4, 4, 2, 4]
    for name, old in before.items():
        np.testing.assert_array_equal(cache.tensor(name), old[[1, 1, 0, 1], :, :4])


def test_kernel_copies_give_the_same_beams_as_host_copies(artifact):
    model = flagc.load(artifact)
    prompts = [[5, 17, 99], list(range(10, 27))]
    host = model.generate(prompts, max_new_tokens=8, num_beams=3)
    model._decoder = CachedDecoder(model.engine, model.manifest, kernel_copies=True)
    kernel = model.generate(prompts, max_new_tokens=8, num_beams=3)
    assert [r.token_ids for r in host] == [r.token_ids for r in kernel]
    assert [r.score for r in host] == pytest.approx([r.score for r in kernel], abs=1e-6)


def test_resume_keeps_the_common_prefix_and_equals_a_fresh_prefill(artifact):
    model = flagc.load(artifact)
    dec = CachedDecoder(model.engine, model.manifest)
    dec.prefill([[5, 17, 99, 3]], 0, reserve=32)
    dec.append(np.array([42]))
    dec.append(np.array([7]))
    # The conversation goes on from [5, 17, 99, 3, 42] (the 7 was rolled back) with new turns.
    follow = [5, 17, 99, 3, 42, 60, 61, 62]
    logits, ran = dec.resume(follow, reserve=32)
    assert ran == 3 and dec.cache.row_tokens(0) == follow
    fresh = CachedDecoder(model.engine, model.manifest).prefill([follow], 0, reserve=32)
    np.testing.assert_allclose(logits, fresh, atol=1e-5)
    # A prompt equal to what is cached still runs its last token (logits are needed).
    logits, ran = dec.resume(follow, reserve=32)
    assert ran == 1
    np.testing.assert_allclose(logits, fresh, atol=1e-5)


def test_cache_grows_and_keeps_content(artifact):
    model = flagc.load(artifact)
    dec = CachedDecoder(model.engine, model.manifest)
    dec.prefill([[5, 17, 99, 3]], 0, reserve=5)
    assert dec.cache.capacity_tokens == 5
    dec.append(np.array([42]))
    logits, _ = dec.resume([5, 17, 99, 3, 42] + list(range(20, 40)), reserve=25)
    assert dec.cache.capacity_tokens == 25
    fresh = CachedDecoder(model.engine, model.manifest).prefill(
        [[5, 17, 99, 3, 42] + list(range(20, 40))], 0, reserve=25)
    np.testing.assert_allclose(logits, fresh, atol=1e-5)


def test_limits_name_the_flag_to_change(artifact):
    model = flagc.load(artifact)
    with pytest.raises(RuntimeInputError, match=r"12 rows .* max batch 8.*--max-batch 12"):
        model.generate([[1, 2], [3, 4], [5, 6]], max_new_tokens=2, num_beams=4)
    cache = KVCache(KVLayout(2, 2, 16, "float32"), max_rows=8, max_tokens=256)
    with pytest.raises(RuntimeInputError, match="300 tokens exceed .* max sequence length 256"):
        cache.reserve(1, 300)


def test_memory_figures_and_inspect(artifact):
    layout = KVLayout.from_manifest(flagc.load(artifact).manifest)
    assert layout.bytes_per_token == 2 * 2 * 2 * 16 * 4  # k+v x layers x kv_heads x head_dim x f32
    assert layout.cache_bytes(8, 2048) == 2 * 512 * 8 * 2048  # past and present arenas
    res = CliRunner().invoke(app, ["inspect", artifact, "--batch", "8", "--context", "2048"])
    assert res.exit_code == 0, res.output
    assert "0.5 KiB per token; batch 8 x 2048 tokens: 16.0 MiB (past + present buffers)" \
        in res.output
    res = CliRunner().invoke(app, ["inspect", artifact])  # defaults: max batch x max seq
    assert "batch 8 x 256 tokens: 2.0 MiB" in res.output


class _Recorder:
    """Records what a cache binds (stands in for an engine binding)."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def input_buffer(self, name, device, device_id, dtype, shape, ptr):
        self.inputs[name] = (tuple(shape), ptr)

    def output_buffer(self, name, device, device_id, dtype, shape, ptr):
        self.outputs[name] = (tuple(shape), ptr)


def test_bindings_ping_pong_and_the_shared_buffer_seam():
    ids, valid = np.array([[4, 5, 6]]), np.ones((1, 3), dtype=np.int64)
    cache = KVCache(KVLayout(1, 2, 8, "float32"), max_rows=2, max_tokens=32)
    cache.reset(1, 10)
    rec = _Recorder()
    cache.begin_step(ids, valid)
    cache.bind(rec, 3)
    past, present = rec.inputs["past_key_values.0.key"], rec.outputs["present.0.key"]
    assert past[0] == (1, 2, 0, 8) and present[0] == (1, 2, 3, 8) and past[1] != present[1]
    cache.commit(ids, valid)
    cache.bind(rec, 1)  # the next step reads what the last one wrote
    assert rec.inputs["past_key_values.0.key"] == ((1, 2, 3, 8), present[1])
    # "shared_buffer": one max-length buffer is both past and present; nothing swaps.
    shared = KVCache(KVLayout(1, 2, 8, "float32", shared_buffer=True), max_rows=2, max_tokens=32)
    shared.reset(1, 10)
    assert shared.capacity_tokens == 32
    for _ in range(2):
        shared.begin_step(ids, valid)
        shared.bind(rec, 3)
        assert rec.inputs["past_key_values.0.value"] == rec.outputs["present.0.value"]
        assert rec.inputs["past_key_values.0.value"][0] == (1, 2, 32, 8)
        shared.commit(ids, valid)
    assert shared.length == 6 and shared.positions.tolist() == [6]


def test_padded_tracks_padding_without_scanning_the_mask():
    """The decoder picks the dense static graph from `padded`: False only when no cached slot of
    any row is padding (after padded prefills, appends, trims and a new batch)."""
    cache = KVCache(KVLayout(1, 1, 2, "float32"), max_rows=2, max_tokens=8)
    cache.reset(2, 8)
    ids = np.array([[5, 6], [0, 7]])
    cache.begin_step(ids, np.array([[1, 1], [0, 1]]))  # row 1 left-padded
    cache.commit(ids, np.array([[1, 1], [0, 1]]))
    assert cache.padded
    cache.begin_step(np.array([[1], [2]]), None)
    cache.commit(np.array([[1], [2]]), None)
    assert cache.padded and not cache.mask[:2, :3].all()
    cache.reset(2, 8)
    cache.begin_step(ids, np.ones_like(ids))
    cache.commit(ids, np.ones_like(ids))
    assert not cache.padded
    cache.begin_step(np.array([[1], [2]]), np.array([[1], [0]]))  # a padded decode slot
    cache.commit(np.array([[1], [2]]), np.array([[1], [0]]))
    assert cache.padded
    cache.trim(2)  # rolled back past it
    assert not cache.padded and cache.mask[:2, :2].all()
