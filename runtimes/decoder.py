"""One decoder step at a time: an engine plus its KV cache, fed through IO binding.

`prefill` starts a batch (left padding), `append` feeds more tokens to every row (a decode step
is append of one token), `resume` continues a single conversation from the longest cached prefix,
`reorder` follows beam search. Each returns the last position's logits [rows, vocab]; after a
one-token step they are a view of a reused buffer, valid until the next step (copy to keep them).

The step's small host arrays (ids, mask, positions) are bound as they are; the cache tensors are
bound as raw buffers (see kv_cache). A one-token step writes its logits into a preallocated host
buffer too; a longer (prefill) step lets onnxruntime allocate them.

When the artifact has a static decode graph for the batch's row count (`flagc build
--decode-graphs`), one-token steps go through it instead (static_decode.py): fixed shapes and
addresses, replayed as a CUDA graph on GPUs; prefill and other batch sizes keep the dynamic graph.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flagc.errors import RuntimeInputError

from .kv_cache import KVCache, KVLayout
from .static_decode import StaticDecodeStep, host_greedy, static_graphs

__all__ = ["CachedDecoder", "left_pad", "positions_from_mask"]

_LOGITS = "logits"


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-align prompts in one [batch, longest] array; returns (ids, mask)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: each row counts its real tokens from 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


class CachedDecoder:
    """Runs an engine step by step over a KV cache that stays bound in place."""

    def __init__(self, engine, manifest: dict[str, Any], device: str = "cpu",
                 kernel_copies: bool = False, static_decode: bool = True):
        self.engine = engine
        self.layout = KVLayout.from_manifest(manifest)
        dims = manifest["dims"]
        self.cache = KVCache(self.layout, max_rows=int(dims["max_batch"]),
                             max_tokens=int(dims["max_seq"]), device=device,
                             kernel_copies=kernel_copies)
        self.vocab_size = int(manifest["vocab_size"])
        outs = {o["name"]: o for o in manifest["io"]["outputs"]}
        self._logits_dtype = np.dtype({"f16": np.float16, "bf16": np.float32}.get(
            outs[_LOGITS]["dtype"], np.float32)) if _LOGITS in outs else np.dtype(np.float32)
        self._binding = engine.binding()
        self._binding.output_alloc(_LOGITS)  # bound first: outputs()[0] is always the logits
        self._logits_buf = np.empty(0, dtype=self._logits_dtype)
        inputs = set(engine.input_names)
        self._has_positions = "position_ids" in inputs
        self.last_prefill = 0  # prompt tokens the last prefill/resume actually ran
        # Static decode graphs (one per batch size) take one-token steps when the batch fits.
        device = getattr(engine, "device", "cpu")
        use_static = static_decode and hasattr(engine, "folder")
        self._static_files = {greedy: static_graphs(manifest, device, greedy) if use_static
                              else {} for greedy in (False, True)}
        self._static: dict[tuple[int, bool, bool], Any] = {}  # (rows, dense, greedy) -> step
        # greedy steps whose screened LM head proved the pick / that ran the full head
        self.screen_stats = {"certified": 0, "full_head": 0}
        self.last_logits = self._no_logits  # the last append_greedy step's logits, on demand

    @staticmethod
    def _no_logits() -> np.ndarray:
        raise RuntimeInputError("last_logits: no append_greedy step has run")

    # ---- steps -------------------------------------------------------------------------------
    def static_step(self, rows: int, greedy: bool = False):
        """The static decode step already built for `rows` rows (the dense one when both
        exist), or None: for profiling its graph alone (StaticDecodeStep.replay)."""
        return self._static.get((rows, True, greedy)) or self._static.get((rows, False, greedy))

    def _prepare_static_step(self, rows: int, greedy: bool = False):
        """The static decode step for `rows` rows, or None when the artifact has none.
        greedy: its greedy variant (no logits; the screened LM head).

        The dense graph (rotary inside the attention, positions = slot indices) only when no
        row holds padding."""
        files = self._static_files[greedy]
        if not files:
            return None
        dense = (rows, True) in files and not self.cache.padded
        file = files.get((rows, dense))
        if file is None:
            return None
        key, cache = (rows, dense, greedy), self.cache
        step = self._static.get(key)
        if step is None or step.storage is not cache.storage:
            step = self._static[key] = StaticDecodeStep(
                self.engine, file, rows, cache, self.vocab_size, self._logits_dtype,
                dense=dense)
        return step

    def _run(self, ids: np.ndarray, valid: np.ndarray | None, greedy: bool = False,
             keep_logits: bool = True, suppress=()):
        """Logits [rows, vocab] of the last position; with `greedy`, (argmax token, its logit)
        per row instead, picked on the device when a static graph runs the step (without
        `keep_logits`, by the graph's greedy variant where there is one: no logits at all,
        and the `suppress`ed tokens never picked; other steps leave those to the caller)."""
        cache, b = self.cache, self._binding
        rows, s = ids.shape
        step = None
        if s == 1:
            step = (greedy and not keep_logits and self._prepare_static_step(rows, True)) \
                or self._prepare_static_step(rows)
        mask, pos = cache.begin_step(ids, valid, mask=step is None)
        if step is not None:
            if not step.has_logits:  # the greedy variant: suppression is the graph's
                step.suppress(suppress)
            step.run(ids, pos)
            cache.commit(ids, valid)
            if greedy:
                self.last_logits = lambda: step.logits()[:, -1, :]
                picks = step.greedy()
                certified = step.certified()
                if certified is not None:
                    self.screen_stats["certified" if certified else "full_head"] += 1
                return picks
            return step.logits()[:, -1, :]
        b.input_array("input_ids", ids)
        b.input_array("attention_mask", mask)
        if self._has_positions:
            b.input_array("position_ids", pos)
        cache.bind(b, s)
        if s == 1:
            need = rows * self.vocab_size
            if self._logits_buf.size < need:
                self._logits_buf = np.empty(cache.capacity_rows * self.vocab_size,
                                            dtype=self._logits_dtype)
            out = self._logits_buf[:need].reshape(rows, 1, self.vocab_size)
            b.output_buffer(_LOGITS, "cpu", 0, self._logits_dtype, out.shape, out.ctypes.data)
            self.engine.run_binding(b)
        else:
            b.output_alloc(_LOGITS)
            self.engine.run_binding(b)
            out = b.outputs()[0].numpy()
        cache.commit(ids, valid)
        if greedy:
            last = out[:, -1, :]
            self.last_logits = lambda: last
            return host_greedy(last)
        return out[:, -1, :]

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int, reserve: int,
                rows: int | None = None) -> np.ndarray:
        """Start a batch from token-id prompts; `reserve` slots (prompt + new tokens) per row.

        `rows` reserves more rows than prompts (beam search expands after this step).
        """
        ids, mask = left_pad(prompts, pad_id)
        self.cache.reset(len(prompts), reserve, rows or 0)
        self.last_prefill = int(mask.sum())
        return self._run(ids, mask)

    def append(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [rows, s] (or [rows] for one token each) to every row."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[:, None]
        return self._run(ids, None)

    def append_greedy(self, ids: np.ndarray, keep_logits: bool = True, suppress=()
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Like `append`, but return each row's argmax token (int64 [rows], first maximum) and
        its logit (float32 [rows]) instead of the logits: static decode graphs pick on the
        device, so no vocab-wide row crosses to the host. With `keep_logits`, `last_logits()`
        returns the step's logits [rows, vocab] (copied then) until the next step; without,
        the greedy graph variant may run, which screens the LM head, computes no logits and
        never picks a token of `suppress` (other steps may: the caller redoes those picks on
        `last_logits()`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[:, None]
        return self._run(ids, None, greedy=True, keep_logits=keep_logits, suppress=suppress)

    def resume(self, prompt: Sequence[int], reserve: int) -> tuple[np.ndarray, int]:
        """Continue a one-row conversation whose full token ids are now `prompt`.

        Keeps the longest cached prefix of `prompt` (at least one token is always fed, since the
        step must produce logits), trims the rest of the cache and prefills what is new.
        Returns (logits [1, vocab], number of tokens prefilled).
        """
        cache = self.cache
        if cache.rows != 1 or cache.length == 0:
            return self.prefill([prompt], 0, reserve), len(prompt)
        held = cache.row_tokens(0)
        if len(held) != cache.length:  # padding slots: not a plain conversation
            return self.prefill([prompt], 0, reserve), len(prompt)
        keep = _common_prefix(held, prompt)
        keep = min(keep, len(prompt) - 1)
        cache.trim(keep)
        cache.reserve(1, reserve)
        self.last_prefill = len(prompt) - keep
        return self.append(np.asarray(prompt[keep:], dtype=np.int64)[None, :]), len(prompt) - keep

    def reorder(self, rows: np.ndarray) -> None:
        self.cache.reorder(rows)

    def reset(self) -> None:
        """Forget the cached conversation (the buffers are kept)."""
        self.cache.rows = self.cache.length = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def check_prompts(prompts: Sequence[Sequence[int]], max_seq: int, vocab_size: int) -> None:
    """Reject empty prompts, ids outside the vocabulary and prompts over the context limit."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    for row, p in enumerate(prompts):
        if len(p) > max_seq:
            which = f" (prompt {row} of the batch)" if len(prompts) > 1 else ""
            raise RuntimeInputError(f"prompt of {len(p)} tokens is longer than the artifact's max "
                                    f"sequence length {max_seq}{which}; shorten it or rebuild "
                                    "with a larger --max-seq")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise RuntimeInputError(f"prompt {row} holds token id {bad[0]} outside the "
                                    f"vocabulary [0, {vocab_size})")
