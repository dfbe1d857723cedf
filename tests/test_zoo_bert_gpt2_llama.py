"""Parity of flagc's zoo modules with Hugging Face transformers (the test oracle) on tiny,
randomly initialised models saved with save_pretrained and loaded through from_pretrain."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from flagc.models import (  # noqa: E402
    BertForSeq2seq,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
    RobertaModel,
)

TOL = 1e-4
VOCAB = 100
ENC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
DECODERS = {
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        GPT2LMHeadModel,
    ),
    "llama": (
        lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                rope_theta=500.0,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        LlamaForCausalLM,
    ),
    "qwen2": (
        lambda: transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                intermediate_size=64,
                max_position_embeddings=64,
                tie_word_embeddings=True,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        Qwen2ForCausalLM,
    ),
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).abs().max())


def _save(hf_model, root, name):
    hf_model.eval().save_pretrained(root / name)
    return hf_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------
ENCODERS = [
    ("BertModel", transformers.BertModel, transformers.BertConfig, BertModel, {}),
    (
        "BertSeqCls",
        transformers.BertForSequenceClassification,
        transformers.BertConfig,
        BertForSequenceClassification,
        {"num_labels": 3},
    ),
    (
        "BertTokCls",
        transformers.BertForTokenClassification,
        transformers.BertConfig,
        BertForTokenClassification,
        {"num_labels": 5},
    ),
    ("RobertaModel", transformers.RobertaModel, transformers.RobertaConfig, RobertaModel, {}),
    (
        "RobertaSeqCls",
        transformers.RobertaForSequenceClassification,
        transformers.RobertaConfig,
        BertForSequenceClassification,
        {"num_labels": 3},
    ),
]


@pytest.mark.parametrize("name,hf_cls,hf_cfg,ours,extra", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_encoder_parity_padded_pairs(root, name, hf_cls, hf_cfg, ours, extra):
    torch.manual_seed(0)
    hf = _save(hf_cls(hf_cfg(**ENC, **extra)), root, name)
    model = ours.from_pretrain(root, name)
    roberta = "Roberta" in name
    pad = 1 if roberta else 0
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    # Sentence pairs (semantic matching): second segment gets token type 1.
    types = None if roberta else (torch.arange(12) >= 6).long().expand(3, 12) * mask
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, unused_flag=True)
    if hasattr(ref, "last_hidden_state"):
        real = mask.bool()
        assert _max_diff(out["last_hidden_state"][real], ref.last_hidden_state[real]) < TOL
        assert _max_diff(out["pooler_output"], ref.pooler_output) < TOL
    elif ref.logits.dim() == 3:  # token classification: compare real tokens only
        real = mask.bool()
        assert _max_diff(out["logits"][real], ref.logits[real]) < TOL
    else:
        assert _max_diff(out["logits"], ref.logits) < TOL
    # The weights really came from the checkpoint: a fresh random model disagrees.
    fresh = ours(model.config).eval()
    with torch.no_grad():
        other = fresh(input_ids=ids, attention_mask=mask, token_type_ids=types)["logits"]
    assert _max_diff(other, out["logits"]) > 1e-2


@pytest.mark.parametrize(
    "hf_cls,ours,shape",
    [
        (transformers.BertForSequenceClassification, BertForSequenceClassification, (4,)),
        (transformers.BertForTokenClassification, BertForTokenClassification, (4, 10)),
    ],
)
def test_classification_loss_matches_transformers(root, hf_cls, ours, shape):
    torch.manual_seed(1)
    name = f"loss_{hf_cls.__name__}"
    hf = _save(hf_cls(transformers.BertConfig(**ENC, num_labels=3)), root, name)
    model = ours.from_pretrain(root, name)
    ids = torch.randint(3, VOCAB, (4, 10))
    labels = torch.randint(0, 3, shape)
    if len(shape) == 2:
        labels[:, :2] = -100  # ignored positions
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels).loss
        got = model(input_ids=ids, labels=labels)["loss"]
    assert abs(float(ref) - float(got)) < TOL


def test_bert_seq2seq_unilm_mask_and_cached_decoding(root):
    """Title generation: source tokens never see the target; decoding with past KV is exact."""
    torch.manual_seed(2)
    name = "BertSeq2seq"
    _save(transformers.BertForMaskedLM(transformers.BertConfig(**ENC)), root, name)
    model = BertForSeq2seq.from_pretrain(root, name)  # MLM checkpoint: cls.predictions.* heads
    src = torch.randint(3, VOCAB, (1, 6))
    tgt = torch.randint(3, VOCAB, (1, 5))
    ids = torch.cat([src, tgt], 1)
    types = torch.cat([torch.zeros_like(src), torch.ones_like(tgt)], 1)
    with torch.no_grad():
        full = model(input_ids=ids, token_type_ids=types)
        other_tgt = model(input_ids=torch.cat([src, tgt.flip(1)], 1), token_type_ids=types)
        # Source positions are independent of the target.
        assert _max_diff(full["logits"][:, :6], other_tgt["logits"][:, :6]) < 1e-6
        prefix = model(input_ids=ids[:, :8], token_type_ids=types[:, :8])
        step = model(
            input_ids=ids[:, 8:],
            token_type_ids=types[:, 8:],
            past_key_values=prefix["past_key_values"],
        )
        assert _max_diff(step["logits"], full["logits"][:, 8:]) < TOL
        loss = model(input_ids=ids, token_type_ids=types, labels=ids)["loss"]
    expect = torch.nn.functional.cross_entropy(full["logits"][0, 5:10], ids[0, 6:11])
    assert abs(float(loss) - float(expect)) < TOL


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder_pair(request, root):
    torch.manual_seed(3)
    make_hf, ours = DECODERS[request.param]
    hf = _save(make_hf(), root, request.param)
    return hf, ours.from_pretrain(str(root), request.param)


def test_decoder_logits_and_loss(decoder_pair):
    hf, model = decoder_pair
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        out = model(input_ids=ids, labels=ids, return_dict=True)  # unknown kwarg ignored
    assert _max_diff(out["logits"], ref.logits) < TOL
    assert abs(float(out["loss"]) - float(ref.loss)) < TOL


def test_decoder_left_padded_batch_equals_single_sequences(decoder_pair):
    hf, model = decoder_pair
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its real tokens are ids[1, 4:]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)["logits"]
        ref0 = hf(input_ids=ids[:1]).logits
        ref1 = hf(input_ids=ids[1:, 4:]).logits
    assert _max_diff(out[0], ref0[0]) < TOL
    assert _max_diff(out[1, 4:], ref1[0]) < TOL


def test_decoder_past_kv_prefill_then_step(decoder_pair):
    hf, model = decoder_pair
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :8], attention_mask=mask[:, :8])
        step = model(
            input_ids=ids[:, 8:], attention_mask=mask, past_key_values=prefill["past_key_values"]
        )
        whole = model(input_ids=ids, attention_mask=mask)["logits"]
        ref = hf(input_ids=ids[1:]).logits
    k, v = step["past_key_values"][0]
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert tuple(k.shape) == (2, kv_heads, 9, k.shape[-1]) and k.shape == v.shape
    assert _max_diff(step["logits"][:, 0], whole[:, 8]) < TOL
    assert _max_diff(step["logits"][1, 0], ref[0, 8]) < TOL


def _greedy(model, ids, new_tokens):
    out = model(input_ids=ids)
    tokens = []
    for _ in range(new_tokens):
        nxt = out["logits"][:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = model(input_ids=nxt, past_key_values=out["past_key_values"])
    return torch.cat(tokens, 1)


def test_greedy_generation_matches_generate(decoder_pair):
    hf, model = decoder_pair
    ids = torch.randint(1, VOCAB, (1, 7))
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
        )
        got = _greedy(model, ids, 16)
    assert torch.equal(got, ref[:, 7:])
