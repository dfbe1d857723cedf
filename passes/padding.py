"""pack-tokens: encoders compute their per-token ops on the real tokens only.

A padded batch [batch, seq, hidden] spends the same work on padding as on text, and in practice
a quarter or more of a batch is padding. Every op that treats tokens independently (linear,
norms, activations, residual adds) gives the same result on the real tokens gathered into one
[tokens, hidden] tensor (`pack_tokens`); only ops that mix positions (attention, reshapes into
heads) need the padded layout, and get it back through `unpack_tokens`. In a BERT layer that is
one unpack before the attention block and one pack after it: the output projection, both norms
and the whole MLP run on real tokens.

Applies to graphs with an `attention_mask` input [batch, seq] and no KV cache (encoders). Per-token
outputs come back with zeros at padding positions (their values carry no meaning in any model);
`--pass-option pack_tokens=false` keeps the padded computation everywhere.
"""

from __future__ import annotations

from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Node, Value
from flagc.ir.ops import Op
from flagc.passes.cleanup import dce, redirect_outputs, redirected
from flagc.passes.manager import PassContext, register_pass

__all__ = ["pack_tokens"]

# Ops that treat every token on its own, given per-token operands or [<= 1-D] parameters.
TOKENWISE = {Op.LINEAR, Op.QLINEAR, Op.ADD_NORM, Op.LAYER_NORM, Op.RMS_NORM, Op.GELU, Op.SILU,
             Op.RELU, Op.TANH, Op.SIGMOID, Op.ERF, Op.CAST, Op.ADD, Op.SUB, Op.MUL, Op.DIV}
# Params: the inputs of these ops that are weights, whatever their rank.
PARAM_INPUTS = {Op.LINEAR: {1, 2}, Op.QLINEAR: set(range(1, 8)), Op.ADD_NORM: {2, 3},
                Op.LAYER_NORM: {1, 2}, Op.RMS_NORM: {1}}


@register_pass("pack-tokens")
def pack_tokens(graph: Graph, ctx: PassContext) -> dict[str, int]:
    if ctx.options.get("pack_tokens", True) is False:  # --pass-option pack_tokens=false
        ctx.decline("pack-tokens", "turned off (pack_tokens=false)")
        return {"packed ops": 0}
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None or mask.rank != 2:
        return {"packed ops": 0}
    if any(v.name.startswith("past_key_values.") for v in graph.inputs):
        ctx.decline("pack-tokens", "a KV cache: decoders keep the padded layout")
        return {"packed ops": 0}
    lead = tuple(mask.shape)
    chosen = _packable(graph, lead)
    if not chosen:
        return {"packed ops": 0}
    packed: dict[Value, Value] = {}  # padded value -> its packed twin
    nodes: list[Node] = []

    def packed_of(v: Value) -> Value:
        if v not in packed:
            node = make_node(Op.PACK_TOKENS, [v, mask])
            nodes.append(node)
            packed[v] = node.outputs[0]
        return packed[v]

    redirect: dict[Value, Value] = {}
    count = 0
    for node in graph.nodes:
        if id(node) not in chosen:
            nodes.append(redirected(node, redirect))
            continue
        ins = [packed_of(v) if _per_token(node, i, v, lead) else v
               for i, v in enumerate(node.inputs)]
        twin = make_node(node.op, ins, node.attrs, node.name)
        nodes.append(twin)
        count += 1
        for old, new in zip(node.outputs, twin.outputs):
            packed[old] = new
            unpack = make_node(Op.UNPACK_TOKENS, [new, mask])
            nodes.append(unpack)  # dce drops it when nothing padded reads `old`
            redirect[old] = unpack.outputs[0]
    graph.nodes = nodes
    redirect_outputs(graph, redirect)
    dce(graph, ctx)
    return {"packed ops": count}


def _per_token(node: Node, i: int, v: Value | None, lead: tuple) -> bool:
    """Input i of `node` is a per-token activation ([batch, seq, ...]), not a parameter."""
    if v is None or i in PARAM_INPUTS.get(node.op, ()):
        return False
    return v.rank >= 2 and tuple(v.shape[:2]) == lead


def _candidate(node: Node, lead: tuple) -> bool:
    if node.op not in TOKENWISE:
        return False
    acts = [i for i, v in enumerate(node.inputs) if _per_token(node, i, v, lead)]
    if not acts or any(v.rank < 2 or tuple(v.shape[:2]) != lead for v in node.outputs):
        return False
    for i, v in enumerate(node.inputs):  # everything else broadcasts along the last dims only
        if v is not None and i not in acts and i not in PARAM_INPUTS.get(node.op, ()) \
                and v.rank > 1:
            return False
    return True


def _packable(graph: Graph, lead: tuple) -> set[int]:
    """ids of the nodes worth packing: candidates whose results reach another packed node or a
    graph output (a result that only feeds padded consumers would be packed just to be
    unpacked, e.g. the q|k|v projection whose split heads go to attention)."""
    chosen = {id(n) for n in graph.nodes if _candidate(n, lead)}
    consumers: dict[Value, list[Node]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                consumers.setdefault(v, []).append(n)
    outputs = set(graph.outputs.values())
    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if id(n) in chosen and not any(
                    v in outputs or any(id(c) in chosen for c in consumers.get(v, ()))
                    for v in n.outputs):
                chosen.discard(id(n))
                changed = True
    return chosen
