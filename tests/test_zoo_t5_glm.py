"""Parity tests for the zoo's T5 (vs Hugging Face transformers) and GLM (vs a FlagAI 1.8.4 fixture).

T5: tiny random transformers models are saved with save_pretrained and loaded through flagc's
from_pretrain; encoder states, decoder logits (with and without past KV), loss and greedy
generation must match. GLM: tests/fixtures/glm/ was produced by scripts/make_glm_fixture.py
running FlagAI's own GLM code; CI needs no FlagAI.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.export import Dim

from flagc.errors import CheckpointError, ConfigError, RuntimeInputError
from flagc.models.glm import (
    GLMConfig,
    GLMForSeq2Seq,
    GLMForSequenceClassification,
    GLMModel,
    glm_generate_blank,
    glm_prefix_allowed,
)
from flagc.models import registry
from flagc.models.t5 import T5Config, T5ForConditionalGeneration, T5Model

TOL = 1e-4
FIXTURE = Path(__file__).parent / "fixtures" / "glm"


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL
) -> float:
    """Shape first, then max abs diff (reported on failure with where it happened)."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    diff = (actual.float() - expected.float()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    assert worst <= tol, (
        f"{what}: max abs diff {worst:.3g} at {divmod(int(diff.argmax()), diff.shape[-1])}"
    )
    return worst


# ---------------------------------------------------------------------------------------------
# T5 vs transformers
# ---------------------------------------------------------------------------------------------
T5_VARIANTS = {
    # original T5: relu, tied, decoder output scaled; asymmetric depth exercises num_decoder_layers
    "t5-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=3),
    # t5 v1.1 / mT5: gated-gelu, no scaling
    "t5v11-gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _hf_t5(variant: str, folder: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **T5_VARIANTS[variant],
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper attention than the init's, so bucket bias and masks matter
        for name, p in hf.named_parameters():
            if name.endswith((".q.weight", ".k.weight", "relative_attention_bias.weight")):
                p.mul_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=sorted(T5_VARIANTS))
def t5_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _hf_t5(request.param, folder)
    ours = T5ForConditionalGeneration.from_pretrain(folder)
    return hf, ours


def _t5_inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded second sequence
    dec = torch.randint(2, 64, (2, 6), generator=gen)
    return ids, mask, dec


def test_t5_encoder_and_decoder_logits_match_hf(t5_pair):
    hf, ours = t5_pair
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        enc = ours.encode(ids, mask)
        assert_close(enc, ref.encoder_last_hidden_state, "encoder hidden states")
        out = ours(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec)
        assert_close(out["logits"], ref.logits, "decoder logits given encoder outputs")


def test_t5_decoder_with_past_matches_full_decode(t5_pair):
    hf, ours = t5_pair
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        enc = ours.encode(ids, mask)
        first = ours(
            encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :4], use_cache=True
        )
        past = first["past_key_values"]
        assert past[0][0].shape == (2, 4, 4, 8) and past[0][2].shape == (2, 4, 9, 8)
        # one token at a time, cross K/V reused from the cache (no encoder output passed)
        steps = []
        for t in range(4, 6):
            step = ours(
                attention_mask=mask, decoder_input_ids=dec[:, t : t + 1], past_key_values=past
            )
            past = step["past_key_values"]
            steps.append(step["logits"])
        assert_close(first["logits"], ref[:, :4], "decoder logits, prefix")
        assert_close(torch.cat(steps, dim=1), ref[:, 4:], "decoder logits with past KV")


def test_t5_loss_with_labels_matches_hf(t5_pair):
    hf, ours = t5_pair
    ids, mask, dec = _t5_inputs()
    labels = dec.clone()
    labels[0, -2:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels, unknown_flagai_kwarg=1)
    assert_close(out["logits"], ref.logits, "logits from shifted labels")
    assert_close(out["loss"], ref.loss, "loss")


def _greedy(model: T5Model, ids, mask, steps: int) -> torch.Tensor:
    """Minimal greedy seq2seq loop through the module: encode once, decode with past KV."""
    cfg = model.config
    enc = model.encode(ids, mask)
    tokens = torch.full((ids.shape[0], 1), cfg.decoder_start_token_id, dtype=torch.long)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    past = None
    for _ in range(steps):
        kw = {"past_key_values": past} if past is not None else {"encoder_outputs": enc}
        out = model(attention_mask=mask, decoder_input_ids=tokens[:, -1:], use_cache=True, **kw)
        past = out["past_key_values"]
        nxt = out["logits"][:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, cfg.pad_token_id), nxt)
        done = done | (nxt == cfg.eos_token_id)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if bool(done.all()):
            break
    return tokens


