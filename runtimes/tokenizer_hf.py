"""Reading a Hugging Face style tokenizer folder into a `Built` pipeline.

Sources, first match wins: tokenizer.json; vocab.txt (BERT WordPiece); vocab.json + merges.txt
(byte-level BPE); spiece.model / tokenizer.model / *.model (SentencePiece). Special tokens, the
chat template and add_bos/add_eos come from tokenizer_config.json, special_tokens_map.json,
chat_template.jinja / chat_template.json and generation_config.json (extra EOS ids).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from flagc.errors import CheckpointError, ConfigError

from .tokenizer_build import (
    Built,
    PRE_TOKENIZER_SPLITS,
    add_typed_tokens,
    byte_level_bpe,
    sentencepiece_bpe,
    sentencepiece_unigram,
    set_special_template,
    wordpiece,
)

__all__ = ["read_folder", "read_json", "kind_of"]


def read_json(path: Path, required: bool = False) -> dict:
    """A JSON object from `path`; {} when absent and not required; CheckpointError when corrupt."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"tokenizer file not found: {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _Config:
    """tokenizer_config.json merged over special_tokens_map.json (the config wins, as in HF)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = {**read_json(folder / "special_tokens_map.json")}
        self.data.update(read_json(folder / "tokenizer_config.json"))

    def get(self, key, default=None):
        return self.data.get(key, default)

    def token(self, name: str, default: str | None) -> str | None:
        return _token_str(self.data[name]) if name in self.data else default

    @property
    def flavour(self) -> str:
        """tokenizer_class without the Fast suffix, e.g. "Qwen2Tokenizer"."""
        return str(self.data.get("tokenizer_class") or "").removesuffix("Fast")


def kind_of(backend: Backend) -> str:
    """wordpiece | bpe (byte-level) | sentencepiece (BPE with ▁ and byte fallback) | unigram."""
    model = json.loads(backend.to_str())["model"]
    kind = model.get("type", "")
    if kind == "BPE":
        return "sentencepiece" if model.get("byte_fallback") else "bpe"
    return {"WordPiece": "wordpiece", "Unigram": "unigram", "WordLevel": "wordlevel"}.get(
        kind, kind.lower()
    )


def _add_config_tokens(backend: Backend, cfg: _Config) -> None:
    """Add tokenizer_config.json's added_tokens_decoder entries at the ids it declares."""
    decoder = cfg.get("added_tokens_decoder") or {}
    where = cfg.folder / "tokenizer_config.json"
    for key in sorted(decoder, key=int):
        entry = decoder[key]
        content = entry.get("content")
        token = AddedToken(
            content,
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", not entry.get("special", False)),
            special=entry.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != int(key):
            raise CheckpointError(
                f"{where}: added_tokens_decoder puts {content!r} at id {key} but the vocabulary "
                f"gives it id {backend.token_to_id(content)}"
            )


def _from_tokenizer_json(path: Path, cfg: _Config) -> tuple[Backend, str]:
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON / schema
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from exc
    return backend, kind_of(backend)


def _from_vocab_txt(path: Path, cfg: _Config) -> tuple[Backend, str]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable vocab.txt ({exc})") from exc
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token.rstrip("\r"): i for i, token in enumerate(lines)}
    unk = cfg.token("unk_token", "[UNK]")
    if unk not in vocab:
        raise CheckpointError(f"{path}: the unknown token {unk!r} is not in the vocabulary")
    backend = wordpiece(
        vocab,
        unk,
        lowercase=bool(cfg.get("do_lower_case", True)),
        strip_accents=cfg.get("strip_accents"),
        chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
    )
    specials = [cfg.token(n, d) for n, d in _BERT_SPECIALS]
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials if t in vocab])
    cls, sep = cfg.token("cls_token", "[CLS]"), cfg.token("sep_token", "[SEP]")
    for t in (cls, sep):
        if t not in vocab:
            raise CheckpointError(f"{path}: BERT special token {t!r} is not in the vocabulary")
    set_special_template(backend, [(cls, vocab[cls])], [(sep, vocab[sep])], pair_type_ids=True)
    return backend, "wordpiece"


_BERT_SPECIALS = [
    ("pad_token", "[PAD]"),
    ("unk_token", "[UNK]"),
    ("cls_token", "[CLS]"),
    ("sep_token", "[SEP]"),
    ("mask_token", "[MASK]"),
]


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable merges.txt ({exc})") from exc
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}:{n}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


