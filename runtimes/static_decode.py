"""Decode steps through a static-shape graph (flagc/lower/onnx_static.py), as CUDA graphs on GPU.

One `StaticDecodeStep` per batch size and variant the artifact has a graph for (the dense
variant, rotary inside the attention, serves batches without padding). Its small inputs (ids,
positions, the max_seq-wide mask, the cache length) live in device buffers allocated once and
overwritten before each step; the logits land in a device buffer too; the KV cache is bound to
the cache's shared buffers. The graphs also return the greedy pick (argmax token and its logit):
greedy decoding copies those 16 bytes per row back instead of the logits. Every address is therefore the same on every step, which is what lets
onnxruntime record the step once as a CUDA graph and replay it: one launch instead of hundreds
of kernel dispatches from the host.

The cache has two arenas (kv_cache.py) and beam search or a rolled-back conversation moves it
from one to the other, so each arena gets its own binding and its own captured graph
(onnxruntime's `gpu_graph_id`). A step is tied to one cache storage: when the cache reallocates
(more rows), the decoder makes a new step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.lower.onnx_static import GREEDY_LOGIT, GREEDY_TOKEN

from .kv_cache import KVCache
from .ort_engine import OrtEngine

__all__ = ["StaticDecodeStep", "static_graphs"]


def static_graphs(manifest: dict[str, Any]) -> dict[tuple[int, bool], str]:
    """{(batch, dense): ONNX file} of the artifact's static decode graphs (empty when none).

    dense graphs are for batches without padding (flagc/lower/onnx_static.py)."""
    info = manifest.get("static_decode") or {}
    out = {(int(b), False): f for b, f in info.get("graphs", {}).items()}
    out.update({(int(b), True): f for b, f in info.get("dense_graphs", {}).items()})
    return out


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

        self._ids = buffer((batch, 1), np.int64)
        self._pos = buffer((batch, 1), np.int64)
        self._mask = buffer((batch, width), np.int64)
        self._length = buffer((batch,), np.int32)
        self._length_host = np.zeros(batch, np.int32)  # refilled in place: no array per step
        # Graphs written since the greedy outputs were added return float32 logits.
        types = {o.name: o.type for o in self.engine.session.get_outputs()}
        if types.get("logits") == "tensor(float)":
            logits_dtype = np.dtype(np.float32)
        self._logits = buffer((batch, 1, vocab_size), logits_dtype)
        self.has_greedy = GREEDY_TOKEN in types and GREEDY_LOGIT in types
        if self.has_greedy:
            self._token = buffer((batch, 1, 1), np.int64)
            self._token_logit = buffer((batch, 1, 1), np.float32)
        self._bindings: dict[int, Any] = {}  # arena -> binding
        self._options: dict[int, Any] = {}  # arena -> RunOptions naming its CUDA graph
        self._ort = ort

    def _binding(self, arena: int):
        b = self._bindings.get(arena)
        if b is None:
            b = self._bindings[arena] = self.engine.binding()
            b.input_value("input_ids", self._ids)
            b.input_value("position_ids", self._pos)
            b.input_value("attention_mask", self._mask)
            b.input_value("cache_length", self._length)
            b.output_value("logits", self._logits)
            if self.has_greedy:
                b.output_value(GREEDY_TOKEN, self._token)
                b.output_value(GREEDY_LOGIT, self._token_logit)
            self.cache.bind(b, 1)
            opts = self._ort.RunOptions()
            if self.device == "cuda":
                opts.add_run_config_entry("gpu_graph_id", str(arena + 1))
            self._options[arena] = opts
        return b

    def run(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Feed ids [batch, 1] at `positions` [batch, 1]; the cache's mask already marks the
        new slot (KVCache.begin_step). The results stay on the device until `logits()` or
        `greedy()` reads them."""
        cache = self.cache
        if cache.storage is not self.storage or cache.rows != self.batch:
            raise RuntimeInputError("static decode step used with a reallocated KV cache")
        # Each refresh is a synchronous host-to-device copy: only what the graph reads.
        self._ids.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        if not self.dense:
            self._pos.update_inplace(np.ascontiguousarray(positions, dtype=np.int64))
            self._mask.update_inplace(np.ascontiguousarray(cache.mask[: self.batch]))
        self._length_host.fill(cache.length)
        self._length.update_inplace(self._length_host)
        arena = cache.arena
        binding = self._binding(arena)
        before = self.engine.run_seconds
        self.engine.run_binding(binding, self._options[arena])
        # The generation loop's overhead report counts time inside the engine's runs.
        self.parent.run_seconds += self.engine.run_seconds - before
        self.parent.run_calls += 1

    def logits(self) -> np.ndarray:
        """The last step's logits [batch, 1, vocab], copied to the host."""
        return self._logits.numpy()

    def greedy(self) -> tuple[np.ndarray, np.ndarray]:
        """The last step's argmax token per row (int64 [batch]) and its logit (float32 [batch]),
        picked on the device; from the host copy of the logits for graphs without the outputs."""
        if self.has_greedy:  # copies: on the CPU numpy() views the buffer the next step fills
            return (self._token.numpy().reshape(-1).copy(),
                    self._token_logit.numpy().reshape(-1).copy())
        logits = np.asarray(self._logits.numpy()[:, -1, :], dtype=np.float32)
        tokens = logits.argmax(axis=-1)
        return tokens, logits[np.arange(len(tokens)), tokens]

    def replay(self) -> None:
        """Run the step again on its bound buffers as they are (no input refresh, no readback):
        the graph's own time, for profiling."""
        arena = self.cache.arena
        binding = self._binding(arena)
        self.engine.run_binding(binding, self._options[arena])
