"""Generation against transformers' generate (greedy and beam search) on random LLaMA / Qwen2
(GPT-2 once flagc.build takes a GPT-2 folder), batching, seeded sampling, and the errors."""

import os

import pytest
import torch
from typer.testing import CliRunner

import flagc
from flagc.cli import app
from flagc.errors import RuntimeInputError, SamplingError

PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tiny_llama, tiny_qwen2, tmp_path_factory):
    src = tiny_llama if request.param == "llama" else tiny_qwen2
    out = str(tmp_path_factory.mktemp("gen") / request.param)
    flagc.build(src, "onnx-fp32", out, custom=os.path.join("examples", "llama.py")
                if request.param == "llama" else None)
    return src, out


def _hf(src):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(src).eval()


def _eos_emitted_early(hf, prompt):
    """A token greedy decoding first emits at step 3 or later: as an extra EOS it makes
    hypotheses finish early, but not before they hold a few tokens."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return next((t for i, t in enumerate(new) if i >= 2 and t not in new[:i]), None)


def _hf_new_tokens(seq, start, stop_ids):
    out = []
    for t in seq[start:].tolist():
        if t in stop_ids:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("num_beams", [1, 4])
def test_greedy_and_beam_equal_transformers_generate(built, num_beams):
    src, out = built
    hf, model = _hf(src), flagc.load(out)
    model_eos = model.manifest["generation"]["eos_token_ids"]
    extra = _eos_emitted_early(hf, PROMPT)  # None when greedy repeats one token
    stop_ids = model_eos + ([extra] if extra is not None else [])
    for early_stopping, length_penalty in [(False, 1.0), (True, 0.5), ("never", 1.0)]:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                              num_beams=num_beams, eos_token_id=stop_ids or None,
                              pad_token_id=0,
                              early_stopping=early_stopping, length_penalty=length_penalty,
                              return_dict_in_generate=True, output_scores=True)
        ours = model.generate(PROMPT, max_new_tokens=12, num_beams=num_beams,
                              stop_token_ids=stop_ids[len(model_eos):],
                              early_stopping=early_stopping,
                              length_penalty=length_penalty)
        expected = _hf_new_tokens(ref.sequences[0], len(PROMPT), stop_ids)
        assert ours.token_ids == expected
        if num_beams > 1:
            assert ours.score == pytest.approx(float(ref.sequences_scores[0]), abs=1e-4)
    assert expected and ours.finish_reason in ("stop", "length")


def test_beam_search_on_a_left_padded_batch_equals_transformers(built):
    src, out = built
    hf, model = _hf(src), flagc.load(out)
    prompts = [[5, 17, 99], list(range(10, 27))]
    ids = torch.tensor([[0] * 14 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 14 + [1] * 3, [1] * 17])
    eos = model.manifest["generation"]["eos_token_ids"]
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=4,
                          do_sample=False, eos_token_id=eos or None, pad_token_id=0,
                          repetition_penalty=1.3)
    ours = model.generate(prompts, max_new_tokens=10, num_beams=4, repetition_penalty=1.3)
    for row, r in enumerate(ours):
        assert r.token_ids == _hf_new_tokens(ref[row], 17, eos)
        assert r.prompt_tokens == len(prompts[row])


def test_batched_greedy_and_beams_equal_single_runs(built):
    _, out = built
    model = flagc.load(out)
    prompts = [[1, 2, 3], list(range(10, 27)), [9] * 40]
    batch = model.generate(prompts, max_new_tokens=12)
    for p, r in zip(prompts, batch):
        assert r.token_ids == model.generate(p, max_new_tokens=12).token_ids
    beams = model.generate(prompts[:2], max_new_tokens=6, num_beams=4)
    for p, r in zip(prompts[:2], beams):
        assert r.token_ids == model.generate(p, max_new_tokens=6, num_beams=4).token_ids


def test_seeded_sampling_is_reproducible_and_per_row(built):
    _, out = built
    model = flagc.load(out)
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=40, top_p=0.9, seed=7)
    a = model.generate([PROMPT, PROMPT], **kw)
    b = model.generate([PROMPT, PROMPT], **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids != a[1].token_ids  # one generator, different draws per row
    other = model.generate([PROMPT, PROMPT], **{**kw, "seed": 8})
    assert [r.token_ids for r in other] != [r.token_ids for r in a]


def test_decode_runs_once_per_token_with_the_cache(built):
    _, out = built
    r = flagc.load(out).generate(PROMPT, max_new_tokens=20, min_new_tokens=20)
    assert len(r.token_ids) == 20 and r.timings["session_runs"] == 20
    assert r.timings["prefill_tokens"] == len(PROMPT)


def test_gpt2_greedy_and_beam_equal_transformers(tmp_path):
    """GPT-2 builds through the torch.export frontend."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=128, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(str(tmp_path / "gpt2"))
    flagc.build(str(tmp_path / "gpt2"), "onnx-fp32", str(tmp_path / "art"))
    model = flagc.load(str(tmp_path / "art"))
    for num_beams in (1, 4):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                              num_beams=num_beams, eos_token_id=1, pad_token_id=0)
        ours = model.generate(PROMPT, max_new_tokens=10, num_beams=num_beams)
        assert ours.token_ids == _hf_new_tokens(ref[0], len(PROMPT), [1])


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,culprit", [
    ("--temperature", "-0.5", "temperature=-0.5"),
    ("--top-p", "1.5", "top_p=1.5"),
    ("--top-p", "0", "top_p=0.0"),
    ("--top-k", "-1", "top_k=-1"),
    ("--num-beams", "0", "num_beams=0"),
])
def test_cli_rejects_invalid_sampling_values(built, flag, value, culprit):
    _, out = built
    res = CliRunner().invoke(app, ["run", out, "--ids", "5,17", "-n", "2", flag, value])
    assert res.exit_code == 1
    assert f"invalid sampling parameter {culprit}" in res.output


