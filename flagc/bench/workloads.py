"""Workload inputs: the same token ids for every engine of a point, built as the anchors build them.

The texts and the construction are those of the baselines' `anchors.py` (encoder: padded batches
whose real lengths vary; decoder: the first N tokens of a fixed prompt), so a ratio measured here
means what the anchor numbers mean. Inputs are tokenized once per point and handed to every
engine, so tokenization is never part of a timing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flagc.bench.base import ENCODER, Point

__all__ = ["ENCODER_SENTENCES", "DECODER_PROMPT", "Tokenizer", "EncoderInputs", "DecoderInputs",
           "make_inputs", "find_tokenizer"]

ENCODER_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome and the actors were brilliant in every scene.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Offline embeddings work well for semantic search over short documents.",
    "Transformers process every token of a sequence in parallel with self-attention.",
    "The weather forecast predicts heavy rain in the northern mountains this weekend.",
    "She bought three apples, two oranges and a loaf of bread at the market.",
    "Memory bandwidth often limits the speed of token generation on a CPU.",
    "The committee postponed its decision until the final report is published.",
    "Children were playing football in the park while their parents watched.",
    "A compiler lowers a high-level program into efficient machine instructions.",
    "The museum opened a new exhibition about the history of printing.",
    "He forgot his umbrella at the station and walked home in the rain.",
    "Quantisation stores weights in fewer bits to save memory and time.",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Researchers measured the temperature of the lake every morning for a year.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "Our team won the match after a penalty in the last minute.",
    "The library will be closed on Monday because of a public holiday.",
]

DECODER_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type, an oil-based ink and a wooden screw "
    "press into a practical system for producing books. Within a few decades printing shops had "
    "spread across Europe."
)


@dataclass
class EncoderInputs:
    """One encoder point's feeds, shared by every engine."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_type_ids: np.ndarray  # int64 zeros, for baselines whose graphs take it


@dataclass
class DecoderInputs:
    """One decode point's prompts, shared by every engine."""

    prompts: list[list[int]]  # `batch` prompts of exactly `seq` tokens each (no padding)


class Tokenizer:
    """A tokenizer from a `tokenizer.json` (the `tokenizers` library), or synthetic ids.

    Synthetic ids are the fallback when an artifact ships no tokenizer.json: timing does not
    depend on which ids are fed, and every engine gets the same ones.
    """

    def __init__(self, path: Path | None, pad_id: int = 0, vocab_size: int = 100) -> None:
        self.path = path
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self._tok = None
        if path is not None:
            from tokenizers import Tokenizer as HfTokenizer

            self._tok = HfTokenizer.from_file(str(path))
            self._tok.no_padding()
            self._tok.no_truncation()

    @property
    def kind(self) -> str:
        """Where the ids come from, for the report."""
        return f"tokenizer.json ({self.path})" if self._tok else "synthetic ids"

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens when `special`."""
        if self._tok is None:
            rng = random.Random(text)
            n = max(1, len(text.split()) + (2 if special else 0))
            return [rng.randrange(1, self.vocab_size) for _ in range(n)]
        return self._tok.encode(text, add_special_tokens=special).ids

    def encode_padded(self, texts: list[str], seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Special tokens, truncation to `seq` and right padding to `seq`, as HF's
        `tok(texts, padding="max_length", truncation=True, max_length=seq)` does."""
        ids = np.full((len(texts), seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), seq), dtype=np.int64)
        for i, text in enumerate(texts):
            if self._tok is not None:
                self._tok.enable_truncation(max_length=seq)
                row = self._tok.encode(text, add_special_tokens=True).ids
                self._tok.no_truncation()
            else:
                row = self.encode(text, special=True)[:seq]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


def find_tokenizer(artifact_dir: Path, source_dir: Path | None,
                   vocab_size: int | None) -> Tokenizer:
    """The artifact's tokenizer.json, else the source folder's, else synthetic ids."""
    for folder in (artifact_dir, source_dir):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return Tokenizer(folder / "tokenizer.json", pad_id=_pad_id(folder))
    return Tokenizer(None, vocab_size=vocab_size or 100)


def _pad_id(folder: Path) -> int:
    """Pad id from tokenizer_config.json / the tokenizer's vocab; 0 when none is declared."""
    cfg_path = folder / "tokenizer_config.json"
    pad = None
    if cfg_path.is_file():
        pad = json.loads(cfg_path.read_text()).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
    if pad:
        from tokenizers import Tokenizer as HfTokenizer

        tid = HfTokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(pad)
        if tid is not None:
            return tid
    return 0


def make_inputs(point: Point, tok: Tokenizer, seed: int = 0) -> EncoderInputs | DecoderInputs:
    """The inputs of `point`, identical for every engine (seeded)."""
    if point.workload == ENCODER:
        return _encoder_inputs(tok, point.batch, point.seq, seed)
    return _decoder_inputs(tok, point.batch, point.seq)


def _encoder_inputs(tok: Tokenizer, batch: int, seq: int, seed: int) -> EncoderInputs:
    # As anchors.py: short shapes join two sentences; long ones fill each row to a random real
    # length between seq/3 and seq, so padding (and its masking) is part of the workload.
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        if seq <= 32:
            rows.append(" ".join(rng.sample(ENCODER_SENTENCES, 2)))
            continue
        target = rng.randint(seq // 3, seq)
        text = ""
        while len(tok.encode(text, special=True)) < target:
            text = (text + " " + rng.choice(ENCODER_SENTENCES)).strip()
        rows.append(text)
    ids, mask = tok.encode_padded(rows, seq)
    return EncoderInputs(ids, mask, np.zeros_like(ids))


def _decoder_inputs(tok: Tokenizer, batch: int, seq: int) -> DecoderInputs:
    # The anchors' prompt is the first 32 tokens of DECODER_PROMPT; longer contexts repeat it.
    text, ids = DECODER_PROMPT, tok.encode(DECODER_PROMPT, special=False)
    while len(ids) < seq:
        text = text + " " + DECODER_PROMPT
        ids = tok.encode(text, special=False)
    ids = ids[:seq]
    # Rows of a batch are rotations of the prompt: same length (no padding, so every engine
    # does the same work) but different content.
    prompts = [ids[(7 * i) % seq:] + ids[: (7 * i) % seq] for i in range(batch)]
    return DecoderInputs(prompts)
