"""The inline-if pass, and folding inside subgraphs: numbers before and after, against the evaluator and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.ir import to_onnx
from test_onnx_io import f32, make_model


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
