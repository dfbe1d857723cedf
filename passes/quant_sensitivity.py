"""Calibration for the quantize pass: one reference-interpreter run on a calibration input gives
each linear's input activations, from which come
- importance: mean x**2 per input feature, which weights the scale search (errors on features
  that carry large activations cost more; LLMs have a few such outlier features), and
- sensitivity: the linear's output error when its weight alone is quantized.

Opt-in (`quant_calibrate`, `quant_sensitive=N`): unlike the quantize pass itself it holds every
weight and activation of the calibration run, so it suits models that fit in memory.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from flagc.ir.graph import Graph, Node
from flagc.ir.quant import QuantScheme, dequantize_weight, fake_quant_activation, quantize_weight

__all__ = ["Calibration", "feeds_for_ids"]


def feeds_for_ids(graph: Graph, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one sequence of token `ids` [1, T], no cache: ones mask, positions 0..T-1."""
    from flagc.ir.symbolic import eval_dim

    t = int(ids.shape[1])
    rng = np.random.default_rng(0)
    symbols = {"batch": 1, "seq": t, "past": 0}
    feeds = {}
    for v in graph.inputs:
        shape = tuple(d if isinstance(d, int) else eval_dim(d, symbols) for d in v.shape)
        if v.name == "input_ids":
            feeds[v.name] = np.asarray(ids).astype(v.dtype.numpy)
        elif v.name == "position_ids":
            feeds[v.name] = np.arange(t, dtype=v.dtype.numpy).reshape(shape)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones(shape, v.dtype.numpy)
        elif v.dtype.is_float:  # past keys/values (empty at past=0), or a float input
            feeds[v.name] = rng.standard_normal(shape).astype(v.dtype.numpy)
        else:  # token types
            feeds[v.name] = np.zeros(shape, v.dtype.numpy)
    return feeds


class Calibration:
    """Activations of one interpreter run on `ids` [1, T] (64 fixed random ids if None)."""

    def __init__(self, graph: Graph, ids: Optional[np.ndarray] = None):
        from flagc.ir.interpreter import interpret_all

        if ids is None:
            vocab = _vocab(graph)
            ids = np.random.default_rng(0).integers(0, vocab, size=(1, 64))
        feeds = feeds_for_ids(graph, ids)
        self.feeds = feeds
        _, self.env = interpret_all(graph, feeds)

    def importance(self, node: Node) -> np.ndarray:
        x = self.env[node.inputs[0]].float()
        return x.reshape(-1, x.shape[-1]).pow(2).mean(0).numpy()

    def hessian(self, node: Node) -> np.ndarray:
        """X^T X of the linear's calibration inputs [K, K] (GPTQ's layer Hessian, up to 2/T)."""
        x = self.env[node.inputs[0]].double()
        x = x.reshape(-1, x.shape[-1])
        return (x.T @ x / x.shape[0]).numpy()

    def error(self, node: Node, scheme: QuantScheme, act_quant: str,
              importance: Optional[np.ndarray] = None) -> float:
        """||y_q - y|| / ||y|| with only this linear quantized."""
        env = self.env
        x, w = env[node.inputs[0]], env[node.inputs[1]]
        bias = env[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None \
            else None
        k = int(w.shape[1])
        codes, scales, zp = (None if a is None else torch.from_numpy(a)
                             for a in quantize_weight(np.asarray(w), scheme, importance))
        wq = dequantize_weight(codes, scales, zp, bits=scheme.bits, k=k)
        xq = fake_quant_activation(x, act_quant, scheme.block_for(k))
        y = F.linear(xq.float(), wq, None if bias is None else bias.float())
        ref = env[node.outputs[0]].float()
        return float((y - ref).norm() / ref.norm().clamp_min(1e-12))

    def errors(self, nodes: list[Node], scheme_for: Callable[[Node], QuantScheme],
               act_quant: str, importance: Callable[[Node], Optional[np.ndarray]]):
        return {n: self.error(n, scheme_for(n), act_quant, importance(n)) for n in nodes}


def _vocab(graph: Graph) -> int:
    logits = graph.outputs.get("logits")
    return int(logits.shape[-1]) if logits is not None else 100
