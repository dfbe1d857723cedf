"""The graph DSL: Fastllm-style custom model files build flagc IR.

A custom model is a `ComputeGraph` subclass whose `build()` reads `self.config` (the model folder's
config.json), `self.weight[name]` (checkpoint tensor names) and `self.data[name]` (inputs and named
intermediates), and calls op methods in destination-passing style, as Fastllm does:

    self.RMSNorm(data["hiddenStates"], weight["model.norm.weight"], eps, data["normed"])

Writing to `data[name]` again rebinds the name to a new SSA value. Reserved inputs: `inputIds`,
`positionIds`, `attentionMask`, `sin`, `cos` (rotary tables computed from the config), `atype`,
and `data["pastKey."][i]` / `data["pastValue."][i]` (the KV cache of block i; their last binding
becomes the block's present output). The graph's output is `data["logits"]` (or
`data["lastHiddenStates"]` for encoders).
"""

from __future__ import annotations

import math
import traceback
from typing import Any, Optional, Sequence

import numpy as np

from flagc.errors import CheckpointError, ConfigError, FlagcError, IRError
from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Value
from flagc.ir.ops import Op
from flagc.ir.symbolic import sym
from flagc.ir.types import DType, TensorType

__all__ = ["ComputeGraph", "DataRef", "WeightRef"]

BATCH, SEQ, PAST = sym("batch"), sym("seq"), sym("past")


class DataRef:
    """A named slot in `self.data`; reading resolves to its current value."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: "ComputeGraph", name: str):
        self.owner, self.name = owner, name

    def __repr__(self) -> str:
        return f"data[{self.name!r}]"


class WeightRef:
    """A checkpoint tensor by name; resolved (and checked to exist) when an op uses it."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: "ComputeGraph", name: str):
        self.owner, self.name = owner, name

    def __getitem__(self, key):  # weight["model.layers."][i][".mlp.up_proj.weight"]
        return WeightRef(self.owner, f"{self.name}{key}")

    def __repr__(self) -> str:
        return f"weight[{self.name!r}]"

    @property
    def exists(self) -> bool:
        return self.name in self.owner._store


class _WeightView:
    def __init__(self, owner: "ComputeGraph"):
        self._owner = owner

    def __getitem__(self, name: str) -> WeightRef | None:
        if name == "":  # Fastllm's "no tensor" (e.g. an absent bias)
            return None
        return WeightRef(self._owner, name)

    def get(self, name: str) -> WeightRef | None:
        """The tensor if the checkpoint has it, else None (for optional biases)."""
        return WeightRef(self._owner, name) if name in self._owner._store else None

    def __contains__(self, name: str) -> bool:
        return name in self._owner._store

    def names(self) -> list[str]:
        return self._owner._store.names()


class _IndexedData:
    def __init__(self, owner: "ComputeGraph", prefix: str):
        self.owner, self.prefix = owner, prefix

    def __getitem__(self, i: int) -> DataRef:
        return DataRef(self.owner, f"{self.prefix}{int(i)}")


class _DataView:
    def __init__(self, owner: "ComputeGraph"):
        self._owner = owner

    def __getitem__(self, name: str):
        if name in ("pastKey.", "pastValue."):
            return _IndexedData(self._owner, name)
        return DataRef(self._owner, name)

    def __contains__(self, name: str) -> bool:
        return name in self._owner._env


Operand = Any  # DataRef | WeightRef | Value | None


