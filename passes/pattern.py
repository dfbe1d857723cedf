"""The one pattern matcher every rewrite uses: pattern -> condition (with a reason) -> replacement.

A pattern is a tree of `Pat` (a node with an op, attribute constraints and input patterns), `Var`
(any value, bound by name; the same name must bind the same value) and `Const` (a scalar from a
CONSTANT node, optionally with a required value). Commutative binary ops match either operand
order. A match is rejected when an inner node's result is read outside the match (replacing the
root would leave it computed twice), unless the pattern marks the node `shared=True`.

    rule = Rewrite("silu", Pat(Op.MUL, [Var("x"), Pat(Op.SIGMOID, [Var("x")])]),
                   replace=lambda m, r: r.emit(Op.SILU, [m["x"]]))
    apply_rewrites(graph, [rule], ctx)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Node, Value
from flagc.ir.ops import COMMUTATIVE, Op

__all__ = ["Pat", "Var", "Const", "Match", "Rewrite", "Replacer", "apply_rewrites",
           "scalar_value"]


@dataclass(frozen=True)
class Var:
    name: str
    check: Optional[Callable[[Value], bool]] = None  # e.g. lambda v: v.kind == "weight"


@dataclass(frozen=True)
class Const:
    """A scalar (any shape of one element) from a CONSTANT node; `value` pins it (rel. 1e-6)."""

    name: Optional[str] = None
    value: Optional[float] = None


@dataclass(frozen=True)
class Pat:
    op: Union[Op, frozenset]
    inputs: Sequence[Any] = ()
    attrs: dict = field(default_factory=dict)  # name -> value or predicate(value) -> bool
    name: Optional[str] = None  # binds the node under this name
    shared: bool = False  # its outputs may be read outside the match
    output: int = 0  # which output of the node the parent reads


PatternPart = Union[Pat, Var, Const]


class Match(dict):
    """Bound values by name (`m["x"]`), plus `nodes` (name -> Node) and `matched` (all nodes)."""

    def __init__(self):
        super().__init__()
        self.nodes: dict[str, Node] = {}
        self.matched: list[Node] = []
        self.consts: dict[str, float] = {}


def scalar_value(v: Value) -> Optional[float]:
    """The number a one-element CONSTANT holds, else None."""
    n = v.producer
    if v.kind != "node" or n is None or n.op is not Op.CONSTANT:
        return None
    arr = np.asarray(n.attrs["value"])
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _match(part: PatternPart, v: Optional[Value], m: Match, root: bool) -> bool:
    if isinstance(part, Var):
        if v is None or (part.check is not None and not part.check(v)):
            return False
        if part.name in m:
            return m[part.name] is v
        m[part.name] = v
        return True
    if isinstance(part, Const):
        x = None if v is None else scalar_value(v)
        if x is None:
            return False
        if part.value is not None and not np.isclose(x, part.value, rtol=1e-6, atol=1e-12):
            return False
        if part.name:
            m.consts[part.name] = x
            m[part.name] = v
        return True
    if v is None or v.kind != "node" or v.producer is None:
        return False
    node = v.producer
    ops = part.op if isinstance(part.op, frozenset) else frozenset([part.op])
    if node.op not in ops or node.outputs[part.output] is not v:
        return False
    for key, want in part.attrs.items():
        have = node.attrs.get(key)
        if not (want(have) if callable(want) else have == want):
            return False
    if len(part.inputs) != len(node.inputs) and not (
            len(part.inputs) < len(node.inputs)
            and all(x is None for x in node.inputs[len(part.inputs):])):
        return False
    orders = [list(node.inputs[:len(part.inputs)])]
    if node.op in COMMUTATIVE and len(part.inputs) == 2:
        orders.append(orders[0][::-1])
    for order in orders:
        trial = _copy(m)
        if all(_match(p, x, trial, False) for p, x in zip(part.inputs, order)):
            _restore(m, trial)
            if part.name:
                m.nodes[part.name] = node
            m.matched.append(node)
            node_flags = getattr(m, "_shared", set())
            if part.shared or root:
                node_flags.add(node)
            m._shared = node_flags  # type: ignore[attr-defined]
            return True
    return False


def _copy(m: Match) -> Match:
    c = Match()
    c.update(m)
    c.nodes = dict(m.nodes)
    c.matched = list(m.matched)
    c.consts = dict(m.consts)
    c._shared = set(getattr(m, "_shared", set()))  # type: ignore[attr-defined]
    return c


def _restore(m: Match, src: Match) -> None:
    m.clear()
    m.update(src)
    m.nodes, m.matched, m.consts = src.nodes, src.matched, src.consts
    m._shared = src._shared  # type: ignore[attr-defined]


def match_at(pattern: Pat, node: Node, uses: dict[Value, list[Node]],
             graph_outputs: set[Value]) -> Optional[Match]:
    """Match `pattern` rooted at `node`, or None. Inner nodes must not escape the match."""
    m = Match()
    if not _match(pattern, node.outputs[pattern.output], m, True):
        return None
    inside = set(map(id, m.matched))
    for n in m.matched:
        if n in m._shared:  # type: ignore[attr-defined]
            continue
        for out in n.outputs:
            if out in graph_outputs or any(id(u) not in inside for u in uses.get(out, [])):
                return None
    return m


class Replacer:
    """Builds the replacement: new nodes go right before the matched root, in order."""

    def __init__(self, graph: Graph, scope: Optional[str]):
        self.graph = graph
        self.scope = scope
        self.new_nodes: list[Node] = []
        self.aliases: list[tuple[Value, Value]] = []  # other values the replacement takes over

    def alias(self, old: Value, new: Value) -> None:
        self.aliases.append((old, new))

    def emit(self, op: Op, inputs: Sequence[Optional[Value]], **attrs: Any):
        node = make_node(op, inputs, attrs, self.scope)
        self.new_nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def constant(self, value, dtype) -> Value:
        return self.emit(Op.CONSTANT, [], value=np.array(value, dtype=dtype.numpy))


Condition = Callable[[Match, Graph], Optional[str]]
Replacement = Callable[[Match, Replacer], Union[Value, Sequence[Value]]]


@dataclass
class Rewrite:
    """One rewrite rule. `condition` returns None to accept, else the reason it declines;
    `replace` returns the value(s) that take the place of the root's output(s)."""

    name: str
    pattern: Pat
    replace: Replacement
    condition: Optional[Condition] = None
    log_declines: bool = True  # False for rules whose declines are routine (canonicalization)


