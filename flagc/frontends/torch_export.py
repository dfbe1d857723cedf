"""The torch.export frontend: an nn.Module becomes flagc IR through one aten -> IR table.

    graph = capture(module, inputs=[InputSpec("input_ids", DType.I64, ("batch", "seq")), ...],
                    outputs=["logits", "present.0.key", ...], weights={name: WeightSource})

The module's forward takes the inputs positionally and returns a flat tuple of tensors, one per
output name. Symbolic dims are names ("batch", "seq", "past") or sums of them ("past+seq"); each
bare name becomes a `torch.export.Dim` and sums are left to export (`Dim.AUTO`).

Weights stay lazy: tracing runs on fake tensors (the module may live on the meta device), and
every parameter becomes an IR weight whose data comes from `weights[name]` (a WeightSource, e.g.
a memory-mapped checkpoint tensor) or, for a module with real parameters, from the parameter
itself. An aten op without a converter stops the build naming the op and the source line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from flagc.errors import IRError
from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Value, WeightSource
from flagc.ir.ops import Op
from flagc.ir.symbolic import Dim, dim_str, parse_dim
from flagc.ir.types import DType, TensorType

__all__ = ["InputSpec", "capture", "UnsupportedOpError", "SymVal", "Converter"]

# Example sizes for tracing: distinct and > 1 so export neither specialises nor confuses dims.
_EXAMPLE_SIZES = {"batch": 2, "seq": 5, "past": 3, "src": 7, "choices": 2}
_DIM_RANGES = {"batch": (1, 1024), "seq": (1, 65536), "past": (0, 65536), "src": (1, 65536)}


class UnsupportedOpError(IRError):
    """An aten op the frontend has no converter for (or cannot convert with these arguments)."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, dtype, and dims (ints, symbol names or sums like 'past+seq')."""

    name: str
    dtype: DType
    dims: tuple[int | str, ...]

    def ir_type(self) -> TensorType:
        return TensorType(self.dtype, tuple(d if isinstance(d, int) else parse_dim(d)
                                            for d in self.dims))


class SymVal:
    """A symbolic integer (a SymInt in the exported graph): its IR dim, and the IR scalar
    computing it at run time, emitted on first use."""

    __slots__ = ("dim", "_make", "_value")

    def __init__(self, dim: Dim, make: Callable[[], Value]):
        self.dim, self._make, self._value = dim, make, None

    def value(self) -> Value:
        if self._value is None:
            self._value = self._make()
        return self._value

    def __repr__(self) -> str:
        return f"SymVal({dim_str(self.dim)})"


def capture(module: torch.nn.Module, inputs: Sequence[InputSpec], outputs: Sequence[str], *,
            weights: Optional[Mapping[str, WeightSource]] = None, name: str = "model",
            example_sizes: Optional[Mapping[str, int]] = None, strip_prefix: str = "",
            dim_ranges: Optional[Mapping[str, tuple[int, int]]] = None) -> Graph:
    """Export `module` with torch.export and convert it to an IR graph (see module docstring).

    Args:
        module: forward(*inputs) -> tuple of tensors (one per output name), in eval mode.
        inputs: the graph inputs, in forward's argument order.
        outputs: names for forward's returned tensors, in order.
        weights: parameter FQN -> WeightSource; required for parameters on the meta device.
        name: the IR graph's name.
        example_sizes: symbol -> size used for the tracing examples (defaults are small primes).
        strip_prefix: removed from parameter names to name IR weights (a wrapper's `inner.`).
        dim_ranges: symbol -> (min, max) where the defaults are too wide (a learned position
            table bounds seq).
    """
    exported = export_module(module, inputs, example_sizes, dim_ranges)
    cv = Converter(exported, inputs, outputs, weights, name, module)
    cv.strip_prefix = strip_prefix
    return cv.run()


def export_module(module: torch.nn.Module, inputs: Sequence[InputSpec],
                  example_sizes: Optional[Mapping[str, int]] = None,
                  dim_ranges: Optional[Mapping[str, tuple[int, int]]] = None):
    """torch.export with the declared dynamic dims, on fake / meta tensors."""
    sizes = dict(_EXAMPLE_SIZES, **(example_sizes or {}))
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dims: dict[str, Any] = {}
    examples, shapes = [], []
    for spec in inputs:
        concrete, dyn = [], {}
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                concrete.append(d)
                continue
            parsed = parse_dim(d)
            if isinstance(parsed, int):
                concrete.append(parsed)
                continue
            from flagc.ir.symbolic import eval_dim

            concrete.append(eval_dim(parsed, {s: sizes.get(s, 4) for s in parsed.symbols}))
            if d in parsed.symbols or d.isidentifier():
                if d not in dims:
                    lo, hi = {**_DIM_RANGES, **(dim_ranges or {})}.get(d, (1, 65536))
                    dims[d] = torch.export.Dim(d, min=lo, max=hi)
                dyn[axis] = dims[d]
            else:
                dyn[axis] = torch.export.Dim.AUTO
        examples.append(_example(spec.dtype, concrete, device))
        shapes.append(dyn or None)
    shapes = _group_varargs(module, shapes)
    try:
        return torch.export.export(module, tuple(examples), dynamic_shapes=shapes,
                                   strict=False)
    except Exception as exc:  # export's own errors are long; keep the head and name the module
        text = str(exc).strip().splitlines()
        head = "\n".join(text[:12])
        raise IRError(f"torch.export could not capture {type(module).__name__}: "
                      f"{type(exc).__name__}: {head}") from exc


