"""The pass manager: runs a named pipeline of IR passes, checked and measured.

After every pass the verifier runs (a broken rewrite names itself, not a later lowering error);
each pass reports rewrite counts, which the manager times and keeps for the manifest. With
`dump_dir` the IR after each pass is written as text; with `check` the reference interpreter runs
the graph before and after each pass on the same random inputs and names the first pass (and node)
whose result diverges.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from flagc.errors import ConfigError, VerifyError
from flagc.ir.graph import Graph

__all__ = ["PassContext", "PassStats", "register_pass", "PASSES", "run_pipeline", "PassError"]


class PassError(VerifyError):
    """A pass produced invalid IR or changed the graph's numbers (under --check)."""


@dataclass
class PassContext:
    """What passes may read: the target, build options, and a log of declined rewrites."""

    target: Any = None  # flagc.lower.targets.Target
    options: dict[str, Any] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)  # "rewrite: reason" -> count
    plan: dict[str, Any] = field(default_factory=dict)  # precision/quantization plans for manifest

    def decline(self, rewrite: str, reason: str) -> None:
        key = f"{rewrite}: {reason}"
        self.declined[key] = self.declined.get(key, 0) + 1


@dataclass
class PassStats:
    name: str
    seconds: float
    rewrites: dict[str, int]
    nodes_before: int
    nodes_after: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 4), "rewrites": self.rewrites,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after}


PassFn = Callable[[Graph, PassContext], dict[str, int]]
PASSES: dict[str, PassFn] = {}


def register_pass(name: str):
    """Decorator: `@register_pass("dce") def dce(graph, ctx) -> {rewrite: count}`."""

    def deco(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn
    return deco


def run_pipeline(graph: Graph, names: list[str], ctx: Optional[PassContext] = None, *,
                 dump_dir: Optional[str] = None, check: bool = False,
                 check_feeds: Optional[dict] = None, check_tolerance: float = 1e-4,
                 on_pass: Optional[Callable[[str], None]] = None) -> list[PassStats]:
    """Run passes in order on `graph` (in place); returns per-pass statistics."""
    from flagc.ir.text import print_graph
    from flagc.ir.verifier import verify

    ctx = ctx or PassContext()
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; known: {sorted(PASSES)}")
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        _dump(dump_dir, 0, "input", print_graph(graph))
    checker = _Checker(graph, check_feeds, check_tolerance) if check else None
    stats: list[PassStats] = []
    for i, name in enumerate(names, 1):
        before = len(graph.nodes)
        t0 = time.perf_counter()
        rewrites = PASSES[name](graph, ctx) or {}
        seconds = time.perf_counter() - t0
        try:
            verify(graph)
        except VerifyError as exc:
            raise PassError(f"pass {name!r} produced invalid IR:\n{exc}") from None
        stats.append(PassStats(name, seconds, {k: v for k, v in rewrites.items() if v},
                               before, len(graph.nodes)))
        if dump_dir:
            _dump(dump_dir, i, name, print_graph(graph))
        if checker is not None:
            # Precision passes change numbers by design: they declare their own tolerance.
            checker.after(name, graph, getattr(PASSES[name], "check_tolerance", check_tolerance))
        if on_pass:
            on_pass(name)
    return stats


def _dump(folder: str, index: int, name: str, text: str) -> None:
    with open(os.path.join(folder, f"{index:02d}-{name}.ir"), "w") as f:
        f.write(text)


class _Checker:
    """Interpreter runs before/after each pass on fixed random inputs (see `--check`)."""

    def __init__(self, graph: Graph, feeds: Optional[dict], tolerance: float):
        from flagc.ir.interpreter import interpret_all

        self.feeds = feeds if feeds is not None else random_feeds(graph)
        self.tolerance = tolerance
        self.outputs, self.env = interpret_all(graph, self.feeds)

    def after(self, name: str, graph: Graph, tolerance: float) -> None:
        from flagc.ir.interpreter import interpret_all

        self.tolerance = tolerance
        outputs, env = interpret_all(graph, self.feeds)
        for key, want in self.outputs.items():
            diff = _max_diff(want, outputs[key])
            if diff > _allowed(want, self.tolerance):
                culprit = _first_diverging_node(graph, env, self.env, self.tolerance)
                raise PassError(f"--check: pass {name!r} changed output {key!r} "
                                f"(max abs diff {diff:.3g}){culprit}")
        # Each pass is compared with the one before it, so drift is blamed where it starts.
        self.outputs, self.env = outputs, env


def _allowed(want, tolerance: float) -> float:
    if not want.dtype.is_floating_point or not want.numel():
        return 0.0
    return tolerance * max(1.0, float(want.float().abs().max()))


def _max_diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.dtype.is_floating_point:
        return float((a != b).any())
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _first_diverging_node(graph: Graph, env: dict, ref_env: dict, tolerance: float) -> str:
    """The first node (in order) whose output exists before and after the pass and differs."""
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            if v in ref_env and v in env:
                if _max_diff(ref_env[v], env[v]) > _allowed(ref_env[v], tolerance):
                    return f"; first diverging node: #{i} {n.op.value}" + \
                        (f" ({n.name})" if n.name else "")
    return "; the diverging values were all created by the pass"


def random_feeds(graph: Graph, seed: int = 0, batch: int = 2, seq: int = 5, past: int = 3):
    """Small random inputs for a decoder/encoder graph, valid for the usual input names."""
    import numpy as np

    from flagc.ir.symbolic import eval_dim
    from flagc.ir.types import DType

    rng = np.random.default_rng(seed)
    symbols = {"batch": batch, "seq": seq, "past": past}
    for v in graph.inputs:  # other symbols (T5's source length `src`) take the seq length
        for d in v.shape:
            for name in ([] if isinstance(d, int) else d.symbols):
                symbols.setdefault(name, seq)
    # Integer inputs index embedding tables: draw below the smallest table each one reads.
    bounds: dict[str, int] = {}
    for n in graph.nodes:
        if n.op.value == "embedding" and n.inputs[0].kind == "input":
            name, rows = n.inputs[0].name, int(n.inputs[1].shape[0])
            bounds[name] = min(bounds.get(name, rows), rows)
    feeds = {}
    for v in graph.inputs:
        shape = tuple(eval_dim(d, symbols) if not isinstance(d, int) else d for d in v.shape)
        if v.name == "position_ids":
            feeds[v.name] = np.broadcast_to(np.arange(past, past + seq), shape).astype(np.int64)
        elif v.name == "attention_mask" or v.dtype is DType.BOOL:
            feeds[v.name] = np.ones(shape, v.dtype.numpy)
        elif v.dtype in (DType.I64, DType.I32):
            feeds[v.name] = rng.integers(0, bounds.get(v.name, 2), size=shape).astype(
                v.dtype.numpy)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(v.dtype.numpy)
    return feeds