def apply_rewrites(graph: Graph, rules: Sequence[Rewrite], ctx=None,
                   max_rounds: int = 8) -> dict[str, int]:
    """Apply rules until none fires (bounded); returns how often each fired."""
    counts = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        fired = _one_round(graph, rules, ctx, counts)
        if not fired:
            break
    return counts


def _one_round(graph: Graph, rules, ctx, counts) -> int:
    fired = 0
    uses = graph.uses()
    outputs = set(graph.outputs.values())
    dead: set[int] = set()
    redirect: dict[Value, Value] = {}  # replaced value -> its replacement, applied at the end
    result: list[Node] = []
    for node in graph.nodes:
        if id(node) in dead:
            result.append(node)  # dropped below
            continue
        for rule in rules:
            m = match_at(rule.pattern, node, uses, outputs)
            if m is None or any(id(n) in dead for n in m.matched):
                continue
            reason = rule.condition(m, graph) if rule.condition else None
            if reason is not None:
                if ctx is not None and rule.log_declines:
                    ctx.decline(rule.name, reason)
                continue
            r = Replacer(graph, node.name)
            new = rule.replace(m, r)
            new_values = [new] if isinstance(new, Value) else list(new)
            olds = [node.outputs[rule.pattern.output]] if len(new_values) == 1 else \
                list(node.outputs)
            result.extend(r.new_nodes)
            for old, nv in list(zip(olds, new_values)) + r.aliases:
                redirect[old] = nv
                uses.setdefault(nv, []).extend(uses.get(old, []))
            for n in m.matched:
                if n not in m._shared or n is node:  # type: ignore[attr-defined]
                    dead.add(id(n))
            counts[rule.name] += 1
            fired += 1
            break
        result.append(node)
    if not fired:
        return 0

    def follow(v: Optional[Value]) -> Optional[Value]:
        while v is not None and v in redirect:
            v = redirect[v]
        return v

    nodes = []
    for n in result:
        if id(n) in dead:
            continue
        if any(v in redirect for v in n.inputs if v is not None):
            n = n.with_inputs(follow(v) for v in n.inputs)
        nodes.append(n)
    graph.nodes = nodes
    for k, v in graph.outputs.items():
        graph.outputs[k] = follow(v)
    return fired
