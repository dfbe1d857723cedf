"""Token selection for the generation loop: validated sampling parameters and a batched sampler.

Everything here is pure numpy and runs once per generated token, so the hot path avoids full-vocab
sorts (top-k uses `np.argpartition`; top-p looks at a small preselected head of the distribution and
only sorts the whole vocabulary when that head holds less than `top_p` of the mass) and keeps
penalty bookkeeping as per-row count arrays that are updated incrementally.

Processing order follows Hugging Face transformers 5.x (`GenerationMixin._get_logits_processor`):
repetition penalty, then (not in transformers) OpenAI-style presence/frequency penalties, the
`min_new_tokens` EOS suppression, temperature, top-k, top-p, and finally the draw.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flagc.errors import RuntimeInputError, SamplingError

__all__ = ["SamplingParams", "Sampler", "filter_logits", "check_finite_logits"]

# top-p without top-k first tries the few hundred most likely tokens, then a few thousand; only if
# those hold less than top_p of the probability mass does it sort the full vocabulary. LM
# distributions are peaked, so the first head almost always suffices.
_TOP_P_HEADS = (256, 4096)


def _fail(name: str, value: object, allowed: str) -> SamplingError:
    return SamplingError(f"invalid sampling parameter {name}={value!r}: allowed {allowed}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `top_k=True` is a bug in the caller, not a request for top-1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    if not _is_int(value) or value < low:
        raise _fail(name, value, allowed)


def _check_real(name: str, value: object, ok, allowed: str) -> None:
    if not _is_real(value) or not math.isfinite(value) or not ok(value):
        raise _fail(name, value, allowed)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction.

    Attributes:
        max_new_tokens: Upper bound on generated tokens (>= 1).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it (finite, >= 0).
        top_k: Keep the k most likely tokens; 0 disables.
        top_p: Keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
        repetition_penalty: transformers semantics on prompt + generated tokens (> 0, 1 = off).
        presence_penalty: OpenAI semantics on generated tokens (finite, 0 = off).
        frequency_penalty: OpenAI semantics on generated tokens (finite, 0 = off).
        seed: Seed of the sampler's generator; None draws fresh entropy.
        stop_token_ids: Token ids that end a row (in addition to the model's EOS ids).
        stop_strings: Strings that end a row; the returned text stops before them.
        num_beams: 1 for greedy/sampling, > 1 for beam search (requires temperature 0).
        length_penalty: Beam score = sum logprob / generated_len ** length_penalty.
        early_stopping: Beam search stopping rule: True, False or "never" (transformers semantics).
        min_new_tokens: Stop tokens are suppressed until this many tokens were generated.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        # Lists are accepted (JSON, CLI) but stored as tuples so that params stay hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        _check_int("max_new_tokens", self.max_new_tokens, 1, "an integer >= 1")
        _check_real("temperature", self.temperature, lambda v: v >= 0, "a finite number >= 0")
        _check_int("top_k", self.top_k, 0, "an integer >= 0 (0 disables top-k)")
        _check_real("top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a number > 0")
        _check_real("presence_penalty", self.presence_penalty, lambda v: True, "a finite number")
        _check_real("frequency_penalty", self.frequency_penalty, lambda v: True, "a finite number")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise _fail("seed", self.seed, "None or an integer >= 0")
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids", tok, 0, "token ids (integers >= 0)")
        for text in self.stop_strings:
            if not isinstance(text, str) or not text:
                raise _fail("stop_strings", text, "non-empty strings")
        _check_int("num_beams", self.num_beams, 1, "an integer >= 1")
        _check_real("length_penalty", self.length_penalty, lambda v: True, "a finite number")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise _fail("early_stopping", self.early_stopping, 'True, False or "never"')
        _check_int("min_new_tokens", self.min_new_tokens, 0, "an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise _fail(
                "min_new_tokens",
                self.min_new_tokens,
                f"an integer <= max_new_tokens ({self.max_new_tokens})",
            )
        if self.num_beams > 1 and self.temperature > 0:
            raise _fail(
                "temperature",
                self.temperature,
                f"0 when num_beams={self.num_beams} (beam sampling is not supported)",
            )

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        """Build params from keyword arguments, rejecting names that are not parameters.

        Raises:
            SamplingError: an unknown name (the message lists the valid ones) or an invalid value.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise SamplingError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; "
                f"valid names: {', '.join(valid)}"
            )
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Filtering: temperature, top-k, top-p over candidate sets.


