"""Streaming detokenization and stop conditions on real (tiny, trained-here) tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flagc.errors import SamplingError
from flagc.runtimes.stopping import StopChecker
from flagc.runtimes.streaming import IncrementalDecoder

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Streaming text is fun; stop here ### please. END of story",
    "cafe naive resume, once upon a time",
] * 20
# Emoji (incl. a ZWJ family), CJK and accented letters are unseen or rare in CORPUS, so their
# UTF-8 bytes are spread over several tokens.
TEXTS = [
    "Hello 世界! 🎉 café 👨‍👩‍👧 naïve ### end",
    "the lazy dog 日本語のテキスト 🙂🙃 over",
    "  leading spaces and\nnew lines\n\n 😀",
]
SP = "\u2581"


@pytest.fixture(scope="module")
def byte_bpe():
    """GPT-2 style byte-level BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def sentencepiece_bpe(tmp_path_factory):
    """Llama style: Metaspace pieces, <0xXX> byte fallback, decoder stripping one leading space."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    base.train_from_iterator(CORPUS, trainer)
    vocab_file, merges_file = base.model.save(str(tmp_path_factory.mktemp("sp")))
    vocab = json.load(open(vocab_file, encoding="utf-8"))
    lines = open(merges_file, encoding="utf-8").read().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SP, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def _stream(tok, ids, skip_special_tokens=True):
    decoder = IncrementalDecoder(tok.decode, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("tokenizer", ["byte_bpe", "sentencepiece_bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_full_decode(request, tokenizer, text):
    tok = request.getfixturevalue(tokenizer)
    ids = tok.encode(text).ids
    pieces, rest = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) + rest == full
    assert rest == ""  # every character completed before the end
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("tokenizer", ["byte_bpe", "sentencepiece_bpe"])
def test_split_characters_are_held_back(request, tokenizer):
    """The test above is not vacuous: tokens alone decode to U+FFFD and pushes return ""."""
    tok = request.getfixturevalue(tokenizer)
    ids = tok.encode(TEXTS[0]).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, _ = _stream(tok, ids)
    assert "" in pieces
    assert "世界" in "".join(pieces) and "👨‍👩‍👧" in "".join(pieces)


def test_sentencepiece_leading_spaces_survive(sentencepiece_bpe):
    ids = sentencepiece_bpe.encode("the lazy dog").ids
    alone = "".join(sentencepiece_bpe.decode([i]) for i in ids)
    assert alone == "thelazydog"  # naive per-token decoding loses the spaces
    pieces, rest = _stream(sentencepiece_bpe, ids)
    assert "".join(pieces) + rest == "the lazy dog"


def test_incomplete_tail_is_flushed(byte_bpe):
    ids = byte_bpe.encode("ok 🎉").ids[:-1]  # drop the last byte of the emoji
    pieces, rest = _stream(byte_bpe, ids)
    assert "".join(pieces) == "ok " and rest.endswith("\ufffd")
    assert "".join(pieces) + rest == byte_bpe.decode(ids)


def test_special_tokens_skipped_or_kept(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    ids = byte_bpe.encode("hi there").ids + [eos] + byte_bpe.encode(" more").ids
    for skip in (True, False):
        pieces, rest = _stream(byte_bpe, ids, skip_special_tokens=skip)
        assert "".join(pieces) + rest == byte_bpe.decode(ids, skip_special_tokens=skip)


# ----------------------------------------------------------------------------------------------
# stop conditions


def _run_checker(checker, rows_ids, steps=None):
    """Feed rows of ids step by step (as the generation loop would); collect streamed text."""
    batch = len(rows_ids)
    checker.begin(batch)
    streamed = [""] * batch
    length = max(len(r) for r in rows_ids)
    for t in range(length if steps is None else steps):
        tokens = np.array([r[t] if t < len(r) else 0 for r in rows_ids])
        stopped = checker.update(tokens)
        for row in range(batch):
            streamed[row] += checker.pop_text(row)
        if stopped.all():
            break
    checker.finish()
    for row in range(batch):
        streamed[row] += checker.pop_text(row)
    return streamed


def test_stop_string_inside_a_token_cuts_at_the_right_character(byte_bpe):
    text = "Streaming text is fun; stop here ### please. END"
    ids = byte_bpe.encode(text).ids
    # A stop string ending one character into a multi-character token.
    pieces = [byte_bpe.decode(ids[:n]) for n in range(len(ids) + 1)]
    n = next(
        n
        for n in range(1, len(ids))
        if len(pieces[n]) - len(pieces[n - 1]) >= 3 and len(pieces[n - 1]) > 10
    )
    stop = pieces[n][len(pieces[n - 1]) - 4 : len(pieces[n - 1]) + 1]
    checker = StopChecker(stop_strings=[stop], tokenizer_decode=byte_bpe.decode)
    streamed = _run_checker(checker, [ids])
    assert checker.reason(0) == "stop_string"
    assert checker.text(0) == streamed[0] == pieces[n - 1][:-4]
    assert len(checker._rows[0].decoder.ids) == n  # stopped on the token that completed it


def test_earliest_of_several_stop_strings_wins_and_later_text_is_dropped(byte_bpe):
    ids = byte_bpe.encode("Hello world, the quick brown fox. END of story").ids
    checker = StopChecker(stop_strings=["END", "quick", "k b"], tokenizer_decode=byte_bpe.decode)
    _run_checker(checker, [ids])
    assert checker.text(0) == "Hello world, the "


def test_stop_string_with_multibyte_characters(byte_bpe):
    ids = byte_bpe.encode("abc 世界 🎉 tail").ids
    checker = StopChecker(stop_strings=["界 🎉"], tokenizer_decode=byte_bpe.decode)
    streamed = _run_checker(checker, [ids])
    assert checker.text(0) == streamed[0] == "abc 世"


def test_streaming_holds_back_a_possible_stop_prefix(byte_bpe):
    ids = byte_bpe.encode("one ## two ### three").ids
    checker = StopChecker(stop_strings=["###"], tokenizer_decode=byte_bpe.decode)
    checker.begin(1)
    seen = []
    for tok in ids:
        checker.update(np.array([tok]))
        seen.append(checker.pop_text(0))
        # Nothing streamed may later turn out to be part of the stop string.
        assert not "".join(seen).endswith("#") or "".join(seen).endswith("## two")
    assert "".join(seen) == checker.text(0) == "one ## two "


def test_stop_tokens_per_row_and_no_decode_needed():
    checker = StopChecker(stop_token_ids=[2, 9])
    checker.begin(3)
    assert checker.update(np.array([5, 2, 7])).tolist() == [False, True, False]
    assert checker.update(np.array([9, 5, 7])).tolist() == [True, True, False]
    assert [checker.reason(r) for r in range(3)] == ["stop_token", "stop_token", None]
    checker.finish(2)
    assert checker.reason(2) == "length"


def test_stop_token_excluded_from_text_and_rows_independent(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    a = byte_bpe.encode("first row").ids + [eos] + byte_bpe.encode(" junk").ids
    b = byte_bpe.encode("second row, longer ### cut").ids
    checker = StopChecker([eos], ["###"], byte_bpe.decode, skip_special_tokens=False)
    streamed = _run_checker(checker, [a, b])
    assert checker.text(0) == streamed[0] == "first row"
    assert checker.text(1) == streamed[1] == "second row, longer "
    assert [checker.reason(0), checker.reason(1)] == ["stop_token", "stop_string"]


def test_length_finish_flushes_everything(byte_bpe):
    ids = byte_bpe.encode("no stop here 🎉").ids
    checker = StopChecker(stop_strings=["zzz"], tokenizer_decode=byte_bpe.decode)
    streamed = _run_checker(checker, [ids])
    assert streamed[0] == checker.text(0) == "no stop here 🎉"
    assert checker.reason(0) == "length"


def test_stop_checker_bad_arguments():
    with pytest.raises(SamplingError, match="need a tokenizer_decode"):
        StopChecker(stop_strings=["x"])
    with pytest.raises(SamplingError, match="non-empty"):
        StopChecker(stop_strings=[""], tokenizer_decode=lambda ids, **kw: "")
    checker = StopChecker([1])
    checker.begin(2)
    with pytest.raises(SamplingError, match="3 tokens for 2 rows"):
        checker.update(np.array([1, 2, 3]))
