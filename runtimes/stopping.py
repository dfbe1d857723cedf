"""Per-row stop conditions: stop token ids and stop strings, with streaming-safe text.

A stop string can end in the middle of a token (the token "ab\\n\\nc" completes the stop "\\n\\n"),
so stopping works on decoded text, not on ids: the row's text is cut right before the first
occurrence of any stop string and everything after it is dropped. While a row runs, text that
could still turn out to be the start of a stop string is held back from streaming.

Max-new-tokens is the generation loop's business; it calls `finish` for rows that hit it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flagc.errors import SamplingError

from .streaming import DecodeFn, IncrementalDecoder

__all__ = ["StopChecker"]

STOP_TOKEN = "stop_token"
STOP_STRING = "stop_string"
LENGTH = "length"


class _Row:
    """Text state of one row: decoded text so far, what was streamed, where it stops."""

    __slots__ = ("decoder", "text", "streamed", "cut", "reason")

    def __init__(self, decoder: IncrementalDecoder | None) -> None:
        self.decoder = decoder
        self.text = ""
        self.streamed = 0  # characters handed out by pop_text
        self.cut: int | None = None  # text ends here (stop string start)
        self.reason: str | None = None


class StopChecker:
    """Tracks, for a batch of rows, which have stopped and what text each produced.

    Usage: `begin(batch)`, then `stopped = update(tokens)` after every step; `pop_text(row)`
    returns streamable new text; `finish(row)` when the loop ends a row for another reason (max
    tokens); `text(row)` is the final text once a row is done.
    """

    def __init__(
        self,
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer_decode: DecodeFn | None = None,
        skip_special_tokens: bool = True,
    ):
        """Args:
        stop_token_ids: ids that end a row (EOS included); they are not part of the text.
        stop_strings: non-empty strings that end a row; the text stops right before them.
        tokenizer_decode: decode_fn(ids, skip_special_tokens=bool) -> str; needed for text
            and stop strings.
        skip_special_tokens: passed to tokenizer_decode.
        """
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise SamplingError(f"stop_strings={tuple(stop_strings)!r}: allowed non-empty strings")
        if stop_strings and tokenizer_decode is None:
            raise SamplingError(
                f"stop_strings={tuple(stop_strings)!r} need a tokenizer_decode function to "
                "see the text; pass the tokenizer's decode"
            )
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.stop_strings = tuple(stop_strings)
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._decode = tokenizer_decode
        self._skip_special = skip_special_tokens
        self.begin(0)

    def begin(self, batch_size: int) -> None:
        """Reset for a new batch of `batch_size` rows."""
        self.stopped = np.zeros(batch_size, dtype=bool)
        self._rows = [_Row(self._new_decoder()) for _ in range(batch_size)]

    def _new_decoder(self) -> IncrementalDecoder | None:
        if self._decode is None:
            return None
        return IncrementalDecoder(self._decode, skip_special_tokens=self._skip_special)

    def update(self, tokens: np.ndarray) -> np.ndarray:
        """Feed the tokens just chosen ([batch]); return the stopped mask (bool [batch]).

        Rows that had already stopped ignore their token.
        """
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.shape[0] != len(self._rows):
            raise SamplingError(
                f"StopChecker.update got {tokens.shape[0]} tokens for {len(self._rows)} rows "
                "(call begin(batch_size) first)"
            )
        # Plain Python on the ids: per step this costs less than numpy's call overheads (and
        # np.isin sorts), which matter next to a GPU decode step of a millisecond.
        ids = tokens.tolist()
        for row, token in enumerate(ids):
            if token in self.stop_token_ids and not self.stopped[row]:
                self._end(row, STOP_TOKEN)
        if self._decode is not None:
            for row in np.flatnonzero(~self.stopped):
                if self._append(int(row), self._rows[row].decoder.push(ids[row])):
                    self._end(int(row), STOP_STRING)
        return self.stopped.copy()

    def _append(self, row: int, piece: str) -> bool:
        """Add decoded text to a row; True if the text now holds a stop string (sets the cut)."""
        state = self._rows[row]
        if not piece or state.cut is not None:
            return False
        old_len = len(state.text)
        state.text += piece
        # Earlier searches found nothing, so a match must end inside the new piece.
        start = max(0, old_len - self._longest + 1)
        found = [p for p in (state.text.find(s, start) for s in self.stop_strings) if p >= 0]
        if found:
            state.cut = min(found)
        return bool(found)

    def _end(self, row: int, reason: str) -> None:
        """Mark a row done, flushing the characters its decoder held back."""
        if self.stopped[row]:
            return
        state = self._rows[row]
        self.stopped[row] = True
        state.reason = reason
        # The held-back tail may itself complete a stop string, which then decides the cut.
        if state.decoder is not None and self._append(row, state.decoder.flush()):
            state.reason = STOP_STRING

    def finish(self, row: int | None = None) -> None:
        """End a row (or all running rows) that the loop stops for another reason (max tokens)."""
        rows = range(len(self._rows)) if row is None else [row]
        for r in rows:
            self._end(r, LENGTH)

    def reason(self, row: int) -> str | None:
        """Why a row ended: "stop_token", "stop_string", "length", or None while running."""
        return self._rows[row].reason

    def pop_text(self, row: int) -> str:
        """New text of a row that is safe to stream (never part of a stop string)."""
        state = self._rows[row]
        end = self._safe_end(state, bool(self.stopped[row]))
        piece = state.text[state.streamed : end]
        state.streamed = max(state.streamed, end)
        return piece

    def _safe_end(self, state: _Row, done: bool) -> int:
        if state.cut is not None:
            return state.cut
        if done:
            return len(state.text)
        return len(state.text) - self._partial_stop_suffix(state.text)

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0

    def text(self, row: int) -> str:
        """The row's text so far, cut before its stop string (final once the row is done)."""
        state = self._rows[row]
        return state.text if state.cut is None else state.text[: state.cut]