def _group_varargs(module, shapes: list):
    """dynamic_shapes follow forward's signature: inputs caught by *args form one tuple."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return tuple(shapes[:i]) + (tuple(shapes[i:]),)
    return tuple(shapes)


def _example(dtype: DType, shape: list[int], device) -> torch.Tensor:
    if dtype.is_float:
        return torch.zeros(shape, dtype=dtype.torch, device=device)
    if dtype is DType.BOOL:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.ones(shape, dtype=dtype.torch, device=device)


def source_line(node) -> str:
    """'file.py:123 (code)' of the user code that produced an FX node, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") \
                else ""
            parts = lines[i].split(",")
            path = _short_path(parts[0][len("File "):].strip().strip('"'))
            lineno = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
            return f"{path}:{lineno}" + (f" ({code})" if code else "")
    return "unknown source line"


def _short_path(path: str) -> str:
    import os

    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


class Converter:
    """Walks an ExportedProgram's FX graph, dispatching each node through ATEN_TABLE."""

    def __init__(self, exported, inputs: Sequence[InputSpec], outputs: Sequence[str],
                 weights: Optional[Mapping[str, WeightSource]], name: str,
                 module: Optional[torch.nn.Module] = None):
        self.ep = exported
        self.specs = list(inputs)
        self.output_names = list(outputs)
        self.weights = dict(weights or {})
        self.module = module
        self.graph = Graph(name)
        self.env: dict[Any, Any] = {}
        self.node = None  # the FX node being converted (for provenance and errors)
        self.strip_prefix = ""
        from flagc.frontends.shape_check import ShapeCheck

        self.shapes = ShapeCheck()

    # ---- the walk ---------------------------------------------------------------------------
    def run(self) -> Graph:
        from flagc.frontends.aten_table import lookup

        self._placeholders()
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                continue
            self.node = node
            if node.op == "output":
                self._outputs(node.args[0])
                break
            if node.op != "call_function":
                raise UnsupportedOpError(f"unsupported FX node {node.op} {node.target} at "
                                         f"{source_line(node)}")
            fn = lookup(node.target)
            args = self._map(node.args)
            kwargs = self._map(node.kwargs)
            if fn is None:
                raise UnsupportedOpError(f"unsupported aten op {_op_name(node.target)} at "
                                         f"{source_line(node)}: add a converter to "
                                         "flagc/frontends/aten_table.py")
            if not self._has_dynamic(args, kwargs) and _foldable(node.target):
                self.env[node] = self._fold(node, args, kwargs)
                continue
            try:
                self.env[node] = fn(self, *args, **kwargs)
            except UnsupportedOpError:
                raise
            except IRError as exc:
                raise IRError(f"converting {_op_name(node.target)} at {source_line(node)}: "
                              f"{exc}") from exc
            self._check_shape(node)
        return self.graph

    def _check_shape(self, node) -> None:
        result = self.env[node]
        if isinstance(result, Value):
            problem = self.shapes.problem(result.type, node.meta.get("val"))
            if problem:
                raise IRError(f"converting {_op_name(node.target)} at {source_line(node)}: "
                              f"{problem} (a converter bug in flagc/frontends/aten_table.py)")

    def _map(self, x):
        if isinstance(x, torch.fx.Node):
            return self.env[x]
        if isinstance(x, (list, tuple)):
            return type(x)(self._map(i) for i in x)
        if isinstance(x, dict):
            return {k: self._map(v) for k, v in x.items()}
        return x

    def _has_dynamic(self, args, kwargs) -> bool:
        def walk(x):
            if isinstance(x, (Value, SymVal)):
                return True
            if isinstance(x, (list, tuple)):
                return any(walk(i) for i in x)
            if isinstance(x, dict):
                return any(walk(v) for v in x.values())
            return False
        return walk(args) or walk(kwargs)

    def _fold(self, node, args, kwargs):
        """Evaluate a node whose inputs are all constants (rotary inverse frequencies, ...)."""
        kwargs = dict(kwargs)
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        with torch.no_grad():
            return node.target(*args, **kwargs)

    # ---- inputs, weights and outputs ---------------------------------------------------------
    def _placeholders(self) -> None:
        from torch.export.graph_signature import InputKind

        user = iter(self.specs)
        by_name = {n.name: n for n in self.ep.graph.nodes if n.op == "placeholder"}
        for spec in self.ep.graph_signature.input_specs:
            node = by_name[spec.arg.name]
            if spec.kind == InputKind.USER_INPUT:
                s = next(user)
                self.env[node] = self.graph.add_input(s.name, s.ir_type())
                self.shapes.bind(node.meta["val"], s.ir_type())
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.env[node] = self._weight(spec.target, node.meta["val"])
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self.env[node] = self.ep.constants[spec.target]
            else:
                raise UnsupportedOpError(f"unsupported exported input kind {spec.kind} "
                                         f"({spec.target})")

    def _weight(self, fqn: str, fake) -> Value:
        shape = tuple(int(d) for d in fake.shape)
        dtype = DType.from_torch(fake.dtype)
        ir_dtype = DType.F32 if dtype.is_float else dtype  # checkpoints load as f32 (DSL too)
        source = self.weights.get(fqn) or self._module_source(fqn)
        name = fqn[len(self.strip_prefix):] if fqn.startswith(self.strip_prefix) else fqn
        return self.graph.add_weight(name, TensorType(ir_dtype, shape), source)

    def _module_source(self, fqn: str) -> WeightSource:
        tensor = None
        if self.module is not None:
            tensor = self.ep.state_dict.get(fqn)
            if tensor is None:  # non-persistent buffers (HF's position_ids) are constants
                tensor = self.ep.constants.get(fqn)
        if tensor is None or tensor.device.type == "meta":
            raise IRError(f"parameter {fqn!r} lives on the meta device and no WeightSource was "
                          "given for it: pass weights={name: WeightSource} to capture()")
        held = tensor.detach()

        def load(t=held):
            t = t.to(torch.float32) if t.is_floating_point() else t
            return t.contiguous().numpy()

        return WeightSource(load, origin=f"module parameter {fqn}")

    def _outputs(self, results) -> None:
        flat = list(results)
        if len(flat) != len(self.output_names):
            raise IRError(f"the module returned {len(flat)} tensors but {len(self.output_names)} "
                          f"output names were given: {self.output_names}")
        for name, x in zip(self.output_names, flat):
            v = self.env[x] if isinstance(x, torch.fx.Node) else x
            self.graph.outputs[name] = self.value(v)

    # ---- helpers for converters --------------------------------------------------------------
    def emit(self, op: Op, inputs: Sequence[Optional[Value]], **attrs):
        where = source_line(self.node) if self.node is not None else None
        node = make_node(op, list(inputs), attrs, where)
        self.graph.add_node(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def constant(self, array, dtype: Optional[DType] = None) -> Value:
        arr = np.asarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor)
                         else array)
        if dtype is not None:
            arr = arr.astype(dtype.numpy)
        if arr.size > 64:  # large folded tensors become weights, not inline attributes
            name = f"const.{len(self.graph.weights)}"
            return self.graph.add_constant_weight(name, np.ascontiguousarray(arr))
        return self.emit(Op.CONSTANT, [], value=np.array(arr, copy=True))  # keeps 0-d

    def value(self, x, dtype: Optional[DType] = None) -> Value:
        """Any operand (IR value, SymVal, python scalar, constant tensor) as an IR value."""
        if isinstance(x, SymVal):
            v = x.value()
        elif isinstance(x, Value):
            v = x
        elif isinstance(x, torch.Tensor):
            v = self.constant(x)
        elif isinstance(x, bool):
            v = self.constant(np.array(x))
        elif isinstance(x, int):
            v = self.constant(np.array(x, np.int64))
        elif isinstance(x, float):
            v = self.constant(np.array(x, (dtype or DType.F32).numpy))
        else:
            raise IRError(f"cannot use {x!r} as a tensor operand")
        if dtype is not None and v.dtype is not dtype:
            v = self.cast(v, dtype)
        return v

    def cast(self, v: Value, dtype: DType) -> Value:
        if v.dtype is dtype:
            return v
        if v.producer is not None and v.producer.op is Op.CONSTANT:
            return self.constant(np.asarray(v.producer.attrs["value"]).astype(dtype.numpy))
        return self.emit(Op.CAST, [v], dtype=dtype.value)

    def out_dtype(self, index: int = 0) -> DType:
        val = self.node.meta.get("val")
        if isinstance(val, (list, tuple)):
            val = val[index]
        return DType.from_torch(val.dtype)

    def sym_value(self, x) -> Value:
        """An int or SymVal as an i64 scalar IR value."""
        if isinstance(x, SymVal):
            return x.value()
        return self.constant(np.array(int(x), np.int64))


def as_dim(x) -> Dim:
    """An int or SymVal as an IR dim."""
    return x.dim if isinstance(x, SymVal) else int(x)


def _op_name(target) -> str:
    """aten.add.Tensor for overloads, the function name for Python builtins."""
    if hasattr(target, "_schema"):
        return str(target)
    return getattr(target, "__name__", str(target))


def _foldable(target) -> bool:
    # Creation ops and pure math on constants fold; never fold ops with side effects.
    return target is not None and not str(target).startswith("aten._assert")
