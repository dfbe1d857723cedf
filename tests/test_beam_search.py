"""BeamSearch against transformers' own beam search on a tiny random GPT-2.

The harness plays the generation loop: it prefills the prompt expanded to batch*num_beams rows,
feeds log-softmaxed logits to BeamSearch, reorders the KV cache with the returned beam indices and
feeds the returned tokens, exactly as runtimes/generate.py will with an exported engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flagc.errors import RuntimeInputError, SamplingError
from flagc.runtimes.beam_search import BeamSearch, log_softmax

VOCAB = 50
PROMPT_LEN = 5
MAX_NEW = 10


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A large init range makes the next-token distributions peaked and distinct, so float noise
    # between two equivalent computations cannot flip a near-tie.
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        initializer_range=0.5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def prompts():
    return torch.tensor([[3, 17, 22, 9, 41], [8, 8, 30, 2, 14]], dtype=torch.long)


def _hf_beam_search(model, prompts, num_beams, eos, early_stopping, length_penalty):
    """transformers' reference: (list per item of token lists, scores [batch, num_beams])."""
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=eos,
        pad_token_id=0,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        num_return_sequences=num_beams,
        return_dict_in_generate=True,
        output_scores=True,
    )
    lengths = (out.beam_indices >= 0).sum(dim=1)
    seqs = [
        out.sequences[i, PROMPT_LEN : PROMPT_LEN + int(lengths[i])].tolist()
        for i in range(len(lengths))
    ]
    batch = prompts.shape[0]
    grouped = [seqs[i * num_beams : (i + 1) * num_beams] for i in range(batch)]
    return grouped, out.sequences_scores.reshape(batch, num_beams).numpy()


def _ours(model, prompts, num_beams, eos, early_stopping, length_penalty, expand_first=True):
    """Drive BeamSearch with the real model and a KV cache reordered by beam_indices."""
    batch = prompts.shape[0]
    search = BeamSearch(
        batch,
        num_beams,
        eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=MAX_NEW,
        pad_token_id=0,
    )
    rows = prompts.repeat_interleave(num_beams, dim=0) if expand_first else prompts
    with torch.no_grad():
        out = model(input_ids=rows, attention_mask=torch.ones_like(rows), use_cache=True)
        cache, mask = out.past_key_values, torch.ones_like(rows)
        steps = 0
        while True:
            logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).numpy()
            tokens, beam_idx, done = search.step(logprobs)
            steps += 1
            if done:
                break
            cache.reorder_cache(torch.from_numpy(beam_idx))
            mask = torch.cat(
                [mask[torch.from_numpy(beam_idx)], torch.ones(len(tokens), 1, dtype=mask.dtype)], 1
            )
            out = model(
                input_ids=torch.from_numpy(tokens)[:, None],
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
    assert steps <= MAX_NEW
    return search.finalize(), search.scores()


def _pick_eos(model, prompts):
    """An EOS id that greedy decoding actually emits early, so hypotheses finish before max."""
    greedy = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=4,
        eos_token_id=None,
        pad_token_id=0,
    )
    return int(greedy[0, PROMPT_LEN + 2])


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_matches_transformers(model, prompts, num_beams, early_stopping, length_penalty):
    eos = _pick_eos(model, prompts)
    ref_seqs, ref_scores = _hf_beam_search(
        model, prompts, num_beams, eos, early_stopping, length_penalty
    )
    seqs, scores = _ours(model, prompts, num_beams, [eos], early_stopping, length_penalty)
    assert seqs == ref_seqs
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_eos_actually_finishes_hypotheses(model, prompts):
    """Guard against a vacuous comparison: some hypotheses must end in EOS before max length."""
    eos = _pick_eos(model, prompts)
    seqs, _ = _ours(model, prompts, 4, [eos], False, 1.0)
    ended = [h for item in seqs for h in item if len(h) < MAX_NEW]
    assert ended and all(h[-1] == eos for h in ended)


