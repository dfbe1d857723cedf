"""The decoder generation loop: left-padded batches, KV cache carried between steps, sampling,
stop tokens/strings and streaming.

Position ids come from the attention mask (cumsum - 1), so a left-padded row computes exactly what
it would alone. The cache is the engine's `present.*` outputs fed back as the next `past_*`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.runtimes.sampling import Sampler, SamplingParams
from flagc.runtimes.stopping import StopChecker

__all__ = ["GenerationResult", "generate_tokens", "KVLayout"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: Optional[str]
    finish_reason: str  # "stop" (stop token or string) | "length"
    prompt_tokens: int
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @staticmethod
    def from_manifest(manifest: dict[str, Any]) -> "KVLayout":
        kv = manifest["kv_cache"]
        return KVLayout(kv["layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"])

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        out = {}
        for i in range(self.layers):
            out[f"past_key_values.{i}.key"] = np.zeros(shape, dtype=self.dtype)
            out[f"past_key_values.{i}.value"] = np.zeros(shape, dtype=self.dtype)
        return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def generate_tokens(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                    layout: KVLayout, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    *, vocab_size: int, max_seq: int, eos_token_ids: Sequence[int] = (),
                    pad_id: int = 0, decode: Callable | None = None,
                    on_text: Callable[[int, str], None] | None = None,
                    ) -> list[GenerationResult]:
    """Generate for a batch of token-id prompts; `run(feeds) -> outputs` is the engine."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest > max_seq:
        raise RuntimeInputError(f"prompt of {longest} tokens is longer than the artifact's "
                                f"max sequence length {max_seq} (rebuild with a larger --max-seq)")
    budget = min(params.max_new_tokens, max_seq - longest)
    if budget < 1:
        raise RuntimeInputError(f"prompt of {longest} tokens leaves no room to generate within "
                                f"max sequence length {max_seq}")
    batch = len(prompts)
    sampler = Sampler(params, vocab_size, eos_token_ids)
    sampler.begin(prompts)
    stops = StopChecker(tuple(eos_token_ids) + tuple(params.stop_token_ids), params.stop_strings,
                        decode)
    stops.begin(batch)
    ids, mask = left_pad(prompts, pad_id)
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask,
                                    "position_ids": positions_from_mask(mask)}
    feeds.update(layout.empty(batch))
    generated: list[list[int]] = [[] for _ in range(batch)]
    start = time.perf_counter()
    token_times: list[float] = []
    for step in range(budget):
        out = run(feeds)
        tokens = sampler.step(out["logits"][:, -1, :])
        token_times.append(time.perf_counter() - start)
        was_stopped = stops.stopped.copy()
        now_stopped = stops.update(tokens)
        for row in np.flatnonzero(~was_stopped):
            if not (now_stopped[row] and stops.reason(int(row)) == "stop_token"):
                generated[row].append(int(tokens[row]))
        if on_text is not None:
            for row in np.flatnonzero(~was_stopped):
                piece = stops.pop_text(int(row))
                if piece:
                    on_text(int(row), piece)
        if now_stopped.all() or step == budget - 1:
            break
        last_pos = feeds["position_ids"][:, -1:]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": tokens.reshape(batch, 1).astype(np.int64),
                 "attention_mask": mask, "position_ids": last_pos + 1}
        for i in range(layout.layers):
            feeds[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
            feeds[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    results = []
    for row in range(batch):
        stopped = bool(stops.stopped[row])
        if not stopped:
            stops.finish(row)
        if on_text is not None:
            rest = stops.pop_text(row)
            if rest:
                on_text(row, rest)
        text = stops.text(row) if decode is not None else None
        results.append(GenerationResult(
            token_ids=generated[row], text=text,
            finish_reason="stop" if stopped else "length", prompt_tokens=len(prompts[row]),
            timings={"prefill_s": token_times[0] if token_times else 0.0,
                     "token_times_s": list(token_times)}))
    return results