class ComputeGraph:
    """Base class of custom model files; subclasses implement `build()`."""

    def __init__(self, config: dict[str, Any], weights, name: str = "model"):
        self.config: dict[str, Any] = dict(config)
        self._store = weights
        self.graph = Graph(name)
        self.weight = _WeightView(self)
        self.data = _DataView(self)
        self._env: dict[str, Value] = {}
        self._past_inputs: dict[str, Value] = {}
        self.activation_dtype = DType.F32

    def build(self) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError("a ComputeGraph subclass must implement build()")

    # ---- derived config ------------------------------------------------------------------------
    def _cfg(self, key: str, *alts: str, default: Any = None) -> Any:
        for k in (key, *alts):
            if k in self.config and self.config[k] is not None:
                return self.config[k]
        if default is None:
            raise ConfigError(f"config is missing {key!r}" +
                              (f" (or {', '.join(map(repr, alts))})" if alts else ""))
        return default

    @property
    def num_heads(self) -> int:
        return int(self._cfg("num_attention_heads", "n_head", "num_heads"))

    @property
    def kv_heads(self) -> int:
        return int(self._cfg("num_key_value_heads", "multi_query_group_num",
                             default=self.num_heads))

    @property
    def head_dim(self) -> int:
        if self.config.get("head_dim"):
            return int(self.config["head_dim"])
        return int(self._cfg("hidden_size", "n_embd")) // self.num_heads

    @property
    def max_positions(self) -> int:
        return int(self._cfg("max_positions", "max_position_embeddings", "seq_length",
                             "n_positions"))

    # ---- value resolution ----------------------------------------------------------------------
    def _value(self, x: Operand, what: str) -> Optional[Value]:
        if x is None or isinstance(x, Value):
            return x
        if isinstance(x, WeightRef):
            return self._weight_value(x.name, what)
        if isinstance(x, DataRef):
            if x.name not in self._env:
                self._env[x.name] = self._reserved_input(x.name, what)
            return self._env[x.name]
        raise IRError(f"{what}: expected data[...] or weight[...], got {x!r}")

    def _weight_value(self, name: str, what: str) -> Value:
        if name in self.graph.weights:
            return self.graph.weights[name]
        if name not in self._store:
            raise CheckpointError(f"{self._store.missing_message(name)} (needed by {what})")
        _, shape = self._store.info(name)
        return self.graph.add_weight(name, TensorType(DType.F32, shape), self._store.source(name))

    def _reserved_input(self, name: str, what: str) -> Value:
        g = self.graph
        if name == "inputIds":
            return g.add_input("input_ids", TensorType(DType.I64, (BATCH, SEQ)))
        if name == "positionIds":
            return g.add_input("position_ids", TensorType(DType.I64, (BATCH, SEQ)))
        if name == "attentionMask":
            return g.add_input("attention_mask", TensorType(DType.I64, (BATCH, PAST + SEQ)))
        if name in ("sin", "cos"):
            return self._rope_tables()[name]
        if name.startswith(("pastKey.", "pastValue.")):
            layer = int(name.split(".")[1])
            kind = "key" if name.startswith("pastKey.") else "value"
            t = TensorType(self.activation_dtype, (BATCH, self.kv_heads, PAST, self.head_dim))
            v = g.add_input(f"past_key_values.{layer}.{kind}", t)
            self._past_inputs[name] = v
            return v
        raise IRError(f"{what}: data[{name!r}] is read before anything was written to it")

    def _rope_tables(self) -> dict[str, Value]:
        if "cos" in self._env:
            return {"cos": self._env["cos"], "sin": self._env["sin"]}
        # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta
        # and rope_scaling at the top level.
        params = self.config.get("rope_parameters") or {}
        theta = float(params.get("rope_theta", self._cfg("rope_theta", default=10000.0)))
        scaling = self.config.get("rope_scaling") or params
        if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope scaling {scaling!r} is not supported yet (supported: "
                              "default)")
        factor = float(self.config.get("partial_rotary_factor", 1.0))
        rot = int(self.head_dim * factor)
        positions = self.max_positions
        inv = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        angles = np.outer(np.arange(positions, dtype=np.float64), inv)
        # float64 angles then fp32 tables: matches HF within 1e-7 and keeps long contexts exact.
        cos = self.graph.add_constant_weight("rope.cos", np.cos(angles).astype(np.float32))
        sin = self.graph.add_constant_weight("rope.sin", np.sin(angles).astype(np.float32))
        self._env["cos"], self._env["sin"] = cos, sin
        return {"cos": cos, "sin": sin}

    def _emit(self, op: Op, inputs: Sequence[Operand], what: str, **attrs):
        vals = [self._value(x, f"{op.value} ({what})") for x in inputs]
        try:
            node = make_node(op, vals, attrs, self._location())
        except IRError as exc:
            tensors = [f"{x!r}: {v.type}" for x, v in zip(inputs, vals)
                       if isinstance(x, WeightRef) and v is not None]
            detail = f" [weights: {'; '.join(tensors)}]" if tensors else ""
            err = CheckpointError if tensors else IRError
            raise err(f"{exc}{detail} at {self._location()}") from None
        self.graph.add_node(node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def _location(self) -> str:
        """file:line of the custom model code that called the op (for provenance and errors)."""
        for frame in reversed(traceback.extract_stack()[:-3]):
            if not frame.filename.endswith(("compute_graph.py",)):
                return f"{frame.filename.split('/')[-1]}:{frame.lineno}"
        return "?"

    def _bind(self, out: DataRef, value: Value) -> None:
        if not isinstance(out, DataRef):
            raise IRError(f"output must be data[...], got {out!r}")
        self._env[out.name] = value

    # ---- Fastllm's documented ops ----------------------------------------------------------
    def Print(self, x: Operand) -> None:
        v = self._value(x, "Print")
        print(f"[flagc] {x!r}: {v.type}")

    def Exit(self) -> None:
        raise FlagcError(f"custom model called Exit() at {self._location()}")

    def DataTypeAs(self, x: DataRef, atype: Operand = None) -> None:
        v = self._value(x, "DataTypeAs")
        if v.dtype != self.activation_dtype:
            self._bind(x, self._emit(Op.CAST, [v], "DataTypeAs",
                                     dtype=self.activation_dtype.value))

    def Embedding(self, ids: Operand, table: Operand, out: DataRef) -> None:
        self._bind(out, self._emit(Op.EMBEDDING, [ids, table], "Embedding"))

    def RMSNorm(self, x: Operand, w: Operand, eps: float, out: DataRef) -> None:
        self._bind(out, self._emit(Op.RMS_NORM, [x, w], "RMSNorm", eps=float(eps)))

    def LayerNorm(self, x: Operand, gamma: Operand, beta: Operand, eps: float,
                  out: DataRef) -> None:
        self._bind(out, self._emit(Op.LAYER_NORM, [x, gamma, beta], "LayerNorm", eps=float(eps)))

    def Linear(self, x: Operand, w: Operand, b: Operand, out: DataRef) -> None:
        self._bind(out, self._emit(Op.LINEAR, [x, w, b], "Linear"))

    def ExpandHead(self, x: DataRef, head_dim: int) -> None:
        """[batch, seq, heads*head_dim] -> [batch, seq, heads, head_dim], in place."""
        self._bind(x, self._emit(Op.RESHAPE, [x], "ExpandHead", shape=[0, 0, -1, int(head_dim)]))

    def LlamaRotatePosition2D(self, x: DataRef, position_ids: Operand, sin: Operand,
                              cos: Operand, rotary_dim: int) -> None:
        """Rotate-half rotary embedding of the first `rotary_dim` dims of each head, in place."""
        self._bind(x, self._emit(Op.ROTARY, [x, position_ids, cos, sin], "LlamaRotatePosition2D",
                                 rotary_dim=int(rotary_dim), interleaved=False))

    def NearlyRotatePosition2D(self, x: DataRef, position_ids: Operand, sin: Operand,
                               cos: Operand, rotary_dim: int) -> None:
        """Interleaved-pair rotary embedding (GPT-J / GLM style), in place."""
        self._bind(x, self._emit(Op.ROTARY, [x, position_ids, cos, sin],
                                 "NearlyRotatePosition2D", rotary_dim=int(rotary_dim),
                                 interleaved=True))

    def FusedAttention(self, q: Operand, past_key: DataRef, past_value: DataRef, cur_k: Operand,
                       cur_v: Operand, original: Operand, mask: Operand, out: DataRef,
                       seq_lens: Operand = None, scale: float | None = None,
                       mask_type: int | str = 0, unit_len: int = 128) -> None:
        """Attention with the KV cache: appends cur_k/cur_v to past_key/past_value (rebinding
        them to the presents) and writes [batch, seq, heads*head_dim] to `out`.

        `original` and `seq_lens`/`unit_len` are accepted for Fastllm compatibility; flagc
        derives lengths from the attention mask. mask_type 0/"causal", "bidirectional", "prefix".
        """
        kind = {0: "causal", 1: "bidirectional"}.get(mask_type, mask_type)
        qv = self._value(q, "FusedAttention")
        kv = self._value(cur_k, "FusedAttention")
        heads, kv_heads, d = qv.shape[2], kv.shape[2], qv.shape[3]
        if scale is None:
            scale = 1.0 / math.sqrt(int(d))
        attn, pk, pv = self._emit(Op.ATTENTION, [q, cur_k, cur_v, past_key, past_value, mask],
                                  "FusedAttention", num_heads=int(heads), kv_heads=int(kv_heads),
                                  scale=float(scale), mask=kind)
        self._bind(out, attn)
        self._bind(past_key, pk)
        self._bind(past_value, pv)

    def AddTo(self, x: DataRef, y: Operand, alpha: float = 1.0) -> None:
        """x += alpha * y."""
        yv = self._value(y, "AddTo")
        if alpha != 1.0:
            c = self._emit(Op.CONSTANT, [], "AddTo", value=np.array(alpha, dtype=np.float32))
            yv = self._emit(Op.MUL, [yv, c], "AddTo")
        self._bind(x, self._emit(Op.ADD, [x, yv], "AddTo"))

    def MulTo(self, x: DataRef, y: Operand) -> None:
        """x *= y."""
        self._bind(x, self._emit(Op.MUL, [x, y], "MulTo"))

    def Silu(self, x: Operand, out: DataRef) -> None:
        self._bind(out, self._emit(Op.SILU, [x], "Silu"))

    def Gelu(self, x: Operand, out: DataRef, approximate: str = "none") -> None:
        self._bind(out, self._emit(Op.GELU, [x], "Gelu", approximate=approximate))

    def Softmax(self, x: Operand, out: DataRef, axis: int = -1) -> None:
        self._bind(out, self._emit(Op.SOFTMAX, [x], "Softmax", axis=axis))

    def MatMul(self, a: Operand, b: Operand, out: DataRef) -> None:
        self._bind(out, self._emit(Op.MATMUL, [a, b], "MatMul"))

    def Reshape(self, x: Operand, shape: Sequence[int], out: DataRef) -> None:
        self._bind(out, self._emit(Op.RESHAPE, [x], "Reshape", shape=[int(s) for s in shape]))

    def Transpose(self, x: Operand, perm: Sequence[int], out: DataRef) -> None:
        self._bind(out, self._emit(Op.TRANSPOSE, [x], "Transpose", perm=[int(p) for p in perm]))

    def Concat(self, xs: Sequence[Operand], axis: int, out: DataRef) -> None:
        self._bind(out, self._emit(Op.CONCAT, list(xs), "Concat", axis=int(axis)))

    def Slice(self, x: Operand, axis: int, start: int, end: int, out: DataRef) -> None:
        self._bind(out, self._emit(Op.SLICE, [x], "Slice", axis=axis, start=start, end=end))

    def SplitLastTokenStates(self, x: Operand, seq_lens: Operand, out: DataRef) -> None:
        """Keep each sequence's last position (batches are left-padded)."""
        self._bind(out, self._emit(Op.LAST_TOKEN, [x], "SplitLastTokenStates"))

    def Op(self, op: Op | str, inputs: Sequence[Operand], out: DataRef | Sequence[DataRef],
           **attrs) -> None:
        """Any registered IR op by name, for what the named methods above don't cover."""
        op = Op(op) if isinstance(op, str) else op
        result = self._emit(op, list(inputs), op.value, **attrs)
        if isinstance(out, DataRef):
            self._bind(out, result if isinstance(result, Value) else result[0])
        else:
            for ref, v in zip(out, result):
                self._bind(ref, v)

    # ---- finishing -------------------------------------------------------------------------
    def finish(self) -> Graph:
        """Collect outputs after build(): logits (or hidden states) and every present KV."""
        g = self.graph
        for key in ("logits", "lastHiddenStates"):
            if key in self._env:
                name = "logits" if key == "logits" else "last_hidden_state"
                g.outputs[name] = self._env[key]
                break
        else:
            raise IRError("build() wrote neither data['logits'] nor data['lastHiddenStates']")
        layers = sorted({int(k.split(".")[1]) for k in self._past_inputs})
        for i in layers:
            for kind, prefix in (("key", "pastKey."), ("value", "pastValue.")):
                name = f"{prefix}{i}"
                if self._env.get(name) is self._past_inputs.get(name):
                    raise IRError(f"data[{prefix!r}][{i}] is read but never updated by "
                                  "FusedAttention: the cache would not grow")
                g.outputs[f"present.{i}.{kind}"] = self._env[name]
        # Inputs in a stable order: ids, mask, positions, then the cache by layer.
        order = {"input_ids": 0, "attention_mask": 1, "position_ids": 2}
        g.inputs.sort(key=lambda v: (order.get(v.name, 3), _cache_key(v.name)))
        return g


def _cache_key(name: str) -> tuple[int, int]:
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "past_key_values":
        return int(parts[1]), 0 if parts[2] == "key" else 1
    return 0, 0
