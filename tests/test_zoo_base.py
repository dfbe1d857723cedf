"""BaseModel contract: strict loading, config handling, save round trip, registry, AutoLoader,
torch.export capture. Tiny models only; the HF-parity tests live in test_zoo_bert_gpt2_llama."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from flagc.errors import CheckpointError, ConfigError
from flagc.models import (
    AutoLoader,
    BertConfig,
    BertForEmbedding,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    get_family,
    hub_model,
    hub_model_names,
    model_class,
    normalize_task,
)

GPT2 = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _hf_style_gpt2(folder, **overrides):
    """A GPT-2 folder with HF names and Conv1D ([in, out]) layout, written without transformers."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied, as HF saves it
        hf = (
            name.replace("model.layers.", "transformer.h.")
            .replace("model.wte", "transformer.wte")
            .replace("model.wpe", "transformer.wpe")
            .replace("model.norm", "transformer.ln_f")
            .replace("attn_norm", "ln_1")
            .replace("mlp_norm", "ln_2")
            .replace("attn.qkv_proj", "attn.c_attn")
            .replace("attn.o_proj", "attn.c_proj")
            .replace("mlp.fc_in", "mlp.c_fc")
            .replace("mlp.fc_out", "mlp.c_proj")
        )
        if hf.endswith(".weight") and t.dim() == 2 and ".h." in hf:
            t = t.t()  # Conv1D layout
        tensors[hf] = t.contiguous()
    tensors.update(overrides)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_embd": 32,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": 64,
                "vocab_size": 100,
            }
        )
    )
    return model, tensors


def test_hf_names_with_conv1d_transpose_load(tmp_path):
    ref, _ = _hf_style_gpt2(tmp_path / "g")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "g")  # folder path, HF spelling
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)["logits"], ref(input_ids=ids)["logits"])
    assert model.lm_head.weight is model.model.wte.weight


def test_every_problem_reported_in_one_error(tmp_path):
    _, tensors = _hf_style_gpt2(tmp_path / "g")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_proj.bias"] = torch.zeros(31)
    tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "g" / "model.safetensors"))
    model = GPT2LMHeadModel(GPT2Config(**GPT2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        model.load_weights(tmp_path / "g")
    msg = str(err.value)
    assert "model.layers.1.mlp.fc_in.bias [128]" in msg and "1 missing" in msg
    assert "transformer.h.0.attn.rotary.weight [2]" in msg and "1 unexpected" in msg
    assert (
        "transformer.h.0.attn.c_proj.bias -> model.layers.0.attn.o_proj.bias: "
        "expected [32], got [31]" in msg
    )
    # Nothing was half-loaded.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_corrupt_safetensors_names_file(tmp_path):
    _hf_style_gpt2(tmp_path / "g")
    path = tmp_path / "g" / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT2LMHeadModel.from_pretrain(tmp_path, "g")


def test_pytorch_bin_and_sharded_index(tmp_path):
    ref, tensors = _hf_style_gpt2(tmp_path / "g")
    ids = torch.randint(0, 100, (1, 5))
    expect = ref(input_ids=ids)["logits"]
    # pytorch_model.bin wrapped FlagAI-style in {"module": ...}
    binary = tmp_path / "b"
    binary.mkdir()
    torch.save({"module": tensors}, binary / "pytorch_model.bin")
    (binary / "config.json").write_text((tmp_path / "g" / "config.json").read_text())
    got = GPT2LMHeadModel.from_pretrain(tmp_path, "b")(input_ids=ids)["logits"]
    assert torch.equal(got, expect)
    # two shards + index
    shard = tmp_path / "s"
    shard.mkdir()
    names = sorted(tensors)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(shard / file))
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    (shard / "config.json").write_text((tmp_path / "g" / "config.json").read_text())
    got = GPT2LMHeadModel.from_pretrain(tmp_path, "s")(input_ids=ids)["logits"]
    assert torch.equal(got, expect)


def test_save_round_trip_keeps_own_names(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            tie_word_embeddings=True,
        )
    ).eval()
    model.save(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "lm_head.weight" not in saved and "model.embed.weight" in saved
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    again = LlamaForCausalLM.from_pretrain(tmp_path, "m")
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids)["logits"], model(input_ids=ids)["logits"])


