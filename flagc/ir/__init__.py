"""flagc's IR: typed SSA values with symbolic dims, one op registry, text form, verifier,
reference interpreter."""

from flagc.ir.builder import Builder, make_node
from flagc.ir.graph import Graph, Node, Value, WeightSource
from flagc.ir.interpreter import interpret
from flagc.ir.ops import REGISTRY, Op, opdef
from flagc.ir.symbolic import Dim, Sym, dim_str, parse_dim, sym
from flagc.ir.text import parse_graph, print_graph
from flagc.ir.types import DType, TensorType
from flagc.ir.verifier import verify

__all__ = [
    "Builder", "make_node", "Graph", "Node", "Value", "WeightSource", "interpret", "REGISTRY",
    "Op", "opdef", "Dim", "Sym", "dim_str", "parse_dim", "sym", "parse_graph", "print_graph",
    "DType", "TensorType", "verify",
]