# tokenizer_class -> (split regex, NFC, default specials). Others get GPT-2's byte-level setup.
_BPE_FLAVOURS = {
    "Qwen2Tokenizer": (
        PRE_TOKENIZER_SPLITS["qwen2"],
        True,
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ),
}
_GPT2_FLAVOUR = (PRE_TOKENIZER_SPLITS["gpt-2"], False, {})
_GPT2_DEFAULT_SPECIALS = {
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def _from_vocab_merges(path: Path, cfg: _Config) -> tuple[Backend, str]:
    vocab = read_json(path, required=True)
    if not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{path}: expected {{token: id}} with integer ids")
    merges = _read_merges(path.parent / "merges.txt")
    split, nfc, _ = _BPE_FLAVOURS.get(cfg.flavour, _GPT2_FLAVOUR)
    add_prefix = bool(cfg.get("add_prefix_space", False))
    backend = byte_level_bpe(vocab, merges, split=split, add_prefix_space=add_prefix, nfc=nfc)
    _add_config_tokens(backend, cfg)
    return backend, "bpe"


def _load_spm_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError as exc:  # protobuf comes with onnx; say so if it is missing
        raise ConfigError(
            f"reading {path} needs the protobuf package: pip install protobuf"
        ) from exc
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from exc
    if not proto.pieces:
        raise CheckpointError(f"{path}: SentencePiece model has no pieces")
    return proto


def _from_spm(path: Path, cfg: _Config) -> tuple[Backend, str]:
    """SentencePiece .model, converted as transformers' T5Tokenizer / LlamaTokenizer convert it."""
    proto = _load_spm_proto(path)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    if proto.trainer_spec.model_type == 1:  # UNIGRAM
        backend = sentencepiece_unigram(pieces, unk_id, proto.trainer_spec.byte_fallback, charsmap)
        kind = "unigram"
    elif proto.trainer_spec.model_type == 2:  # BPE
        tokens = [p for p, _ in pieces]
        backend = sentencepiece_bpe(
            tokens,
            [s for _, s in pieces],
            tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
            add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
            spm_normalizer=_spm_normalizers(proto, charsmap),
            split_words=proto.trainer_spec.split_by_whitespace,
        )
        kind = "sentencepiece"
    else:
        raise ConfigError(
            f"{path}: SentencePiece model_type {proto.trainer_spec.model_type} is not supported "
            "(only UNIGRAM=1 and BPE=2)"
        )
    add_typed_tokens(backend, [p for p, _ in pieces], types)
    if _is_t5(path, cfg):
        _add_t5_sentinels(backend, cfg)
    _add_config_tokens(backend, cfg)
    return backend, kind


def _spm_normalizers(proto, charsmap: bytes | None) -> list:
    """sentencepiece's normalization before the ▁ prefix: the charsmap (e.g. nmt_nfkc), then
    dropping leading, trailing and repeated spaces when the model says so."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    return steps


def _is_t5(path: Path, cfg: _Config) -> bool:
    return cfg.flavour.startswith(("T5", "MT5")) or (
        path.name == "spiece.model" and not cfg.flavour
    )


def _add_t5_sentinels(backend: Backend, cfg: _Config) -> None:
    """T5's <extra_id_N> sentinels, appended after the vocabulary in reverse, so <extra_id_0> gets
    the last id (32099 in t5-base), as in T5Tokenizer."""
    extra = [_token_str(t) for t in (cfg.get("additional_special_tokens") or [])]
    extra = [t for t in extra if t and re.fullmatch(r"<extra_id_\d+>", t)]
    if not extra:
        extra = [f"<extra_id_{i}>" for i in range(int(cfg.get("extra_ids", 100)))]
    extra.sort(key=lambda t: -int(t[len("<extra_id_") : -1]))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])


def _spm_specials(proto_path: Path) -> dict[str, str | None]:
    proto = _load_spm_proto(proto_path)
    ids = {
        "bos_token": proto.trainer_spec.bos_id,
        "eos_token": proto.trainer_spec.eos_id,
        "pad_token": proto.trainer_spec.pad_id,
        "unk_token": proto.trainer_spec.unk_id,
    }
    n = len(proto.pieces)
    return {k: proto.pieces[i].piece if 0 <= i < n else None for k, i in ids.items()}


def has_tokenizer_source(folder: Path) -> bool:
    """Whether `folder` holds any file a tokenizer can be built from (see `_find_source`)."""
    folder = Path(folder)
    names = ("tokenizer.json", "vocab.txt", "vocab.json")
    return any((folder / n).is_file() for n in names) or any(folder.glob("*.model"))


def _find_source(folder: Path):
    """(path, builder) of the first tokenizer source present in `folder`."""
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json", _from_tokenizer_json
    if (folder / "vocab.txt").is_file():
        return folder / "vocab.txt", _from_vocab_txt
    if (folder / "vocab.json").is_file():
        if not (folder / "merges.txt").is_file():
            raise CheckpointError(f"{folder}: vocab.json found but merges.txt is missing")
        return folder / "vocab.json", _from_vocab_merges
    models = [folder / "spiece.model", folder / "tokenizer.model"] + sorted(folder.glob("*.model"))
    for path in models:
        if path.is_file():
            return path, _from_spm
    raise CheckpointError(
        f"{folder}: no tokenizer files (expected tokenizer.json, vocab.txt, "
        "vocab.json + merges.txt, or a SentencePiece *.model)"
    )


def _default_specials(path: Path, cfg: _Config, kind: str) -> dict[str, str | None]:
    """Specials a source implies when the config names none (as the transformers classes do)."""
    if path.name == "vocab.txt":
        return {"bos_token": None, "eos_token": None, "pad_token": "[PAD]", "unk_token": "[UNK]"}
    if path.name == "vocab.json":
        return {**_GPT2_DEFAULT_SPECIALS, **_BPE_FLAVOURS.get(cfg.flavour, _GPT2_FLAVOUR)[2]}
    if path.suffix == ".model":
        specials = _spm_specials(path)
        if _is_t5(path, cfg):
            specials["bos_token"] = None
        return specials
    return {}


def _chat_template(folder: Path, cfg: _Config) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list): extra stop tokens for chat."""
    value = read_json(folder / "generation_config.json").get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _apply_bos_eos(backend, path, cfg, bos, eos) -> None:
    """Rewrite the post-processor from add_bos_token / add_eos_token, as transformers does when a
    config states either flag or tokenizer.json has no post-processor. T5 always appends </s>."""
    if path.suffix == ".model" and _is_t5(path, cfg):
        set_special_template(backend, [], [(eos, backend.token_to_id(eos))])
        return
    if path.name == "vocab.txt":
        return  # [CLS]/[SEP] already set
    explicit = "add_bos_token" in cfg.data or "add_eos_token" in cfg.data
    default_bos = path.suffix == ".model" and cfg.flavour.startswith("Llama")
    if not (explicit or backend.post_processor is None or path.name != "tokenizer.json"):
        return
    add_bos = (
        bool(cfg.get("add_bos_token", default_bos)) and backend.token_to_id(bos or "") is not None
    )
    add_eos = bool(cfg.get("add_eos_token", False)) and backend.token_to_id(eos or "") is not None
    set_special_template(
        backend,
        [(bos, backend.token_to_id(bos))] if add_bos else [],
        [(eos, backend.token_to_id(eos))] if add_eos else [],
    )


def _add_named_specials(backend: Backend, tokens) -> None:
    """BOS/EOS/PAD/UNK that are in the vocabulary are matched whole in text (as transformers adds
    them as special tokens); ones already added keep their own flags."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    todo = [t for t in tokens if t and t not in added and backend.token_to_id(t) is not None]
    if todo:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in todo])


def read_folder(folder: str | Path) -> Built:
    """Build the tokenizer of a Hugging Face style folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    cfg = _Config(folder)
    path, build = _find_source(folder)
    backend, kind = build(path, cfg)
    defaults = _default_specials(path, cfg, kind)
    names = {
        n: cfg.token(n, defaults.get(n))
        for n in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    _add_named_specials(backend, names.values())
    ids = {n: (backend.token_to_id(t) if t is not None else None) for n, t in names.items()}
    _apply_bos_eos(backend, path, cfg, names["bos_token"], names["eos_token"])
    eos_ids = [ids["eos_token"]] if ids["eos_token"] is not None else []
    eos_ids += [i for i in _generation_eos(folder) if i not in eos_ids]
    return Built(
        backend,
        kind,
        bos_token_id=ids["bos_token"],
        eos_token_ids=eos_ids,
        pad_token_id=ids["pad_token"],
        unk_token_id=ids["unk_token"],
        chat_template=_chat_template(folder, cfg),
    )
