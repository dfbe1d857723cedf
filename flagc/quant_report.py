"""The accuracy report of a quantized build (`flagc build --report`): report.json and report.md.

The quantized graph is run by the reference interpreter on a fixed text (teacher forcing) next
to the same graph with every QLINEAR computed from its float weight, which is the fp32 build's
math. Overall: logits cosine, greedy top-1 agreement and perplexity (and its delta); per
quantized layer the same with only that layer quantized (re-running from that layer on, the
float activations before it are shared). Encoders without logits report the cosine of each
float output per token.

The interpreter holds the weights of both versions, so the report suits models that fit in RAM.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from flagc.ir.graph import Graph, Node
from flagc.ir.interpreter import bind_symbols
from flagc.ir.ops import Op, opdef
from flagc.passes.quantize import FLOAT_WEIGHTS
from flagc.passes.quant_sensitivity import feeds_for_ids

__all__ = ["accuracy_report", "write_report", "REPORT_TEXT"]

REPORT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type, an oil-based ink and a wooden screw "
    "press into a practical system for producing books. Within a few decades printing shops had "
    "spread across Europe, and the price of books fell so far that ordinary people could afford "
    "them. Scholars exchanged ideas faster than ever before, and the printed word shaped the "
    "Reformation, the scientific revolution and the rise of newspapers."
)


class _Runner:
    """The interpreter loop with weights loaded once and QLINEARs switchable to float."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.weights = {v: torch.from_numpy(np.array(graph.load_weight(n)))
                        for n, v in graph.weights.items()}
        floats = graph.metadata.get(FLOAT_WEIGHTS, {})
        self.float_w: dict[Node, torch.Tensor] = {}
        for n in graph.nodes:
            if n.op is Op.QLINEAR and n.inputs[1].name in floats:
                _, _, source = floats[n.inputs[1].name]
                self.float_w[n] = torch.from_numpy(np.array(source.load(), dtype=np.float32))
        self.quantized = list(self.float_w)

    def run(self, feeds, quantized: set, start: int = 0, env: Optional[dict] = None):
        if env is None:
            tf = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            bind_symbols(self.graph, tf)
            env = {v: tf[v.name] for v in self.graph.inputs}
            env.update(self.weights)
        else:
            env = dict(env)
        for n in self.graph.nodes[start:]:
            args = [None if v is None else env[v] for v in n.inputs]
            if n.op is Op.QLINEAR and n in self.float_w and n not in quantized:
                bias = args[4] if len(args) > 4 else None
                out = F.linear(args[0], self.float_w[n].to(args[0].dtype), bias)
            else:
                out = opdef(n.op).reference(*args, **n.attrs)
            for v, t in zip(n.outputs, out if isinstance(out, tuple) else (out,)):
                env[v] = t
        return env


def _compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
             ids: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "logits" in ref:
        a = ref["logits"][0].float()
        b = got["logits"][0].float()
        cos = F.cosine_similarity(a, b, dim=-1)
        target = torch.from_numpy(ids[0, 1:]).long()
        nll_a = F.cross_entropy(a[:-1], target).item()
        nll_b = F.cross_entropy(b[:-1], target).item()
        out.update({
            "logits_cosine_min": round(float(cos.min()), 6),
            "logits_cosine_mean": round(float(cos.mean()), 6),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "perplexity": round(math.exp(nll_b), 4),
            "perplexity_delta": round(math.exp(nll_b) - math.exp(nll_a), 4),
        })
        return out
    for name, a in ref.items():
        if not a.dtype.is_floating_point:
            continue
        a2, b2 = a.float().reshape(-1, a.shape[-1]), got[name].float().reshape(-1, a.shape[-1])
        cos = F.cosine_similarity(a2, b2, dim=-1)
        out[f"{name}_cosine_min"] = round(float(cos.min()), 6)
        out[f"{name}_cosine_mean"] = round(float(cos.mean()), 6)
    return out


def accuracy_report(graph: Graph, ids: np.ndarray, per_layer: bool = True,
                    layer_tokens: int = 32) -> dict[str, Any]:
    """The report as a dict; `ids` [1, T] token ids (the text's, or fixed ones)."""
    runner = _Runner(graph)
    outputs = {k: v for k, v in graph.outputs.items() if not k.startswith("present.")}

    def pick(env):
        return {k: env[v] for k, v in outputs.items()}

    feeds = feeds_for_ids(graph, ids)
    ref_env = runner.run(feeds, quantized=set())
    all_q = set(runner.quantized)
    report: dict[str, Any] = {
        "tokens": int(ids.shape[1]),
        "quantized_layers": len(all_q),
        "overall": _compare(pick(ref_env), pick(runner.run(feeds, all_q)), ids),
        "layers": [],
    }
    if per_layer and all_q:
        short = ids[:, :layer_tokens]
        feeds = feeds_for_ids(graph, short)
        base = runner.run(feeds, quantized=set())
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        rows = []
        for n in runner.quantized:
            env = runner.run(feeds, {n}, start=index[id(n)], env=base)
            row = {"layer": _layer_name(graph, n), "bits": n.attrs["bits"],
                   **_compare(pick(base), pick(env), short)}
            rows.append(row)
        report["layer_tokens"] = int(short.shape[1])
        report["layers"] = rows
    return report


def _layer_name(graph: Graph, n: Node) -> str:
    floats = graph.metadata.get(FLOAT_WEIGHTS, {})
    entry = floats.get(n.inputs[1].name)
    return entry[0] if entry else n.inputs[1].name


def write_report(graph: Graph, folder: str, tokenizer=None, text: str = REPORT_TEXT,
                 plan: Optional[dict] = None) -> dict[str, Any]:
    """Write report.json and report.md into `folder`; returns the report."""
    if tokenizer is not None:
        ids = np.array([tokenizer.encode(text, add_special_tokens=False)[:128]], dtype=np.int64)
        source = "text"
    else:  # no tokenizer: fixed pseudo-random ids within the vocabulary
        vocab = int(graph.outputs["logits"].shape[-1]) if "logits" in graph.outputs else 100
        ids = np.random.default_rng(0).integers(0, vocab, size=(1, 64)).astype(np.int64)
        source = "fixed random token ids (no tokenizer)"
    report = accuracy_report(graph, ids)
    report["input"] = source
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(to_markdown(report, plan))
    return report


def to_markdown(report: dict[str, Any], plan: Optional[dict] = None) -> str:
    q = (plan or {}).get("quantization", {})
    lines = ["# Quantization accuracy report", "",
             f"Reference: the same graph with float weights (the fp32 build's math), run by the "
             f"reference interpreter on {report['tokens']} tokens ({report.get('input', '')}), "
             f"teacher-forced.", ""]
    if q:
        lines += [f"Scheme: {q.get('default')}; activations: {q.get('activations')}.", ""]
    keys = list(report["overall"])
    lines += ["## Overall", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {report['overall'][k]} |" for k in keys]
    if report["layers"]:
        cols = [k for k in report["layers"][0] if k not in ("layer", "bits")]
        lines += ["", f"## Per quantized layer (only that layer quantized, first "
                      f"{report['layer_tokens']} tokens), worst first", "",
                  "| layer | bits | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        sort_key = cols[0]
        for row in sorted(report["layers"], key=lambda r: r.get(sort_key, 0)):
            lines.append(f"| {row['layer']} | {row['bits']} | "
                         + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