@pytest.mark.parametrize("variant", sorted(T5_VARIANTS))
def test_t5_greedy_generation_matches_hf_generate(variant, tmp_path):
    # transformers' generate cache assumes equal encoder / decoder depth: use a symmetric model.
    T5_VARIANTS_SYM = {**T5_VARIANTS[variant], "num_decoder_layers": 2}
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **T5_VARIANTS_SYM,
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    ours = T5ForConditionalGeneration.from_pretrain(tmp_path)
    ids, mask, _ = _t5_inputs()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1
        )
        got = _greedy(ours, ids, mask, 12)
    assert got.tolist() == ref.tolist()


def test_t5_config_and_hub_configs():
    cfg = T5Config.from_dict({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and not cfg.scale_decoder_outputs
    assert T5Config(tie_word_embeddings=True).scale_decoder_outputs is True
    # transformers 5 writes tie_word_embeddings=true with scale_decoder_outputs=false for v1.1
    assert T5Config.from_dict({"scale_decoder_outputs": False}).scale_decoder_outputs is False
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu-gated-x")
    with pytest.raises(ConfigError, match="num_heads"):
        T5Config(num_heads=0)


@pytest.mark.parametrize(
    "name", ["T5-base-ch", "T5-base-en", "GLM-large-ch", "GLM-large-en", "GLM-10b-ch"]
)
def test_hub_models_build_through_the_registry(name):
    hub = registry.hub_model(name)
    assert hub is not None, f"{name} missing from the registry's hub table"
    family = registry.get_family(hub.family)
    cls = registry.model_class(family, "base")
    with torch.device("meta"):  # shapes only: GLM-10b-ch must not allocate 40 GB
        model = cls(cls.config_from_dict(dict(hub.config)))
    n = sum(p.numel() for p in model.parameters())
    expected = {
        "T5-base-ch": (2.0e8, 3.0e8),
        "T5-base-en": (2.0e8, 2.5e8),
        "GLM-large-ch": (3.0e8, 4.0e8),
        "GLM-large-en": (3.0e8, 4.0e8),
        "GLM-10b-ch": (9.5e9, 10.5e9),
    }[name]
    assert expected[0] < n < expected[1], f"{name}: {n} parameters"


def test_registry_task_classes():
    assert registry.model_class("t5", "title-generation") is T5ForConditionalGeneration
    assert registry.model_class("mt5", "seq2seq") is T5ForConditionalGeneration
    assert registry.model_class("glm", "title_generation") is GLMForSeq2Seq
    assert registry.model_class("glm", "classification") is GLMForSequenceClassification
    assert registry.model_class("glm", "lm") is GLMModel


def test_t5_load_reports_missing_lm_head(tmp_path):
    _hf_t5("t5v11-gated", tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    # transformers 5 saves v1.1 tied; force an untied config: lm_head.weight must then be present
    data["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        T5ForConditionalGeneration.from_pretrain(tmp_path)


def test_t5_torch_export_decoder_step_dynamic(t5_pair):
    """The decoder step exports with symbolic batch / past / source lengths and runs on others."""
    _, ours = t5_pair
    ids, mask, dec = _t5_inputs()
    batch, past, src = Dim("batch", max=64), Dim("past", max=512), Dim("src", min=2, max=512)
    kv = ({0: batch, 2: past}, {0: batch, 2: past}, {0: batch, 2: src}, {0: batch, 2: src})
    n_layers = len(ours.decoder.block)
    with torch.no_grad():
        first = ours(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :3], use_cache=True
        )
        kwargs = {
            "attention_mask": mask,
            "decoder_input_ids": dec[:, 3:4],
            "past_key_values": first["past_key_values"],
        }
        shapes = {
            "attention_mask": {0: batch, 1: src},
            "decoder_input_ids": {0: batch},
            "past_key_values": tuple(kv for _ in range(n_layers)),
        }
        exported = torch.export.export(ours, (), kwargs, dynamic_shapes=shapes)
        # run it on a different batch / past length than it was traced with
        other = ours(
            input_ids=ids[:1],
            attention_mask=mask[:1],
            decoder_input_ids=dec[:1, :5],
            use_cache=True,
        )
        step = {
            "attention_mask": mask[:1],
            "decoder_input_ids": dec[:1, 5:6],
            "past_key_values": other["past_key_values"],
        }
        got = exported.module()(**step)["logits"]
        eager = ours(**step)["logits"]
    assert_close(got, eager, "exported decoder step", tol=1e-5)


# ---------------------------------------------------------------------------------------------
# GLM vs the FlagAI fixture
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm_fx():
    meta = json.loads((FIXTURE / "config.json").read_text())
    return meta["config"], load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory, glm_fx):
    """A FlagAI-style model folder: flat config.json + weights under FlagAI's names."""
    folder = tmp_path_factory.mktemp("glm")
    (folder / "config.json").write_text(json.dumps(glm_fx[0]))
    shutil.copy(FIXTURE / "weights.safetensors", folder / "model.safetensors")
    return folder


def _glm_args(io, sep_key="attention_mask"):
    return {
        "input_ids": io["input_ids"],
        "position_ids": io["position_ids"],
        "attention_mask": io[sep_key],
    }


def test_glm_logits_loss_and_mems_match_flagai(glm_dir, glm_fx):
    _, io = glm_fx
    model = GLMModel.from_pretrain(glm_dir)
    with torch.no_grad():
        out = model(**_glm_args(io), labels=io["labels"], return_memory=True)
    assert_close(out["logits"], io["logits"], "GLM logits")
    assert_close(out["loss"].reshape(1), io["loss"], "GLM loss")
    assert len(out["hidden_states"]) == 3
    for i, mem in enumerate(out["hidden_states"]):
        assert_close(mem, io[f"mems.{i}"], f"GLM mems[{i}]")


def test_glm_incremental_step_matches_flagai(glm_dir, glm_fx):
    _, io = glm_fx
    model = GLMModel.from_pretrain(glm_dir)
    step = {
        "input_ids": io["step_input_ids"],
        "position_ids": io["step_position_ids"],
        "attention_mask": io["attention_mask"],
    }
    with torch.no_grad():
        first = model(**_glm_args(io), use_cache=True, return_memory=True)
        via_kv = model(**step, past_key_values=first["past_key_values"])
        via_mems = model(**step, mems=first["hidden_states"])  # FlagAI's own generation path
    assert_close(via_kv["logits"], io["step_logits"], "GLM step logits (past KV)")
    assert_close(via_mems["logits"], io["step_logits"], "GLM step logits (FlagAI mems)")


def test_glm_attention_scale_and_seq2seq_loss_match_flagai(glm_dir, glm_fx):
    _, io = glm_fx
    scaled = GLMModel.from_pretrain(glm_dir, attention_scale=2.0)
    s2s = GLMForSeq2Seq.from_pretrain(glm_dir)
    with torch.no_grad():
        assert_close(scaled(**_glm_args(io))["logits"], io["scaled_logits"], "attention_scale=2")
        out = s2s(**_glm_args(io), target_ids=io["s2s_target_ids"], loss_mask=io["s2s_loss_mask"])
    assert_close(out["loss"].reshape(1), io["s2s_loss"], "GLMForSeq2Seq loss")


def test_glm_sequence_classification_matches_flagai(tmp_path, glm_fx):
    config, io = glm_fx
    # FlagAI's classification checkpoint layout: backbone under "model.", heads at the top.
    tensors = {f"model.{k}": v for k, v in load_file(str(FIXTURE / "weights.safetensors")).items()}
    tensors.update(load_file(str(FIXTURE / "cls_head.safetensors")))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        cls = GLMForSequenceClassification.from_pretrain(tmp_path, pool_token="cls")
        out = cls(**_glm_args(io), labels=io["cls_labels"])
        start = GLMForSequenceClassification.from_pretrain(tmp_path, pool_token="start")
        start_logits = start(**_glm_args(io, "start_attention_mask"))["logits"]
    assert_close(out["logits"], io["cls_logits"], "classification logits (cls)")
    assert_close(out["loss"].reshape(1), io["cls_loss"], "classification loss")
    assert_close(start_logits, io["start_logits"], "classification logits (start)")


def test_glm_backbone_checkpoint_spellings(tmp_path, glm_fx):
    config, io = glm_fx
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    # FlagAI's load_weights_glm strips a leading "model."; pytorch_model.bin is FlagAI's format.
    torch.save(
        {"module": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "pytorch_model.bin"
    )
    model = GLMModel.from_pretrain(tmp_path)
    with torch.no_grad():
        assert_close(model(**_glm_args(io))["logits"], io["logits"], "logits from model.* .bin")
    # A backbone-only checkpoint feeds a classifier when heads may stay random...
    with pytest.warns(UserWarning, match="pool_layer"):
        GLMForSequenceClassification.from_pretrain(tmp_path, allow_missing_heads=True)
    # ...and is reported, naming the head tensors, when they may not.
    with pytest.raises(CheckpointError, match="multichoice_head.weight"):
        GLMForSequenceClassification.from_pretrain(tmp_path)


def test_glm_prefix_mask_golden():
    allowed = glm_prefix_allowed(torch.tensor([0, 2]), q_len=3, past_len=1)[:, 0].int().tolist()
    assert allowed == [
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],  # sep 0: causal, past always visible
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]],  # sep 2: first two keys bidirectional
    ]


