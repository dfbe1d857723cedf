"""Optimization profiles (min/opt/max shapes) for a TensorRT engine, from the manifest's dims.

TensorRT needs a range for every dynamic input dim. flagc's dims are symbols (`batch`, `seq`,
`past`) and sums of them (`past+seq`); this module binds each symbol at its min, opt and max and
evaluates every input shape. No TensorRT import: the profiles are plain data that the engine build
and the manifest share.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from flagc.errors import ConfigError
from flagc.ir.symbolic import eval_dim, parse_dim

__all__ = ["symbol_ranges", "profile_shapes"]


def symbol_ranges(symbols: Sequence[str], max_batch: int, max_seq: int,
                  has_past: bool) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per symbol.

    Decoders get a profile tuned for the hot path, one new token against a half-full cache
    (opt seq=1, past=max_seq/2); prefill still fits because seq reaches max_seq. Encoders (no past)
    tune for a mid-length sequence.
    """
    seq_opt = 1 if has_past else min(128, max_seq)
    ranges = {"batch": (1, 1, max_batch), "seq": (1, seq_opt, max_seq),
              # past=0 is the prefill step; at least one new token, so at most max_seq-1 cached
              "past": (0, max(max_seq // 2, 0) if has_past else 0, max(max_seq - 1, 0))}
    for s in symbols:
        ranges.setdefault(s, (1, min(128, max_seq), max_seq))  # e.g. an encoder length
    return ranges


def profile_shapes(inputs: Sequence[Mapping[str, Any]], max_batch: int,
                   max_seq: int) -> dict[str, dict[str, list[int]]]:
    """{input name: {"min": [...], "opt": [...], "max": [...]}} for the io signature's inputs.

    A dim that sums symbols (`past+seq`) is clamped to [1, max_seq]: the artifact never holds
    more than max_seq positions, and a tighter max lets TensorRT size scratch memory smaller.
    """
    parsed = {}
    symbols: set[str] = set()
    for sig in inputs:
        try:
            dims = [parse_dim(str(d)) for d in sig["shape"]]
        except ValueError as exc:
            raise ConfigError(f"input {sig['name']!r}: cannot parse shape {sig['shape']}: "
                              f"{exc}") from exc
        parsed[sig["name"]] = dims
        for d in dims:
            if not isinstance(d, int):
                symbols.update(d.symbols)
    ranges = symbol_ranges(sorted(symbols), max_batch, max_seq, "past" in symbols)
    out: dict[str, dict[str, list[int]]] = {}
    for name, dims in parsed.items():
        prof = {}
        for i, key in enumerate(("min", "opt", "max")):
            bind = {s: r[i] for s, r in ranges.items()}
            shape = []
            for d in dims:
                v = eval_dim(d, bind)
                if not isinstance(d, int) and len(d.terms) > 1:
                    v = min(max(v, 1), max_seq)
                shape.append(int(v))
            prof[key] = shape
        out[name] = prof
    return out
