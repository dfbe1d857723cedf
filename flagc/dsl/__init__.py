"""The graph DSL for custom model files."""

from flagc.dsl.compute_graph import ComputeGraph, DataRef, WeightRef
from flagc.dsl.custom import build_custom_graph, load_custom_model

__all__ = ["ComputeGraph", "DataRef", "WeightRef", "build_custom_graph", "load_custom_model"]