def test_glm_blank_generation_cache_matches_recompute(glm_dir):
    model = GLMModel.from_pretrain(glm_dir)
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randint(5, 100, (2, 7), generator=gen)
    mask_pos = torch.tensor([3, 6])
    sop, eop = 1, 2
    got = glm_generate_blank(model, ctx, mask_pos, sop_id=sop, eop_ids=[eop], max_new_tokens=8)
    # Reference: recompute the whole sequence each step (no cache), GLM's 2-D positions.
    tokens = torch.cat((ctx, torch.full((2, 1), sop)), dim=1)
    ref = []
    with torch.no_grad():
        for _ in range(got.shape[1]):
            n_new = tokens.shape[1] - 7
            pos = torch.cat(
                (torch.arange(7).expand(2, 7), mask_pos[:, None].expand(2, n_new)), dim=1
            )
            block = torch.cat(
                (torch.zeros(2, 7, dtype=torch.long), torch.arange(1, n_new + 1).expand(2, n_new)),
                dim=1,
            )
            logits = model(
                input_ids=tokens,
                position_ids=torch.stack((pos, block), dim=1),
                attention_mask=torch.tensor([7, 7]),
            )["logits"]
            nxt = logits[:, -1].argmax(-1)
            ref.append(nxt)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
    ref = torch.stack(ref, dim=1)
    done = torch.zeros(2, dtype=torch.bool)
    for t in range(ref.shape[1]):  # after eop, glm_generate_blank pads with eop
        ref[:, t] = torch.where(done, torch.tensor(eop), ref[:, t])
        done |= ref[:, t] == eop
    assert got.tolist() == ref.tolist()