def _topk_candidates(x: np.ndarray, top_k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Top-k over rows of `x`: (token ids [b, k], logits [b, k]), or (None, masked x) on ties.

    transformers keeps every token whose logit equals the k-th largest one, so when such a tie
    crosses the cut we return the full row with the losers masked to -inf instead of k columns.
    """
    vocab = x.shape[1]
    if top_k <= 0 or top_k >= vocab:
        return None, x
    idx = np.argpartition(x, vocab - top_k, axis=1)[:, vocab - top_k :]
    vals = np.take_along_axis(x, idx, axis=1)
    threshold = vals.min(axis=1, keepdims=True)
    keep = x >= threshold
    if np.any(keep.sum(axis=1) > top_k):
        return None, np.where(keep, x, np.float32(-np.inf))
    return idx, vals


def _row_logsumexp(vals: np.ndarray) -> np.ndarray:
    """log(sum(exp(vals))) per row ([b, 1], float64); exp in float32, sum in float64."""
    m = vals.max(axis=1, keepdims=True)
    total = np.exp(vals - m).sum(axis=1, keepdims=True, dtype=np.float64)
    return m.astype(np.float64) + np.log(total)


def _top_p_head(vals: np.ndarray, top_p: float, log_z: np.ndarray):
    """Preselect the most likely tokens of full rows, if few enough of them cover top_p everywhere.

    Returns (ids [b, m], logits [b, m]) or None when no head size in `_TOP_P_HEADS` suffices.
    Tokens outside a head holding >= top_p of the mass are removed anyway, so nothing is lost.
    """
    vocab = vals.shape[1]
    for size in _TOP_P_HEADS:
        if vocab <= 2 * size:
            return None
        idx = np.argpartition(vals, vocab - size, axis=1)[:, vocab - size :]
        head = np.take_along_axis(vals, idx, axis=1)
        mass = np.exp(_row_logsumexp(head) - log_z)[:, 0]
        # The margin keeps float rounding from cutting a token that a full sort would keep.
        if np.all(mass >= top_p + 1e-6):
            return idx, head
    return None


def _apply_top_p(idx: np.ndarray | None, vals: np.ndarray, top_p: float, log_z: np.ndarray):
    """Sort candidates by logit (descending) and mask those outside the top-p nucleus.

    transformers removes a token when the ascending cumulative probability up to and including it
    is <= 1 - top_p; equivalently, when the mass of the strictly more likely tokens is >= top_p.
    The most likely token always survives (min_tokens_to_keep=1). `log_z` is the row's log
    normalizer over all surviving tokens, which may be more than the candidates given here.
    """
    order = np.argsort(-vals, axis=1, kind="stable")
    vals = np.take_along_axis(vals, order, axis=1)
    idx = order if idx is None else np.take_along_axis(idx, order, axis=1)
    probs = np.exp(vals.astype(np.float64) - log_z)
    mass_before = np.zeros_like(probs)
    np.cumsum(probs[:, :-1], axis=1, out=mass_before[:, 1:])
    remove = mass_before >= top_p
    remove[:, 0] = False
    return idx, np.where(remove, np.float32(-np.inf), vals)


def _select(x: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """Candidate tokens after top-k and top-p: (ids [b, m] or None, logits).

    ids None means "every token, in vocab order" (no top-k, or a top-k tie), so logits is [b, V].

    Logits of filtered-out candidates are -inf. `x` must already be temperature-scaled.
    """
    idx, vals = _topk_candidates(x, top_k)
    if top_p >= 1.0:
        return idx, vals
    log_z = _row_logsumexp(vals)
    if idx is None:
        head = _top_p_head(vals, top_p, log_z)
        if head is not None:
            idx, vals = head
    return _apply_top_p(idx, vals, top_p, log_z)


def _check_filter_args(top_k: int, top_p: float, temperature: float) -> None:
    _check_int("top_k", top_k, 0, "an integer >= 0 (0 disables top-k)")
    _check_real("top_p", top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    _check_real(
        "temperature",
        temperature,
        lambda v: v > 0,
        "a finite number > 0 here (temperature 0 is greedy decoding, which filters nothing)",
    )


def filter_logits(
    logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0
) -> np.ndarray:
    """Temperature, top-k and top-p filtering with transformers' semantics (filter value -inf).

    Args:
        logits: float array [batch, vocab]; not modified.
        top_k: keep the k largest logits (ties with the k-th are kept); 0 disables.
        top_p: keep the smallest most-likely set whose probability reaches top_p; 1 disables.
        temperature: divide logits by this (> 0).

    Returns:
        float32 [batch, vocab]: scaled logits, -inf where filtered out.
    """
    _check_filter_args(top_k, top_p, temperature)
    x = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        x = x / np.float32(temperature)
    idx, vals = _select(x, top_k, top_p)
    if idx is None:
        return np.array(vals, dtype=np.float32, copy=True)
    out = np.full(x.shape, -np.inf, dtype=np.float32)
    np.put_along_axis(out, idx, vals, axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# The sampler.


def _check_finite(row_max: np.ndarray, step: int) -> None:
    """Raise on rows whose best logit is NaN or +-inf (NaN propagates through max/argmax)."""
    bad = np.flatnonzero(~np.isfinite(row_max))
    if bad.size:
        row = int(bad[0])
        raise RuntimeInputError(
            f"logits row {row} at generation step {step} has no finite maximum "
            f"(got {row_max[row]}): the model produced NaN/inf logits; fp16 overflow in the "
            "model's activations is a common cause, so try an fp32 or bf16 target"
        )


def check_finite_logits(logits: np.ndarray, step: int) -> None:
    """Raise a clear error if any row of logits [batch, vocab] has a NaN/inf maximum."""
    _check_finite(np.asarray(logits).max(axis=1), step)


class Sampler:
    """Picks the next token of every row of a batch, and tracks what each row has produced.

    Usage: `sampler.begin(prompt_ids_per_row)` once, then `tokens = sampler.step(logits)` per
    step; `step` records the chosen tokens for the penalties. Rows that already stopped may keep
    being passed; their tokens are simply ignored by the caller.
    """

    def __init__(
        self, params: SamplingParams, vocab_size: int, eos_token_ids: Sequence[int] = ()
    ) -> None:
        """Create a sampler.

        Args:
            params: validated sampling parameters.
            vocab_size: width of the logits rows.
            eos_token_ids: the model's EOS ids, suppressed (with params.stop_token_ids) until
                params.min_new_tokens tokens were generated.
        """
        if not _is_int(vocab_size) or vocab_size < 1:
            raise RuntimeInputError(f"Sampler vocab_size={vocab_size!r}: expected an integer >= 1")
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)
        stops = {int(t) for t in (*eos_token_ids, *params.stop_token_ids) if int(t) < vocab_size}
        self._suppressed = np.array(sorted(stops), dtype=np.int64)
        self._suppressed_set = frozenset(self._suppressed.tolist())
        # Repetition penalty: which tokens a row has seen (prompt + generated), as a mask for
        # cheap novelty tests and as flat indices so each step touches only those logits.
        self._seen: np.ndarray | None = None  # [b, V] bool
        self._seen_flat = np.zeros(0, dtype=np.int64)  # row * V + token, unique
        # Presence/frequency: counts of generated tokens and the logit offset they imply,
        # updated per recorded token so a step costs one subtraction.
        self._counts: np.ndarray | None = None  # [b, V] int32
        self._offset: np.ndarray | None = None  # [b, V] float32
        self.batch_size: int | None = None
        self.num_generated = 0

    @property
    def _uses_repetition(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def _uses_counts(self) -> bool:
        return self.params.presence_penalty != 0.0 or self.params.frequency_penalty != 0.0

    def begin(self, prompt_ids_per_row: Sequence[Sequence[int]]) -> None:
        """Start a batch: one prompt (token ids, padding excluded) per row."""
        self.batch_size = len(prompt_ids_per_row)
        self.num_generated = 0
        b, vocab = self.batch_size, self.vocab_size
        self._seen = np.zeros((b, vocab), dtype=bool) if self._uses_repetition else None
        self._seen_flat = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros((b, vocab), dtype=np.int32) if self._uses_counts else None
        self._offset = np.zeros((b, vocab), dtype=np.float32) if self._uses_counts else None
        if self._seen is None:
            return
        for row, ids in enumerate(prompt_ids_per_row):
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            bad = ids[(ids < 0) | (ids >= vocab)]
            if bad.size:
                raise RuntimeInputError(
                    f"prompt row {row} holds token id {int(bad[0])} outside the vocabulary "
                    f"[0, {vocab})"
                )
            self._seen[row, ids] = True
        self._seen_flat = np.flatnonzero(self._seen)

    def step(self, logits: np.ndarray) -> np.ndarray:
        """Choose one token per row from logits [batch, vocab]; returns int64 [batch].

        Raises:
            RuntimeInputError: wrong shape, or a row whose logits are NaN/inf.
        """
        x = self._validated(logits)
        x = self.penalize(x)
        p = self.params
        if p.greedy:
            tokens = np.argmax(x, axis=1)  # first maximum: ties go to the lowest id
            _check_finite(x[np.arange(x.shape[0]), tokens], self.num_generated)
        else:
            _check_finite(x.max(axis=1), self.num_generated)
            if p.temperature != 1.0:
                x = x / np.float32(p.temperature)
            tokens = self._draw(*_select(x, p.top_k, p.top_p))
        tokens = tokens.astype(np.int64, copy=False)
        self.record(tokens)
        return tokens

    @property
    def picks_argmax(self) -> bool:
        """True when the next token is the argmax of the raw logits except where min_new_tokens
        suppresses a stop token: greedy without penalties. The decoder may then pick on the
        device and hand the picks to `take`."""
        p = self.params
        return p.greedy and not self._seen_flat.size and self._offset is None

    @property
    def suppressed_now(self) -> np.ndarray:
        """The stop tokens min_new_tokens keeps from the next pick (empty when none): a
        decoder that picks the argmax itself may leave them out (`take` then accepts its
        picks as they are; otherwise it redoes a suppressed pick on the logits)."""
        if self.num_generated < self.params.min_new_tokens:
            return self._suppressed
        return self._suppressed[:0]

    def take(self, tokens: np.ndarray, token_logits: np.ndarray,
             logits: Callable[[], np.ndarray]) -> np.ndarray:
        """Accept the argmax tokens [batch] picked elsewhere (when `picks_argmax`), with their
        logits for `step`'s NaN/inf check; returns them as int64. A pick that min_new_tokens
        suppresses is redone by `step` on the full `logits()` [batch, vocab]: any other pick
        is unchanged by the suppression (it stays the first maximum)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if self.batch_size is not None and len(tokens) != self.batch_size:
            raise RuntimeInputError(f"Sampler.take: {len(tokens)} tokens, but begin() got "
                                    f"{self.batch_size} rows")
        if self.suppressed_now.size and not self._suppressed_set.isdisjoint(tokens.tolist()):
            return self.step(logits())
        token_logits = np.asarray(token_logits).reshape(-1)
        if not np.isfinite(token_logits).all():
            _check_finite(token_logits, self.num_generated)
        self.record(tokens)
        return tokens

    def record(self, tokens: np.ndarray) -> None:
        """Count tokens [batch] as generated (step does this; call it for forced tokens)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        self.num_generated += 1
        if self._seen is None and self._counts is None:
            return
        rows = np.arange(len(tokens))
        if self._seen is not None:
            new = ~self._seen[rows, tokens]
            self._seen[rows, tokens] = True
            flat = rows[new] * self.vocab_size + tokens[new]
            self._seen_flat = np.concatenate([self._seen_flat, flat])
        if self._counts is not None:
            self._counts[rows, tokens] += 1
            first = self._counts[rows, tokens] == 1
            p = self.params
            self._offset[rows, tokens] += np.where(
                first, p.presence_penalty + p.frequency_penalty, p.frequency_penalty
            ).astype(np.float32)

    def reorder(self, rows: np.ndarray) -> None:
        """Row r continues old row rows[r] (beam search): penalty state follows its row."""
        rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = len(rows)
        if self._seen is not None:
            self._seen = self._seen[rows]
            self._seen_flat = np.flatnonzero(self._seen)
        if self._counts is not None:
            self._counts, self._offset = self._counts[rows], self._offset[rows]

    def _validated(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits)
        if x.ndim != 2 or x.shape[1] != self.vocab_size:
            raise RuntimeInputError(
                f"Sampler.step: logits shape {x.shape}, expected [batch, {self.vocab_size}]"
            )
        if self.batch_size is None:
            self.begin([[] for _ in range(x.shape[0])])
        elif x.shape[0] != self.batch_size:
            raise RuntimeInputError(
                f"Sampler.step: logits batch {x.shape[0]}, but begin() got {self.batch_size} rows"
            )
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """Logits [batch, vocab] after repetition/presence/frequency penalties and min_new_tokens.

        This is what `step` ranks (greedy) or scales and filters (sampling); the input is never
        modified. Public so the generation loop can report and tests can check it.
        """
        p = self.params
        suppressed = self.suppressed_now
        x = np.asarray(logits, dtype=np.float32)
        if self._seen_flat.size or self._offset is not None or suppressed.size:
            x = x.copy()  # one copy; everything below works in place on it
        if self._seen_flat.size:
            # transformers: shrink positive logits by division and negative ones by multiplication.
            pen = np.float32(p.repetition_penalty)
            flat = x.reshape(-1)
            seen = flat[self._seen_flat]
            flat[self._seen_flat] = np.where(seen < 0, seen * pen, seen / pen)
        if self._offset is not None:
            x -= self._offset
        if suppressed.size:
            x[:, suppressed] = -np.inf
        return x

    def _draw(self, idx: np.ndarray | None, vals: np.ndarray) -> np.ndarray:
        """Inverse-CDF draw from softmax(vals) per row; one uniform number per row."""
        probs = np.exp(vals.astype(np.float64) - vals.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs, axis=1)
        targets = self.rng.random(len(vals)) * cdf[:, -1]
        picked = (cdf <= targets[:, None]).sum(axis=1)
        # Rounding can push the target onto the total; never step past the last non-zero token.
        last_nonzero = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
        picked = np.minimum(picked, last_nonzero)
        if idx is None:
            return picked
        return idx[np.arange(len(idx)), picked]
