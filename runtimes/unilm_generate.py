"""FlagAI's BERT / RoBERTa seq2seq (UniLM) title generation over a `unilm` artifact.

The source ([CLS] text [SEP], token type 0) runs once; its last position predicts the first
title token. Each generated token is fed with token type 1 against the KV cache, seeing the
source and the earlier title tokens, until [SEP]. Greedy / sampled decoding uses the Sampler,
beam search (FlagAI's default for titles) the transformers-identical BeamSearch. Sources run one
at a time: BERT numbers positions from the cache length, so right padding would shift them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.runtimes.generate import GenerationResult
from flagc.runtimes.sampling import Sampler, SamplingParams

__all__ = ["UniLMGenerator"]


class UniLMGenerator:
    def __init__(self, engine, manifest: Mapping[str, Any]):
        self.engine = engine
        kv = manifest["kv_cache"]
        self.layers, self.heads, self.head_dim = kv["layers"], kv["kv_heads"], kv["head_dim"]
        self.vocab_size = int(manifest["vocab_size"])
        self.pad_id = int(manifest.get("zoo", {}).get("pad_token_id") or 0)

    def _run(self, ids: np.ndarray, types: np.ndarray, total: int, past) -> tuple:
        feeds = {"input_ids": ids, "token_type_ids": types,
                 "attention_mask": np.ones((ids.shape[0], total), np.int64)}
        for i in range(self.layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = past[f"{i}.{kind}"]
        out = self.engine.run(feeds)
        presents = {k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        return out["logits"][:, -1, :], presents

    def generate_one(self, source: Sequence[int], params: SamplingParams,
                     eos_token_ids: Sequence[int], decode: Callable | None = None,
                     ) -> GenerationResult:
        if not source:
            raise RuntimeInputError("the source needs at least one token")
        t0 = time.perf_counter()
        beams = params.num_beams
        ids = np.asarray([source], np.int64)
        empty = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
        past = {f"{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}
        logits, past = self._run(ids, np.zeros_like(ids), ids.shape[1], past)
        total = ids.shape[1]
        eos = set(int(e) for e in eos_token_ids)
        if beams > 1:
            from flagc.runtimes.beam_search import BeamSearch, log_softmax

            search = BeamSearch(1, beams, eos_token_ids, length_penalty=params.length_penalty,
                                early_stopping=params.early_stopping,
                                max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_id)
            past = {k: np.repeat(v, beams, axis=0) for k, v in past.items()}
            logits = np.repeat(logits, beams, axis=0)
            for _ in range(params.max_new_tokens):
                tokens, order, done = search.step(log_softmax(logits))
                if done:
                    break
                past = {k: v[order] for k, v in past.items()}
                total += 1
                step = tokens.reshape(-1, 1)
                logits, past = self._run(step, np.ones_like(step), total, past)
            generated = [t for t in search.finalize()[0][0] if t not in eos]
            reason = "stop"
        else:
            sampler = Sampler(params, self.vocab_size, eos_token_ids)
            sampler.begin([list(source)])
            generated, reason = [], "length"
            for _ in range(params.max_new_tokens):
                token = int(sampler.step(logits)[0])
                if token in eos:
                    reason = "stop"
                    break
                generated.append(token)
                total += 1
                step = np.asarray([[token]], np.int64)
                logits, past = self._run(step, np.ones_like(step), total, past)
        return GenerationResult(token_ids=generated, text=decode(generated) if decode else None,
                                finish_reason=reason, prompt_tokens=len(source),
                                timings={"total_s": time.perf_counter() - t0})
