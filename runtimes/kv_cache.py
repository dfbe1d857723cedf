"""The decoder KV cache: preallocated buffers bound in place, plus per-row bookkeeping.

The lowered attention takes `past_key_values.{i}.key|value` [rows, kv_heads, T, head_dim] and
returns `present.{i}.key|value` = concat(past, new) [rows, kv_heads, T + s, head_dim]. Every tensor
has two preallocated arenas (see kv_storage): a step binds `past` to the tensor at the start of
one arena and `present` to the start of the other, so onnxruntime writes the grown cache straight
into our memory; then the roles swap. Nothing is concatenated or copied outside `session.run`.

Slot t of the buffer is the t-th token fed to a row. A left-padded batch gives every row the same
slot count T; `mask` marks the slots that hold real tokens (the engine's `attention_mask`),
`positions` is each row's next position id (its count of real tokens), `tokens` what each slot
holds (-1 for padding), which a continued conversation uses to find the prefix it can keep.

Shared buffer seam: when the manifest's kv_cache says `"shared_buffer": true` (an attention that
writes the new keys into its past buffer, e.g. onnxruntime's GroupQueryAttention with
past_present_share_buffer), one arena per tensor is bound as both past and present with shape
[rows, kv_heads, capacity, head_dim], and the step does not swap. The second arena is then only
scratch for reorder/trim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from flagc.errors import RuntimeInputError

from .kv_storage import make_storage

__all__ = ["KVLayout", "KVCache"]


@dataclass(frozen=True)
class KVLayout:
    """What one cached token costs and how the engine names the cache tensors."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    shared_buffer: bool = False

    @staticmethod
    def from_manifest(manifest: dict[str, Any]) -> "KVLayout":
        kv = manifest.get("kv_cache")
        if not kv:
            raise RuntimeInputError(f"model {manifest.get('model')!r} has no KV cache in its "
                                    "manifest; it cannot generate")
        return KVLayout(int(kv["layers"]), int(kv["kv_heads"]), int(kv["head_dim"]),
                        str(kv["dtype"]), bool(kv.get("shared_buffer", False)))

    @property
    def names(self) -> tuple[tuple[str, str], ...]:
        """(past input, present output) name pairs, layer by layer, key before value."""
        return _names(self.layers)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token of one row."""
        return 2 * self.layers * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def cache_bytes(self, rows: int, tokens: int) -> int:
        """Memory of a cache for `rows` x `tokens`: two arenas (past and present) per tensor."""
        return 2 * self.bytes_per_token * rows * tokens

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors (for a full-sequence forward without a cache)."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {past: np.zeros(shape, dtype=self.dtype) for past, _ in self.names}


class KVCache:
    """Preallocated KV buffers for up to `max_rows` rows of `max_tokens` slots on one device.

    Buffers are sized lazily by `reserve` (to what a request needs, within the limits) and kept
    between requests, so a chat reuses them turn after turn.
    """

    def __init__(self, layout: KVLayout, *, max_rows: int, max_tokens: int, device: str = "cpu",
                 device_id: int = 0, kernel_copies: bool = False):
        """Args:
        layout: from the manifest's kv_cache.
        max_rows: the artifact's max batch (rows include beams).
        max_tokens: the artifact's max sequence length.
        device: "cpu" or "cuda" (where the buffers live; the engine's device).
        kernel_copies: on cpu, copy with the onnxruntime kernels used on GPUs (tests).
        """
        self.layout = layout
        self.max_rows, self.max_tokens = int(max_rows), int(max_tokens)
        self.device, self.device_id, self._kernel = device, device_id, kernel_copies
        self.shared = layout.shared_buffer
        self._storage = None
        self.capacity_rows = self.capacity_tokens = 0
        self._cur = 0  # the arena holding the cache (past of the next step)
        self.rows = self.length = 0
        # Some cached slot is padding (False is exact; True may be stale once a reorder dropped
        # the padded rows): the decoder's dense-graph test, without a scan of the mask.
        self.padded = False
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.tokens = np.zeros((0, 0), dtype=np.int64)
        self.positions = np.zeros(0, dtype=np.int64)

    # ---- sizing ------------------------------------------------------------------------------
    @property
    def storage(self):
        """The buffers now (replaced when the cache grows): bindings to them are valid as long
        as this object is."""
        return self._storage

    @property
    def arena(self) -> int:
        """Which of the two arenas holds the cache (beam reorders and trims swap them)."""
        return self._cur

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers now."""
        return 0 if self._storage is None else self._storage.nbytes

    def _shape(self, rows: int | None = None, length: int | None = None) -> tuple[int, ...]:
        if self.shared:
            length = self.capacity_tokens
        elif length is None:
            length = self.length
        return (self.rows if rows is None else rows, self.layout.kv_heads, length,
                self.layout.head_dim)

    def reserve(self, rows: int, tokens: int) -> None:
        """Make room for `rows` rows of `tokens` slots, keeping the cached content."""
        if rows > self.max_rows:
            raise RuntimeInputError(f"{rows} rows (prompts x beams) exceed the artifact's max "
                                    f"batch {self.max_rows}; rebuild with --max-batch {rows} or "
                                    "send fewer prompts or beams at once")
        if tokens > self.max_tokens:
            raise RuntimeInputError(f"{tokens} tokens exceed the artifact's max sequence length "
                                    f"{self.max_tokens}; shorten the prompt or max_new_tokens, "
                                    "or rebuild with a larger --max-seq")
        if rows <= self.capacity_rows and tokens <= self.capacity_tokens:
            return
        new_rows = max(rows, self.capacity_rows)
        if self.shared:
            # A shared buffer's row stride depends on its slot count, so it is sized once.
            new_tokens = self.max_tokens
        else:
            # Grow the context geometrically so a long chat reallocates O(log n) times.
            new_tokens = max(tokens, self.capacity_tokens) if tokens <= self.capacity_tokens \
                else min(self.max_tokens, max(tokens, 2 * self.capacity_tokens))
        names = [p for p, _ in self.layout.names]
        elems = new_rows * self.layout.kv_heads * new_tokens * self.layout.head_dim
        if self._storage is None or self.rows == 0:
            self._storage = None  # free before allocating the replacement
            self._storage = make_storage(names, self.layout.dtype, elems, self.device,
                                         self.device_id, kernel=self._kernel)
        else:
            # The filled [rows, kv, T, d] prefix keeps its layout in a bigger arena.
            self._storage = self._storage.grown(elems, self._cur, self._shape())
        self._cur = 0
        self.capacity_rows, self.capacity_tokens = new_rows, new_tokens
        self.mask = _resized(self.mask, new_rows, new_tokens, 0)
        self.tokens = _resized(self.tokens, new_rows, new_tokens, -1)

    # ---- a batch -----------------------------------------------------------------------------
    def reset(self, rows: int, tokens: int, room_rows: int = 0) -> None:
        """Start empty with `rows` rows, room for `tokens` slots and max(rows, room_rows) rows."""
        self.rows = self.length = 0
        self.reserve(max(rows, room_rows), tokens)
        self.rows = rows
        self.mask[:rows] = 0
        self.tokens[:rows] = -1
        self.positions = np.zeros(rows, dtype=np.int64)
        self.padded = False

    def begin_step(self, ids: np.ndarray, valid: np.ndarray | None,
                   mask: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Record `ids` [rows, s] (valid marks real tokens; None: all are) in the next slots.

        Returns the step's attention_mask [rows, T + s] (None when `mask` is False: a static
        step reads `self.mask` whole) and position_ids [rows, s]. The slots only count once
        `commit` runs (after the engine succeeded).
        """
        rows, s = ids.shape
        if rows != self.rows:
            raise RuntimeInputError(f"KV cache holds {self.rows} rows, the step gave {rows}")
        end = self.length + s
        if end > self.capacity_tokens:
            raise RuntimeInputError(f"KV cache full: {self.length} + {s} tokens exceed the "
                                    f"{self.capacity_tokens} slots reserved")
        if valid is None:  # appended tokens: no padding (the per-token decode path)
            self.mask[:rows, self.length:end] = 1
            self.tokens[:rows, self.length:end] = ids
            pos = self.positions[:, None] if s == 1 else self.positions[:, None] + np.arange(s)
        else:
            self.padded = self.padded or not valid.all()
            self.mask[:rows, self.length:end] = valid
            self.tokens[:rows, self.length:end] = np.where(valid != 0, ids, -1)
            # a decode step: each row's next position, no cumsum
            steps = valid - 1 if s == 1 else np.cumsum(valid, axis=1) - 1
            pos = np.maximum(self.positions[:, None] + steps, 0)
        step_mask = np.ascontiguousarray(self.mask[:rows, :end]) if mask else None
        return step_mask, pos.astype(np.int64, copy=False)

    def bind(self, binding, s: int) -> None:
        """Bind every past input and present output for a step of `s` new tokens."""
        st = self._storage
        dev, dev_id, dt = st.device, st.device_id, st.dtype
        src, dst = self._cur, (self._cur if self.shared else 1 - self._cur)
        past_shape = self._shape()
        present_shape = past_shape if self.shared else self._shape(length=self.length + s)
        # One read and one write per tensor; with a shared buffer both are the same memory.
        for past, present in self.layout.names:
            binding.input_buffer(past, dev, dev_id, dt, past_shape, st.ptr(src, past))
            binding.output_buffer(present, dev, dev_id, dt, present_shape, st.ptr(dst, past))

    def commit(self, ids: np.ndarray, valid: np.ndarray | None) -> None:
        """The engine ran the step begun with `ids`: its slots now hold keys and values."""
        self.length += ids.shape[1]
        self.positions = self.positions + (ids.shape[1] if valid is None else valid.sum(axis=1))
        if not self.shared:
            self._cur = 1 - self._cur

    # ---- rearranging -------------------------------------------------------------------------
    def reorder(self, rows: np.ndarray) -> None:
        """Row r becomes old row rows[r] (beam search); len(rows) may differ from self.rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise RuntimeInputError(f"KV cache reorder: row index out of range [0, {self.rows})")
        if np.array_equal(rows, np.arange(self.rows)):
            return
        self.reserve(len(rows), self.length)
        self._move(rows, self.length)
        self.mask[: len(rows)] = self.mask[rows]
        self.tokens[: len(rows)] = self.tokens[rows]
        self.positions = self.positions[rows]
        self.rows = len(rows)

    def trim(self, length: int) -> None:
        """Keep only the first `length` slots of every row (a conversation rolled back)."""
        if not 0 <= length <= self.length:
            raise RuntimeInputError(f"KV cache trim to {length}: holds {self.length} slots")
        if length == self.length:
            return
        if not self.shared:
            self._move(np.arange(self.rows), length)
        self.mask[: self.rows, length:] = 0
        self.tokens[: self.rows, length:] = -1
        self.length = length
        self.positions = self.mask[: self.rows, :length].sum(axis=1)
        self.padded = not self.mask[: self.rows, :length].all()

    def _move(self, rows: np.ndarray, length: int) -> None:
        # Non-shared: the [rows, kv, T, d] layout depends on T, so trimming is a copy too.
        if self.shared:
            self._storage.take(self._cur, 1 - self._cur, self._shape(), rows, self.capacity_tokens)
        else:
            self._storage.take(self._cur, 1 - self._cur, self._shape(), rows, length)
        self._cur = 1 - self._cur

    def row_tokens(self, row: int) -> list[int]:
        """Token ids held by a row's real slots, oldest first."""
        t = self.tokens[row, : self.length]
        return t[t >= 0].tolist()

    def tensor(self, name: str) -> np.ndarray:
        """A host copy (or view) of one cached tensor, [rows, kv_heads, length, head_dim]."""
        full = self._storage.view(self._cur, name, self._shape())
        return full[:, :, : self.length]


@lru_cache(maxsize=None)
def _names(layers: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"past_key_values.{i}.{k}", f"present.{i}.{k}")
                 for i in range(layers) for k in ("key", "value"))


def _resized(a: np.ndarray, rows: int, cols: int, fill: int) -> np.ndarray:
    out = np.full((rows, cols), fill, dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out
