"""The IR's one text form: `print_graph` and `parse_graph` round-trip exactly.

    graph tiny (
      %x: f32[batch, seq, 4]
    ) weights (
      @w: f32[8, 4]
    ) {
      %0 = linear(%x, @w) : f32[batch, seq, 8]
      %1 = rms_norm(%0, @n) {eps=1e-06, offset=0.0} : f32[batch, seq, 8]  # layer.0
      return y=%1
    }

Absent optional inputs print as `_`; attribute values are JSON, numpy arrays print as
`array(f32, [2], [1.0, 2.0])`; a trailing `# ...` holds the node's provenance name.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from flagc.errors import IRError
from flagc.ir.graph import Graph, Value
from flagc.ir.ops import Op
from flagc.ir.types import DType, TensorType

__all__ = ["print_graph", "parse_graph"]


def _fmt_attr(v: Any) -> str:
    if isinstance(v, np.ndarray):
        dt = DType.from_numpy(v.dtype)
        data = v.reshape(-1).tolist()
        return f"array({dt.value}, {json.dumps(list(v.shape))}, {json.dumps(data)})"
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v)


def print_graph(graph: Graph) -> str:
    names: dict[Value, str] = {}
    lines = [f"graph {graph.name} ("]
    for v in graph.inputs:
        names[v] = f"%{v.name}"
        lines.append(f"  %{v.name}: {v.type}")
    lines.append(") weights (")
    for wname, v in graph.weights.items():
        names[v] = f"@{wname}"
        lines.append(f"  @{wname}: {v.type}")
    lines.append(") {")
    counter = 0
    for n in graph.nodes:
        outs = []
        for v in n.outputs:
            names[v] = f"%{counter}"
            counter += 1
            outs.append(names[v])
        args = ", ".join("_" if v is None else names.get(v, "%?") for v in n.inputs)
        attrs = ""
        if n.attrs:
            attrs = " {" + ", ".join(f"{k}={_fmt_attr(n.attrs[k])}" for k in sorted(n.attrs)) + "}"
        types = ", ".join(str(v.type) for v in n.outputs)
        loc = f"  # {json.dumps(n.name)}" if n.name else ""
        lines.append(f"  {', '.join(outs)} = {n.op.value}({args}){attrs} : {types}{loc}")
    rets = ", ".join(f"{k}={names.get(v, '%?')}" for k, v in graph.outputs.items())
    lines.append(f"  return {rets}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- parser ----------------------------------------------------------------------------------

_DECL = re.compile(r"^\s*([%@])(\S+?):\s*(.+?)\s*$")
_NODE = re.compile(r"^\s*(?P<outs>%[^=]+?)\s*=\s*(?P<op>[a-z_0-9]+)\((?P<args>[^)]*)\)"
                   r"(?P<attrs>\s*\{.*\})?\s*:\s*(?P<types>[^#]+?)\s*(#\s*(?P<loc>.*))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets, parentheses or strings."""
    out, depth, cur, in_str, esc = [], 0, [], False, False
    for ch in text:
        if in_str:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_attr(text: str) -> Any:
    if text.startswith("array("):
        parts = _split_top(text[len("array("):-1])
        dt = DType(parts[0])
        shape = json.loads(parts[1])
        data = json.loads(parts[2])
        return np.array(data, dtype=dt.numpy).reshape(shape)
    return json.loads(text)


def parse_graph(text: str) -> Graph:
    """Parse IR text; weights come back without data sources. IRError names the bad line."""
    from flagc.ir.builder import make_node

    lines = [ln for ln in text.splitlines() if ln.strip()]
    m = re.match(r"^graph\s+(\S+)\s*\($", lines[0].strip()) if lines else None
    if not m:
        raise IRError("IR text must start with 'graph NAME ('")
    graph = Graph(m.group(1))
    env: dict[str, Value] = {}
    section = "inputs"
    for lineno, line in enumerate(lines[1:], start=2):
        s = line.strip()
        try:
            if s == ") weights (":
                section = "weights"
            elif s == ") {":
                section = "body"
            elif s == "}":
                section = "done"
            elif section in ("inputs", "weights"):
                d = _DECL.match(s)
                if not d:
                    raise IRError("expected '%name: type' or '@name: type'")
                t = TensorType.parse(d.group(3))
                if d.group(1) == "%":
                    env["%" + d.group(2)] = graph.add_input(d.group(2), t)
                else:
                    env["@" + d.group(2)] = graph.add_weight(d.group(2), t, None)
            elif s.startswith("return"):
                for item in _split_top(s[len("return"):].strip()):
                    k, _, ref = item.partition("=")
                    graph.outputs[k.strip()] = _lookup(env, ref.strip())
            else:
                _parse_node(s, env, graph, make_node)
        except IRError as exc:
            raise IRError(f"IR text line {lineno}: {exc}\n  {s}") from None
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise IRError(f"IR text line {lineno}: cannot parse ({exc})\n  {s}") from None
    return graph


def _lookup(env: dict[str, Value], ref: str) -> Value:
    if ref not in env:
        raise IRError(f"undefined value {ref}")
    return env[ref]


def _parse_node(s: str, env: dict[str, Value], graph: Graph, make_node) -> None:
    m = _NODE.match(s)
    if not m:
        raise IRError("expected '%out = op(args) {attrs} : types'")
    try:
        op = Op(m.group("op"))
    except ValueError:
        raise IRError(f"unknown op {m.group('op')!r}") from None
    args = [a.strip() for a in m.group("args").split(",") if a.strip()]
    inputs = [None if a == "_" else _lookup(env, a) for a in args]
    attrs: dict[str, Any] = {}
    if m.group("attrs"):
        body = m.group("attrs").strip()[1:-1]
        for item in _split_top(body):
            k, _, v = item.partition("=")
            attrs[k.strip()] = _parse_attr(v.strip())
    loc = json.loads(m.group("loc")) if m.group("loc") else None
    node = make_node(op, inputs, attrs, loc)
    outs = [o.strip() for o in m.group("outs").split(",")]
    types = [TensorType.parse(t) for t in _split_top(m.group("types"))]
    if len(outs) != len(node.outputs):
        raise IRError(f"{op.value} has {len(node.outputs)} outputs, line names {len(outs)}")
    for name, v, t in zip(outs, node.outputs, types):
        if v.type != t:
            raise IRError(f"{op.value}: declared type {t} but inferred {v.type}")
        env[name] = v
    graph.add_node(node)
