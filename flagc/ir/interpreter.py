"""The reference interpreter: runs any IR graph with each op's PyTorch reference implementation.

It is the numerical oracle for passes (`--check`) and lowering tests, not a fast runtime.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from flagc.errors import IRError, RuntimeInputError
from flagc.ir.graph import Graph, Value
from flagc.ir.ops import opdef
from flagc.ir.symbolic import eval_dim

__all__ = ["interpret", "interpret_all"]


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


def bind_symbols(graph: Graph, feeds: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Solve symbol values from the fed inputs' shapes; RuntimeInputError on a mismatch."""
    bindings: dict[str, int] = {}
    pending = []
    for v in graph.inputs:
        shape = feeds[v.name].shape
        if len(shape) != v.type.rank:
            raise RuntimeInputError(f"input {v.name!r}: expected rank {v.type.rank} "
                                    f"({v.type}), got shape {tuple(shape)}")
        for d, actual in zip(v.type.shape, shape):
            if isinstance(d, int):
                if d != actual:
                    raise RuntimeInputError(f"input {v.name!r}: expected {v.type}, got shape "
                                            f"{tuple(shape)}")
            elif list(d.terms.items()) == [((next(iter(d.symbols)),), 1)]:  # a bare symbol
                name = next(iter(d.symbols))
                if name in bindings and bindings[name] != actual:
                    raise RuntimeInputError(
                        f"input {v.name!r}: dim {name}={actual} conflicts with {name}="
                        f"{bindings[name]} from another input")
                bindings[name] = int(actual)
            else:
                pending.append((v, d, actual))
    # Composite dims (past+seq) can bind one remaining unknown symbol.
    for v, d, actual in pending:
        unknown = [s for s in d.symbols if s not in bindings]
        if len(unknown) == 1:
            base = eval_dim(d, {**bindings, unknown[0]: 0})
            step = eval_dim(d, {**bindings, unknown[0]: 1}) - base
            if step and (actual - base) % step == 0:
                bindings[unknown[0]] = (actual - base) // step
        if all(s in bindings for s in d.symbols) and eval_dim(d, bindings) != actual:
            raise RuntimeInputError(f"input {v.name!r}: dim {d} should be "
                                    f"{eval_dim(d, bindings)}, got {actual}")
    return bindings


def interpret(graph: Graph, feeds: Mapping[str, Any],
              weights: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Run the graph; feeds by input name, weights loaded lazily unless given explicitly."""
    return interpret_all(graph, feeds, weights)[0]


def interpret_all(graph: Graph, feeds: Mapping[str, Any],
                  weights: Mapping[str, Any] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[Value, torch.Tensor]]:
    """Like `interpret`, also returning every value computed (for pass checking/calibration)."""
    missing = [v.name for v in graph.inputs if v.name not in feeds]
    if missing:
        raise RuntimeInputError(f"missing graph inputs: {missing}")
    tfeeds = {k: _as_tensor(v) for k, v in feeds.items()}
    bind_symbols(graph, tfeeds)
    env: dict[Value, torch.Tensor] = {v: tfeeds[v.name] for v in graph.inputs}
    weights = weights or {}
    for name, v in graph.weights.items():
        data = weights[name] if name in weights else graph.load_weight(name)
        env[v] = _as_tensor(data)
    for i, n in enumerate(graph.nodes):
        args = [None if v is None else env[v] for v in n.inputs]
        try:
            result = opdef(n.op).reference(*args, **n.attrs)
        except Exception as exc:
            raise IRError(f"interpreter: node #{i} ({n.op.value}"
                          f"{', ' + n.name if n.name else ''}) failed: {exc}") from exc
        outs = result if isinstance(result, tuple) else (result,)
        for v, t in zip(n.outputs, outs):
            env[v] = t
    return {k: env[v] for k, v in graph.outputs.items()}, env
