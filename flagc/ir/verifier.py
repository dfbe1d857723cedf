"""The IR verifier: a table of rules, each returning problems that name the node at fault.

It runs after every pass; a failure raises VerifyError listing every problem found.
"""

from __future__ import annotations

from typing import Callable, Iterator

from flagc.errors import VerifyError
from flagc.ir.graph import Graph, Node
from flagc.ir.ops import REGISTRY, opdef

__all__ = ["verify", "RULES"]


def _node_label(graph: Graph, index: int, node: Node) -> str:
    label = f"node #{index} ({node.op.value if hasattr(node.op, 'value') else node.op}"
    return label + (f", {node.name})" if node.name else ")")


def _rule_known_op(graph: Graph) -> Iterator[str]:
    for i, n in enumerate(graph.nodes):
        if n.op not in REGISTRY:
            yield f"{_node_label(graph, i, n)}: unknown op {n.op!r}"


def _rule_defined_before_use(graph: Graph) -> Iterator[str]:
    defined = set(graph.inputs) | set(graph.weights.values())
    for i, n in enumerate(graph.nodes):
        for j, v in enumerate(n.inputs):
            if v is not None and v not in defined:
                where = "never defined" if v.producer is None else "defined later (not topological)"
                yield f"{_node_label(graph, i, n)}: input {j} ({v.name or 'unnamed'}) is {where}"
        for v in n.outputs:
            if v in defined:
                yield f"{_node_label(graph, i, n)}: output {v.name or ''} defined twice (not SSA)"
            defined.add(v)
    for name, v in graph.outputs.items():
        if v not in defined:
            yield f"graph output {name!r} is not produced by any node, input or weight"


def _rule_producer_links(graph: Graph) -> Iterator[str]:
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            if v.producer is not n:
                yield f"{_node_label(graph, i, n)}: output's producer link points elsewhere"


def _rule_types(graph: Graph) -> Iterator[str]:
    for i, n in enumerate(graph.nodes):
        if n.op not in REGISTRY:
            continue
        d = opdef(n.op)
        problem = d.check_arity(len(n.inputs))
        if problem:
            yield f"{_node_label(graph, i, n)}: {problem}"
            continue
        try:
            attrs = d.full_attrs(n.attrs)
            names = list(d.inputs)
            types = [None if v is None else v.type for v in n.inputs]
            if not (names and names[-1].endswith("*")):
                types += [None] * (len(names) - len(types))
            expected = d.infer(types, attrs)
        except Exception as exc:
            yield f"{_node_label(graph, i, n)}: {exc}"
            continue
        if len(expected) != len(n.outputs):
            yield (f"{_node_label(graph, i, n)}: has {len(n.outputs)} outputs, "
                   f"op defines {len(expected)}")
            continue
        for k, (t, v) in enumerate(zip(expected, n.outputs)):
            if t != v.type:
                yield f"{_node_label(graph, i, n)}: output {k} has type {v.type}, inferred {t}"


def _rule_io_names(graph: Graph) -> Iterator[str]:
    seen: set[str] = set()
    for v in graph.inputs:
        if not v.name:
            yield "a graph input has no name"
        elif v.name in seen:
            yield f"graph input name {v.name!r} is used twice"
        seen.add(v.name or "")


RULES: dict[str, Callable[[Graph], Iterator[str]]] = {
    "known-op": _rule_known_op,
    "defined-before-use": _rule_defined_before_use,
    "producer-links": _rule_producer_links,
    "types": _rule_types,
    "io-names": _rule_io_names,
}


def verify(graph: Graph, context: str = "") -> None:
    """Raise VerifyError listing every rule violation (prefixed by `context`, e.g. a pass name)."""
    problems = [p for rule in RULES.values() for p in rule(graph)]
    if problems:
        head = f"IR verification failed{' after ' + context if context else ''} " \
               f"in graph {graph.name!r}:"
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise VerifyError(head + "\n  " + "\n  ".join(shown) + more)
