"""A loaded artifact: engine + tokenizer + manifest, with `forward` and `generate`."""

from __future__ import annotations

from typing import Any

import numpy as np

from flagc.artifact import read_manifest
from flagc.errors import ArtifactError, RuntimeInputError
from flagc.runtimes.generate import generate_tokens
from flagc.runtimes.kv_cache import KVLayout
from flagc.runtimes.decoder import positions_from_mask
from flagc.runtimes.sampling import SamplingParams

__all__ = ["LoadedModel", "load_artifact"]


def load_artifact(path: str, device: str = "cpu", threads: int | None = None,
                  static_decode: bool = True) -> "LoadedModel":
    folder, manifest = read_manifest(path)
    backend = manifest["target"].get("backend")
    if backend == "tensorrt":
        from flagc.runtimes.trt_engine import TrtEngine

        return LoadedModel(folder, manifest, TrtEngine(folder, manifest, device, threads))
    if backend != "onnxruntime":
        raise ArtifactError(f"{folder}: backend {backend!r} is not supported by this runtime")
    from flagc.runtimes.ort_engine import OrtEngine

    return LoadedModel(folder, manifest, OrtEngine(folder, manifest, device, threads),
                       static_decode=static_decode)


class LoadedModel:
    def __init__(self, folder: str, manifest: dict[str, Any], engine,
                 static_decode: bool = True):
        self.folder = folder
        self.manifest = manifest
        self.engine = engine
        self._tokenizer = None
        self._decoder = None
        self.static_decode = static_decode  # use the artifact's static decode graphs if any

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.manifest.get("tokenizer"):
                raise RuntimeInputError(f"{self.folder}: the artifact has no tokenizer (its source "
                                        "had none); pass token ids instead of text")
            from flagc.runtimes.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.folder)
        return self._tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return bool(self.manifest.get("tokenizer"))

    @property
    def decoder(self):
        """The engine stepped over its KV cache (buffers kept between calls)."""
        if self._decoder is None:
            from flagc.runtimes.decoder import CachedDecoder

            self._decoder = CachedDecoder(self.engine, self.manifest,
                                          getattr(self.engine, "device", "cpu"),
                                          static_decode=self.static_decode)
        return self._decoder

    def _seq2seq(self):
        from flagc.runtimes.ort_engine import OrtEngine
        from flagc.runtimes.seq2seq import Seq2SeqGenerator

        if self.manifest["target"].get("backend") == "tensorrt":
            from flagc.runtimes.trt_engine import TrtEngine

            enc = TrtEngine(self.folder, self.manifest, device=f"cuda:{self.engine.device_id}",
                            role="encoder")
        else:
            enc = OrtEngine(self.folder, {**self.manifest,
                                          "engine": self.manifest["encoder"]["engine"]},
                            getattr(self.engine, "device", "cpu"))
        return Seq2SeqGenerator(enc, self.engine, self.manifest)

    @property
    def max_seq(self) -> int:
        return int(self.manifest["dims"]["max_seq"])

    # ---- full-sequence forward ---------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None) -> dict[str, np.ndarray]:
        """Full-sequence outputs (no cache): `logits` [batch, seq, vocab] as numpy."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise RuntimeInputError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        if ids.shape[1] > self.max_seq:
            raise RuntimeInputError(f"input of {ids.shape[1]} tokens exceeds the artifact's max "
                                    f"sequence length {self.max_seq}")
        mask = np.ones_like(ids) if attention_mask is None else \
            np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        names = set(self.engine.input_names)
        if "position_ids" in names:
            feeds["position_ids"] = positions_from_mask(mask)
        if "kv_cache" in self.manifest and self.manifest["kv_cache"]:
            feeds.update(KVLayout.from_manifest(self.manifest).empty(ids.shape[0]))
        outs = [n for n in self.engine.output_names if not n.startswith("present.")]
        return self.engine.run({k: v for k, v in feeds.items() if k in names}, outs)

    # ---- encoder tasks (flagc.runtimes.encoder) ------------------------------------------------
    def embed(self, texts) -> np.ndarray:
        """Sentence vectors [n, d] with the model's pooling (sentence-transformers config)."""
        from flagc.runtimes.encoder import Encoder

        return Encoder(self).embed(texts)

    def classify(self, texts, pairs=None) -> list[dict[str, Any]]:
        """One {label, id, score} per text (or per sentence pair, for semantic matching)."""
        from flagc.runtimes.encoder import Encoder

        return Encoder(self).classify(texts, pairs)

    def label(self, texts) -> list[list[tuple[str, str]]]:
        """Per-token (token, label) for each text (NER / sequence labeling)."""
        from flagc.runtimes.encoder import Encoder

        return Encoder(self).label(texts)

    # ---- generation --------------------------------------------------------------------------
    def _prompt_ids(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            tok = self.tokenizer
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True)
                return tok.encode(text, add_special_tokens=False)
            return tok.encode(prompt)
        ids = [int(t) for t in prompt]
        return ids

    def generate(self, prompt_or_ids, *, chat: bool = False, stream=None, resume: bool = False,
                 glm_tokens=None, **sampling):
        """Generate from one prompt (text or token ids) or a list of them.

        Sampling and beam options are keywords (max_new_tokens, temperature, top_k, top_p, seed,
        repetition_penalty, stop_strings, num_beams, length_penalty, early_stopping, ...; see
        SamplingParams). `resume` continues the conversation held in the KV cache: only the
        tokens after the longest cached prefix of the (single) prompt are run.
        Returns a GenerationResult, or a list of them when given a list of prompts.
        GLM artifacts fill the prompt's blank; `glm_tokens` overrides the special token ids
        their tokenizer would give ({'mask': [...], 'gmask', 'sop', 'eop'}).
        """
        single = isinstance(prompt_or_ids, str) or (
            len(prompt_or_ids) > 0 and isinstance(prompt_or_ids[0], (int, np.integer)))
        prompts = [prompt_or_ids] if single else list(prompt_or_ids)
        defaults = dict(self.manifest.get("generation", {}).get("defaults", {}))
        defaults.update(sampling)
        params = SamplingParams.from_kwargs(**defaults)
        ids = [self._prompt_ids(p, chat) for p in prompts]
        gen = self.manifest.get("generation", {})
        decode = self.tokenizer.decode if self.has_tokenizer else None
        if "encoder" in self.manifest:  # encoder-decoder (T5): flagc.runtimes.seq2seq
            results = self._seq2seq().generate(ids, params, gen.get("eos_token_ids", []), decode)
            return results[0] if single else results
        kind = self.manifest.get("zoo", {}).get("kind")
        if kind == "glm":  # flagc.runtimes.glm_generate
            from flagc.runtimes.glm_generate import GLMGenerator

            tokens = glm_tokens or GLMGenerator.special_ids(self.tokenizer)
            glm = GLMGenerator(self.engine, self.manifest)
            results = [glm.generate_one(p, params, tokens, decode) for p in ids]
            return results[0] if single else results
        if kind == "unilm":  # BERT title generation: flagc.runtimes.unilm_generate
            from flagc.runtimes.unilm_generate import UniLMGenerator

            eos = list(gen.get("eos_token_ids", [])) + list(params.stop_token_ids)
            unilm = UniLMGenerator(self.engine, self.manifest)
            results = [unilm.generate_one(p, params, eos, decode) for p in ids]
            return results[0] if single else results
        on_text = None
        if stream is not None:
            on_text = (lambda row, piece: stream(piece)) if single else stream
        self.engine.run_seconds, self.engine.run_calls = 0.0, 0
        results = generate_tokens(
            self.decoder, ids, params, max_seq=self.max_seq,
            eos_token_ids=gen.get("eos_token_ids", []), pad_id=int(gen.get("pad_token_id") or 0),
            decode=decode, on_text=on_text, resume=resume)
        for r in results:
            r.timings["session_run_s"] = self.engine.run_seconds
            r.timings["session_runs"] = self.engine.run_calls
        return results[0] if single else results
