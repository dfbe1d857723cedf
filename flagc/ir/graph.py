"""The IR graph: SSA values, nodes, and graphs with lazy weights.

Values are produced once (by a node, as a graph input, or as a weight) and referenced by object
identity; names are for humans and for the ONNX boundary, and the printer assigns `%N` names to
anonymous values. Nodes keep their op, inputs, attributes and outputs; rewrites build new nodes
(`Node.with_inputs`) rather than editing lists in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from flagc.ir.types import DType, TensorType

__all__ = ["Value", "Node", "Graph", "WeightSource"]


class Value:
    """An SSA value. `kind` is 'input', 'weight' or 'node' (produced by `producer`)."""

    __slots__ = ("type", "name", "kind", "producer", "__weakref__")

    def __init__(self, type: TensorType, name: str | None = None, kind: str = "node",
                 producer: "Node | None" = None):
        self.type = type
        self.name = name
        self.kind = kind
        self.producer = producer

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self):
        return self.type.shape

    @property
    def rank(self) -> int:
        return len(self.type.shape)

    def __repr__(self) -> str:
        return f"Value({self.name or '?'}: {self.type})"


@dataclass(eq=False)
class Node:
    """One op application. `inputs` may hold None for an absent optional input."""

    op: Any  # flagc.ir.ops.Op; typed loosely to keep this module free of the registry
    inputs: tuple[Optional[Value], ...]
    attrs: dict[str, Any]
    outputs: tuple[Value, ...]
    name: str | None = None  # optional provenance (e.g. the DSL line or torch module path)

    def __post_init__(self):
        for v in self.outputs:
            v.producer = self
            v.kind = "node"

    def with_inputs(self, inputs: Iterable[Optional[Value]]) -> "Node":
        """A new node with the same op, attrs and output values, reading other inputs."""
        return Node(self.op, tuple(inputs), dict(self.attrs), self.outputs, self.name)

    def __repr__(self) -> str:
        return f"Node({self.op.value if hasattr(self.op, 'value') else self.op}, name={self.name})"


@dataclass
class WeightSource:
    """Where a weight's data comes from: called once when the data is needed (lowering, interpreter).

    `load` returns a numpy array (or torch tensor) of exactly the weight's type; it must not keep a
    reference, so lowering can stream a 10B model one tensor at a time.
    """

    load: Callable[[], Any]
    origin: str = ""  # file and tensor name, for error messages


@dataclass(eq=False)
class Graph:
    """A function: named inputs, nodes in topological order, named outputs, lazy weights."""

    name: str
    inputs: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, Value] = field(default_factory=dict)
    weights: dict[str, Value] = field(default_factory=dict)
    weight_sources: dict[str, WeightSource] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(type, name, kind="input")
        self.inputs.append(v)
        return v

    def add_weight(self, name: str, type: TensorType, source: WeightSource | None) -> Value:
        if name in self.weights:
            existing = self.weights[name]
            if existing.type != type:
                from flagc.errors import IRError

                raise IRError(f"weight {name!r} declared twice: {existing.type} vs {type}")
            return existing
        v = Value(type, name, kind="weight")
        self.weights[name] = v
        if source is not None:
            self.weight_sources[name] = source
        return v

    def add_constant_weight(self, name: str, array: np.ndarray) -> Value:
        arr = np.ascontiguousarray(array)
        t = TensorType(DType.from_numpy(arr.dtype), tuple(int(d) for d in arr.shape))
        return self.add_weight(name, t, WeightSource(lambda: arr, origin=f"constant {name}"))

    def add_node(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    # -- queries ------------------------------------------------------------------------------
    def uses(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v, []).append(n)
        return out

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.weights.values()
        for n in self.nodes:
            yield from n.outputs

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes:
            hist[n.op.value] = hist.get(n.op.value, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def parameter_count(self) -> int:
        total = 0
        for v in self.weights.values():
            count = 1
            for d in v.shape:
                count *= int(d)
            total += count
        return total

    def load_weight(self, name: str):
        from flagc.errors import CheckpointError

        source = self.weight_sources.get(name)
        if source is None:
            raise CheckpointError(f"weight {name!r} has no data source (graph parsed from text?)")
        return source.load()

    # -- editing ------------------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> int:
        """Point every reader of `old` (nodes and outputs) at `new`; returns how many changed."""
        count = 0
        for i, n in enumerate(self.nodes):
            if any(v is old for v in n.inputs):
                self.nodes[i] = n.with_inputs(new if v is old else v for v in n.inputs)
                count += 1
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new
                count += 1
        return count

    def prune_weights(self) -> None:
        """Drop weights nothing reads (after DCE)."""
        used = {v for n in self.nodes for v in n.inputs if v is not None}
        used.update(self.outputs.values())
        for name in [k for k, v in self.weights.items() if v not in used]:
            del self.weights[name]
            self.weight_sources.pop(name, None)
