"""The runtime tokenizer: one class over a `tokenizers` pipeline, whatever the source format.

Sources: a Hugging Face style folder (`from_pretrained`), GGUF metadata (`from_gguf`), or an
artifact folder written by `save` (`load`). All tokenization runs in the `tokenizers` library;
the builders in `tokenizer_build` / `tokenizer_hf` only assemble pipelines the way transformers
and llama.cpp assemble them, and tests/test_tokenizers.py holds them to exact-id parity.

    tok = Tokenizer.from_pretrained("models/bert-base-chinese")
    ids = tok.encode("你好, world")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as Backend

from flagc.errors import CheckpointError, ConfigError

from .tokenizer_build import Built, from_gguf_metadata
from .tokenizer_hf import kind_of, read_folder, read_json

__all__ = ["Tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "flagc_tokenizer.json"
META_FORMAT = 1


class Tokenizer:
    """Text <-> token ids, special token ids, and chat templates for one model.

    Attributes:
        kind: "wordpiece", "bpe" (byte-level BPE), "sentencepiece" (SentencePiece BPE with byte
            fallback) or "unigram" (SentencePiece unigram).
        bos_token_id, pad_token_id, unk_token_id: ids, or None when the model has none.
        eos_token_ids: every id that ends generation (EOS, end-of-turn, generation_config's).
        vocab_size: size including added tokens.
        chat_template: the Jinja chat template, or None.
    """

    def __init__(self, built: Built):
        self._backend = built.backend
        self.kind = built.kind
        self.bos_token_id = built.bos_token_id
        self.eos_token_ids = list(built.eos_token_ids)
        self.pad_token_id = built.pad_token_id
        self.unk_token_id = built.unk_token_id
        self.chat_template = built.chat_template
        # Pads are never stripped from the batch; keep the backend from padding on its own.
        self._backend.no_padding()
        self._backend.no_truncation()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_ids}, pad={self.pad_token_id})"
        )

    # ----------------------------------------------------------------------------- encode/decode

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (for offsets, batching options, ...)."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS/[CLS]/[SEP] as the model wants."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the backend), unpadded."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def encode_pair(self, a: str, b: str) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids) of a sentence pair, e.g. [CLS] a [SEP] b [SEP] with types 0/1."""
        encoding = self._backend.encode(a, b, add_special_tokens=True)
        return encoding.ids, encoding.type_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; byte-level and byte-fallback pieces are joined before UTF-8 decoding."""
        ids = [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(int(i))

    def token_to_id(self, t: str) -> int | None:
        return self._backend.token_to_id(t)

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._backend.id_to_token(i)

    # ----------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render `messages` with the model's chat template, as transformers renders it.

        Extra keyword arguments (tools, documents, enable_thinking, ...) reach the template.
        Raises ConfigError when the model has no template or the template raises.
        """
        if not self.chat_template:
            raise ConfigError(
                "this tokenizer has no chat_template (tokenizer_config.json / GGUF "
                "tokenizer.chat_template); pass plain text to encode() instead"
            )
        import jinja2

        template = _compile_template(self.chat_template)
        context = {
            "bos_token": self._token(self.bos_token_id) or "",
            "eos_token": self._token(self.eos_token_ids[0] if self.eos_token_ids else None) or "",
            "pad_token": self._token(self.pad_token_id) or "",
            "unk_token": self._token(self.unk_token_id) or "",
            "tools": None,
            "documents": None,
        }
        context.update(kwargs)
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:
            raise ConfigError(f"chat template failed: {exc}") from exc

    # ----------------------------------------------------------------------------- persistence

    def save(self, folder: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and flagc_tokenizer.json into `folder`; returns the file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT,
            "kind": self.kind,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "unk_token_id": self.unk_token_id,
            "chat_template": self.chat_template,
            # Strings too, so a reader without `tokenizers` can see what the ids mean.
            "tokens": {
                "bos": self._token(self.bos_token_id),
                "eos": [self._token(i) for i in self.eos_token_ids],
                "pad": self._token(self.pad_token_id),
                "unk": self._token(self.unk_token_id),
            },
        }
        _write_atomic(folder / TOKENIZER_FILE, self._backend.to_str(pretty=False))
        _write_atomic(folder / META_FILE, json.dumps(meta, ensure_ascii=False, indent=1))
        return [TOKENIZER_FILE, META_FILE]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Read what `save` wrote; CheckpointError naming the file that is missing or corrupt."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON / schema
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        meta = read_json(folder / META_FILE, required=True)
        if meta.get("format") != META_FORMAT:
            raise CheckpointError(
                f"{folder / META_FILE}: format {meta.get('format')!r}, expected {META_FORMAT}"
            )
        built = Built(
            backend,
            meta.get("kind") or kind_of(backend),
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=list(meta.get("eos_token_ids") or []),
            pad_token_id=meta.get("pad_token_id"),
            unk_token_id=meta.get("unk_token_id"),
            chat_template=meta.get("chat_template"),
        )
        return cls(built)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face style folder: tokenizer.json, vocab.txt, vocab.json + merges.txt or a
        SentencePiece *.model, with tokenizer_config.json / special_tokens_map.json beside it."""
        return cls(read_folder(folder))

    @classmethod
    def from_gguf(cls, metadata: dict) -> "Tokenizer":
        """The tokenizer described by GGUF metadata (`read_gguf(path).metadata`)."""
        return cls(from_gguf_metadata(metadata))


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """A sandboxed Jinja environment configured like transformers' chat template renderer."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"chat template does not parse: line {exc.lineno}: {exc.message}"
        ) from exc
