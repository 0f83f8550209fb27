"""The IR itself: use-def maintenance, the printer, verify(), dtypes, shapes."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import GraphError, VerifyError
from kiln.ir import Attr, AttrType, DType, Graph, Node, Use, evaluate
from kiln.ir.shape_rules import broadcast


def small_graph() -> Graph:
    """x -> Conv(w) -> Relu -> y, opset 17."""
    g = Graph("g", opset={"": 17})
    x = g.add_input("x", DType.FLOAT32, (1, 2, 4, 4))
    w = g.add_constant(np.ones((3, 2, 1, 1), np.float32), "w")
    conv = g.make_node("Conv", [x, w], {"kernel_shape": [1, 1]}, name="conv")
    conv.outputs[0].name = "c"
    relu = g.make_node("Relu", [conv.outputs[0]], name="relu")
    for v in (conv.outputs[0], relu.outputs[0]):
        v.dtype, v.shape = DType.FLOAT32, (1, 3, 4, 4)
    g.outputs.append(relu.outputs[0])
    return g


def test_uses_track_inputs():
    g = small_graph()
    conv, relu = g.nodes
    x = g.inputs[0]
    assert x.uses == (Use(conv, 0),)
    assert conv.outputs[0].uses == (Use(relu, 0),)
    assert conv.outputs[0].producer is conv and relu.outputs[0].is_graph_output
    g.verify()


def test_set_input_moves_the_use():
    g = small_graph()
    conv, relu = g.nodes
    relu.set_input(0, g.inputs[0])
    assert conv.outputs[0].uses == ()
    assert Use(relu, 0) in g.inputs[0].uses


def test_replace_all_uses_with_updates_users_and_graph_outputs():
    g = small_graph()
    conv, relu = g.nodes
    neg = g.make_node("Neg", [conv.outputs[0]], name="neg")
    neg.outputs[0].dtype, neg.outputs[0].shape = DType.FLOAT32, (1, 3, 4, 4)
    relu.outputs[0].replace_all_uses_with(neg.outputs[0])
    assert g.outputs == [neg.outputs[0]]
    conv.outputs[0].replace_all_uses_with(g.inputs[0])  # type mismatch is fine for the link test
    assert conv.outputs[0].uses == ()
    assert {u.node.name for u in g.inputs[0].uses} == {"conv", "relu", "neg"}


def test_remove_node_refuses_while_used_and_detaches_inputs():
    g = small_graph()
    conv, relu = g.nodes
    with pytest.raises(GraphError, match="still used"):
        g.remove_node(conv)
    with pytest.raises(GraphError, match="graph output"):
        g.remove_node(relu)
    g.outputs = [conv.outputs[0]]
    g.remove_node(relu)
    assert conv.outputs[0].uses == () and relu.graph is None
    g.verify()


def test_remove_constant_refuses_while_used():
    g = small_graph()
    with pytest.raises(GraphError, match="still has 1 use"):
        g.remove_constant(g.constants["w"])


def test_names_are_made_unique():
    g = Graph("g", opset={"": 17})
    a = g.add_input("x", DType.FLOAT32, (2,))
    n1 = g.make_node("Relu", [a], name="r")
    n2 = g.make_node("Relu", [a], name="r")
    assert n1.name != n2.name
    assert n1.outputs[0].name != n2.outputs[0].name
    # value names and node names are separate namespaces, as in ONNX
    n3 = g.make_node("Relu", [a], name="x")
    assert n3.name == "x"


def test_printer_text():
    g = small_graph()
    assert str(g) == "\n".join([
        "graph g (opset ai.onnx=17)",
        "  input %x: f32[1,2,4,4]",
        "  const %w: f32[3,2,1,1] {1,1,1,1,1,1}",
        "  %c = Conv(%x, %w) {kernel_shape=[1,1]} : f32[1,3,4,4]",
        "  %relu_out = Relu(%c) : f32[1,3,4,4]",
        "  return %relu_out",
    ])


def test_printer_shows_small_constants_and_subgraphs():
    g = Graph("g", opset={"": 17})
    cond = g.add_input("cond", DType.BOOL, ())
    g.add_constant(np.array([1, 2], np.int64), "k")
    then = g.subgraph("then")
    one = then.add_constant(np.array([1.0], np.float32), "one")
    then.outputs.append(one)
    other = g.subgraph("else")
    two = other.add_constant(np.array([2.0], np.float32), "two")
    other.outputs.append(two)
    node = g.make_node("If", [cond], {"then_branch": then, "else_branch": other}, name="if")
    node.outputs[0].dtype, node.outputs[0].shape = DType.FLOAT32, (1,)
    g.outputs.append(node.outputs[0])
    text = str(g)
    assert "const %k: i64[2] {1,2}" in text
    assert "      then:" not in text and "    else_branch:" in text and "      graph then" in text
    g.verify()
    assert evaluate(g, {"cond": np.array(True)})[node.outputs[0].name].tolist() == [1.0]
    assert evaluate(g, {"cond": np.array(False)})[node.outputs[0].name].tolist() == [2.0]


def test_clone_is_structural_and_independent():
    g = Graph("g", opset={"": 17})
    cond = g.add_input("cond", DType.BOOL, ())
    x = g.add_input("x", DType.FLOAT32, ("N", 2))
    then = g.subgraph("then")
    other = g.subgraph("else")
    for branch, op in ((then, "Relu"), (other, "Neg")):
        y = branch.make_node(op, [x]).outputs[0]  # reads an outer value
        y.dtype, y.shape = DType.FLOAT32, ("N", 2)
        branch.outputs.append(y)
    node = g.make_node("If", [cond], {"then_branch": then, "else_branch": other}, name="if")
    node.outputs[0].dtype, node.outputs[0].shape = DType.FLOAT32, ("N", 2)
    split = g.make_node("Split", [node.outputs[0]], {"axis": 1}, num_outputs=2, name="split")
    split.outputs[1].name = ""  # an optional output nobody reads
    split.outputs[0].dtype, split.outputs[0].shape = DType.FLOAT32, ("N", 1)
    g.outputs.append(split.outputs[0])
    c = g.clone()
    assert str(c) == str(g)
    c.verify()
    assert c.nodes[1].outputs[1].name == ""
    inner = c.nodes[0].attr("then_branch").nodes[0]
    assert inner.input(0) is c.inputs[1] and inner.input(0) is not x  # outer reads point into the copy
    assert not set(map(id, c.walk_nodes())) & set(map(id, g.walk_nodes()))
    c.remove_node(c.nodes[1], force=True)  # changing the copy leaves the original alone
    assert len(g.nodes) == 2 and g.nodes[1].graph is g
    feeds = {"cond": np.array(False), "x": np.array([[1.0, -2.0]], np.float32)}
    assert evaluate(g.clone(), feeds)[g.outputs[0].name].tolist() == [[-1.0]]
    assert c.fresh_name(x.name) != x.name  # names used in the original stay taken


def test_verify_reports_out_of_order_nodes():
    g = small_graph()
    conv, relu = g.nodes
    g._nodes.reverse()  # break the order behind the API's back
    with pytest.raises(VerifyError, match="before it is defined"):
        g.verify()
    g.sort()
    g.verify()


def test_verify_reports_stale_uses_and_missing_types():
    g = small_graph()
    conv, relu = g.nodes
    relu._inputs[0] = g.inputs[0]  # bypass set_input: use lists are now wrong
    problems = str(pytest.raises(VerifyError, g.verify).value)
    assert "stale use" in problems and "missing from that value's uses" in problems
    g = small_graph()
    g.nodes[0].outputs[0].dtype = None
    with pytest.raises(VerifyError, match="no known dtype"):
        g.verify()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda n: n.set_attr("kernel_shape", "3x3"), "attribute 'kernel_shape' is STRING, schema wants INTS"),
        (lambda n: n.set_attr("bogus", 1), "unknown attribute 'bogus'"),
        (lambda n: n.set_inputs([n.input(0)]), "has 1 inputs, schema allows 2..3"),
    ],
)
def test_verify_checks_op_schemas(mutate, message):
    g = small_graph()
    mutate(g.nodes[0])
    with pytest.raises(VerifyError, match=message):
        g.verify()


def test_verify_checks_required_attributes_and_unknown_ops():
    g = Graph("g", opset={"": 17})
    x = g.add_input("x", DType.INT64, (2,))
    n = g.make_node("Cast", [x], name="cast")  # Cast requires 'to'
    n.outputs[0].dtype, n.outputs[0].shape = DType.FLOAT32, (2,)
    m = g.make_node("NoSuchOp", [x], name="mystery")
    m.outputs[0].dtype, m.outputs[0].shape = DType.FLOAT32, (2,)
    problems = str(pytest.raises(VerifyError, g.verify).value)
    assert "missing required attribute 'to'" in problems
    assert "no schema for NoSuchOp at opset 17" in problems


def test_sort_detects_cycles():
    g = Graph("g", opset={"": 17})
    x = g.add_input("x", DType.FLOAT32, (2,))
    a = g.make_node("Relu", [x], name="a")
    b = g.make_node("Relu", [a.outputs[0]], name="b")
    a.set_input(0, b.outputs[0])
    with pytest.raises(GraphError, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        g.sort()


def test_node_rejects_value_with_a_producer():
    g = small_graph()
    with pytest.raises(GraphError, match="already has a producer"):
        Node("Relu", [g.inputs[0]], outputs=[g.nodes[0].outputs[0]])


def test_attr_inference_and_types():
    assert Attr.infer(3).type is AttrType.INT
    assert Attr.infer(2.5).type is AttrType.FLOAT
    assert Attr.infer([1, 2]).value == (1, 2) and Attr.infer([1, 2]).type is AttrType.INTS
    assert Attr.infer([1.0, 2]).type is AttrType.FLOATS
    assert Attr.infer(["a"]).type is AttrType.STRINGS
    assert Attr.infer(np.zeros(2, np.float32)).type is AttrType.TENSOR
    with pytest.raises(TypeError):
        Attr.infer(object())


@pytest.mark.parametrize("dtype", list(DType))
def test_dtype_round_trips(dtype):
    assert DType.from_onnx(dtype.onnx_code) is dtype
    assert DType.from_numpy(dtype.numpy) is dtype
    assert DType.from_short(dtype.short) is dtype
    assert DType.from_short(dtype.name.lower()) is dtype


def test_dtype_set_is_complete():
    names = {d.name.lower() for d in DType}
    assert names == {
        "float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool",
    }


def test_broadcast_shapes_with_symbols():
    assert broadcast([(1, 3, 1), (2, 1, 5)]) == (2, 3, 5)
    assert broadcast([("N", 3, 1), (1, 3, "W")]) == ("N", 3, "W")
    assert broadcast([("?4", 3), (1, 3)]) == ("?4", 3)  # an unknown dim keeps its identity
    assert broadcast([(2,), (3,)]) == (None,)
    assert broadcast([("A",), ("B",)]) == (None,)
    assert broadcast([(2,), None]) is None
