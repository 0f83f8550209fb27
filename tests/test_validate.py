"""Validation at import: models that break their ops' rules are refused in one line, as onnxruntime refuses them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import f32, make_model
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.ir.oracle import run_onnxruntime
from kiln.ir.validate import ModelValidationError


def _w(name, shape):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def conv(**attrs):
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
                      [f32("x", [1, 4, 8, 8])], [f32("y", None)], [_w("w", (6, 4, 3, 3))])


def conv_weight(shape, **attrs):
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
                      [f32("x", [1, 4, 8, 8])], [f32("y", None)], [_w("w", shape)])


def pool(**attrs):
    return make_model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs)],
                      [f32("x", [1, 4, 8, 8])], [f32("y", None)])


def unary(op, shape=(2, 3, 4), **attrs):
    return make_model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [f32("x", list(shape))],
                      [f32("y", None)], opset=17)


def add(a, b):
    return make_model([helper.make_node("Add", ["a", "b"], ["y"], name="add")], [f32("a", a), f32("b", b)],
                      [f32("y", None)])


def bn(eps):
    c = 4
    inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    return make_model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn",
                                        epsilon=eps)], [f32("x", [1, c, 2, 2])], [f32("y", None)], inits)


def clip(lo_shape):
    inits = [numpy_helper.from_array(np.zeros(lo_shape, np.float32), "lo"),
             numpy_helper.from_array(np.ones((), np.float32), "hi")]
    return make_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")], [f32("x", [3, 4])],
                      [f32("y", None)], inits, opset=13)


CASES = {
    "clip bound not a scalar": (clip([3, 4]), "input min is [3, 4]; Clip's bounds must be scalars"),
    "zero stride": (conv(strides=[0, 1]), "attribute 'strides' is [0, 1]; every entry must be > 0"),
    "zero dilation": (conv(dilations=[1, 0]), "attribute 'dilations' is [1, 0]; every entry must be > 0"),
    "negative pad": (conv(pads=[-1, 0, 0, 0]), "pads must be >= 0"),
    "pads of the wrong length": (conv(pads=[1, 1]), "attribute 'pads' has 2 entries; a 2-D window needs 4"),
    "zero kernel": (pool(kernel_shape=[0, 2]), "attribute 'kernel_shape' is [0, 2]"),
    "pool pad past its kernel": (pool(kernel_shape=[2, 2], pads=[2, 0, 0, 0]), "a pad must be smaller than the kernel"),
    "group not dividing the channels": (conv_weight((8, 4, 3, 3), group=4), "the input has 4 channels"),
    "group not dividing the filters": (conv_weight((6, 2, 3, 3), group=4), "which group=4 does not divide"),
    "weight channels wrong": (conv_weight((6, 3, 3, 3)), "the input has 4 channels; the weight takes 3"),
    "softmax axis out of range": (unary("Softmax", axis=3), "attribute 'axis' is 3; for rank 3 it must be in [-3, 2]"),
    "flatten axis out of range": (unary("Flatten", axis=4), "attribute 'axis' is 4"),
    "transpose perm not a permutation": (unary("Transpose", perm=[0, 0, 1]), "must be a permutation of 0..2"),
    "shapes that do not broadcast": (add([2, 3], [4, 3]), "the input shapes [2,3] and [4,3] do not broadcast"),
    # onnxruntime runs this one (its outputs are NaN or infinite, by its own formula): kiln refuses it, saying
    # why. A NaN epsilon compiles (all NaN, as onnxruntime): tests/test_conformance.py checks it
    "negative epsilon": (bn(-1.0), "attribute 'epsilon' is -1.0"),
    "an unknown attribute": (unary("Relu", alpha=1.0), "Unrecognized attribute: alpha"),
    "an attribute of the wrong type": (unary("Softmax", axis=1.5), "Softmax"),
    "a required input left empty": (make_model([helper.make_node("Add", ["a", ""], ["y"], name="add")],
                                               [f32("a", [2])], [f32("y", None)]), "add"),
    "gemm bias that does not broadcast": (
        make_model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="gemm", transB=1)], [f32("a", [2, 6])],
                   [f32("y", None)], [_w("b", (5, 6)), _w("c", (3,))]),
        "C has the shape [3], which does not broadcast to the product's [2, 5]"),
    "split sizes for more outputs than the node has": (
        make_model([helper.make_node("Split", ["x", "s"], ["y"], name="split")], [f32("x", [6])], [f32("y", None)],
                   [numpy_helper.from_array(np.array([2, 4], np.int64), "s")], opset=13),
        "the split sizes [2, 4] make 2 parts; the node has 1 outputs"),
    "pads of the wrong count": (
        make_model([helper.make_node("Pad", ["x", "p"], ["y"], name="pad")], [f32("x", [2, 3])], [f32("y", None)],
                   [numpy_helper.from_array(np.array([0, 1, 1], np.int64), "p")], opset=13),
        "pads has 3 values; an input of rank 2 need 4"),
    "a fixed-type input of another type": (
        make_model([helper.make_node("Expand", ["x", "s"], ["y"], name="expand")], [f32("x", [2, 3])],
                   [f32("y", None)], [_w("s", (2,))]),
        "input 1 ('shape') is tensor(float), which Expand does not take"),
    "an If output declared with another dtype than its branches give": (
        make_model([helper.make_node("If", ["c"], ["y"], name="if",
                                     then_branch=helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                                                   [f32("t", [2, 3])]),
                                     else_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                                                   [f32("e", [2, 3])]))],
                   [f32("x", [2, 3]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])]),
        "its output 'y' is int32, but its then branch gives float32"),
    "resize scales past any tensor": (
        make_model([helper.make_node("Resize", ["x", "", "s"], ["y"], name="resize")], [f32("x", [1, 1, 4, 4])],
                   [f32("y", None)], [numpy_helper.from_array(np.array([1, 1, 1e10, 1e10], np.float32), "s")]),
        "kiln compiles tensors of up to 2147483647 elements"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_models_are_refused_in_one_line(tmp_path, capsys, case):
    model, message = CASES[case]
    with pytest.raises(ModelValidationError, match=None) as info:
        kiln.load(model)
    assert message in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert main(["compile", str(path), "-o", str(tmp_path / "m.kiln")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error line
    assert all(ln.startswith("[kiln] ") for ln in lines[:-1]) and lines[-1].startswith("kiln: error: ")
    assert message in lines[-1]
    assert not (tmp_path / "m.kiln").exists()
    if "epsilon" in case:
        return
    # onnxruntime refuses each of the others too
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises several types
        run_onnxruntime(model.SerializeToString(), {v.name: np.ones([d.dim_value for d in v.type.tensor_type.shape.dim],
                                                                     np.float32) for v in model.graph.input})


def test_valid_variants_still_load():
    kiln.load(conv(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1]))
    kiln.load(conv_weight((8, 1, 3, 3), group=4))
    kiln.load(unary("Softmax", axis=-3))
    kiln.load(add([2, 1, 3], [4, 3]))
    kiln.load(bn(0.0))
    kiln.load(clip([]))
    kiln.load(clip([1]))  # onnxruntime takes a one-element bound as a scalar


def test_an_empty_recurrence_and_a_tensor_past_the_index_range_are_refused_in_one_line():
    """kiln-only refusals (onnxruntime aborts on the first; it would try to run the second)."""
    lstm = make_model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="lstm", hidden_size=2)],
                      [f32("x", [4, 0, 3])], [f32("y", None)], [_w("w", (1, 8, 3)), _w("r", (1, 8, 2))])
    with pytest.raises(ModelValidationError, match="the input is \\[4, 0, 3\\]; kiln compiles recurrences over non-empty"):
        kiln.load(lstm)
    big = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [f32("x", [1 << 20, 4, 64, 64])],
                     [f32("y", None)], [_w("w", (16, 4, 1, 1))])
    with pytest.raises(ModelValidationError, match="its output 'y' would have the shape .* kiln compiles tensors of up to"):
        kiln.load(big)


@pytest.mark.parametrize("op", ["Conv", "BatchNormalization", "LayerNormalization"])
def test_a_symbolic_channel_dim_is_pinned_to_the_weights(tmp_path, op):
    """A conv's (or a normalization's) input channels must be its weight's (its scale's): a symbolic
    channel dim is pinned at import, so a run with other channels is refused in one line, as
    onnxruntime refuses it."""
    import kiln.runtime
    from kiln.errors import InputError

    if op == "Conv":
        node, inits = helper.make_node("Conv", ["x", "w"], ["y"], name="n"), [_w("w", (6, 4, 3, 3))]
    elif op == "LayerNormalization":  # over the last three dims, a [4, 8, 8] scale: C is pinned to 4
        node = helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="n", axis=1)
        inits = [_w("s", (4, 8, 8))]
    else:
        node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="n")
        inits = [_w("s", (4,)), _w("b", (4,)), _w("m", (4,)),
                 numpy_helper.from_array(np.ones(4, np.float32), "v")]
    model = make_model([node], [f32("x", ["N", "C", 8, 8])], [f32("y", None)], inits)
    graph = kiln.load(model)
    assert graph.inputs[0].shape == ("N", 4, 8, 8)
    kiln.compile(graph, tmp_path / "m.kiln", threads=1)
    runtime = kiln.runtime.load(tmp_path / "m.kiln")
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], run_onnxruntime(model.SerializeToString(), {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="input 'x' has shape \\[2, 3, 8, 8\\]"):
        runtime.run({"x": x[:, :3]})


def test_an_input_smaller_than_a_conv_window_is_refused_at_run_time(tmp_path):
    """A 5x5 conv without pads needs H and W of 5 at least: a smaller input is refused in one line (onnxruntime
    fails such a run too), a fitting one matches onnxruntime."""
    import kiln.runtime
    from kiln.errors import InputError

    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [f32("x", [1, 2, "H", "W"])],
                       [f32("y", None)], [_w("w", (3, 2, 5, 5))])
    kiln.compile(kiln.load(model), tmp_path / "m.kiln", threads=1)
    runtime = kiln.runtime.load(tmp_path / "m.kiln")
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], run_onnxruntime(model.SerializeToString(), {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)
    small = x[:, :, :4]
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises several types
        run_onnxruntime(model.SerializeToString(), {"x": small})
    with pytest.raises(InputError, match=r"its dim 2 \(H\) must be at least 5 for the model's conv and pool windows"):
        runtime.run({"x": small})


def test_a_window_need_is_carried_back_through_convs_and_pools():
    """conv 3x3 -> relu -> maxpool 2/2 -> conv 3x3, none padded: the last conv needs 3 rows, so the pool
    6, so the input 8. onnxruntime runs at 8 and refuses 7; kiln's runtime refuses 7 in one line."""
    import kiln.runtime
    from kiln.errors import InputError
    from kiln.ir import window_minimums

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    model = make_model(nodes, [f32("x", [1, 2, "H", "W"])], [f32("y", None)], [_w("w1", (2, 2, 3, 3)), _w("w2", (2, 2, 3, 3))])
    assert window_minimums(kiln.load(model)) == {"H": 8, "W": 8}
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 9)).astype(np.float32)
    run_onnxruntime(model.SerializeToString(), {"x": x})
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises several types
        run_onnxruntime(model.SerializeToString(), {"x": x[:, :, :7]})
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        kiln.compile(kiln.load(model), f"{tmp}/m.kiln", threads=1)
        runtime = kiln.runtime.load(f"{tmp}/m.kiln")
        np.testing.assert_allclose(runtime.run({"x": x})["y"], run_onnxruntime(model.SerializeToString(), {"x": x})["y"],
                                   rtol=1e-4, atol=1e-5)
        with pytest.raises(InputError, match=r"its dim 2 \(H\) must be at least 8"):
            runtime.run({"x": x[:, :, :7]})
