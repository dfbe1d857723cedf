"""Encoder-decoder generation (T5 title generation) over an artifact's two engines.

The encoder engine (`encoder.onnx`) runs once per batch of sources and returns the hidden states
and, per decoder layer, the cross-attention K/V; the decoder engine (`model.onnx`) then steps
from the decoder start token with its self-attention cache (`past_key_values.*` in, `present.*`
out). Greedy and sampled decoding use the Sampler, beam search (num_beams > 1) the
transformers-identical BeamSearch, reordering the cache by the returned beam indices.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.runtimes.generate import GenerationResult
from flagc.runtimes.sampling import Sampler, SamplingParams

__all__ = ["Seq2SeqGenerator"]


class Seq2SeqGenerator:
    """Generation with `encoder` and `decoder` engines (each `run(feeds, outputs) -> dict`)."""

    def __init__(self, encoder, decoder, manifest: dict[str, Any]):
        self.encoder, self.decoder = encoder, decoder
        self.manifest = manifest
        zoo = manifest.get("zoo", {})
        kv = manifest["kv_cache"]
        self.layers, self.heads, self.head_dim = kv["layers"], kv["kv_heads"], kv["head_dim"]
        self.start_id = int(zoo.get("decoder_start_token_id") or 0)
        self.pad_id = int(zoo.get("pad_token_id") or 0)
        self.vocab_size = int(manifest["vocab_size"])

    def encode(self, sources: Sequence[Sequence[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Right-pad the sources and run the encoder; returns (outputs, attention mask)."""
        if not sources or any(len(s) == 0 for s in sources):
            raise RuntimeInputError("every source needs at least one token")
        width = max(len(s) for s in sources)
        ids = np.full((len(sources), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, s in enumerate(sources):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        return self.encoder.run({"input_ids": ids, "attention_mask": mask}), mask

    def _feeds(self, tokens, mask, cross, past) -> dict[str, np.ndarray]:
        feeds = {"decoder_input_ids": tokens.reshape(-1, 1).astype(np.int64),
                 "encoder_attention_mask": mask}
        for i in range(self.layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = past[f"{i}.{kind}"]
                feeds[f"cross.{i}.{kind}"] = cross[f"cross.{i}.{kind}"]
        return feeds

    def _empty_past(self, rows: int) -> dict[str, np.ndarray]:
        shape = (rows, self.heads, 0, self.head_dim)
        return {f"{i}.{k}": np.zeros(shape, np.float32) for i in range(self.layers)
                for k in ("key", "value")}

    def generate(self, sources: Sequence[Sequence[int]], params: SamplingParams,
                 eos_token_ids: Sequence[int], decode: Callable | None = None,
                 ) -> list[GenerationResult]:
        t0 = time.perf_counter()
        enc, mask = self.encode(sources)
        beams = params.num_beams
        cross = {k: v for k, v in enc.items() if k.startswith("cross.")}
        if beams > 1:  # every beam reads its item's encoder output
            cross = {k: np.repeat(v, beams, axis=0) for k, v in cross.items()}
            mask = np.repeat(mask, beams, axis=0)
        rows = mask.shape[0]
        tokens = np.full(rows, self.start_id, dtype=np.int64)
        past = self._empty_past(rows)
        search = self._search(len(sources), params, eos_token_ids)
        generated: list[list[int]] = [[] for _ in range(rows)]
        done = np.zeros(rows, dtype=bool)
        eos = set(int(e) for e in eos_token_ids)
        for _ in range(params.max_new_tokens):
            out = self.decoder.run(self._feeds(tokens, mask, cross, past))
            logits = out["logits"][:, -1, :]
            past = {k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
            if beams > 1:
                from flagc.runtimes.beam_search import log_softmax

                tokens, order, finished = search.step(log_softmax(logits))
                past = {k: v[order] for k, v in past.items()}
                if finished:
                    break
                continue
            tokens = search.step(logits)
            for row in np.flatnonzero(~done):
                if int(tokens[row]) in eos:
                    done[row] = True
                else:
                    generated[row].append(int(tokens[row]))
            if done.all():
                break
        if beams > 1:
            generated = [hyps[0] for hyps in search.finalize()]
            generated = [[t for t in g if t not in eos] for g in generated]
        elapsed = time.perf_counter() - t0
        results = []
        for row, src in enumerate(sources):
            ids = generated[row]
            finished = beams > 1 or bool(done[row])
            results.append(GenerationResult(
                token_ids=ids, text=decode(ids) if decode else None,
                finish_reason="stop" if finished else "length", prompt_tokens=len(src),
                timings={"total_s": elapsed}))
        return results

    def _search(self, batch: int, params: SamplingParams, eos_token_ids):
        if params.num_beams > 1:
            from flagc.runtimes.beam_search import BeamSearch

            return BeamSearch(batch, params.num_beams, eos_token_ids,
                              length_penalty=params.length_penalty,
                              early_stopping=params.early_stopping,
                              max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_id)
        sampler = Sampler(params, self.vocab_size, eos_token_ids)
        sampler.begin([[] for _ in range(batch)])
        return sampler
