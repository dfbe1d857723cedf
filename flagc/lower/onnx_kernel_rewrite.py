"""What every rewrite onto flagc's own kernels (`ai.flagc`, runtimes/kernels) shares: the op
domain, who reads a tensor, committing node replacements, and the opset import the rewritten
graph needs."""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import TensorProto, helper

__all__ = ["DOMAIN", "import_domain", "commit_rewrites", "readers_of", "only_reader_lookup",
           "drop_dead", "reads"]

DOMAIN = "ai.flagc"


def import_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def commit_rewrites(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                    replaced: dict[int, onnx.NodeProto | None],
                    new_inits: dict[str, TensorProto]) -> None:
    """Rebuild the graph from `nodes` (the graph's nodes, as the objects whose ids key
    `replaced`), each swapped for its replacement (None: dropped); add `new_inits`."""
    g = model.graph
    kept = [replaced.get(id(n), n) for n in nodes]
    del g.node[:]
    g.node.extend(n for n in kept if n is not None)
    g.initializer.extend(new_inits.values())
    import_domain(model)


def readers_of(nodes) -> dict[str, list[onnx.NodeProto]]:
    """tensor name -> the nodes (of `nodes`) reading it."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            readers[i].append(n)
    return readers


def only_reader_lookup(g: onnx.GraphProto, readers: dict[str, list[onnx.NodeProto]]):
    """only_reader(name): the one node reading tensor `name`; None for several, none, or a
    graph output."""
    graph_outputs = {o.name for o in g.output}

    def only_reader(name: str) -> onnx.NodeProto | None:
        users = readers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph_outputs else None
    return only_reader


def drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (what a rewrite left behind)."""
    live = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(reads(node))
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def reads(node: onnx.NodeProto) -> set[str]:
    """The names `node` reads: its inputs and what its subgraphs (If branches) take from the
    enclosing scope."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            local |= {o for n in sub.node for o in n.output}
            names |= {i for n in sub.node for i in reads(n)} - local
    return names
