"""kiln's own shape rules: symbolic dims carried through ops, and shape-tensor values."""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Graph, infer_shapes
from kiln.passes.rules import example_graph


def _out(build, inputs):
    return example_graph("s", inputs, build).outputs[0]


def test_elementwise_keeps_an_unknown_dims_identity():
    g = Graph("g", opset={"": 17})
    x = g.add_input("x", DType.FLOAT32, ("N", 16, "?0", "?1"))
    two = g.add_constant(np.float32(2.0), "two")
    m = g.make_node("Mul", [two, x])
    r = g.make_node("Relu", [m.outputs[0]])
    g.outputs.append(r.outputs[0])
    infer_shapes(g)
    assert m.outputs[0].shape == ("N", 16, "?0", "?1") and r.outputs[0].shape == ("N", 16, "?0", "?1")


def test_reshape_through_a_dynamic_shape_chain():
    """Reshape(x, Concat(Slice(Shape(x)), [-1])) flattens the trailing dims: the channel dim survives."""
    def build(op, x):
        dims = op.Cast(op.Slice(op.Shape(x), op.constant(np.array([0])), op.constant(np.array([2]))), to=7)
        target = op.Concat(dims, op.constant(np.array([-1], np.int64)), axis=0)
        return op.Transpose(op.Reshape(x, target), perm=[0, 2, 1])

    y = _out(build, {"x": (DType.FLOAT32, ("N", 120, "H", "W"))})
    assert y.shape[0] == "N" and y.shape[2] == 120 and len(y.shape) == 3


def test_conv_and_pool_with_symbolic_spatial_dims():
    def build(op, x):
        w = op.constant(np.zeros((8, 3, 3, 3), np.float32))
        same = op.Conv(x, w, pads=[1, 1, 1, 1])
        return op.MaxPool(same, kernel_shape=[2, 2], strides=[2, 2])

    g = example_graph("c", {"x": (DType.FLOAT32, ("N", 3, "H", 32))}, build)
    conv = g.nodes[0].outputs[0]
    assert conv.shape == ("N", 8, "H", 32)  # "same" padding keeps H
    pool = g.outputs[0]
    assert pool.shape[:2] == ("N", 8) and pool.shape[3] == 16


def test_matmul_gather_unsqueeze_and_reduce():
    def build(op, a, b):
        m = op.MatMul(a, b)
        r = op.ReduceMean(m, axes=[-1], keepdims=0)
        return op.Unsqueeze(op.Gather(r, op.constant(np.array(0)), axis=1), op.constant(np.array([1])))

    y = _out(build, {"a": (DType.FLOAT32, ("B", 4, "S", 8)), "b": (DType.FLOAT32, (8, 5))})
    assert y.shape == ("B", 1, "S")  # (B,4,S,5) -> mean over 5 -> (B,4,S) -> [:, 0] -> (B,S) -> (B,1,S)
