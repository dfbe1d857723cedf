"""Encoder tasks on a loaded artifact: embeddings, sequence classification, token labels.

Texts are tokenized with the artifact's tokenizer and right-padded (BERT's convention); the
engine returns `last_hidden_state` (and `logits` for classification / labeling graphs).
Pooling follows the manifest's `zoo.pooling` (sentence-transformers' modules.json: mean, cls,
max, lasttoken, optional L2 normalization); labels come from the config's id2label.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flagc.errors import RuntimeInputError

__all__ = ["encoder_feeds", "pool", "Encoder"]


def encoder_feeds(rows: Sequence[Sequence[int]], pad_id: int, input_names,
                  type_rows: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids [batch, seq], right-padded."""
    if not rows or any(len(r) == 0 for r in rows):
        raise RuntimeInputError("every input needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
        if type_rows is not None:
            types[i, :len(r)] = type_rows[i]
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: v for k, v in feeds.items() if k in set(input_names)}


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str = "mean",
         normalize: bool = False) -> np.ndarray:
    """[batch, seq, d] hidden states -> [batch, d] sentence vectors (float32)."""
    h = hidden.astype(np.float32)
    m = mask.astype(np.float32)[..., None]
    if mode == "mean":
        out = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    elif mode == "cls":
        out = h[:, 0]
    elif mode == "max":
        out = np.where(m > 0, h, np.float32(-1e9)).max(axis=1)
    elif mode == "lasttoken":
        last = mask.sum(axis=1).astype(np.int64) - 1
        out = h[np.arange(h.shape[0]), last]
    else:
        raise RuntimeInputError(f"unknown pooling mode {mode!r} (mean, cls, max, lasttoken)")
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class Encoder:
    """Task methods over a LoadedModel (`engine`, `tokenizer`, `manifest`)."""

    def __init__(self, model):
        self.model = model
        self.zoo: dict[str, Any] = model.manifest.get("zoo", {})

    def _labels(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.zoo.get("id2label") or {}).items()}

    def run(self, texts: Sequence[str] | str, pairs: Sequence[str] | None = None):
        """Tokenize and run; returns (outputs, attention mask, token ids per row)."""
        if isinstance(texts, str):
            texts = [texts]
        tok = self.model.tokenizer
        type_rows = None
        if pairs is not None:
            encoded = [tok.encode_pair(a, b) for a, b in zip(texts, pairs)]
            rows = [ids for ids, _ in encoded]
            type_rows = [types for _, types in encoded]
        else:
            rows = tok.encode_batch(list(texts))
        pad = self.zoo.get("pad_token_id")
        pad = tok.pad_token_id if pad is None else pad
        feeds = encoder_feeds(rows, int(pad or 0), self.model.engine.input_names, type_rows)
        return self.model.engine.run(feeds), feeds["attention_mask"], rows

    def embed(self, texts: Sequence[str] | str) -> np.ndarray:
        out, mask, _ = self.run(texts)
        p = self.zoo.get("pooling") or {"mode": "mean", "normalize": False}
        return pool(out["last_hidden_state"], mask, p.get("mode", "mean"),
                    bool(p.get("normalize")))

    def classify(self, texts, pairs=None) -> list[dict[str, Any]]:
        out, _, _ = self.run(texts, pairs)
        logits = self._logits(out, rank=2)
        probs = _softmax(logits)
        names = self._labels()
        return [{"label": names.get(int(i), str(int(i))), "id": int(i),
                 "score": float(p[int(i)])} for i, p in zip(logits.argmax(-1), probs)]

    def label(self, texts) -> list[list[tuple[str, str]]]:
        """Per-token (token, label) pairs, special tokens included as the model saw them."""
        out, mask, rows = self.run(texts)
        logits = self._logits(out, rank=3)
        names = self._labels()
        tok = self.model.tokenizer
        result = []
        for r, ids in enumerate(rows):
            best = logits[r, :len(ids)].argmax(-1)
            result.append([(tok.id_to_token(int(t)) or str(int(t)), names.get(int(b), str(int(b))))
                           for t, b in zip(ids, best)])
        return result

    def _logits(self, out, rank: int) -> np.ndarray:
        if "logits" not in out or out["logits"].ndim != rank:
            task = self.zoo.get("task", "?")
            raise RuntimeInputError(f"this artifact was built for task {task!r}; build it with "
                                    f"--task {'classification' if rank == 2 else 'ner'}")
        return out["logits"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run_task(model, text: str, pair: str | None = None, as_json: bool = False) -> str:
    """`flagc run` for encoder artifacts: the task's result for one text, printable."""
    import json

    task = model.manifest.get("zoo", {}).get("task")
    if task == "classification":
        result: Any = model.classify([text], None if pair is None else [pair])[0]
        return json.dumps(result, ensure_ascii=False) if as_json else result["label"]
    if task == "sequence_labeling":
        pairs = model.label([text])[0]
        if as_json:
            return json.dumps([{"token": t, "label": lab} for t, lab in pairs],
                              ensure_ascii=False)
        return "\n".join(f"{t}\t{lab}" for t, lab in pairs)
    vector = model.embed([text])[0]
    if as_json:
        return json.dumps({"embedding": [float(x) for x in vector]})
    return " ".join(f"{x:.6f}" for x in vector)


__all__ += ["run_task"]
