"""The reference evaluator: whole graphs, single nodes, intermediates, kiln ops, and the
overrides of onnx's reference kernels, each checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.check import compare
from kiln.errors import EvaluationError, InputError
from kiln.ir import AttrType, DType, Evaluator, Graph, evaluate, evaluate_node, load
from kiln.ir import schemas
from helpers import f32, make_model, ort_outputs

RNG = np.random.default_rng(0)


def _check_against_ort(model, feeds, rtol=1e-5, atol=1e-6):
    got = evaluate(load(model), feeds)
    want = ort_outputs(model, feeds)
    cmp = compare("eval", got, want, rtol, atol)
    assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("opset", [9, 11, 15])
def test_batchnorm_inference_matches_onnxruntime(opset):
    c = 4
    params = [
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), n) for n in ("s", "b", "m", "v")
    ]
    model = make_model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
                       [f32("x", [2, c, 3, 3])], [f32("y", [2, c, 3, 3])], params, opset=opset)
    _check_against_ort(model, {"x": RNG.standard_normal((2, c, 3, 3)).astype(np.float32)})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset, axis", [(9, None), (11, 2), (11, -1), (13, None), (13, 1)])
def test_softmax_family_follows_each_opsets_semantics(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    model = make_model([helper.make_node(op, ["x"], ["y"], **attrs)], [f32("x", [2, 3, 4])], [f32("y", [2, 3, 4])],
                       opset=opset)
    _check_against_ort(model, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


def test_contractions_are_closer_to_exact_than_float32():
    # a long dot product with cancellation: float64 accumulation must be near the exact answer
    k = 4096
    rng = np.random.default_rng(7)
    a = rng.standard_normal((1, k)).astype(np.float32)
    b = rng.standard_normal((k, 1)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])], [f32("a", [1, k]), f32("b", [k, 1])],
                       [f32("y", [1, 1])])
    got = evaluate(load(model), {"a": a, "b": b})["y"]
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert got.dtype == np.float32
    # float64 accumulation then one rounding: within half a float32 ulp of the exact sum
    assert abs(float(got[0, 0]) - float(exact[0, 0])) <= abs(np.spacing(np.float32(exact[0, 0]))) / 2


@pytest.mark.parametrize("op, attrs, wshape", [
    ("Conv", {"pads": [1, 1, 1, 1], "group": 2}, (4, 2, 3, 3)),
    ("ConvTranspose", {"strides": [2, 2]}, (4, 3, 3, 3)),
])
def test_wide_conv_matches_onnxruntime(op, attrs, wshape):
    w = numpy_helper.from_array(RNG.standard_normal(wshape).astype(np.float32), "w")
    model = make_model([helper.make_node(op, ["x", "w"], ["y"], **attrs)], [f32("x", [1, 4, 5, 5])], [f32("y", None)],
                       [w])
    _check_against_ort(model, {"x": RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)}, rtol=1e-5, atol=1e-5)


def test_gemm_old_opset_matches_onnxruntime():
    b = numpy_helper.from_array(RNG.standard_normal((5, 3)).astype(np.float32), "b")
    c = numpy_helper.from_array(RNG.standard_normal((3,)).astype(np.float32), "c")
    model = make_model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], alpha=0.5, beta=2.0)],
                       [f32("a", [2, 5])], [f32("y", [2, 3])], [b, c], opset=9)
    _check_against_ort(model, {"a": RNG.standard_normal((2, 5)).astype(np.float32)})


def _chain():
    return make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        [f32("x", [3])], [f32("y", [3])],
    )


def test_intermediate_values_can_be_requested():
    ev = Evaluator(load(_chain()))
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    out = ev.run({"x": x}, outputs=["r", "y"])
    assert out["r"].tolist() == [0.0, 0.0, 2.0] and out["y"].tolist() == [-0.0, -0.0, -2.0]
    with pytest.raises(EvaluationError, match="no value named 'nope'"):
        ev.run({"x": x}, outputs=["nope"])


@pytest.mark.parametrize("feeds, message", [
    ({}, "missing x"),
    ({"x": np.zeros(3, np.float32), "z": np.zeros(1)}, "unexpected z"),
    ({"x": np.zeros(3, np.float64)}, "dtype float64, expected f32\\[3\\]"),
    ({"x": np.zeros(4, np.float32)}, "shape \\[4\\], expected f32\\[3\\]"),
])
def test_wrong_inputs_are_refused_with_the_signature(feeds, message):
    with pytest.raises(InputError, match=message):
        evaluate(load(_chain()), feeds)


def test_evaluate_node_uses_constants_and_feeds():
    g = load(make_model([helper.make_node("Add", ["x", "k"], ["y"])], [f32("x", [2])], [f32("y", [2])],
                        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "k")]))
    (out,) = evaluate_node(g.nodes[0], {"x": np.array([10.0, 20.0], np.float32)})
    assert out.tolist() == [11.0, 22.0]
    with pytest.raises(EvaluationError, match="needs a value for 'x'"):
        evaluate_node(g.nodes[0], {})


@pytest.fixture
def scaled_add_op():
    """A kiln-domain op registered for one test: y = (a + b) * alpha."""

    @schemas.register_kiln_op("TestScaledAdd", inputs=(2, 2), attrs={"alpha": (AttrType.FLOAT, 1.0)},
                              infer=lambda node: [(node.input(0).dtype, node.input(0).shape)])
    def scaled_add(a, b, alpha=1.0):
        """y = (a + b) * alpha"""
        return ((a + b) * np.asarray(alpha, a.dtype),)

    schemas.is_supported.cache_clear()
    yield scaled_add
    del schemas.KILN_OPS["TestScaledAdd"]
    schemas.is_supported.cache_clear()


def test_kiln_ops_evaluate_through_their_numpy_function(scaled_add_op):
    g = Graph("g", opset={"": 17})
    a = g.add_input("a", DType.FLOAT32, (2,))
    b = g.add_input("b", DType.FLOAT32, (2,))
    n = g.make_node("TestScaledAdd", [a, b], {"alpha": 3.0}, domain="kiln", name="sa")
    g.outputs.append(n.outputs[0])
    from kiln.ir import infer_shapes

    infer_shapes(g)
    assert n.outputs[0].type_str() == "f32[2]"
    g.verify()
    feeds = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0, 4.0], np.float32)}
    assert evaluate(g, feeds)[n.outputs[0].name].tolist() == [12.0, 18.0]
    assert evaluate_node(n, feeds)[0].tolist() == [12.0, 18.0]
    n.set_attr("alpha", 2)  # INT where FLOAT is declared
    with pytest.raises(Exception, match="attribute 'alpha' is INT, kiln::TestScaledAdd wants FLOAT"):
        g.verify()


def test_kiln_op_names_cannot_be_registered_twice(scaled_add_op):
    with pytest.raises(ValueError, match="registered twice"):
        schemas.register_kiln_op("TestScaledAdd", inputs=(1, 1))(lambda x: (x,))


def test_support_check_knows_function_ops_and_refuses_foreign_domains():
    assert schemas.is_supported("", "Conv", 17)
    assert schemas.is_supported("", "HardSwish", 14)  # defined by a function body
    assert schemas.is_supported("ai.onnx.ml", "TreeEnsembleClassifier", 3)
    assert not schemas.is_supported("com.microsoft", "FusedConv", 1)
    assert not schemas.is_supported("", "NoSuchOp", 17)
    assert not schemas.is_supported("kiln", "NoSuchKilnOp", 1)


def test_evaluator_on_integer_and_bool_graphs():
    model = make_model(
        [helper.make_node("Greater", ["a", "b"], ["g"]), helper.make_node("Where", ["g", "a", "b"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.INT64, [4]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [4])],
    )
    feeds = {"a": np.array([1, 5, 3, 0]), "b": np.array([2, 2, 3, -1])}
    _check_against_ort(model, feeds)


def test_loop_scan_outputs_are_stacked_per_the_spec():
    """A Loop whose body emits a 2x3 matrix per iteration: the scan output is (N, 2, 3)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["acc_in", "fi"], ["acc_out"]),
         helper.make_node("Mul", ["base", "fi"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), f32("acc_in", [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), f32("acc_out", []), f32("scan", [2, 3])],
    )
    model = make_model(
        [helper.make_node("Loop", ["n", "", "acc0"], ["acc", "stacked"], body=body)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), f32("acc0", [])],
        [f32("acc", []), f32("stacked", [None, 2, 3])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "base")],
    )
    feeds = {"n": np.array(4, np.int64), "acc0": np.array(0.5, np.float32)}
    got = evaluate(load(model), feeds)
    assert got["stacked"].shape == (4, 2, 3)
    _check_against_ort(model, feeds)


