"""Building `tokenizers` pipelines from raw vocabularies: byte-level BPE, SentencePiece BPE/unigram,
WordPiece, and the GGUF `tokenizer.ggml.*` metadata.

Every tokenization algorithm runs inside the `tokenizers` library; this module only assembles the
model, normalizer, pre-tokenizer, decoder and post-processor the way the reference implementations
(transformers' tokenizer classes and GGUF converter, llama.cpp) assemble them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from flagc.errors import ConfigError

__all__ = [
    "Built",
    "bytes_to_unicode",
    "byte_level_bpe",
    "sentencepiece_bpe",
    "sentencepiece_unigram",
    "wordpiece",
    "set_special_template",
    "add_typed_tokens",
    "from_gguf_metadata",
    "PRE_TOKENIZER_SPLITS",
]


@dataclass
class Built:
    """A backend pipeline plus the facts `Tokenizer` keeps beside it (ids, not strings)."""

    backend: Backend
    kind: str
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    chat_template: str | None = None


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:  # unprintable bytes move to code points 256+ in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Split regexes of byte-level BPE vocabularies, as in llama.cpp's llama-vocab.cpp and transformers'
# integrations/gguf/gguf_tokenizer_mapping.py. None means GPT-2's own regex inside ByteLevel.
_GPT2 = None
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "smollm"/"starcoder"/...: llama.cpp splits every digit first, then applies the GPT-2 regex
# (this is also the pre-tokenizer of those models' own tokenizer.json).
_DIGITS_THEN_GPT2 = "digits+gpt2"

PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "gpt2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "pixtral": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "megrez": _QWEN2,
    "gpt-4o": _GPT4O,
    "llama4": _GPT4O,
}


def _byte_level_pre_tokenizer(split: str | None, add_prefix_space: bool):
    if split is _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    if split == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )


def byte_level_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    split: str | None = _GPT2,
    add_prefix_space: bool = False,
    nfc: bool = False,
) -> Backend:
    """GPT-2 style byte-level BPE (GPT2Tokenizer / Qwen2Tokenizer in transformers)."""
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    if nfc:  # Qwen2's tokenizer.json normalizes to NFC before splitting
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(split, add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def merges_from_vocab(tokens: list[str], scores: list[float] | None) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces,
    best piece (highest score, or lowest id without scores) first, as transformers' generate_merges.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = (lambda i: -scores[i]) if scores is not None else (lambda i: i)
    merges = []
    for piece, index in vocab.items():
        local = [
            (piece[:k], piece[k:], rank(index))
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(a, b) for a, b, _ in merges]


def _metaspace_decoder(add_prefix_space: bool):
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:  # the dummy prefix space is not part of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def sentencepiece_bpe(
    tokens: list[str],
    scores: list[float] | None,
    unk_token: str | None,
    add_prefix_space: bool = True,
    spm_normalizer: list | None = None,
    split_words: bool = False,
) -> Backend:
    """SentencePiece BPE with byte fallback.

    Without spm_normalizer this is LlamaTokenizer's pipeline in transformers (and its GGUF path):
    Metaspace adds the "▁" prefix unless the text already starts with a space. With spm_normalizer
    (a list of normalizers, maybe empty) it follows sentencepiece itself, which always adds the
    prefix: the normalizer writes the prefix and the ▁s, and Metaspace only splits words.

    split_words: merge only within ▁-started words, as sentencepiece does for a model trained with
    split_by_whitespace. llama.cpp and transformers' GGUF path merge across the whole text.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges_from_vocab(tokens, scores),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    if spm_normalizer is None:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁",
            prepend_scheme="first" if add_prefix_space else "never",
            split=split_words,
        )
    else:
        steps = list(spm_normalizer)
        if add_prefix_space:
            steps.append(normalizers.Prepend("▁"))
        steps.append(normalizers.Replace(" ", "▁"))
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="never", split=split_words
        )
    backend.decoder = _metaspace_decoder(add_prefix_space)
    return backend


def sentencepiece_unigram(
    pieces: list[tuple[str, float]],
    unk_id: int,
    byte_fallback: bool = False,
    charsmap: bytes | None = None,
) -> Backend:
    """SentencePiece unigram (T5Tokenizer's pipeline): NFKC-like charsmap, whitespace split, ▁."""
    backend = Backend(models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback))
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return backend


