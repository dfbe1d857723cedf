"""The decoder generation loops: sampling (greedy included) and beam search, over a CachedDecoder.

Both take token-id prompts of any lengths (left-padded into one batch; position ids come from each
row's own count of tokens, so a padded row computes what it would alone), run the prompt once and
then one token per step against the KV cache, and return one GenerationResult per prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from flagc.errors import RuntimeInputError, SamplingError
from flagc.runtimes.beam_search import BeamSearch, log_softmax
from flagc.runtimes.decoder import CachedDecoder, check_prompts, left_pad, positions_from_mask
from flagc.runtimes.kv_cache import KVLayout
from flagc.runtimes.sampling import Sampler, SamplingParams, check_finite_logits
from flagc.runtimes.stopping import StopChecker

__all__ = ["GenerationResult", "generate_tokens", "KVLayout", "left_pad", "positions_from_mask"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: Optional[str]
    finish_reason: str  # "stop" (stop token or string) | "length"
    prompt_tokens: int
    timings: dict[str, Any] = field(default_factory=dict)
    score: Optional[float] = None  # beam search: the length-penalized score of the best beam


def generate_tokens(decoder: CachedDecoder, prompts: Sequence[Sequence[int]],
                    params: SamplingParams, *, max_seq: int, eos_token_ids: Sequence[int] = (),
                    pad_id: int = 0, decode: Callable | None = None,
                    on_text: Callable[[int, str], None] | None = None,
                    resume: bool = False) -> list[GenerationResult]:
    """Generate for a batch of token-id prompts.

    Args:
        decoder: the engine and its KV cache.
        params: validated sampling/beam parameters.
        max_seq: the artifact's context limit (prompt + generated tokens).
        eos_token_ids: the model's end ids (in addition to params.stop_token_ids).
        decode: tokenizer decode (ids, skip_special_tokens=) -> str, for text and stop strings.
        on_text: streaming callback (row, new text).
        resume: one prompt that extends the conversation in the cache: only the tokens after the
            longest cached prefix are run (chat).
    """
    check_prompts(prompts, max_seq, decoder.vocab_size)
    longest = max(len(p) for p in prompts)
    budget = min(params.max_new_tokens, max_seq - longest)
    if budget < 1:
        raise RuntimeInputError(f"prompt of {longest} tokens leaves no room to generate within "
                                f"the artifact's max sequence length {max_seq}")
    if resume and len(prompts) != 1:
        raise RuntimeInputError("resuming a cached conversation takes exactly one prompt")
    stop_ids = tuple(int(t) for t in eos_token_ids) + tuple(params.stop_token_ids)
    if params.num_beams > 1:
        return _beam_search(decoder, prompts, params, budget, stop_ids, pad_id, decode, on_text,
                            resume)
    return _sample(decoder, prompts, params, budget, stop_ids, pad_id, decode, on_text, resume)


def _start(decoder, prompts, pad_id, reserve, resume, rows=None):
    decoder.screen_stats.update(certified=0, full_head=0)  # counted per generate call
    if resume:
        logits, _ = decoder.resume(prompts[0], reserve)
        return logits
    return decoder.prefill(prompts, pad_id, reserve, rows=rows)


def _sample(decoder, prompts, params, budget, stop_ids, pad_id, decode, on_text, resume):
    batch = len(prompts)
    sampler = Sampler(params, decoder.vocab_size, stop_ids)
    sampler.begin(prompts)
    stops = StopChecker(stop_ids, params.stop_strings, decode)
    stops.begin(batch)
    generated: list[list[int]] = [[] for _ in range(batch)]
    start = time.perf_counter()
    token_times: list[float] = []
    logits = _start(decoder, prompts, pad_id, max(len(p) for p in prompts) + budget, resume)
    picked = None  # (tokens, their logits) when the decoder picked the argmax itself
    for step in range(budget):
        tokens = sampler.step(logits) if picked is None else \
            sampler.take(*picked, decoder.last_logits)
        token_times.append(time.perf_counter() - start)
        running = [row for row, done in enumerate(stops.stopped.tolist()) if not done]
        now_stopped = stops.update(tokens)
        picks = tokens.tolist()
        for row in running:
            if not (now_stopped[row] and stops.reason(row) == "stop_token"):
                generated[row].append(picks[row])
        if on_text is not None:
            for row in running:
                piece = stops.pop_text(row)
                if piece:
                    on_text(row, piece)
        if now_stopped.all() or step == budget - 1:
            break  # the last token is never run: nothing would read its keys and values
        if sampler.picks_argmax:  # greedy: static decode graphs pick on the device
            picked = decoder.append_greedy(tokens, keep_logits=False,
                                           suppress=sampler.suppressed_now)
        else:
            logits = decoder.append(tokens)
    results = []
    for row in range(batch):
        stopped = bool(stops.stopped[row])
        if not stopped:
            stops.finish(row)
        if on_text is not None:
            rest = stops.pop_text(row)
            if rest:
                on_text(row, rest)
        results.append(GenerationResult(
            token_ids=generated[row], text=stops.text(row) if decode is not None else None,
            finish_reason="stop" if stopped else "length", prompt_tokens=len(prompts[row]),
            timings=_timings(token_times, decoder)))
    return results


def _beam_search(decoder, prompts, params, budget, stop_ids, pad_id, decode, on_text, resume):
    """transformers' beam search (see beam_search.py) with the cache reordered every step."""
    if params.stop_strings:
        raise SamplingError(f"stop_strings={params.stop_strings!r} cannot be used with "
                            f"num_beams={params.num_beams}; use stop_token_ids")
    if on_text is not None:
        raise SamplingError(f"streaming cannot be used with num_beams={params.num_beams}: the "
                            "best beam is only known at the end")
    batch, beams = len(prompts), params.num_beams
    search = BeamSearch(batch, beams, stop_ids, length_penalty=params.length_penalty,
                        early_stopping=params.early_stopping, max_new_tokens=budget,
                        pad_token_id=pad_id, min_new_tokens=params.min_new_tokens)
    # Penalties act on log-probabilities, as transformers' logits processors do in beam search;
    # EOS suppression (min_new_tokens) is BeamSearch's job.
    sampler = Sampler(replace(params, min_new_tokens=0), decoder.vocab_size, stop_ids)
    sampler.begin(prompts)
    start = time.perf_counter()
    token_times: list[float] = []
    logits = _start(decoder, prompts, pad_id, max(len(p) for p in prompts) + budget, resume,
                    rows=batch * beams)
    while True:
        check_finite_logits(logits, search.num_generated)
        tokens, rows, done = search.step(sampler.penalize(log_softmax(logits)))
        token_times.append(time.perf_counter() - start)
        if done:
            break
        decoder.reorder(rows)
        sampler.reorder(rows)
        sampler.record(tokens)
        logits = decoder.append(tokens)
    scores = search.scores()
    results = []
    for item, hyps in enumerate(search.finalize()):
        ids = hyps[0]
        stopped = bool(ids) and ids[-1] in stop_ids
        ids = ids[:-1] if stopped else ids
        results.append(GenerationResult(
            token_ids=ids, text=decode(ids, skip_special_tokens=True) if decode else None,
            finish_reason="stop" if stopped else "length", prompt_tokens=len(prompts[item]),
            timings=_timings(token_times, decoder), score=float(scores[item, 0])))
    return results


def _timings(token_times: list[float], decoder: CachedDecoder) -> dict[str, Any]:
    out = {"prefill_s": token_times[0] if token_times else 0.0,
           "prefill_tokens": decoder.last_prefill, "token_times_s": list(token_times)}
    if any(decoder.screen_stats.values()):  # greedy steps on the screened LM head
        out["greedy_screen"] = dict(decoder.screen_stats)
    return out