def test_api_rejects_invalid_beam_combinations(built):
    _, out = built
    model = flagc.load(out)
    with pytest.raises(SamplingError, match="temperature=0.7: allowed 0 when num_beams=4"):
        model.generate(PROMPT, num_beams=4, temperature=0.7)
    with pytest.raises(SamplingError, match="streaming cannot be used with num_beams=2"):
        model.generate(PROMPT, num_beams=2, stream=print)
    with pytest.raises(SamplingError, match="unknown sampling parameter.*num_beam\\b"):
        model.generate(PROMPT, num_beam=2)


def test_prompt_over_the_context_limit_is_a_clear_error(built):
    _, out = built
    too_long = ",".join(["5"] * 257)
    res = CliRunner().invoke(app, ["run", out, "--ids", too_long, "-n", "2"])
    assert res.exit_code == 1
    assert "prompt of 257 tokens is longer than the artifact's max sequence length 256" \
        in res.output
    with pytest.raises(RuntimeInputError, match=r"300 tokens .* length 256 \(prompt 1 of the"):
        flagc.load(out).generate([[5, 6], [5] * 300])
    with pytest.raises(RuntimeInputError, match="leaves no room to generate"):
        flagc.load(out).generate([5] * 256)


def test_non_finite_logits_name_fp16_overflow(tiny_llama, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    hf.save_pretrained(str(tmp_path / "inf"))
    out = str(tmp_path / "art")
    flagc.build(str(tmp_path / "inf"), "onnx-fp32", out, custom=os.path.join("examples",
                                                                              "llama.py"))
    res = CliRunner().invoke(app, ["run", out, "--ids", "5,17,99", "-n", "4"])
    assert res.exit_code == 1
    assert "logits row 0 at generation step 0 has no finite maximum" in res.output
    assert "fp16 overflow" in res.output
    with pytest.raises(RuntimeInputError, match="NaN/inf logits"):
        flagc.load(out).generate([5, 17], num_beams=2, max_new_tokens=3)
