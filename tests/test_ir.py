"""IR core: text round trip, verifier messages, symbolic dims, interpreter vs torch."""

import numpy as np
import pytest
import torch

from flagc.errors import IRError, VerifyError
from flagc.ir import (Builder, DType, Graph, Node, Op, TensorType, Value, interpret, parse_dim,
                      parse_graph, print_graph, sym, verify)
from flagc.ir.symbolic import dim_div, dim_str

B, S, P = sym("batch"), sym("seq"), sym("past")

GOLDEN = """\
graph tiny (
  %x: f32[batch, seq, 4]
) weights (
  @w: f32[8, 4]
  @n: f32[8]
) {
  %0 = linear(%x, @w) : f32[batch, seq, 8]
  %1 = rms_norm(%0, @n) {eps=1e-06, offset=0.0} : f32[batch, seq, 8]  # "layer.0"
  %2 = constant() {value=array(f32, [1], [1.5])} : f32[1]
  %3 = mul(%1, %2) : f32[batch, seq, 8]
  %4 = reshape(%3) {shape=[0, 0, 2, -1]} : f32[batch, seq, 2, 4]
  return y=%4
}
"""


def tiny_graph() -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("tiny")
    x = g.add_input("x", TensorType(DType.F32, (B, S, 4)))
    w = g.add_constant_weight("w", rng.standard_normal((8, 4)).astype(np.float32))
    n = g.add_constant_weight("n", rng.standard_normal(8).astype(np.float32))
    b = Builder(g)
    y = b.emit(Op.LINEAR, [x, w])
    b.scope = "layer.0"
    z = b.emit(Op.RMS_NORM, [y, n], eps=1e-6)
    b.scope = None
    c = b.emit(Op.CONSTANT, [], value=np.array([1.5], np.float32))
    g.outputs["y"] = b.emit(Op.RESHAPE, [b.emit(Op.MUL, [z, c])], shape=[0, 0, 2, -1])
    return g


def test_print_matches_golden_and_round_trips():
    g = tiny_graph()
    verify(g)
    text = print_graph(g)
    assert text == GOLDEN
    assert print_graph(parse_graph(text)) == text


def test_interpreter_matches_torch():
    g = tiny_graph()
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    out = interpret(g, {"x": x})["y"]
    w = torch.from_numpy(g.load_weight("w"))
    n = torch.from_numpy(g.load_weight("n"))
    y = torch.from_numpy(x) @ w.T
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * n * 1.5
    assert out.shape == (2, 3, 2, 4)
    torch.testing.assert_close(out, y.reshape(2, 3, 2, 4), rtol=1e-6, atol=1e-6)


def test_symbolic_dims():
    assert dim_str(P + S) == "past+seq"
    assert parse_dim("past+seq") == P + S
    assert parse_dim("64*batch*seq") == B * S * 64
    assert dim_div(B * S * 64, S) == B * 64
    assert (P + S) - S == P
    assert parse_dim("seq-1") == S - 1


def test_verifier_names_the_node_with_wrong_type():
    g = tiny_graph()
    bad = g.nodes[0]
    wrong = Value(TensorType(DType.F32, (B, S, 9)))
    g.nodes[0] = Node(bad.op, bad.inputs, bad.attrs, (wrong,), "proj")
    g.nodes[1] = g.nodes[1].with_inputs([wrong, g.nodes[1].inputs[1]])
    with pytest.raises(VerifyError, match=r"node #0 \(linear, proj\): output 0 has type "
                                          r"f32\[batch, seq, 9\], inferred f32\[batch, seq, 8\]"):
        verify(g)


def test_verifier_rejects_use_before_definition():
    g = tiny_graph()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(VerifyError, match=r"node #0 \(rms_norm, layer.0\): input 0 .* defined "
                                          r"later"):
        verify(g)


def test_builder_rejects_bad_shapes_naming_the_op():
    g = Graph("bad")
    x = g.add_input("x", TensorType(DType.F32, (B, 4)))
    w = g.add_constant_weight("w", np.zeros((8, 5), np.float32))
    with pytest.raises(IRError, match="linear: input features 4 != weight in-features 5"):
        Builder(g).emit(Op.LINEAR, [x, w])


def test_parse_reports_line_of_unknown_op():
    text = GOLDEN.replace("mul(", "mull(")
    with pytest.raises(IRError, match=r"line 10: unknown op 'mull'"):
        parse_graph(text)


def test_attention_reference_matches_sdpa_with_gqa_and_cache():
    rng = np.random.default_rng(0)
    g = Graph("attn")
    q = g.add_input("q", TensorType(DType.F32, (B, S, 4, 8)))
    k = g.add_input("k", TensorType(DType.F32, (B, S, 2, 8)))
    v = g.add_input("v", TensorType(DType.F32, (B, S, 2, 8)))
    pk = g.add_input("pk", TensorType(DType.F32, (B, 2, P, 8)))
    pv = g.add_input("pv", TensorType(DType.F32, (B, 2, P, 8)))
    out, presk, presv = Builder(g).emit(Op.ATTENTION, [q, k, v, pk, pv], num_heads=4, kv_heads=2,
                                        scale=8 ** -0.5, mask="causal")
    g.outputs.update(out=out, k=presk)
    verify(g)
    assert str(presk.type) == "f32[batch, 2, past+seq, 8]"
    f = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         dict(q=(1, 3, 4, 8), k=(1, 3, 2, 8), v=(1, 3, 2, 8), pk=(1, 2, 5, 8),
              pv=(1, 2, 5, 8)).items()}
    res = interpret(g, f)
    K = torch.cat([torch.from_numpy(f["pk"]), torch.from_numpy(f["k"]).transpose(1, 2)], 2)
    V = torch.cat([torch.from_numpy(f["pv"]), torch.from_numpy(f["v"]).transpose(1, 2)], 2)
    Q = torch.from_numpy(f["q"]).transpose(1, 2)
    mask = torch.ones(3, 8, dtype=torch.bool).tril(diagonal=5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        Q, K.repeat_interleave(2, 1), V.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(res["out"], ref.transpose(1, 2).reshape(1, 3, 32), rtol=1e-5,
                               atol=1e-5)