def test_init_from_json_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "bert",
                **BERT,
                "architectures": ["BertModel"],
                "id2label": {"0": "a", "1": "b", "2": "c", "3": "d"},
            }
        )
    )
    model = BertForSequenceClassification.init_from_json(
        path, num_hidden_layers=1, checkpoint_activations=True
    )
    assert model.config.num_labels == 4 and len(model.model.layers) == 1
    assert model.head.classifier.weight.shape == (4, 32)
    with pytest.raises(ConfigError, match=r"\['bogus_key'\]"):
        BertModel.init_from_json(path, bogus_key=3)
    with pytest.raises(ConfigError, match="hidden_size"):
        BertModel.init_from_json(path, hidden_size=30)  # not a multiple of 4 heads
    with pytest.raises(ConfigError, match="does not exist"):
        BertModel.init_from_json(tmp_path / "nope.json")


def test_embedding_mean_pooling_and_missing_heads(tmp_path):
    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT)).eval()
    base.save(tmp_path / "b")
    emb = BertForEmbedding.from_pretrain(tmp_path, "b")  # pooler tensors skipped
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        hidden = base(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        vec = emb(input_ids=ids, attention_mask=mask)["logits"]
    assert torch.allclose(vec[1], hidden[1, :5].mean(0), atol=1e-6)
    # A bare encoder checkpoint lacks the classifier: strict by default, opt-in random init.
    with pytest.raises(CheckpointError, match="head.classifier.weight"):
        BertForSequenceClassification.from_pretrain(tmp_path, "b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BertForSequenceClassification.from_pretrain(tmp_path, "b", allow_missing_heads=True)
    assert any("head.classifier" in str(w.message) for w in caught)


def test_registry_and_autoloader(tmp_path):
    assert normalize_task("title-generation") == "seq2seq"
    assert normalize_task("NER") == "sequence_labeling"
    assert model_class("qwen2", "text_generation") is LlamaForCausalLM
    assert get_family("roberta").name == "bert"
    glm = hub_model("GLM-10b-ch")
    assert glm.family == "glm" and glm.config["num_layers"] == 48
    assert glm.config["hidden_size"] == 4096 and glm.config["vocab_size"] == 50048
    assert {
        "GLM-large-ch",
        "GLM-large-en",
        "RoBERTa-base-ch",
        "BERT-base-en",
        "GPT2-base-ch",
        "T5-base-ch",
        "T5-base-en",
    } <= set(hub_model_names())
    with pytest.raises(ConfigError, match="valid tasks"):
        AutoLoader("dance", "BERT-base-en", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="hub models are"):
        AutoLoader("lm", "no-such-model", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="no model for task"):
        AutoLoader("ner", "GPT2-base-ch", model_dir=tmp_path)
    _hf_style_gpt2(tmp_path / "my-gpt2")
    loader = AutoLoader("poetry_generation", "my-gpt2", model_dir=tmp_path)
    assert isinstance(loader.get_model(), GPT2LMHeadModel)
    torch.manual_seed(0)
    BertModel(BertConfig(**BERT)).save(tmp_path / "my-bert")
    (tmp_path / "my-bert" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n"
    )
    loader = AutoLoader("semantic-matching", "my-bert", model_dir=tmp_path, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = loader.get_model()
    assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 2
    tokenizer = loader.get_tokenizer()
    assert type(tokenizer).__name__ == "Tokenizer"


def test_meta_build_and_torch_export_dynamic_dims():
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    model = LlamaForCausalLM(config).eval()

    class Step(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, past):
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=past
            )
            return out["logits"], out["past_key_values"]

    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("seq", min=2, max=256)
    past_dim = torch.export.Dim("past", min=2, max=256)
    past = tuple((torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)) for _ in range(2))
    ids = torch.randint(0, 100, (2, 4))
    mask = torch.ones(2, 7, dtype=torch.long)
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "past": tuple(({0: batch, 2: past_dim}, {0: batch, 2: past_dim}) for _ in range(2)),
    }
    exported = torch.export.export(Step(model), (ids, mask, past), dynamic_shapes=shapes)
    ids2 = torch.randint(0, 100, (3, 5))
    past2 = tuple((torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)) for _ in range(2))
    mask2 = torch.ones(3, 11, dtype=torch.long)
    mask2[0, :2] = 0
    got, _ = exported.module()(ids2, mask2, past2)
    want, _ = Step(model)(ids2, mask2, past2)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)


def test_meta_device_from_pretrain_loads_nothing(tmp_path):
    _hf_style_gpt2(tmp_path / "g")
    model = GPT2LMHeadModel.from_pretrain(tmp_path, "g", device="meta")
    assert model.model.wte.weight.device.type == "meta"
    model.load_weights(tmp_path / "g")  # assigns memory-mapped tensors in place of meta ones
    assert model.model.wte.weight.device.type == "cpu"
    assert model.lm_head.weight is model.model.wte.weight
