"""Which passes run for which target, and the entry point the build calls."""

from __future__ import annotations

from typing import Any, Optional

from flagc.ir.graph import Graph
from flagc.passes.manager import PassContext, PassStats, run_pipeline

__all__ = ["pipeline_for", "optimize", "FUSION_PIPELINE"]

# Canonicalize first so that fusions see one spelling of each pattern (e.g. a merged transpose
# of k before attention), and again after fusions that leave reshape/transpose pairs behind.
FUSION_PIPELINE = [
    "canonicalize", "fold-constants", "cse",
    "fuse-norms", "fuse-activations", "fuse-linear", "fuse-rotary",
    "canonicalize", "fuse-attention", "canonicalize",
    "fuse-residual-norm", "merge-projections", "cse", "dce",
]


def pipeline_for(target, options: Optional[dict[str, Any]] = None) -> list[str]:
    """The pass names for `target` (a flagc.lower.targets.Target)."""
    options = options or {}
    if options.get("passes") is not None:  # explicit list (tests, --passes)
        return list(options["passes"])
    names = list(FUSION_PIPELINE)
    if options.get("no_fusion"):
        names = ["canonicalize", "fold-constants", "cse", "dce"]
    precision = getattr(target, "precision", "fp32")
    if precision in ("fp16", "bf16"):
        names += [f"precision-{precision}", "cse", "dce"]
    if getattr(target, "contrib_ops", False) and target.precision in ("int4", "int8"):
        names += ["quantize", "dce"]  # after fusion: merged projections quantize as one matrix
    if getattr(target, "backend", "") == "onnxruntime":
        names += ["pack-tokens"]  # last: it sees the final per-token ops (quantized ones too)
    return names


def optimize(graph: Graph, target, options: Optional[dict[str, Any]] = None, *,
             dump_dir: Optional[str] = None, check: bool = False,
             ) -> tuple[list[PassStats], PassContext]:
    """Run the target's pipeline on `graph` in place; returns statistics and the context."""
    ctx = PassContext(target=target, options=dict(options or {}))
    stats = run_pipeline(graph, pipeline_for(target, ctx.options), ctx, dump_dir=dump_dir,
                         check=check)
    return stats, ctx