@pytest.mark.parametrize("axis, data_shape, idx_shape", [(1, (2, 64), (2, 16)), (0, (40, 3), (5, 2)), (-1, (3, 4, 50), (3, 2, 7))])
def test_gather_elements_beyond_32_and_smaller_indices(axis, data_shape, idx_shape):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(data_shape).astype(np.float32)
    n = data_shape[axis]
    idx = rng.integers(-n, n, size=idx_shape).astype(np.int64)
    model = make_model([helper.make_node("GatherElements", ["d", "i"], ["y"], axis=axis)],
                       [f32("d", list(data_shape)), helper.make_tensor_value_info("i", TensorProto.INT64, list(idx_shape))],
                       [f32("y", list(idx_shape))])
    _check_against_ort(model, {"d": data, "i": idx}, rtol=0, atol=0)


@pytest.mark.parametrize("opset, axes", [(11, [2, 0]), (11, [-2, 0]), (11, None), (13, [2, 0]), (13, None)])
def test_squeeze_axes_are_a_set(opset, axes):
    x = np.random.default_rng(0).standard_normal((1, 2, 1, 4)).astype(np.float32)
    if opset >= 13:
        inits = [] if axes is None else [numpy_helper.from_array(np.array(axes, np.int64), "axes")]
        node = helper.make_node("Squeeze", ["x"] + ([] if axes is None else ["axes"]), ["y"])
    else:
        inits = []
        node = helper.make_node("Squeeze", ["x"], ["y"], **({} if axes is None else {"axes": axes}))
    model = make_model([node], [f32("x", [1, 2, 1, 4])], [f32("y", None)], inits, opset=opset)
    _check_against_ort(model, {"x": x}, rtol=0, atol=0)