def test_multiple_eos_ids(model, prompts):
    eos = [_pick_eos(model, prompts), 7]
    ref_seqs, ref_scores = _hf_beam_search(model, prompts, 3, eos, False, 1.0)
    seqs, scores = _ours(model, prompts, 3, eos, False, 1.0)
    assert seqs == ref_seqs
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_unexpanded_first_step(model, prompts):
    """Passing one row per prompt on step 1 gives the same result as passing num_beams copies."""
    eos = [_pick_eos(model, prompts)]
    expanded = _ours(model, prompts, 4, eos, False, 1.0)
    compact = _ours(model, prompts, 4, eos, False, 1.0, expand_first=False)
    assert expanded[0] == compact[0]
    np.testing.assert_array_equal(expanded[1], compact[1])


def _table_search(table, num_beams, eos, max_new=6, **kw):
    """Beam search over a fixed "model": logprobs depend only on the last token."""
    search = BeamSearch(1, num_beams, eos, max_new_tokens=max_new, **kw)
    last = np.zeros(num_beams, dtype=np.int64)
    done = False
    while not done:
        tokens, beam_idx, done = search.step(table[last])
        last = tokens
    return search


def _brute_force_best(table, eos, max_new, length_penalty):
    """Exhaustive best sequence (ending in EOS or at max length) by length-penalized score."""
    best = (-np.inf, None)
    stack = [([], 0.0, 0)]
    while stack:
        seq, score, last = stack.pop()
        for tok in range(table.shape[1]):
            s = score + float(table[last, tok])
            new = seq + [tok]
            if tok in eos or len(new) == max_new:
                best = max(best, (s / len(new) ** length_penalty, new), key=lambda t: t[0])
            else:
                stack.append((new, s, tok))
    return best


def test_wide_beam_finds_the_exhaustive_optimum():
    """With as many beams as sequences can branch, beam search is exact search."""
    rng = np.random.default_rng(3)
    table = log_softmax(rng.standard_normal((5, 5)).astype(np.float32) * 2)
    best_score, best_seq = _brute_force_best(table, {4}, 4, 1.0)
    search = _table_search(table, 125, [4], max_new=4, early_stopping="never")
    assert search.finalize()[0][0] == best_seq
    assert search.scores()[0, 0] == pytest.approx(best_score, rel=1e-5)


def test_early_stopping_true_stops_once_beams_are_full():
    # Token 1 (EOS) is very likely from every token, so all beams finish quickly.
    table = np.full((4, 4), -5.0, dtype=np.float32)
    table[:, 1] = -0.01
    search = _table_search(table, 2, [1], max_new=50, early_stopping=True)
    assert search.num_generated < 5
    assert all(h[-1] == 1 for h in search.finalize()[0])


def test_beam_indices_and_tokens_shapes():
    search = BeamSearch(2, 3, [0], max_new_tokens=4)
    tokens, beam_idx, done = search.step(np.log(np.full((6, 10), 0.1, dtype=np.float32)))
    assert tokens.shape == beam_idx.shape == (6,)
    assert tokens.dtype == beam_idx.dtype == np.int64
    assert set(beam_idx[:3]) <= {0, 1, 2} and set(beam_idx[3:]) <= {3, 4, 5}
    assert not done


def test_bad_inputs():
    with pytest.raises(SamplingError, match="num_beams=0"):
        BeamSearch(1, 0, [1])
    with pytest.raises(SamplingError, match="early_stopping"):
        BeamSearch(1, 2, [1], early_stopping="sometimes")
    search = BeamSearch(2, 2, [1], max_new_tokens=1)
    with pytest.raises(RuntimeInputError, match=r"expected \[batch\*num_beams=4"):
        search.step(np.zeros((3, 5), dtype=np.float32))
    _, _, done = search.step(np.zeros((4, 5), dtype=np.float32))
    assert done
    with pytest.raises(RuntimeInputError, match="after the search reported done"):
        search.step(np.zeros((4, 5), dtype=np.float32))
