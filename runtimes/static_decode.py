"""Decode steps through a static-shape graph (flagc/lower/onnx_static.py), as CUDA graphs on GPU.

One `StaticDecodeStep` per batch size and variant the artifact has a graph for (the dense
variant, rotary inside the attention, serves batches without padding). Its small inputs (ids,
positions, the max_seq-wide mask, the cache length) live in device buffers allocated once and
overwritten before each step; the logits land in a device buffer too; the KV cache is bound to
the cache's shared buffers. The graphs also return the greedy pick (argmax token and its logit)
and the next cache length: greedy decoding copies 12 bytes per row back instead of the logits,
and nothing forward, because the pick and the length are written into a second pair of
input buffers that the next step reads (the two pairs alternate, each with its own binding).
Every address is therefore the same on every step, which is what lets onnxruntime record the
step once as a CUDA graph and replay it: one launch instead of hundreds of kernel dispatches
from the host.

The cache has two arenas (kv_cache.py) and beam search or a rolled-back conversation moves it
from one to the other, so each arena and input pair gets its own binding and its own captured
graph (onnxruntime's `gpu_graph_id`). A step is tied to one cache storage: when the cache
reallocates (more rows), the decoder makes a new step.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.lower.onnx_greedy_screen import GREEDY_BIAS, GREEDY_CERTIFIED
from flagc.lower.onnx_static import GREEDY_LOGIT, GREEDY_TOKEN, NEXT_CACHE_LENGTH

from .kv_cache import KVCache
from .ort_engine import OrtEngine

__all__ = ["StaticDecodeStep", "static_graphs", "host_greedy"]


def static_graphs(manifest: dict[str, Any], device: str = "cpu",
                  greedy: bool = False) -> dict[tuple[int, bool], str]:
    """{(batch, dense): ONNX file} of the artifact's static decode graphs that run on `device`
    (empty when none). dense graphs are for batches without padding (flagc/lower/onnx_static.py).
    greedy: the greedy variants instead (the LM head screened at 8 bits, no logits out:
    flagc/lower/onnx_greedy_screen.py), for the device they were built for.
    Graphs built on flagc's kernels for another device (`--kernels flagc`: its CUDA products)
    are left out, with a warning: their steps then go through the dynamic graph."""
    info = manifest.get("static_decode") or {}
    kinds = ("graphs", "dense_graphs")
    if greedy:
        if (info.get("greedy_screen") or {}).get("device") != device:
            return {}
        kinds = ("greedy_graphs", "greedy_dense_graphs")
    out = {(int(b), False): f for b, f in info.get(kinds[0], {}).items()}
    out.update({(int(b), True): f for b, f in info.get(kinds[1], {}).items()})
    custom = manifest.get("custom_ops") or {}
    if custom and custom.get("device") != device:
        skipped = sorted(f for f in out.values() if f in custom["files"])
        if skipped:
            warnings.warn(f"{', '.join(skipped)}: built with flagc's {custom.get('device')} "
                          f"kernels (--kernels flagc), not for {device}; those decode steps go "
                          "through the dynamic graph", RuntimeWarning, stacklevel=3)
        out = {k: f for k, f in out.items() if f not in custom["files"]}
    return out


def host_greedy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The greedy pick on the host: per row of logits [rows, vocab], the argmax token (first
    maximum, as the graphs' ArgMax) and its logit as float32."""
    x = np.asarray(logits, dtype=np.float32)
    tokens = x.argmax(axis=-1)
    return tokens, x[np.arange(len(tokens)), tokens]


