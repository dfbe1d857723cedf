"""Greedy decode graphs that screen the LM head at 8 bits and prove the pick exact (CPU).

A greedy step needs only the argmax of the logits z = W x. For a float32 head that product is
the largest of the step: SmolLM2-135M's W is 49152 x 576 (113 MB), 5.6 ms of a 32 ms step on
two cores. The greedy variant of a static decode graph reads an 8-bit copy of W instead
(MatMulNBits, blocks of 32 along K, int8 activations: 28 MB, ~1.7 ms) and turns its scores s
into a proof. For every vocabulary row n

    |s_n - z_n| <= B_n = P_n * ||x||_1 + Q_n * sum_b amax_b(x)

P_n is row n's largest weight rounding error; the second term is the activation rounding:
onnxruntime quantizes x per block b of 32 with scale amax_b / 127, rounding to nearest
(checked against its kernel in tests/test_greedy_screen.py), so each element is off by at most
amax_b / 254, and Q_n = row n's largest block L1 norm / 254. Both carry a margin for float32
rounding. The CANDIDATES rows with the highest upper bounds u = s + B are rescored exactly
(their float32 rows of W, gathered); when the best exact score beats the highest upper bound
of all other rows (less the exact scores' own rounding) and no other candidate ties it, no other
row can reach it: it is the argmax of the full logits. Otherwise an `If` computes the full
float32 logits and their argmax, as the plain graph does. The graph reports which way each step
went (GREEDY_CERTIFIED).

Only greedy steps use these graphs (no logits come out); sampling, penalties and beam search
take the plain static graph. onnxruntime's CPU provider only: `If` runs on the host.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flagc.ir.quant import QuantScheme, quantize_weight
from flagc.lower.onnx_stream import append_tensor

__all__ = ["DATA_FILE", "CANDIDATES", "BITS", "BLOCK", "GREEDY_CERTIFIED", "GREEDY_BIAS",
           "ScreenWeights", "use_greedy_screen"]

DATA_FILE = "greedy-screen.data"
CANDIDATES = 32  # rows rescored exactly; SmolLM2: 128 of 128 steps certified (16: 126)
BITS, BLOCK = 8, 32  # 4-bit screens give bounds of ~20 logits: nothing certifies
GREEDY_CERTIFIED = "greedy_certified"  # bool []: the screen proved the pick (no full head)
# float [B, 1, V] added to the logits before the pick: -inf keeps a token from being picked
# (stop tokens before min_new_tokens), which the graph's callers cannot do afterwards: no logits
GREEDY_BIAS = "greedy_bias"
_MARGIN = 1.0 + 2.0 ** -10  # on every bound: the bound's own float32 arithmetic
_P = "greedy_screen."  # prefix of the screen's node and tensor names


def _rounding(k: int) -> float:
    """Allowance per unit of sum |x w| for a float32 dot product of length k (the classic
    bound is k 2^-24, for any summation order; 4x that)."""
    return 4.0 * k * 2.0 ** -24



class ScreenWeights:
    """Per LM-head weight, the screen's tensors, appended to DATA_FILE once (shared by every
    graph of the artifact): the 8-bit codes, scales and zero points (MatMulNBits' layout), the
    bound's per-row factors P and Q (module docstring) and the rounding allowance per unit of
    ||x||_1 of the exact scores."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, DATA_FILE)
        self._done: dict[str, tuple[list[TensorProto], float]] = {}

    def get(self, tensor: TensorProto, graph: onnx.GraphProto) -> tuple[list[TensorProto], float]:
        """The screen's tensors for the head weight `tensor` [K, V]: codes, scales, zero
        points, the two bound factors and the [V, K] float32 rows the candidates are gathered
        from (the graph's own when it holds W's transpose, as a tied embedding table; else a
        copy in DATA_FILE); and the rounding allowance."""
        if tensor.name not in self._done:
            self._done[tensor.name] = self._write(tensor, graph)
        protos, eps = self._done[tensor.name]
        copies = []
        for t in protos:
            copy = TensorProto()
            copy.CopyFrom(t)
            copies.append(copy)
        return copies, eps

    def _write(self, tensor: TensorProto, graph: onnx.GraphProto
               ) -> tuple[list[TensorProto], float]:
        w = np.ascontiguousarray(numpy_helper.to_array(tensor, base_dir=self.folder).T)  # [V, K]
        codes, scales, zero_points = quantize_weight(w, QuantScheme(BITS, BLOCK, False))
        p, q, r = _row_bounds(w, codes, scales, zero_points)
        rounding = _rounding(w.shape[1])
        factors = {"codes": (codes, np.uint8, TensorProto.UINT8),
                   "scales": (scales.reshape(-1), np.float32, TensorProto.FLOAT),
                   "zero_points": (zero_points, np.uint8, TensorProto.UINT8),
                   "weight_bound": (_MARGIN * (p + rounding * r), np.float32, TensorProto.FLOAT),
                   "act_bound": (_MARGIN * q / 254.0, np.float32, TensorProto.FLOAT)}
        rows = self._rows_in(graph, w)
        if rows is None:
            factors["rows"] = (w, np.float32, TensorProto.FLOAT)
        protos = []
        # not append mode: the tiled writer places rows with pwrite, which O_APPEND ignores
        with open(self.path, "r+b" if os.path.exists(self.path) else "w+b") as f:
            f.seek(0, os.SEEK_END)
            for key, (arr, dtype, onnx_dtype) in factors.items():
                if key in ("weight_bound", "act_bound"):  # rounded up, never below the bound
                    arr = np.nextafter(arr.astype(np.float32), np.float32(np.inf))
                protos.append(append_tensor(arr, dtype, onnx_dtype, f"{_P}{tensor.name}.{key}",
                                            f, DATA_FILE))
        if rows is not None:
            protos.append(rows)
        eps = float(np.nextafter(np.float32(_MARGIN * rounding * float(np.abs(w).max())),
                                 np.float32(np.inf)))
        return protos, eps

    def _rows_in(self, graph: onnx.GraphProto, w: np.ndarray) -> TensorProto | None:
        """A float32 initializer of `graph` equal to w [V, K] (a tied embedding table)."""
        for t in graph.initializer:
            if t.data_type == TensorProto.FLOAT and list(t.dims) == list(w.shape):
                if np.array_equal(numpy_helper.to_array(t, base_dir=self.folder), w):
                    return t
        return None


def _row_bounds(w: np.ndarray, codes, scales, zero_points, rows: int = 4096):
    """Per row of w [V, K]: the largest |w - dequantized| (P before margins), the largest block
    L1 norm of the dequantized row (Q before / 254) and the largest |dequantized| or |w|."""
    n, nb, _ = codes.shape
    p, q, r = (np.empty(n, np.float64) for _ in range(3))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        deq = ((codes[lo:hi].astype(np.float64) - zero_points[lo:hi, :, None])
               * scales[lo:hi, :, None].astype(np.float64))  # [rows, nb, BLOCK]
        exact = w[lo:hi].astype(np.float64).reshape(deq.shape)
        p[lo:hi] = np.abs(exact - deq).max(axis=(1, 2))
        q[lo:hi] = np.abs(deq).sum(axis=2).max(axis=1)
        r[lo:hi] = np.maximum(np.abs(deq), np.abs(exact)).max(axis=(1, 2))
    return p, q, r


def use_greedy_screen(model: onnx.ModelProto, weights: ScreenWeights, token: str,
                      logit: str) -> bool:
    """Rewrite a static decode graph whose `logits` output comes from a float32 MatMul into its
    greedy variant (module docstring): one more input, GREEDY_BIAS; outputs `token` [B, 1]
    int64 (the argmax of logits + bias), `logit` [B, 1, 1] float (its biased logit) and
    GREEDY_CERTIFIED, no `logits`. False (graph untouched) when the head has another form.
    Dead nodes (the plain argmax, the full head) are left for the caller's cleanup; note that
    the `If` reads the hidden state and W from this graph's scope."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    head = producer.get("logits")
    w = inits.get(head.input[1]) if head is not None and head.op_type == "MatMul" else None
    if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
        return False
    k, vocab = (int(d) for d in w.dims)
    logits_vi = next(o for o in g.output if o.name == "logits")
    batch = logits_vi.type.tensor_type.shape.dim[0].dim_value
    if k % BLOCK or vocab <= CANDIDATES or not batch:
        return False
    (codes, scales, zps, weight_bound, act_bound, rows), eps = weights.get(w, g)
    g.initializer.extend(t for t in (codes, scales, zps, weight_bound, act_bound, rows)
                         if t.name not in inits)
    consts = {"k1": [CANDIDATES + 1], "k": [CANDIDATES], "zero": [0], "last": [-1],
              "blocks": [batch, 1, k // BLOCK, BLOCK], "batch_k": [batch, CANDIDATES],
              "ids": [batch, 1]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), _P + name)
                         for name, v in consts.items())
    g.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), _P + "eps"))

    x, full = head.input[0], head.input[1]
    # graph-scope names; every other name below is local to the screen (prefixed _P)
    scope = {"x": x, "W": full, "codes": codes.name, "scales": scales.name,
             "zero_points": zps.name, "weight_bound": weight_bound.name,
             "act_bound": act_bound.name, "rows": rows.name, "token": token, "logit": logit,
             "certified": GREEDY_CERTIFIED, "bias": GREEDY_BIAS}

    def n(op, inputs, outputs, **attrs):
        return helper.make_node(op, [scope.get(i, _P + i) for i in inputs],
                                [scope.get(o, _P + o) for o in outputs], name=_P + outputs[0],
                                **attrs)

    nodes = [
        # scores s and upper bounds u = s + B of every row
        n("MatMulNBits", ["x", "codes", "scales", "zero_points"], ["scores"],
          domain="com.microsoft", K=k, N=vocab, bits=BITS, block_size=BLOCK, accuracy_level=4),
        n("Abs", ["x"], ["abs_x"]),
        n("ReduceSum", ["abs_x", "last"], ["l1"], keepdims=1),
        n("Reshape", ["abs_x", "blocks"], ["abs_blocks"]),
        n("ReduceMax", ["abs_blocks"], ["block_max"], axes=[-1], keepdims=0),
        n("ReduceSum", ["block_max", "last"], ["act_scale"], keepdims=1),
        n("Mul", ["l1", "weight_bound"], ["weight_err"]),
        n("Mul", ["act_scale", "act_bound"], ["act_err"]),
        n("Add", ["weight_err", "act_err"], ["bound"]),
        n("Add", ["scores", "bound"], ["unbiased_upper"]),
        n("Add", ["unbiased_upper", "bias"], ["upper"]),
        # the candidates, rescored exactly from W's float32 columns
        n("TopK", ["upper", "k1"], ["top_upper", "top_rows"], axis=-1),
        n("Slice", ["top_rows", "zero", "k", "last"], ["candidates"]),
        n("Slice", ["top_upper", "k", "k1", "last"], ["others_upper"]),
        n("Reshape", ["candidates", "batch_k"], ["candidate_ids"]),
        n("Gather", ["rows", "candidate_ids"], ["candidate_rows"], axis=0),
        n("Transpose", ["candidate_rows"], ["columns"], perm=[0, 2, 1]),
        n("MatMul", ["x", "columns"], ["unbiased_exact"]),
        n("GatherElements", ["bias", "candidates"], ["candidate_bias"], axis=-1),
        n("Add", ["unbiased_exact", "candidate_bias"], ["exact"]),
        n("ArgMax", ["exact"], ["best"], axis=-1, keepdims=1),
        n("GatherElements", ["candidates", "best"], ["best_token"], axis=-1),
        n("GatherElements", ["exact", "best"], ["best_logit"], axis=-1),
        # proof per row: beats every other row's upper bound, and no candidate ties it
        n("Mul", ["l1", "eps"], ["rounding"]),
        n("Add", ["others_upper", "rounding"], ["to_beat"]),
        n("Greater", ["best_logit", "to_beat"], ["beats"]),
        n("Equal", ["exact", "best_logit"], ["ties"]),
        n("Cast", ["ties"], ["ties_i"], to=TensorProto.INT32),
        n("ReduceSum", ["ties_i", "last"], ["tie_count"], keepdims=1),
        n("Equal", ["tie_count", "one_i"], ["unique"]),
        n("And", ["beats", "unique"], ["row_ok"]),
        n("Cast", ["row_ok"], ["row_ok_i"], to=TensorProto.INT32),
        n("ReduceMin", ["row_ok_i"], ["all_ok"], keepdims=0),
        n("Cast", ["all_ok"], ["certified"], to=TensorProto.BOOL),
    ]
    g.initializer.append(numpy_helper.from_array(np.array(1, np.int32), _P + "one_i"))
    shape = [batch, 1, 1]
    certified_branch = helper.make_graph(
        [helper.make_node("Identity", [_P + "best_token"], [_P + "then_token"]),
         helper.make_node("Identity", [_P + "best_logit"], [_P + "then_logit"])],
        _P + "certified", [],
        [helper.make_tensor_value_info(_P + "then_token", TensorProto.INT64, shape),
         helper.make_tensor_value_info(_P + "then_logit", TensorProto.FLOAT, shape)])
    full_branch = helper.make_graph(
        [helper.make_node("MatMul", [x, full], [_P + "unbiased_logits"]),
         helper.make_node("Add", [_P + "unbiased_logits", GREEDY_BIAS], [_P + "full_logits"]),
         helper.make_node("ArgMax", [_P + "full_logits"], [_P + "else_token"], axis=-1,
                          keepdims=1),
         helper.make_node("GatherElements", [_P + "full_logits", _P + "else_token"],
                          [_P + "else_logit"], axis=-1)],
        _P + "full_head", [],
        [helper.make_tensor_value_info(_P + "else_token", TensorProto.INT64, shape),
         helper.make_tensor_value_info(_P + "else_logit", TensorProto.FLOAT, shape)])
    nodes += [
        helper.make_node("If", [GREEDY_CERTIFIED], [_P + "token3", logit], name=_P + "if",
                         then_branch=certified_branch, else_branch=full_branch),
        helper.make_node("Reshape", [_P + "token3", _P + "ids"], [token], name=_P + "token")]
    # the plain greedy tail goes; the logits stop being an output
    keep = [node for node in g.node if not {token, logit} & set(node.output)]
    del g.node[:]
    g.node.extend(keep + nodes)
    outputs = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend(outputs)
    g.output.append(helper.make_tensor_value_info(GREEDY_CERTIFIED, TensorProto.BOOL, []))
    g.input.append(helper.make_tensor_value_info(GREEDY_BIAS, TensorProto.FLOAT,
                                                 [batch, 1, vocab]))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True
