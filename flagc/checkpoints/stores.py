"""Weight stores: a uniform, lazy view of checkpoint tensors by name.

A store answers `names()`, `shapes()` and `info(name) -> (dtype, shape)` without reading tensor
data; `tensor(name)` returns one tensor as stored (torch, original dtype) and `source(name,
transform)` a WeightSource that loads it as float32 numpy when called (for lowering). It is the one
checkpoint reader: the graph DSL and the zoo's `BaseModel.load_weights` both use it.
Safetensors tensors are read with positioned reads (no map left behind); GGUF is memory-mapped;
pytorch_model.bin is loaded with `weights_only=True, mmap=True`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Optional

import numpy as np

from flagc.errors import CheckpointError
from flagc.ir.graph import WeightSource
from flagc.ir.types import torch_view

__all__ = ["WeightStore", "SafetensorsStore", "TorchBinStore", "MappedStore", "open_weight_store"]

Transform = Optional[Callable[[np.ndarray], np.ndarray]]


class WeightStore:
    """Base: subclasses fill `_index` with name -> (dtype string, shape, loader)."""

    def __init__(self, origin: str):
        self.origin = origin
        self._index: dict[str, tuple[str, tuple[int, ...], Callable[[], Any]]] = {}

    def names(self) -> list[str]:
        return list(self._index)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (_, shape, _) in self._index.items()}

    def tensor(self, name: str):
        """One tensor as stored (a torch tensor in the checkpoint's dtype)."""
        if name not in self._index:
            raise CheckpointError(self.missing_message(name))
        try:
            value = self._index[name][2]()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.origin}: {exc}") \
                from exc
        if not isinstance(value, np.ndarray):
            return value
        return torch_view(value)  # read-only memory maps too

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name not in self._index:
            raise CheckpointError(self.missing_message(name))
        dtype, shape, _ = self._index[name]
        return dtype, shape

    def missing_message(self, name: str) -> str:
        close = [n for n in self._index if n.split(".")[-1] == name.split(".")[-1]][:3]
        hint = f"; similar names: {close}" if close else ""
        return f"tensor {name!r} not found in checkpoint {self.origin}{hint}"

    def source(self, name: str, transform: Transform = None) -> WeightSource:
        if name not in self._index:
            raise CheckpointError(self.missing_message(name))
        origin = f"{self.origin}:{name}"

        def read() -> np.ndarray:
            arr = _to_f32_numpy(self.tensor(name))
            return transform(arr) if transform else arr

        return WeightSource(read, origin)


def _to_f32_numpy(t) -> np.ndarray:
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32).contiguous().numpy() if t.is_floating_point() \
            else t.detach().contiguous().numpy()
    return np.asarray(t)


class SafetensorsStore(WeightStore):
    """One or more .safetensors files (sharded checkpoints via their index json)."""

    def __init__(self, files: list[str]):
        super().__init__(", ".join(os.path.basename(f) for f in files) if len(files) > 1
                         else files[0])
        for path in files:
            self._add_file(path)

    def _add_file(self, path: str) -> None:
        from flagc.checkpoints.safetensors_read import read_tensor

        header, data_start = _read_safetensors_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(d) for d in meta["shape"])
            # Positioned reads, not a map: see safetensors_read for the RSS this saves.
            self._index[name] = (str(meta["dtype"]), shape,
                                 (lambda n=name, m=meta: read_tensor(path, data_start, n, m)))


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """The header and where the data starts. Validated here so that truncation is reported with
    byte counts, not a panic."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(meta["data_offsets"][1])
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data "
                                  f"section but the file holds {data_bytes} (truncated?)")
    return header, 8 + n


class TorchBinStore(WeightStore):
    """pytorch_model.bin shards, loaded with weights_only=True (never unpickling code)."""

    def __init__(self, files: list[str]):
        super().__init__(", ".join(os.path.basename(f) for f in files) if len(files) > 1
                         else files[0])
        import torch

        from flagc.checkpoints.page_release import copy_out, mapped_ranges

        for path in files:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot load with weights_only=True: {exc}") from exc
            # FlagAI's own checkpoints wrap the state dict as {"module": {...}}.
            if isinstance(sd, dict) and set(sd) == {"module"} and isinstance(sd["module"], dict):
                sd = sd["module"]
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path} does not hold a state dict ({type(sd).__name__})")
            # Copies out of the map, whose pages are then released: see page_release.
            ranges = mapped_ranges(path)
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    self._index[name] = (str(t.dtype).replace("torch.", ""), tuple(t.shape),
                                         (lambda t=t, r=ranges: copy_out(t, r)))


class MappedStore(WeightStore):
    """A renaming view over another store, with per-tensor transforms (GGUF -> HF names)."""

    def __init__(self, origin: str):
        super().__init__(origin)

    def add(self, name: str, dtype: str, shape: tuple[int, ...],
            load: Callable[[], np.ndarray]) -> None:
        self._index[name] = (dtype, tuple(shape), load)


def open_weight_store(path: str | os.PathLike) -> WeightStore:
    """The weights of a Hugging Face style folder (safetensors preferred, then pytorch_model.bin),
    or of one weight file or shard index given directly."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _from_index(path)
        return (SafetensorsStore if path.endswith(".safetensors") else TorchBinStore)([path])
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = path
    entries = sorted(os.listdir(folder))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in entries:
            return _from_index(os.path.join(folder, index_name))
    st = [os.path.join(folder, e) for e in entries if e.endswith(".safetensors")]
    if st:
        return SafetensorsStore(st)
    bins = [os.path.join(folder, e) for e in entries if e.endswith(".bin") and "model" in e]
    if bins:
        return TorchBinStore(bins)
    raise CheckpointError(f"{folder}: no weights found (expected *.safetensors or "
                          "pytorch_model.bin)")


def _from_index(path: str) -> WeightStore:
    """A sharded checkpoint from its `*.index.json` (the shards' format from their names)."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except Exception as exc:
        raise CheckpointError(f"shard index {path} is invalid: {exc!r}") from exc
    folder = os.path.dirname(path)
    files = sorted({os.path.join(folder, f) for f in weight_map.values()})
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"shard index {path} names missing shard files {missing}")
    cls = SafetensorsStore if all(f.endswith(".safetensors") for f in files) else TorchBinStore
    return cls(files)