class StaticDecodeStep:
    """One-token decode steps for exactly `batch` rows over `cache`'s shared buffers."""

    def __init__(self, engine: OrtEngine, file: str, batch: int, cache: KVCache,
                 vocab_size: int, logits_dtype: np.dtype, dense: bool = False):
        """dense: the no-padding graph, whose attention reads neither the mask nor the
        positions (it rotates by slot index), so those two device buffers are not refreshed."""
        import onnxruntime as ort

        if not cache.shared:
            raise RuntimeInputError("a static decode graph needs the KV cache's shared buffers "
                                    "(manifest kv_cache.shared_buffer)")
        self.batch, self.cache, self.storage = batch, cache, cache.storage
        self.device, self.parent, self.dense = engine.device, engine, dense
        self.engine = OrtEngine(engine.folder, engine.manifest, engine.device, engine.threads,
                                engine_file=file, cuda_graph=engine.device == "cuda")
        width = cache.capacity_tokens

        def buffer(shape, dtype):
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)

        # Two (ids, length) pairs: a step reads pair p and, when the graph feeds itself,
        # writes its pick and the next length into pair 1 - p.
        self._ids = [buffer((batch, 1), np.int64) for _ in range(2)]
        self._length = [buffer((batch,), np.int32) for _ in range(2)]
        self._pos = buffer((batch, 1), np.int64)
        self._mask = buffer((batch, width), np.int64)
        self._length_host = np.zeros(batch, np.int32)  # refilled in place: no array per step
        types = {o.name: o.type for o in self.engine.session.get_outputs()}
        if types.get("logits") == "tensor(float)":  # graphs with the greedy outputs
            logits_dtype = np.dtype(np.float32)
        # greedy variants (screened LM head) have no logits, and say whether the screen
        # proved the pick or the full head ran
        self.has_logits = "logits" in types
        self._logits = buffer((batch, 1, vocab_size), logits_dtype) if self.has_logits else None
        self.has_greedy = {GREEDY_TOKEN, GREEDY_LOGIT, NEXT_CACHE_LENGTH} <= set(types)
        if self.has_greedy:
            self._token_logit = buffer((batch, 1, 1), np.float32)
        self._certified = buffer((), np.bool_) if GREEDY_CERTIFIED in types else None
        inputs = {i.name for i in self.engine.session.get_inputs()}
        self._bias = buffer((batch, 1, vocab_size), np.float32) if GREEDY_BIAS in inputs \
            else None
        self._suppressed: tuple[int, ...] = ()  # the tokens the bias holds at -inf
        self._parity = 0  # the pair the next step reads
        self._held_ids: np.ndarray | None = None  # what that pair holds, when known
        self._held_length = -1
        self._bindings: dict[tuple[int, int], Any] = {}  # (arena, parity) -> binding
        self._options: dict[tuple[int, int], Any] = {}  # ... -> RunOptions naming its graph
        self._ort = ort

    def _binding(self, arena: int, parity: int):
        key = (arena, parity)
        b = self._bindings.get(key)
        if b is None:
            b = self._bindings[key] = self.engine.binding()
            b.input_value("input_ids", self._ids[parity])
            b.input_value("position_ids", self._pos)
            b.input_value("attention_mask", self._mask)
            b.input_value("cache_length", self._length[parity])
            if self.has_logits:
                b.output_value("logits", self._logits)
            if self._certified is not None:
                b.output_value(GREEDY_CERTIFIED, self._certified)
            if self._bias is not None:
                b.input_value(GREEDY_BIAS, self._bias)
            if self.has_greedy:
                b.output_value(GREEDY_TOKEN, self._ids[1 - parity])
                b.output_value(NEXT_CACHE_LENGTH, self._length[1 - parity])
                b.output_value(GREEDY_LOGIT, self._token_logit)
            self.cache.bind(b, 1)
            opts = self._ort.RunOptions()
            if self.device == "cuda":
                opts.add_run_config_entry("gpu_graph_id", str(1 + 2 * arena + parity))
            self._options[key] = opts
        return b

    def suppress(self, tokens) -> None:
        """Keep `tokens` from being picked by the next steps (greedy graphs: their bias input;
        every row). Refreshes the device buffer only when the set changes."""
        tokens = tuple(sorted(int(t) for t in tokens))
        if tokens == self._suppressed:
            return
        if self._bias is None:
            raise RuntimeInputError("this decode graph cannot suppress tokens (no greedy bias "
                                    "input); suppress them on its logits")
        bias = np.zeros(self._bias.shape(), np.float32)
        bias[..., list(tokens)] = -np.inf
        self._bias.update_inplace(bias)
        self._suppressed = tokens

    def run(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Feed ids [batch, 1] at `positions` [batch, 1]; the cache's mask already marks the
        new slot (KVCache.begin_step). The results stay on the device until `logits()` or
        `greedy()` reads them."""
        cache = self.cache
        if cache.storage is not self.storage or cache.rows != self.batch:
            raise RuntimeInputError("static decode step used with a reallocated KV cache")
        # Each refresh is a synchronous host-to-device copy: only what the graph reads and
        # the device does not hold already (a greedy step's own pick and length).
        p = self._parity
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self._held_ids is None or not np.array_equal(ids, self._held_ids):
            self._ids[p].update_inplace(ids)
        if self._held_length != cache.length:
            self._length_host.fill(cache.length)
            self._length[p].update_inplace(self._length_host)
        if not self.dense:
            self._pos.update_inplace(np.ascontiguousarray(positions, dtype=np.int64))
            self._mask.update_inplace(np.ascontiguousarray(cache.mask[: self.batch]))
        arena = cache.arena
        binding = self._binding(arena, p)
        before = self.engine.run_seconds
        self.engine.run_binding(binding, self._options[(arena, p)])
        # The generation loop's overhead report counts time inside the engine's runs.
        self.parent.run_seconds += self.engine.run_seconds - before
        self.parent.run_calls += 1
        if self.has_greedy:  # the other pair now holds the pick (unread) and length + 1
            self._parity, self._held_ids, self._held_length = 1 - p, None, cache.length + 1
        else:
            self._held_ids, self._held_length = ids.copy(), cache.length

    def logits(self) -> np.ndarray:
        """The last step's logits [batch, 1, vocab], copied to the host."""
        if not self.has_logits:
            raise RuntimeInputError("this greedy decode step screens the LM head and has no "
                                    "logits; ask for them (append_greedy(..., keep_logits="
                                    "True)) before the step")
        return self._logits.numpy()

    def certified(self) -> bool | None:
        """Whether the last step's screen proved its pick (False: the full head ran); None
        for graphs without a screen."""
        return None if self._certified is None else bool(self._certified.numpy())

    def greedy(self) -> tuple[np.ndarray, np.ndarray]:
        """The last step's argmax token per row (int64 [batch]) and its logit (float32 [batch]),
        picked on the device; from the host copy of the logits for graphs without the outputs."""
        if self.has_greedy:  # copies: on the CPU numpy() views a buffer a later step fills
            picks = self._ids[self._parity].numpy().copy()
            self._held_ids = picks
            return picks.reshape(-1).copy(), self._token_logit.numpy().reshape(-1).copy()
        return host_greedy(self._logits.numpy()[:, -1, :])

    def replay(self) -> None:
        """Run the step again on its bound buffers as they are (no input refresh, no readback):
        the graph's own time, for profiling."""
        # The pair the last step read: same inputs, so the same outputs are written again.
        key = (self.cache.arena, 1 - self._parity if self.has_greedy else self._parity)
        self.engine.run_binding(self._binding(*key), self._options[key])
