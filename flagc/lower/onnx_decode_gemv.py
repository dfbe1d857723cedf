"""Static decode graphs on flagc's own GPU kernels: MatMuls become `ai.flagc.DecodeGemv`.

A decode step at batch 1-4 multiplies a few activation rows by every weight matrix once; on an
H100 cuBLAS streams those weights at 1.3-2.2 TB/s of 3.35 and LLaMA's gated MLP costs three more
kernels (Split, Sigmoid+Mul as SiLU, Mul). flagc's DecodeGemv (runtimes/kernels/decode_gemv.cu)
reads the weight in PyTorch's [N, K] layout at 2.1-3.0 TB/s and computes silu(gate) * up in the
same kernel (benchmarks/gpu_decode_gemv.py). Rewrites, on a static decode graph:

    MatMul(x, W[K, 2F]) -> Split(F, F) -> silu(gate) * up   =>  DecodeGemv(x, W^T, gated=1)
    MatMul(x, W[K, N]) -> Add(., b[N])                      =>  DecodeGemv(x, W^T, b)
    MatMul(x, W[K, N])                                       =>  DecodeGemv(x, W^T)

for fp16 weights with K a multiple of 8. The transposed weights are written once, to
`decode-gemv.data` beside the graphs, and shared by every graph that uses them. Above
MAX_ROWS activation rows cuBLAS is faster (the kernel reads every activation row per weight
vector), so larger batches keep their MatMuls.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.lower.onnx_kernel_rewrite import DOMAIN, commit_rewrites, only_reader_lookup, \
    readers_of
from flagc.lower.onnx_stream import DerivedWeights

__all__ = ["MAX_ROWS", "DATA_FILE", "TransposedWeights", "use_decode_gemv", "gated_tail"]
MAX_ROWS = 4
DATA_FILE = "decode-gemv.data"


class TransposedWeights(DerivedWeights):
    """[N, K] copies of [K, N] initializers in DATA_FILE (streamed in tiles by
    onnx_stream.append_tensor: no full-size transposed copy in memory)."""

    def __init__(self, folder: str):
        super().__init__(folder, DATA_FILE)

    def transposed(self, tensor: TensorProto) -> TensorProto:
        return self.get(tensor.name + ".nk",
                        lambda: numpy_helper.to_array(tensor, base_dir=self.folder).T,
                        tensor.data_type)


def use_decode_gemv(model: onnx.ModelProto, weights: TransposedWeights) -> int:
    """Rewrite `model`'s MatMuls (module docstring); returns how many became DecodeGemv."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)  # one object per node: `replaced` is keyed by their ids
    consumers = readers_of(nodes)
    only_reader = only_reader_lookup(g, consumers)

    def weight(name: str) -> TensorProto | None:
        t = inits.get(name)
        if (t is None or t.data_type != TensorProto.FLOAT16 or len(t.dims) != 2
                or t.dims[0] % 8):
            return None
        return t

    replaced: dict[int, onnx.NodeProto | None] = {}  # id(node) -> replacement (None: drop)
    new_inits: dict[str, TensorProto] = {}
    count = 0
    for node in nodes:
        if node.op_type != "MatMul" or id(node) in replaced:
            continue
        w = weight(node.input[1])
        if w is None:
            continue
        w_nk = weights.transposed(w)
        new_inits[w_nk.name] = w_nk
        inputs, out, absorbed, extra = [node.input[0], w_nk.name], node.output[0], [], {}
        gated = gated_tail(node.output[0], int(w.dims[1]), only_reader, consumers, inits)
        if gated is not None:
            (out, absorbed), extra["gated"] = gated, 1
        else:
            add = only_reader(node.output[0])
            bias = _bias_of(add, node.output[0], inits, int(w.dims[1]))
            if bias is not None:
                inputs, out, absorbed = [*inputs, bias], add.output[0], [add]
        replaced[id(node)] = helper.make_node("DecodeGemv", inputs, [out], domain=DOMAIN,
                                              name=f"{node.name or out}.gemv", **extra)
        for dead in absorbed:
            replaced[id(dead)] = None
        count += 1
    if not count:
        return 0
    commit_rewrites(model, nodes, replaced, new_inits)
    return count


def _bias_of(add, matmul_out: str, inits, n: int) -> str | None:
    if add is None or add.op_type != "Add":
        return None
    other = add.input[1] if add.input[0] == matmul_out else add.input[0]
    t = inits.get(other)
    if t is None or t.data_type != TensorProto.FLOAT16 or list(t.dims) != [n]:
        return None
    return other


def gated_tail(product: str, n: int, only_reader, consumers, inits):
    """(output, absorbed nodes) when the [.., n] tensor `product` feeds
    Split(n / 2, n / 2) -> silu(gate) * up and nothing else, else None."""
    split = only_reader(product)
    if split is None or split.op_type != "Split" or len(split.output) != 2:
        return None
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    half = n // 2
    sizes = inits.get(split.input[1]) if len(split.input) > 1 else None
    if axis not in (-1, 2) or sizes is None or sizes.data_location == TensorProto.EXTERNAL \
            or list(numpy_helper.to_array(sizes)) != [half, half]:
        return None
    gate, up = split.output
    gate_users = consumers.get(gate, [])
    sigmoid = next((n for n in gate_users if n.op_type == "Sigmoid"), None)
    silu = next((n for n in gate_users if n.op_type == "Mul"), None)
    if (len(gate_users) != 2 or sigmoid is None or silu is None
            or sorted(silu.input) != sorted([gate, sigmoid.output[0]])
            or only_reader(sigmoid.output[0]) is not silu):
        return None
    product = only_reader(silu.output[0])
    if (product is None or product.op_type != "Mul"
            or sorted(product.input) != sorted([silu.output[0], up])
            or only_reader(up) is not product):
        return None
    return product.output[0], [split, sigmoid, silu, product]
