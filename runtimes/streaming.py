"""Incremental detokenization for streaming output.

Decoding one token at a time is wrong for two common tokenizer families:
- byte-level BPE (GPT-2, Qwen, Llama 3) and SentencePiece byte fallback split one UTF-8 character
  over several tokens, so a lone token decodes to U+FFFD;
- SentencePiece (Metaspace) decoders drop the leading space of the first token of a decode call,
  so "▁world" decodes to "world" alone but to " world" after "▁Hello".

The fix (the scheme vLLM and transformers' TextStreamer use) is to decode a small window that
starts at the previous emitted piece, emit only the text past that context, and hold text back
while it ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["IncrementalDecoder", "DecodeFn"]

# decode_fn(ids, skip_special_tokens=...) -> str, e.g. tokenizers.Tokenizer.decode.
DecodeFn = Callable[..., str]

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    Invariant: "".join(pushes) + flush() == decode_fn(all_ids, skip_special_tokens=...) for
    tokenizers whose decoding of a window is a suffix-consistent part of the full decoding
    (byte-level BPE, SentencePiece/Metaspace with or without byte fallback, WordPiece).
    """

    def __init__(self, decode_fn: DecodeFn, skip_special_tokens: bool = True) -> None:
        """Args:
        decode_fn: called as decode_fn(ids: list[int], skip_special_tokens=bool) -> str.
        skip_special_tokens: passed through to decode_fn.
        """
        self._decode_fn = decode_fn
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: first token of the last emitted piece
        self._read_offset = 0  # tokens before this were emitted
        self._emitted_chars = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(_INCOMPLETE):
            return ""
        piece = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._emitted_chars += len(piece)
        return piece

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD).

        Computed from one full decode, so the concatenation invariant holds even if a window
        decode differed from the full one.
        """
        full = self._decode(self.ids)
        rest = full[self._emitted_chars :]
        self._prefix_offset = self._read_offset = len(self.ids)
        self._emitted_chars = len(full)
        return rest
