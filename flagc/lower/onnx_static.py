"""Static-shape decode graphs: one decode step at a fixed batch, replayable as a CUDA graph.

A CUDA graph replays recorded kernel launches, so every shape and every buffer address must be
the same on every step, and no node may run on the host. The dynamic decoder graph has neither:
its KV inputs grow by one slot per step and its attention lengths come from Shape arithmetic.

`write_static_decodes` derives, from the lowered decoder model, a graph for batch B and one new
token whose KV cache is the max-length buffer shared by past and present
(GroupQueryAttention's past_present_share_buffer mode):

    input_ids, position_ids  [B, 1]        int64
    attention_mask           [B, max_seq]  int64   1 for real cached tokens and the new one
    cache_length             [B]           int32   slots filled before this step
    past_key_values.*        [B, kv, max_seq, d]   bound to the same memory as present.*
    logits                   [B, 1, vocab]  float32 (cast on the device: the host's fp16 -> fp32
                                            conversion of a vocab-wide row costs more than it)
    greedy_token             [B, 1]         int64    the argmax of the logits (first maximum)
    greedy_logit             [B, 1, 1]      float32  its logit (the runtime's NaN/inf check)
    next_cache_length        [B]            int32    cache_length + 1

greedy_token and next_cache_length are the next greedy step's input_ids and cache_length: the
runtime binds them to a second pair of input buffers and alternates, so greedy decoding feeds
itself on the device and copies nothing to it.

Every GroupQueryAttention reads its per-row lengths from `cache_length` and a constant total of
max_seq (the kernel attends to cache_length + 1 keys; the mask's padding bias spans all max_seq
slots), so onnxruntime folds all remaining shape arithmetic into constants at load time.
The weights are not copied: the static graph names the same initializers and, for big models,
the same external data file as the dynamic one.

Dense variant (`decode-b{B}-dense.onnx`): when no row has padding, each row's position is its
slot index, which is what GroupQueryAttention's own rotary uses (the cache length). The dense
graph then feeds the merged q|k|v projection to the kernel packed, with rotary inside
(do_rotary), and drops the padding bias: per layer one split and two rotary kernels fewer, and
the kernel's fastest path (no bias). The runtime takes it whenever the batch has no padding
(always for one row).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.errors import LoweringError
from flagc.lower.onnx_decode_attention import use_decode_attention
from flagc.lower.onnx_decode_gemv import DATA_FILE as GEMV_DATA
from flagc.lower.onnx_decode_gemv import MAX_ROWS, TransposedWeights, use_decode_gemv
from flagc.lower.onnx_kernel_rewrite import DOMAIN as KERNELS_DOMAIN
from flagc.lower.onnx_kernel_rewrite import drop_dead
from flagc.lower.onnx_greedy_screen import BITS as SCREEN_BITS
from flagc.lower.onnx_greedy_screen import BLOCK as SCREEN_BLOCK
from flagc.lower.onnx_greedy_screen import CANDIDATES, ScreenWeights, use_greedy_screen
from flagc.lower.onnx_greedy_screen import DATA_FILE as SCREEN_DATA
from flagc.lower.onnx_qgemv import DATA_FILE as QGEMV_DATA
from flagc.lower.onnx_qgemv import QGemvWeights, use_qgemv

__all__ = ["write_static_decodes", "static_decode_file", "dense_decode_file",
           "greedy_decode_file", "GRAPH_KINDS", "CACHE_LENGTH",
           "GREEDY_TOKEN", "GREEDY_LOGIT", "NEXT_CACHE_LENGTH"]

CACHE_LENGTH = "cache_length"
# write_static_decodes' {batch: file} maps: plain, dense (no padding), and their greedy variants
GRAPH_KINDS = ("graphs", "dense_graphs", "greedy_graphs", "greedy_dense_graphs")
# Greedy decoding reads these instead of the logits: one 8-byte copy back per row, no
# vocab-wide copy and argmax on the host between two graph replays.
GREEDY_TOKEN = "greedy_token"
GREEDY_LOGIT = "greedy_logit"
NEXT_CACHE_LENGTH = "next_cache_length"
_ARGMAX = "static_decode.argmax"
_RAW_LOGITS = "static_decode.logits_model_dtype"
_TOTAL = "static_decode.total_length"
_STEP_INPUTS = ("input_ids", "position_ids")


def static_decode_file(batch: int) -> str:
    return f"decode-b{batch}.onnx"


def dense_decode_file(batch: int) -> str:
    return f"decode-b{batch}-dense.onnx"


def greedy_decode_file(batch: int, dense: bool) -> str:
    return f"decode-b{batch}{'-dense' if dense else ''}-greedy.onnx"


def write_static_decodes(engine_path: str, batches: list[int], max_seq: int,
                         label: str = "", kernels: str = "onnxruntime",
                         greedy_screen: bool = True) -> dict[str, Any]:
    """Write the static decode graphs for `batches` beside `engine_path`:
    {"graphs": {batch: file}, "dense_graphs": {batch: file}}. The dynamic graph is read once;
    a dense variant (module docstring) is written where the attention has the packable form
    (merged q|k|v projection, split, rotary on q and k).
    kernels="flagc": fp16 graphs of up to onnx_decode_gemv.MAX_ROWS rows multiply with flagc's
    DecodeGemv (runtimes/kernels, CUDA; "data" then names the transposed weights' file);
    float32 dense graphs attend with flagc's DecodeAttention (CPU,
    onnx_decode_attention.py) and MatMulNBits become QGemv (CPU, onnx_qgemv.py; "data" then
    names the packed weights' file). The result then also has "custom_ops": {"domain", "device",
    "files"} (the graphs that need the kernel library, and the device its kernels are for).
    greedy_screen: where the LM head is a float32 MatMul, each graph also gets a greedy
    variant that screens the head at 8 bits (onnx_greedy_screen.py, CPU): "greedy_graphs" and
    "greedy_dense_graphs", "greedy_screen" (its parameters) and its data file in "data".
    `label` names the model in error messages (the engine path is a temp folder's)."""
    template = onnx.load(engine_path, load_external_data=False)
    _check_supported(template.graph, label or engine_path)
    folder = os.path.dirname(engine_path)
    gemv = TransposedWeights(folder) if kernels == "flagc" else None
    qgemv = QGemvWeights(folder) if kernels == "flagc" else None
    screen = ScreenWeights(folder) if greedy_screen else None
    out: dict[str, Any] = {"graphs": {}, "dense_graphs": {}}
    custom: dict[str, list[str]] = {}  # device -> graphs on flagc's kernels for it
    for batch in batches:
        use_gemv = gemv if batch <= MAX_ROWS else None
        for kind, dense in (("graphs", False), ("dense_graphs", True)):
            model, device = _specialize(template, batch, max_seq, dense, use_gemv,
                                        attention=kernels == "flagc", qgemv=qgemv)
            if model is None:
                continue
            name = dense_decode_file(batch) if dense else static_decode_file(batch)
            out[kind][str(batch)] = _save(model, folder, name)
            names = [name]
            if screen is not None and use_greedy_screen(model, screen, GREEDY_TOKEN,
                                                        GREEDY_LOGIT):
                drop_dead(model.graph)
                names.append(_save(model, folder, greedy_decode_file(batch, dense)))
                out.setdefault(f"greedy_{kind}", {})[str(batch)] = names[-1]
            if device:
                custom.setdefault(device, []).extend(names)
    data = []
    if len(custom) > 1:
        raise LoweringError(f"static decode graphs on flagc's kernels for {sorted(custom)}: "
                            "one artifact serves one kernel device")
    for device, files in custom.items():
        out["custom_ops"] = {"domain": KERNELS_DOMAIN, "device": device, "files": files}
        if device == "cuda":
            data.append(GEMV_DATA)
    if qgemv is not None and qgemv.used:
        data.append(QGEMV_DATA)
    if out.get("greedy_graphs") or out.get("greedy_dense_graphs"):
        out["greedy_screen"] = {"device": "cpu", "bits": SCREEN_BITS, "block": SCREEN_BLOCK,
                                "candidates": CANDIDATES}
        data.append(SCREEN_DATA)
    if data:
        out["data"] = data
    return out


def _specialize(template: onnx.ModelProto, batch: int, max_seq: int, dense: bool,
                gemv: TransposedWeights | None = None, attention: bool = False,
                qgemv: QGemvWeights | None = None
                ) -> tuple[onnx.ModelProto | None, str | None]:
    """One static graph specialized from (a copy of) `template`, and the device of the flagc
    kernels it uses (None: none); (None, None) when `dense` and the graph does not pack.
    `gemv`: multiply with flagc's DecodeGemv (onnx_decode_gemv.py, CUDA); `attention`: a
    dense float32 graph attends with flagc's DecodeAttention (onnx_decode_attention.py, CPU);
    `qgemv`: MatMulNBits become flagc's QGemv (onnx_qgemv.py, CPU)."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    g = model.graph
    for vi in g.input:
        dims = _dims(vi)
        if vi.name in _STEP_INPUTS:
            _set_dims(vi, [batch, 1])
        elif vi.name == "attention_mask":
            _set_dims(vi, [batch, max_seq])
        else:  # past_key_values.*: [batch, kv_heads, past, head_dim]
            _set_dims(vi, [batch, dims[1], max_seq, dims[3]])
    for vi in g.output:
        dims = _dims(vi)
        if vi.name == "logits":
            _set_dims(vi, [batch, 1, dims[2]])
        else:  # present.*: the shared buffer
            _set_dims(vi, [batch, dims[1], max_seq, dims[3]])
    _add_greedy_outputs(g, next(vi for vi in g.output if vi.name == "logits"))
    g.input.append(helper.make_tensor_value_info(CACHE_LENGTH, TensorProto.INT32, [batch]))
    g.initializer.append(numpy_helper.from_array(np.array(max_seq, np.int32), _TOTAL))
    for node in g.node:
        if node.op_type == "GroupQueryAttention":
            node.input[5], node.input[6] = CACHE_LENGTH, _TOTAL
    if dense and not _pack_qkv_with_rotary(g):
        return None, None
    device = "cuda" if gemv is not None and use_decode_gemv(model, gemv) else None
    if attention and dense and device is None and use_decode_attention(model):
        device = "cpu"
    if qgemv is not None and device != "cuda" and use_qgemv(model, qgemv):
        device = "cpu"
    drop_dead(g)
    if dense and {"attention_mask", "position_ids"} & {i for n in g.node for i in n.input}:
        return None, None  # positions used elsewhere (e.g. learned embeddings): the runtime's
        # dense step does not refresh them, so such a graph gets no dense variant
    del g.value_info[:]  # stale symbolic shapes of the dynamic graph
    return model, device


def _save(model: onnx.ModelProto, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    onnx.save(model, path)
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        raise LoweringError(f"onnx.checker rejected the static decode graph {name}: {exc}") \
            from exc
    return name


def _check_supported(g: onnx.GraphProto, label: str) -> None:
    """Static decode needs every cached tensor to flow through GroupQueryAttention."""
    inputs = {vi.name for vi in g.input}
    missing = {"input_ids", "attention_mask", "position_ids"} - inputs
    if missing:
        raise LoweringError(f"{label}: a static decode graph needs the inputs "
                            f"{sorted(missing)} (a decoder with a KV cache and position ids)")
    past = {n for n in inputs if n.startswith("past_key_values.")}
    if not past:
        raise LoweringError(f"{label}: a static decode graph needs a KV cache")
    readers = {n for node in g.node if node.op_type != "GroupQueryAttention"
               for n in node.input if n in past}
    writers = {o for node in g.node if node.op_type == "GroupQueryAttention" for o in node.output}
    presents = {o.name for o in g.output if o.name.startswith("present.")}
    if readers or not presents <= writers:
        raise LoweringError(f"{label}: --decode-graphs needs every KV cache tensor to go "
                            "through onnxruntime's GroupQueryAttention (a target with contrib "
                            "ops, attention without bias or alibi); this graph's cache is "
                            f"also read by other ops ({sorted(readers)[:2]})")


def _pack_qkv_with_rotary(g: onnx.GraphProto) -> bool:
    """Rewrite every GroupQueryAttention fed by rotary(split(qkv)) to take qkv packed, rotary
    inside, no bias. All or nothing: False (graph untouched) when any node lacks the form."""
    producer = {o: n for n in g.node for o in n.output}
    tensors = {t.name: t for t in g.initializer}

    def small_const(name):  # split sizes; weights may live in external data (not read here)
        t = tensors.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    plans = []
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        q_rot, k_rot = producer.get(node.input[0]), producer.get(node.input[1])
        if not (q_rot and k_rot and q_rot.op_type == k_rot.op_type == "RotaryEmbedding"):
            return False
        split = producer.get(q_rot.input[0])
        if (split is None or split.op_type != "Split" or len(split.output) != 3
                or list(split.output) != [q_rot.input[0], k_rot.input[0], node.input[2]]):
            return False
        if any(r.input[1] != "position_ids" or r.input[2:4] != q_rot.input[2:4]
               for r in (q_rot, k_rot)):
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rot = {a.name: helper.get_attribute_value(a) for a in q_rot.attribute}
        cos = tensors.get(q_rot.input[2])  # [max positions, rotary_dim / 2]: dims suffice
        heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        sizes = small_const(split.input[1]) if len(split.input) > 1 else None
        if cos is None or sizes is None or len(sizes) != 3 or sizes[1] != sizes[2]:
            return False
        head = int(sizes[1]) // kv_heads
        if (int(sizes[0]) != heads * head or head % 16
                or int(rot.get("rotary_embedding_dim", 0) or head) != 2 * int(cos.dims[1])):
            return False
        plans.append((node, split.input[0], q_rot.input[2], q_rot.input[3],
                      int(rot.get("interleaved", 0))))
    for node, packed, cos_name, sin_name, interleaved in plans:
        inputs = list(node.input)
        inputs[0:3] = [packed, "", ""]
        inputs += [""] * (11 - len(inputs))
        inputs[7], inputs[8], inputs[10] = cos_name, sin_name, ""
        del node.input[:]
        node.input.extend(_trim_optional(inputs))
        node.attribute.extend([helper.make_attribute("do_rotary", 1),
                               helper.make_attribute("rotary_interleaved", interleaved)])
    return bool(plans)


def _add_greedy_outputs(g: onnx.GraphProto, logits: onnx.ValueInfoProto) -> None:
    """Make `logits` float32 (a Cast when the model computes in fp16/bf16) and add the greedy
    pick, its logit and the next cache length as outputs (module docstring). ArgMax keeps the
    first maximum, as numpy's argmax does."""
    tensor = logits.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        for node in g.node:
            node.output[:] = [_RAW_LOGITS if o == logits.name else o for o in node.output]
        g.node.append(helper.make_node("Cast", [_RAW_LOGITS], [logits.name],
                                       to=TensorProto.FLOAT, name="static_decode.logits_fp32"))
        tensor.elem_type = TensorProto.FLOAT
    batch = tensor.shape.dim[0].dim_value
    g.initializer.extend([
        numpy_helper.from_array(np.array([batch, 1], np.int64), "static_decode.ids_shape"),
        numpy_helper.from_array(np.array(1, np.int32), "static_decode.one")])
    g.node.extend([
        helper.make_node("ArgMax", [logits.name], [_ARGMAX], axis=-1, keepdims=1,
                         name="static_decode.argmax"),
        helper.make_node("GatherElements", [logits.name, _ARGMAX], [GREEDY_LOGIT], axis=-1,
                         name="static_decode.greedy_logit"),
        helper.make_node("Reshape", [_ARGMAX, "static_decode.ids_shape"], [GREEDY_TOKEN],
                         name="static_decode.greedy_token"),
        helper.make_node("Add", [CACHE_LENGTH, "static_decode.one"], [NEXT_CACHE_LENGTH],
                         name="static_decode.next_cache_length")])
    g.output.extend([
        helper.make_tensor_value_info(GREEDY_TOKEN, TensorProto.INT64, [batch, 1]),
        helper.make_tensor_value_info(GREEDY_LOGIT, TensorProto.FLOAT, [batch, 1, 1]),
        helper.make_tensor_value_info(NEXT_CACHE_LENGTH, TensorProto.INT32, [batch])])


def _trim_optional(inputs: list[str]) -> list[str]:
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _set_dims(vi: onnx.ValueInfoProto, dims: list[int]) -> None:
    shape = vi.type.tensor_type.shape
    for d, v in zip(shape.dim, dims):
        d.ClearField("dim_param")
        d.dim_value = int(v)
