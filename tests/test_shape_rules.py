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


def _batch1_reshape_model(target: list[int]):
    from onnx import helper, numpy_helper

    from helpers import f32, make_model

    return make_model(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Reshape", ["p", "t"], ["y"])],
        [f32("x", [1, 4, 3, 3])], [f32("y", None)], [numpy_helper.from_array(np.array(target, np.int64), "t")],
    )


def test_freeing_a_static_batch_frees_reshape_targets_that_hard_code_it():
    """A model traced at batch 1 reshapes to [1, 4]; with batch N it reshapes to [N, 4], per sample as before."""
    import kiln
    from kiln.ir import evaluate, set_input_shapes

    for target in ([1, 4], [1, -1]):
        model = _batch1_reshape_model(target)
        g = kiln.load(model)
        set_input_shapes(g, {"x": ("N", 4, 3, 3)})
        assert g.outputs[0].shape == ("N", 4)
        x = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32)
        got = evaluate(g, {"x": x})["y"]
        want = np.concatenate([evaluate(kiln.load(model), {"x": x[i:i + 1]})["y"] for i in range(3)])
        np.testing.assert_array_equal(got, want)


def test_freeing_a_batch_leaves_other_reshapes_and_refuses_a_different_size():
    import pytest

    import kiln
    from kiln.errors import InputError
    from kiln.ir import set_input_shapes

    g = kiln.load(_batch1_reshape_model([2, 2]))  # does not start with the batch: left alone
    set_input_shapes(g, {"x": ("N", 4, 3, 3)})
    assert g.nodes[-1].input(1).numpy().tolist() == [2, 2]
    with pytest.raises(InputError, match="does not fit it"):
        set_input_shapes(kiln.load(_batch1_reshape_model([1, 4])), {"x": (2, 4, 3, 3)})


def test_resize_keeps_the_dims_it_scales_by_one():
    """A constant scale of 1 keeps a symbolic batch (onnx's inference names it afresh); constant sizes
    are the output dims; the spatial dims a real scale changes stay unknown."""
    def by_scales(op, x):
        return op.Resize(x, op.constant(np.zeros(0, np.float32)), op.constant(np.array([1, 1, 2, 2], np.float32)))

    def by_sizes(op, x):
        empty = op.constant(np.zeros(0, np.float32))
        return op.Resize(x, empty, empty, op.constant(np.array([3, 8, 5, 7], np.int64)))

    y = _out(by_scales, {"x": (DType.FLOAT32, ("N", 8, "H", "W"))})
    assert y.shape[:2] == ("N", 8) and all(isinstance(d, str) and d.startswith("?") for d in y.shape[2:])
    assert _out(by_sizes, {"x": (DType.FLOAT32, ("N", 8, "H", "W"))}).shape == (3, 8, 5, 7)