def wordpiece(
    vocab: dict[str, int],
    unk_token: str,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    chinese_chars: bool = True,
) -> Backend:
    """BERT WordPiece: BertNormalizer (each CJK character a word), BertPreTokenizer, ##."""
    backend = Backend(models.WordPiece(vocab, unk_token=unk_token))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def set_special_template(
    backend: Backend,
    prefix: list[tuple[str, int]],
    suffix: list[tuple[str, int]],
    pair_type_ids: bool = False,
) -> None:
    """Post-processor wrapping each sequence as prefix + text + suffix (BOS/EOS, [CLS]/[SEP]).

    With pair_type_ids the second sequence of a pair gets token type 1 and no prefix (BERT);
    otherwise both halves get the full wrapping (transformers' update_post_processor).
    """
    pre = " ".join(f"{t}:0" for t, _ in prefix)
    suf = " ".join(f"{t}:0" for t, _ in suffix)
    single = " ".join(x for x in (pre, "$A:0", suf) if x)
    if pair_type_ids:
        suf_b = " ".join(f"{t}:1" for t, _ in suffix)
        pair = " ".join(x for x in (single, "$B:1", suf_b) if x)
    else:
        pre_b = " ".join(f"{t}:1" for t, _ in prefix)
        suf_b = " ".join(f"{t}:1" for t, _ in suffix)
        pair = " ".join(x for x in (single, pre_b, "$B:1", suf_b) if x)
    specials = list(dict.fromkeys(prefix + suffix))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def add_typed_tokens(backend: Backend, tokens: list[str], types: list[int], spelled=None) -> None:
    """Make CONTROL (3) tokens special and USER_DEFINED (4) tokens plain added tokens, so they are
    matched whole in the text instead of being cut into pieces (llama.cpp and transformers do so).

    `spelled`: for byte-level vocabularies, the byte alphabet; a control token outside it is a
    llama.cpp mislabel and is skipped (adding it would grow the vocabulary).
    """
    control, user = [], []
    for token, kind in zip(tokens, types):
        if kind == 3 and (spelled is None or set(token) <= spelled):
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == 4 and backend.token_to_id(token) is not None:
            user.append(AddedToken(token, normalized=False, special=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_get(metadata: dict, key: str, required: bool = True):
    if key not in metadata:
        if required:
            raise ConfigError(f"GGUF metadata has no {key!r}; cannot build the tokenizer")
        return None
    return metadata[key]


def _gguf_id(metadata: dict, key: str, size: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < size:
        raise ConfigError(
            f"GGUF metadata tokenizer.ggml.{key} = {value!r} is not a token id < {size}"
        )
    return value


def _gguf_byte_level(metadata: dict) -> Backend:
    tokens = _gguf_get(metadata, "tokenizer.ggml.tokens")
    merges = _gguf_get(metadata, "tokenizer.ggml.merges")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ConfigError(
            f"GGUF metadata tokenizer.ggml.pre = {pre!r} is not a known pre-tokenizer; "
            f"known: {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare, e.g. added tokens with raw UTF-8) are re-spelled.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = []
    for k, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"GGUF metadata tokenizer.ggml.merges[{k}] = {m!r} is not 'a b'")
        pairs.append((parts[0], parts[1]))
    backend = byte_level_bpe(vocab, pairs, split=PRE_TOKENIZER_SPLITS[pre])
    types = metadata.get("tokenizer.ggml.token_type") or []
    add_typed_tokens(backend, tokens, types, spelled=alphabet)
    return backend


def _gguf_sentencepiece(metadata: dict) -> Backend:
    tokens = _gguf_get(metadata, "tokenizer.ggml.tokens")
    scores = metadata.get("tokenizer.ggml.scores")
    unk = _gguf_id(metadata, "unknown_token_id", len(tokens))
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend = sentencepiece_bpe(
        tokens, scores, tokens[unk] if unk is not None else None, add_prefix_space=add_prefix
    )
    add_typed_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type") or [])
    return backend


# tokenizer.ggml.model -> (builder, kind, add_bos default). llama.cpp adds BOS to a SentencePiece
# vocabulary that does not say otherwise; byte-level vocabularies add nothing by default.
_GGUF_MODELS = {
    "gpt2": (_gguf_byte_level, "bpe", False),
    "llama": (_gguf_sentencepiece, "sentencepiece", True),
}


def from_gguf_metadata(metadata: dict) -> Built:
    """Build the tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes."""
    model = _gguf_get(metadata, "tokenizer.ggml.model")
    if model not in _GGUF_MODELS:
        raise ConfigError(
            f"GGUF metadata tokenizer.ggml.model = {model!r} is not supported; "
            f"supported: {sorted(_GGUF_MODELS)}"
        )
    build, kind, add_bos_default = _GGUF_MODELS[model]
    backend = build(metadata)
    size = len(metadata["tokenizer.ggml.tokens"])
    bos = _gguf_id(metadata, "bos_token_id", size)
    eos = _gguf_id(metadata, "eos_token_id", size)
    add_bos = (
        bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    )
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tokens = metadata["tokenizer.ggml.tokens"]
    set_special_template(
        backend,
        [(tokens[bos], bos)] if add_bos else [],
        [(tokens[eos], eos)] if add_eos else [],
    )
    eos_ids = [eos] if eos is not None else []
    eot = _gguf_id(metadata, "eot_token_id", size)  # end of turn: a second stop token for chat
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    return Built(
        backend,
        kind,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        pad_token_id=_gguf_id(metadata, "padding_token_id", size),
        unk_token_id=_gguf_id(metadata, "unknown_token_id", size),
        chat_template=metadata.get("tokenizer.chat_template"),
    )
