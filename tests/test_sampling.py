"""Sampling: parameters, filtering parity with transformers' warpers, and the batched sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flagc.errors import RuntimeInputError, SamplingError
from flagc.runtimes.sampling import Sampler, SamplingParams, filter_logits


def _logits(batch, vocab, scale=3.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _hf_filter(logits, top_k, top_p, temperature):
    scores = torch.from_numpy(logits.copy())
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


def _assert_filter_equal(ours, ref, logits, top_k, top_p, temperature, eps=1e-6):
    """ours == ref, except for tokens whose top-p decision is a float-rounding tie.

    transformers accumulates float32 probabilities from the least likely token up, we accumulate
    float64 from the most likely down; only a token whose cumulative probability lies within eps
    of the cut may be decided differently. Such tokens must be rare, or the test proves nothing.
    """
    assert ours.shape == ref.shape and ours.dtype == np.float32
    ambiguous = np.zeros(ours.shape, dtype=bool)
    if top_p < 1.0:
        scaled = _hf_filter(logits, top_k, 1.0, temperature).astype(np.float64)
        probs = np.exp(scaled - scaled.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        order = np.argsort(probs, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        np.put_along_axis(ambiguous, order, np.abs(cum - (1 - top_p)) < eps, axis=1)
    assert ambiguous.mean() < 0.01
    differ = ~((ours == ref) | ambiguous)
    assert not differ.any(), f"filters differ at (row, token) {np.argwhere(differ)[:5].tolist()}"


# ----------------------------------------------------------------------------------------------
# filter_logits against transformers


@pytest.mark.parametrize(
    "top_k,top_p,temperature",
    [
        (0, 1.0, 0.7),
        (1, 1.0, 1.0),
        (40, 1.0, 1.0),
        (40, 1.0, 1.5),
        (0, 0.9, 1.0),
        (0, 0.5, 0.6),
        (0, 0.05, 1.0),
        (25, 0.8, 1.3),
        (2000, 0.95, 1.0),
        (5000, 1.0, 1.0),
    ],
)
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])  # flat (full sort path) to peaked (head path)
def test_filter_logits_matches_transformers(top_k, top_p, temperature, scale):
    logits = _logits(16, 3000, scale=scale, seed=int(scale * 10) + top_k)
    ours = filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
    ref = _hf_filter(logits, top_k, top_p, temperature)
    _assert_filter_equal(ours, ref, logits, top_k, top_p, temperature)


def test_filter_logits_top_k_keeps_ties_like_transformers():
    logits = np.array([[1, 3, 3, 3, 0, 2], [5, 5, 5, 5, 5, 5]], dtype=np.float32)
    ours = filter_logits(logits, top_k=2)
    np.testing.assert_array_equal(ours, _hf_filter(logits, 2, 1.0, 1.0))
    assert (ours[0] > -np.inf).sum() == 3 and (ours[1] > -np.inf).sum() == 6


def test_filter_logits_top_p_always_keeps_one_token():
    logits = np.array([[10.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ours = filter_logits(logits, top_p=0.01)
    np.testing.assert_array_equal(ours, [[10.0, -np.inf, -np.inf, -np.inf]])


@pytest.mark.parametrize("top_p", [0.9, 0.99])
def test_filter_logits_large_vocab(top_p):
    """20k tokens, scale 3: the 256 head holds < 0.9, so top-p uses the 4096 head (0.9) or the
    full sort (0.99); both must agree with transformers."""
    logits = _logits(8, 20000, scale=3.0, seed=11)
    ours = filter_logits(logits, top_p=top_p)
    _assert_filter_equal(ours, _hf_filter(logits, 0, top_p, 1.0), logits, 0, top_p, 1.0)


def test_filter_logits_does_not_modify_input():
    logits = _logits(2, 100)
    before = logits.copy()
    filter_logits(logits, top_k=5, top_p=0.5, temperature=0.5)
    np.testing.assert_array_equal(logits, before)


# ----------------------------------------------------------------------------------------------
# penalties


def test_repetition_penalty_matches_transformers():
    logits = _logits(3, 64)
    prompts = [[1, 2, 3], [10, 10, 11], []]
    generated = [np.array([5, 63, 0]), np.array([2, 63, 7])]
    sampler = Sampler(SamplingParams(repetition_penalty=1.3), 64)
    sampler.begin(prompts)
    for tokens in generated:
        sampler.record(tokens)
    ours = sampler.penalize(logits)
    processor = RepetitionPenaltyLogitsProcessor(1.3)
    for row in range(3):
        ids = torch.tensor([prompts[row] + [int(g[row]) for g in generated]])
        ref = processor(ids, torch.from_numpy(logits[row : row + 1].copy())).numpy()[0]
        np.testing.assert_array_equal(ours[row], ref)


def test_presence_and_frequency_penalties_use_generated_counts_only():
    logits = np.zeros((1, 8), dtype=np.float32)
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 8)
    sampler.begin([[6, 6, 6]])  # the prompt does not count (OpenAI semantics)
    for tok in (2, 2, 2, 5):
        sampler.record(np.array([tok]))
    expected = np.zeros(8, dtype=np.float32)
    expected[2] = -(0.5 + 3 * 0.25)
    expected[5] = -(0.5 + 0.25)
    np.testing.assert_array_equal(sampler.penalize(logits)[0], expected)


def test_greedy_repetition_penalty_changes_the_argmax():
    logits = np.array([[2.0, 1.9, 0.0]], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=1.2), 3)
    sampler.begin([[0]])
    assert sampler.step(logits).tolist() == [1]


def test_min_new_tokens_suppresses_eos_and_stop_ids():
    logits = np.array([[0.0, 5.0, 4.0, 1.0]], dtype=np.float32)
    sampler = Sampler(SamplingParams(min_new_tokens=2, stop_token_ids=(2,)), 4, eos_token_ids=[1])
    sampler.begin([[]])
    assert [int(sampler.step(logits)[0]) for _ in range(3)] == [3, 3, 1]


# ----------------------------------------------------------------------------------------------
# the sampler


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = _logits(32, 500)
    logits[0, [7, 9]] = logits[0].max() + 1  # tie: the lowest index wins
    for extra in ({}, {"top_k": 3, "top_p": 0.2}):
        sampler = Sampler(SamplingParams(temperature=0.0, seed=1, **extra), 500)
        tokens = sampler.step(logits)
        assert tokens.dtype == np.int64
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=1))
        assert tokens[0] == 7


def _run(params, steps=20, vocab=300):
    sampler = Sampler(params, vocab)
    sampler.begin([[1, 2]] * 4)
    return np.stack([sampler.step(_logits(4, vocab, seed=i)) for i in range(steps)])


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"top_k": 20},
        {"top_p": 0.9},
        {"top_k": 50, "top_p": 0.8},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.3},
    ],
)
def test_seeded_sampling_is_reproducible(extra):
    a = _run(SamplingParams(temperature=1.0, seed=123, **extra))
    b = _run(SamplingParams(temperature=1.0, seed=123, **extra))
    c = _run(SamplingParams(temperature=1.0, seed=124, **extra))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "vocab,scale,top_k,top_p,temperature",
    [
        (30, 1.5, 0, 1.0, 1.0),
        (30, 1.5, 8, 1.0, 0.7),
        (30, 1.5, 0, 0.8, 1.0),
        (30, 1.5, 12, 0.7, 1.4),
        (600, 6.0, 0, 0.9, 1.0),
    ],  # last: the top-p head fast path
)
def test_empirical_distribution_matches_filtered_softmax(vocab, scale, top_k, top_p, temperature):
    samples = 40000 if vocab < 100 else 10000  # one step over `samples` identical rows
    row = _logits(1, vocab, scale=scale, seed=vocab + top_k)
    sampler = Sampler(
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=7), vocab
    )
    tokens = sampler.step(np.repeat(row, samples, axis=0))
    filtered = filter_logits(row, top_k=top_k, top_p=top_p, temperature=temperature)[0]
    expected = np.exp(filtered.astype(np.float64) - filtered.max())
    expected /= expected.sum()
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[expected == 0].sum() == 0, "sampled a filtered-out token"
    # Pearson chi-square over tokens expected >= 5 times; a loose bound (mean + 8 sd, p << 1e-6)
    # keeps the seeded test stable while still catching a wrong distribution.
    big = expected * samples >= 5
    chi2 = (((counts[big] - expected[big] * samples) ** 2) / (expected[big] * samples)).sum()
    df = max(int(big.sum()) - 1, 1)
    assert chi2 < df + 8 * np.sqrt(2 * df), (chi2, df)


def test_step_records_tokens_for_penalties():
    sampler = Sampler(SamplingParams(frequency_penalty=100.0), 4)
    sampler.begin([[]])
    logits = np.array([[3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    assert [int(sampler.step(logits)[0]) for _ in range(4)] == [0, 1, 2, 3]
    assert sampler.num_generated == 4


def test_non_finite_logits_raise_with_fp16_hint():
    for bad in (np.nan, np.inf):
        logits = _logits(2, 10)
        logits[1, 3] = bad
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
            with pytest.raises(RuntimeInputError, match="row 1.*fp16"):
                Sampler(params, 10).step(logits)
    all_masked = np.full((1, 10), -np.inf, dtype=np.float32)
    with pytest.raises(RuntimeInputError, match="fp16 overflow"):
        Sampler(SamplingParams(temperature=0.5), 10).step(all_masked)


def test_bad_logits_shapes():
    sampler = Sampler(SamplingParams(), 10)
    with pytest.raises(RuntimeInputError, match=r"expected \[batch, 10\]"):
        sampler.step(np.zeros((2, 11), dtype=np.float32))
    sampler.begin([[1], [2]])
    with pytest.raises(RuntimeInputError, match="begin\\(\\) got 2 rows"):
        sampler.step(np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(RuntimeInputError, match="token id 12"):
        Sampler(SamplingParams(repetition_penalty=1.1), 10).begin([[12]])


# ----------------------------------------------------------------------------------------------
# parameter validation


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("num_beams", 0),
        ("max_new_tokens", 0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", float("inf")),
        ("seed", -3),
        ("seed", 1.5),
        ("stop_token_ids", (1, -2)),
        ("stop_strings", ("",)),
        ("length_penalty", float("nan")),
        ("early_stopping", "sometimes"),
        ("early_stopping", 1),
        ("min_new_tokens", -1),
        ("min_new_tokens", 500),
    ],
)
def test_invalid_values_name_the_parameter(name, value):
    with pytest.raises(SamplingError, match=rf"{name}=.*allowed"):
        SamplingParams(**{name: value})


def test_beam_sampling_is_rejected():
    with pytest.raises(SamplingError, match="temperature=0.7.*num_beams=4"):
        SamplingParams(num_beams=4, temperature=0.7)


def test_from_kwargs():
    params = SamplingParams.from_kwargs(temperature=0.5, stop_strings=["\n\n"], stop_token_ids=[2])
    assert params.temperature == 0.5 and params.stop_strings == ("\n\n",)
    assert params.stop_token_ids == (2,)
    assert hash(params) == hash(
        SamplingParams(temperature=0.5, stop_strings=("\n\n",), stop_token_ids=(2,))
    )
    with pytest.raises(
        SamplingError,
        match=r"unknown sampling parameter\(s\) tempreature.*"
        r"valid names: max_new_tokens, temperature",
    ):
        SamplingParams.from_kwargs(tempreature=0.5)


def test_filter_logits_rejects_bad_values():
    with pytest.raises(SamplingError, match="temperature=0"):
        filter_logits(_logits(1, 5), temperature=0)
    with pytest.raises(SamplingError, match="top_p=2"):
        filter_logits(_logits(1, 5), top_p=2)


def test_picks_argmax_says_when_a_pick_made_elsewhere_may_be_taken():
    """Greedy with nothing that needs every logit: the decoder may pick on the device."""
    assert Sampler(SamplingParams(), 8).picks_argmax
    assert Sampler(SamplingParams(min_new_tokens=3), 8, eos_token_ids=[1]).picks_argmax
    assert not Sampler(SamplingParams(temperature=0.7), 8).picks_argmax
    penalized = Sampler(SamplingParams(repetition_penalty=1.2), 8)
    penalized.begin([[3]])
    assert not penalized.picks_argmax


def test_take_redoes_a_suppressed_pick_from_the_full_logits():
    """min_new_tokens: a pick that is a stop token is redone from the logits (the runner-up);
    any other pick is taken as it is, without asking for the logits."""
    logits = np.array([[0.0, 5.0, 4.0, 1.0]], dtype=np.float32)
    sampler = Sampler(SamplingParams(min_new_tokens=2, stop_token_ids=(2,)), 4, eos_token_ids=[1])
    sampler.begin([[]])
    asked = []

    def full():
        asked.append(1)
        return logits

    assert sampler.take(np.array([1]), np.array([5.0]), full).tolist() == [3]  # 1, 2 suppressed
    assert sampler.take(np.array([3]), np.array([1.0]), full).tolist() == [3]
    assert sampler.take(np.array([1]), np.array([5.0]), full).tolist() == [1]  # allowed now
    assert len(asked) == 1 and sampler.num_generated == 3


def test_take_checks_the_picked_logits_and_the_row_count():
    sampler = Sampler(SamplingParams(), 8)
    sampler.begin([[3], [4]])
    never = lambda: pytest.fail("the logits are not needed")  # noqa: E731
    assert sampler.take(np.array([5, 6]), np.array([1.0, 2.0]), never).tolist() == [5, 6]
    assert sampler.num_generated == 1
    with pytest.raises(RuntimeInputError, match="row 1 at generation step 1 has no finite"):
        sampler.take(np.array([5, 6]), np.array([1.0, np.nan]), never)
    with pytest.raises(RuntimeInputError, match="3 tokens, but begin\\(\\) got 2 rows"):
        sampler.take(np.array([5, 6, 7]), np.array([1.0, 2.0, 3.0]), never)