def test_glm_torch_export_dynamic(glm_dir, glm_fx):
    """GLMModel exports with symbolic batch / seq (separator mask) and matches FlagAI's logits."""
    _, io = glm_fx
    model = GLMModel.from_pretrain(glm_dir)
    batch, seq = Dim("batch", max=64), Dim("seq", min=2, max=64)
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 2: seq},
        "attention_mask": {0: batch},
    }
    with torch.no_grad():
        # traced on 2 sequences of 5 tokens, run on the fixture's 4 of 12
        small = {
            # contiguous copies: a strided view would make export guard on the fixture's sizes
            "input_ids": io["input_ids"][:2, :5].clone(),
            "position_ids": io["position_ids"][:2, :, :5].contiguous(),
            "attention_mask": torch.tensor([2, 4]),
        }
        exported = torch.export.export(model, (), small, dynamic_shapes=shapes)
        got = exported.module()(**_glm_args(io))["logits"]
    assert_close(got, io["logits"], "exported GLM logits")


def test_glm_config_validation_and_hub_configs():
    with pytest.raises(ConfigError, match="relative_encoding"):
        GLMConfig(relative_encoding=True)
    with pytest.raises(ConfigError, match="hidden_size"):
        GLMConfig(hidden_size=100, num_attention_heads=16)
    with pytest.raises(ConfigError, match="spell_length"):
        GLMConfig(spell_length=4)
    assert GLMConfig.from_dict({"num_labels": 5}).class_num == 5


def test_glm_bad_attention_mask_is_reported(glm_dir, glm_fx):
    _, io = glm_fx
    model = GLMModel.from_pretrain(glm_dir)
    with pytest.raises(RuntimeInputError, match="separator"):
        model(
            input_ids=io["input_ids"],
            position_ids=io["position_ids"],
            attention_mask=torch.ones(4, 12),
        )
