"""Static decode graphs on flagc's own CPU attention: GroupQueryAttention -> DecodeAttention.

In a dense static decode graph (onnx_static.py: packed q|k|v, rotary inside, past and present
one max-length buffer) every layer's attention is onnxruntime's GroupQueryAttention, which
costs ~40-60 us per layer at 100 cached tokens on two cores (SmolLM2's shape), a fifth of an
int4 layer. `ai.flagc.DecodeAttention` (runtimes/kernels/decode_attention.cc) computes the same
step single-threaded in ~22 us there (one step of SmolLM2: 1-2 ms less in float32, 0.2-0.8 ms
in int4, at ~100 cached tokens). Rewrites

    GroupQueryAttention(qkv, -, -, past_k, past_v, cache_length, total, cos, sin)
        [do_rotary=1, float32, no softcap / local window / smooth softmax]
    =>  DecodeAttention(qkv, past_k, past_v, cache_length, cos, sin)

keeping the three outputs. All or nothing per graph: nodes of another form leave it untouched.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from flagc.lower.onnx_kernel_rewrite import DOMAIN, import_domain

__all__ = ["use_decode_attention"]
_DEFAULTS = {"softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0, "do_rotary": 1}


def use_decode_attention(model: onnx.ModelProto) -> int:
    """Rewrite `model`'s attention (module docstring); returns how many nodes changed."""
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in g.input}
    plans = []
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (9 - len(node.input))
        if (any(attrs.get(k, v) != v for k, v in _DEFAULTS.items())
                or inputs[1] or inputs[2] or not all(inputs[i] for i in (0, 3, 4, 5, 7, 8))
                or len(node.input) > 9 or types.get(inputs[3]) != TensorProto.FLOAT):
            return 0
        plans.append((node, inputs, attrs))
    for node, inputs, attrs in plans:
        node.op_type, node.domain = "DecodeAttention", DOMAIN
        del node.input[:]
        node.input.extend([inputs[0], inputs[3], inputs[4], inputs[5], inputs[7], inputs[8]])
        del node.attribute[:]
        node.attribute.extend([
            helper.make_attribute("num_heads", int(attrs["num_heads"])),
            helper.make_attribute("kv_num_heads", int(attrs["kv_num_heads"])),
            helper.make_attribute("scale", float(attrs.get("scale", 0.0))),
            helper.make_attribute("rotary_interleaved", int(attrs.get("rotary_interleaved", 0)))])
    if plans:
        import_domain(model)
    return len(plans)
