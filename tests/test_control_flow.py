"""The inline-if pass, and folding inside subgraphs: numbers before and after, against the evaluator and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.ir import evaluate, to_onnx
from kiln.ir.oracle import run_onnxruntime
from kiln.passes import PassManager
from kiln.passes.pipeline import passes_for
from helpers import f32, make_model


def _shape_if_model() -> onnx.ModelProto:
    """PyTorch's ``if x.dim() == 2: x = x.unsqueeze(0)`` as exported, then a branch reading outer values.

    ``y = If(Size(Shape(x)) == 2, then: [Unsqueeze(x) * w, Relu(x)], else: [x, x])``; ``w`` is a
    weight in the outer graph and ``k`` a constant inside the branch, so inlining keeps both kinds of reads.
    """
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "w")
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([0], np.int64))),
         helper.make_node("Unsqueeze", ["x", "k"], ["u"]),
         helper.make_node("Mul", ["u", "w"], ["t0"]),
         helper.make_node("Relu", ["x"], ["t1"])],
        "then", [], [f32("t0", None), f32("t1", None)])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e0"]), helper.make_node("Identity", ["x"], ["e1"])],
        "else", [], [f32("e0", None), f32("e1", None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Size", ["s"], ["n"]),
        helper.make_node("Equal", ["n", "two"], ["c"]),
        helper.make_node("If", ["c"], ["y0", "y1"], then_branch=then, else_branch=other, name="if"),
        helper.make_node("Neg", ["y0"], ["out0"]),
    ]
    return make_model(nodes, [f32("x", [3, 4])], [f32("out0", None), f32("y1", None)],
                      [w, numpy_helper.from_array(np.array(2, np.int64), "two")])


def test_constant_condition_if_is_inlined_and_keeps_the_numbers():
    model = _shape_if_model()
    g = kiln.load(model)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = run_onnxruntime(model.SerializeToString(), {"x": x})
    g, report = PassManager(passes_for("O1"), verify_each=True).run(g)
    assert report.stats["inline-if"].changes == 1
    assert not any(n.op_type == "If" for n in g.walk_nodes())
    assert [v.name for v in g.outputs] == ["out0", "y1"]  # output names are kept
    assert g.outputs[0].shape == (1, 3, 4)  # shapes after the If are known again
    for got in (evaluate(g, {"x": x}), run_onnxruntime(to_onnx(g).SerializeToString(), {"x": x})):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_if_whose_output_is_an_outer_value_gets_an_identity_for_the_name():
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [f32("e", None)])
    then = helper.make_graph([], "then", [], [f32("x", None)])  # the branch returns the outer x itself
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                       [f32("x", [2])], [f32("y", None)], [numpy_helper.from_array(np.array(True), "c")])
    g = kiln.load(model)
    g, _ = PassManager(passes_for(names=["inline-if"]), verify_each=True).run(g)
    assert [v.name for v in g.outputs] == ["y"] and g.outputs[0].producer.op_type == "Identity"
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(evaluate(g, {"x": x})["y"], x)


def test_shape_of_an_outer_static_value_folds_inside_a_branch():
    """A branch on a run-time flag reads Shape(x) of the outer static x: the Shape folds in the branch."""
    then = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0), helper.make_node("Mul", ["r", "sf"], ["t"])],
        "then", [], [f32("t", None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"]),
                               helper.make_node("ReduceSum", ["e"], ["t2"], keepdims=1)], "else", [], [f32("t2", None)])
    model = make_model([helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
                       [f32("x", [2, 3]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                       [f32("y", None)])
    g = kiln.load(model)
    g, _ = PassManager(passes_for("O1"), verify_each=True).run(g)
    assert not any(n.op_type in ("Shape", "Cast") for n in g.walk_nodes())  # folded inside the then branch
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        want = run_onnxruntime(model.SerializeToString(), feeds)["y"]
        np.testing.assert_allclose(evaluate(g, feeds)["y"], want)
        np.testing.assert_allclose(run_onnxruntime(to_onnx(g).SerializeToString(), feeds)["y"], want)


def test_branch_weights_do_not_become_branch_inputs_for_shape_inference():
    """Exported for shape inference without weights, a branch's big constants are outer inputs (If branches take none)."""
    big = numpy_helper.from_array(np.ones((4, 32), np.float32), "big")
    then = helper.make_graph([helper.make_node("Add", ["x", "big"], ["t"])], "then", [], [f32("t", None)],
                             initializer=[big])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [f32("e", None)])
    model = make_model([helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
                       [f32("x", [4, 32]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                       [f32("y", None)])
    g = kiln.load(model)
    proto = to_onnx(g, weights=False)
    branch = proto.graph.node[0].attribute[0].g
    assert len(branch.input) == 0 and "big" in [i.name for i in proto.graph.input]
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # raised "Graph has 1 inputs but 0 were provided"
    assert g.outputs[0].shape == (4, 32)
