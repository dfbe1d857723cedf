"""Creating nodes: inference runs at creation, so a shape error names the op being built."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from flagc.errors import IRError
from flagc.ir.graph import Graph, Node, Value
from flagc.ir.ops import Op, opdef

__all__ = ["make_node", "Builder"]


def make_node(op: Op, inputs: Sequence[Optional[Value]], attrs: dict[str, Any] | None = None,
              name: str | None = None) -> Node:
    """A new node with inferred output types; IRError naming the op (and `name`) on bad input."""
    d = opdef(op)
    where = f"{op.value}" + (f" ({name})" if name else "")
    problem = d.check_arity(len(inputs))
    if problem:
        raise IRError(f"{where}: {problem}")
    full = d.full_attrs(attrs or {})
    names = list(d.inputs)
    for i, v in enumerate(inputs):
        label = names[min(i, len(names) - 1)]
        if v is None and not label.endswith("?"):
            raise IRError(f"{where}: required input {label!r} is missing")
    padded = list(inputs)
    n_fixed = len([i for i in names if not i.endswith("*")])
    if not (names and names[-1].endswith("*")):
        padded += [None] * (n_fixed - len(padded))
    types = [None if v is None else v.type for v in padded]
    try:
        out_types = d.infer(types, full)
    except IRError as exc:
        raise IRError(f"{where}: {exc}") from None
    outputs = tuple(Value(t) for t in out_types)
    # Trailing absent optionals are dropped so printed IR stays short.
    trimmed = list(inputs)
    while trimmed and trimmed[-1] is None:
        trimmed.pop()
    return Node(op, tuple(trimmed), full, outputs, name)


class Builder:
    """Appends nodes to a graph: `b.emit(Op.ADD, [x, y])` returns the output value(s)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.scope: str | None = None  # provenance attached to new nodes

    def emit(self, op: Op, inputs: Sequence[Optional[Value]], **attrs: Any):
        node = make_node(op, inputs, attrs, self.scope)
        self.graph.add_node(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs
