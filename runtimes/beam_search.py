"""Engine-agnostic beam search (decoder-only and seq2seq) with transformers 5.x semantics.

This is a numpy port of `GenerationMixin._beam_search` and its helpers in transformers 5.23.0
(`transformers/generation/utils.py`: `_get_top_k_continuations`,
`_get_running_beams_for_next_iteration`, `_update_finished_beams`, `_check_early_stop_heuristic`,
`_beam_search_has_unfinished_sequences`). The rules that matter for identical output:

- Each step keeps K = max(2, 1 + n_eos) * num_beams candidates over all beams, so that at least
  num_beams of them do not end in EOS.
- Only the first num_beams candidates (by accumulated logprob) may become finished hypotheses.
- A finished hypothesis scores sum_logprob / generated_len ** length_penalty, where generated_len
  counts the new tokens including EOS and excludes the prompt (for decoder-only models too:
  `cur_len + 1 - decoder_prompt_len`).
- early_stopping=True stops a batch item once num_beams hypotheses are finished; False and "never"
  keep going while the best running beam could still beat the worst finished one, estimated at the
  current length (False) or at max length when length_penalty > 0 ("never").
- Scores are float32, and "impossible" entries get -1e9 added, exactly as transformers does, so
  ties and orderings come out the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flagc.errors import RuntimeInputError, SamplingError

__all__ = ["BeamSearch", "log_softmax"]

_NEG = np.float32(-1.0e9)  # transformers' "impossible" score offset


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (what beam search consumes)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk_sorted(x: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries per row, largest first (like torch.topk)."""
    if k < x.shape[1]:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    vals = np.take_along_axis(x, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _gather(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[b, idx[b, j], ...] for a of shape [batch, beams, ...] and idx [batch, j]."""
    while idx.ndim < a.ndim:
        idx = idx[..., None]
    return np.take_along_axis(a, idx, axis=1)


class BeamSearch:
    """Beam search state for `batch_size` items of `num_beams` beams each.

    Per step the caller runs the model on the current beams (rows ordered item-major:
    row = item * num_beams + beam), turns logits into logprobs (`log_softmax`), and calls `step`.
    It then reorders its KV cache with the returned beam indices and feeds the returned tokens.
    On the first step the caller may pass only `batch_size` rows (one per prompt, before expanding
    the cache); all beams then continue row `item`, and beam indices refer to those rows.
    """

    def __init__(
        self,
        batch_size: int,
        num_beams: int,
        eos_token_ids: Sequence[int],
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        max_new_tokens: int = 128,
        pad_token_id: int = 0,
        min_new_tokens: int = 0,
    ) -> None:
        """Set up the search.

        Args:
            batch_size: number of prompts.
            num_beams: beams per prompt (>= 1).
            eos_token_ids: ids that finish a hypothesis (may be empty).
            length_penalty: exponent on the generated length in the final score.
            early_stopping: True, False or "never" (transformers semantics, see module doc).
            max_new_tokens: hypotheses are finished when they reach this many new tokens.
            pad_token_id: fills token slots past a hypothesis' end in `padded()`.
            min_new_tokens: EOS ids get -inf logprob until this many tokens were generated.
        """
        if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
            raise SamplingError(
                f"BeamSearch(batch_size={batch_size}, num_beams={num_beams}, "
                f"max_new_tokens={max_new_tokens}): each must be >= 1"
            )
        if not (isinstance(early_stopping, bool) or early_stopping == "never"):
            raise SamplingError(
                f'early_stopping={early_stopping!r}: allowed True, False or "never"'
            )
        self.batch_size, self.num_beams, self.max_new_tokens = batch_size, num_beams, max_new_tokens
        self.eos_token_ids = np.array(sorted(set(int(t) for t in eos_token_ids)), dtype=np.int64)
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        self.pad_token_id = int(pad_token_id)
        self.min_new_tokens = int(min_new_tokens)
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * num_beams
        self._init_state()

    def _init_state(self) -> None:
        b, n, t = self.batch_size, self.num_beams, self.max_new_tokens
        # Only beam 0 is live at first: the others start at -1e9 so step 1 does not pick the same
        # tokens num_beams times from identical copies of the prompt.
        self.running_scores = np.zeros((b, n), dtype=np.float32)
        self.running_scores[:, 1:] = _NEG
        self.running_tokens = np.full((b, n, t), self.pad_token_id, dtype=np.int64)
        self.finished_tokens = np.full((b, n, t), self.pad_token_id, dtype=np.int64)
        self.finished_lengths = np.zeros((b, n), dtype=np.int64)
        self.finished_scores = np.full((b, n), _NEG, dtype=np.float32)
        self.is_finished = np.zeros((b, n), dtype=bool)
        # transformers' is_early_stop_heuristic_unsatisfied: can this item still improve?
        self.improvable = np.ones(b, dtype=bool)
        self.num_generated = 0
        self.done = False

    def step(self, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Advance every beam by one token.

        Args:
            logprobs: float32 [batch * num_beams, vocab] (or [batch, vocab] on the first step).

        Returns:
            next_tokens int64 [batch * num_beams]: the token each new beam appends.
            beam_indices int64 [batch * num_beams]: the input row each new beam continues
                (reorder the KV cache with it before the next step).
            done: True when the search is over; call `finalize()`.
        """
        lp = self._validated(logprobs)
        b, n, s = self.batch_size, self.num_beams, self.num_generated
        vocab = lp.shape[-1]
        accumulated = (lp + self.running_scores[:, :, None]).reshape(b, n * vocab)

        # Top-K continuations over all beams of an item (transformers: _get_top_k_continuations).
        cand = _topk_sorted(accumulated, self.num_candidates)
        cand_scores = np.take_along_axis(accumulated, cand, axis=1)
        cand_beams, cand_tokens = cand // vocab, cand % vocab
        cand_seqs = _gather(self.running_tokens, cand_beams)
        cand_seqs[:, :, s] = cand_tokens
        hits = np.isin(cand_tokens, self.eos_token_ids) | (s + 1 >= self.max_new_tokens)

        next_tokens, beam_indices = self._advance_running(
            cand_scores, cand_seqs, cand_beams, cand_tokens, hits
        )
        self._update_finished(cand_scores, cand_seqs, hits)
        self.num_generated = s + 1
        self._update_improvable()
        self.done = not self._has_unfinished(hits)
        if np.shape(logprobs)[0] == b and n > 1:
            beam_indices = beam_indices // n  # rows of an unexpanded first step are items
        return next_tokens, beam_indices, self.done

    def _validated(self, logprobs: np.ndarray) -> np.ndarray:
        """Check shape and state; returns logprobs as float32 [batch, num_beams, vocab]."""
        if self.done:
            raise RuntimeInputError("BeamSearch.step called after the search reported done")
        lp = np.asarray(logprobs, dtype=np.float32)
        b, n = self.batch_size, self.num_beams
        first_ok = self.num_generated == 0 and lp.ndim == 2 and lp.shape[0] == b
        if lp.ndim != 2 or (lp.shape[0] != b * n and not first_ok):
            raise RuntimeInputError(
                f"BeamSearch.step: logprobs shape {lp.shape}, expected [batch*num_beams={b * n}, "
                f"vocab]" + (f" (or [batch={b}, vocab] on the first step)" if n > 1 else "")
            )
        if lp.shape[0] == b and n > 1:
            lp = np.repeat(lp, n, axis=0)
        lp = lp.reshape(b, n, -1)
        if self.num_generated < self.min_new_tokens and self.eos_token_ids.size:
            lp = lp.copy()
            lp[:, :, self.eos_token_ids[self.eos_token_ids < lp.shape[-1]]] = -np.inf
        return lp

    def _advance_running(self, cand_scores, cand_seqs, cand_beams, cand_tokens, hits):
        """Keep the best num_beams candidates that did not finish as the running beams."""
        b, n = self.batch_size, self.num_beams
        open_scores = cand_scores + hits.astype(np.float32) * _NEG
        keep = _topk_sorted(open_scores, n)
        self.running_tokens = _gather(cand_seqs, keep)
        self.running_scores = np.take_along_axis(open_scores, keep, axis=1)
        source = np.take_along_axis(cand_beams, keep, axis=1) + np.arange(b)[:, None] * n
        tokens = np.take_along_axis(cand_tokens, keep, axis=1)
        return tokens.reshape(-1).astype(np.int64), source.reshape(-1).astype(np.int64)

    def _update_finished(self, cand_scores, cand_seqs, hits) -> None:
        """Merge newly finished candidates into the per-item best num_beams hypotheses."""
        n = self.num_beams
        new_len = self.num_generated + 1
        just_finished = hits.copy()
        just_finished[:, n:] = False  # only the top num_beams candidates may finish
        scores = cand_scores / np.float32(new_len**self.length_penalty)
        # Same float32 additions, in the same order, as transformers' _update_finished_beams.
        full = self.is_finished.all(axis=1) & (self.early_stopping is True)
        scores = scores + full[:, None].astype(np.float32) * _NEG
        scores = scores + (~self.improvable)[:, None].astype(np.float32) * _NEG
        scores = scores + (~just_finished).astype(np.float32) * _NEG

        merged_scores = np.concatenate([self.finished_scores, scores], axis=1)
        merged_seqs = np.concatenate([self.finished_tokens, cand_seqs], axis=1)
        new_lengths = np.full(scores.shape, new_len, dtype=np.int64)
        merged_lengths = np.concatenate([self.finished_lengths, new_lengths], axis=1)
        merged_done = np.concatenate([self.is_finished, just_finished], axis=1)
        best = _topk_sorted(merged_scores, n)
        self.finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        self.finished_tokens = _gather(merged_seqs, best)
        self.finished_lengths = np.take_along_axis(merged_lengths, best, axis=1)
        self.is_finished = np.take_along_axis(merged_done, best, axis=1)

    def _update_improvable(self) -> None:
        """transformers' _check_early_stop_heuristic, after the length was advanced."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_new_tokens
        else:
            best_len = self.num_generated
        best_running = self.running_scores[:, :1] / np.float32(best_len**self.length_penalty)
        worst_done = np.where(
            self.is_finished, self.finished_scores.min(axis=1, keepdims=True), _NEG
        )
        self.improvable &= np.any(best_running > worst_done, axis=1)

    def _has_unfinished(self, hits: np.ndarray) -> bool:
        """transformers' _beam_search_has_unfinished_sequences."""
        improvement_possible = bool(self.improvable.any())
        all_full = bool(self.is_finished.all()) and self.early_stopping is True
        return improvement_possible and not all_full and not bool(hits.all())

    def finalize(self) -> list[list[list[int]]]:
        """Best hypotheses per item, best first: generated token ids (EOS included if emitted).

        Valid once `step` reported done (or earlier, for the hypotheses finished so far).
        """
        out = []
        for item in range(self.batch_size):
            hyps = []
            for beam in range(self.num_beams):
                length = int(self.finished_lengths[item, beam])
                hyps.append(self.finished_tokens[item, beam, :length].tolist())
            out.append(hyps)
        return out

    def scores(self) -> np.ndarray:
        """float32 [batch, num_beams]: length-penalized scores of `finalize()`'s hypotheses."""
        return self.finished_scores.copy()

    def padded(self) -> np.ndarray:
        """int64 [batch, num_beams, longest]: `finalize()` as an array padded with pad_token_id."""
        longest = max(1, int(self.finished_lengths.max()))
        return self.finished_tokens[:, :, :longest].copy()
