"""ONNX import and export on small graphs built here with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.check import compare
from kiln.errors import ExternalDataError, GraphError, ModelLoadError, UnsupportedOpError
from kiln.ir import DType, evaluate, is_unknown_dim, load, save_onnx, to_onnx
from kiln.ir.serde import MAX_IR_VERSION
from helpers import f32, make_model, ort_outputs, shape_chain_model


def test_initializers_and_constant_nodes_become_constants():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    model = make_model(
        [
            helper.make_node("Constant", [], ["k"], value_float=2.0),
            helper.make_node("Constant", [], ["shape"], value_ints=[3, 1]),
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Mul", ["m", "k"], ["y0"]),
            helper.make_node("Reshape", ["y0", "shape"], ["y"]),
        ],
        [f32("x", [1, 2])], [f32("y", [3, 1])], [w],
    )
    g = load(model)
    assert set(g.constants) == {"w", "k", "shape"}
    assert [n.op_type for n in g.nodes] == ["MatMul", "Mul", "Reshape"]
    assert g.constants["k"].const.dtype is DType.FLOAT32 and g.constants["k"].shape == ()
    assert g.constants["shape"].numpy().tolist() == [3, 1]
    g.verify()
    x = np.array([[1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(evaluate(g, {"x": x})["y"], (x @ numpy_helper.to_array(w) * 2).reshape(3, 1))


def test_constant_of_shape_weight_stays_a_node():
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "wshape")
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("v", 1, [1], [0.5])),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [f32("x", [1, 2])], [f32("y", [1, 2])], [shape],
    )
    g = load(model)
    assert [n.op_type for n in g.nodes] == ["ConstantOfShape", "MatMul"]
    assert g.nodes[0].outputs[0].shape == (2, 2)  # but its type is inferred


def test_ir3_initializers_listed_as_inputs_are_constants():
    w = numpy_helper.from_array(np.ones((2,), np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [f32("x", [2]), f32("w", [2])],
                       [f32("y", [2])], [w], opset=9, ir_version=3)
    g = load(model)
    assert [v.name for v in g.inputs] == ["x"] and "w" in g.constants
    out = to_onnx(g)
    assert out.ir_version >= 4 and [i.name for i in out.graph.input] == ["x"]
    onnx.checker.check_model(out)


def test_unknown_dims_become_distinct_symbols():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "batch"])
    x.type.tensor_type.shape.dim[1].dim_value = -1  # a dim written as -1
    x.type.tensor_type.shape.dim.add()  # an unnamed dim
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = load(make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    dims = g.inputs[0].shape
    unknown = [d for d in dims if is_unknown_dim(d)]
    assert len(unknown) == 4 and len(set(unknown)) == 4
    assert dims[3] == "batch"
    assert g.outputs[0].shape is not None and g.outputs[0].shape[3] == "batch"


def test_named_symbols_are_kept_and_propagate():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
        [f32("x", ["N", 3])], [f32("y", None)],
    )
    g = load(model)
    assert g.outputs[0].shape == ("N", 3)


def test_data_propagation_makes_shape_chains_static():
    g = load(shape_chain_model())
    assert g.outputs[0].shape == (2, 12)


def test_nodes_out_of_order_are_sorted():
    model = make_model(
        [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])],
        [f32("x", [2])], [f32("y", [2])],
    )
    g = load(model)
    assert [n.op_type for n in g.nodes] == ["Relu", "Neg"]
    g.verify()


def test_cycle_is_an_error():
    model = make_model(
        [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")],
        [f32("x", [2])], [f32("b", [2])],
    )
    with pytest.raises(GraphError, match="cycle"):
        load(model)


def test_undefined_value_is_an_error():
    model = make_model([helper.make_node("Relu", ["nowhere"], ["y"], name="r")], [f32("x", [2])], [f32("y", [2])])
    with pytest.raises(GraphError, match="node 'r' \\(Relu\\) reads 'nowhere', which nothing in the graph defines"):
        load(model)


def test_unsupported_ops_are_all_listed_before_any_work():
    model = make_model(
        [
            helper.make_node("DynamicQuantizeLSTM", ["x"], ["a"], name="lstm1", domain="com.microsoft"),
            helper.make_node("DynamicQuantizeLSTM", ["a"], ["b"], name="lstm2", domain="com.microsoft"),
            helper.make_node("Frobnicate", ["b"], ["c"], name="frob", domain="acme"),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [f32("x", [2])], [f32("y", [2])],
    )
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("acme", 1)])
    with pytest.raises(UnsupportedOpError) as err:
        load(model)
    msg = str(err.value)
    assert "\n" not in msg
    assert "com.microsoft::DynamicQuantizeLSTM (nodes: lstm1, lstm2)" in msg
    assert "acme::Frobnicate (nodes: frob)" in msg
    assert set(err.value.ops) == {("com.microsoft", "DynamicQuantizeLSTM"), ("acme", "Frobnicate")}


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "absent.onnx")


def test_text_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is not a model\nat all\n")
    with pytest.raises(ModelLoadError, match="text file, not an ONNX model"):
        load(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load(p)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_file(tmp_path, keep):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [f32("x", [1, 64])], [f32("y", [1, 64])], [w])
    data = model.SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises((ModelLoadError, GraphError)) as err:
        load(p)
    assert str(p) in str(err.value)


def _external_model(tmp_path):
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [f32("x", [1, 32])], [f32("y", [1, 32])],
                       [numpy_helper.from_array(w, "w")])
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    return path, w


def test_external_data_is_loaded(tmp_path):
    path, w = _external_model(tmp_path)
    g = load(path)
    t = g.constants["w"].const
    assert not t.is_loaded  # lazy until needed
    np.testing.assert_array_equal(t.numpy(), w)
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(evaluate(g, {"x": x})["y"], x @ w, rtol=1e-5)


def test_missing_external_data(tmp_path):
    path, _ = _external_model(tmp_path)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ExternalDataError, match="external data file 'ext.bin' for initializer 'w' is missing"):
        load(path)


def test_short_external_data(tmp_path):
    path, _ = _external_model(tmp_path)
    (tmp_path / "ext.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ExternalDataError, match="too short"):
        load(path)


def test_external_data_outside_the_model_directory(tmp_path):
    path, _ = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ExternalDataError, match="outside the model's directory"):
        load(path)


def test_save_onnx_with_external_data(tmp_path):
    path, w = _external_model(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    save_onnx(load(path), out, external_data=True)
    assert (out.parent / "model.onnx.data").exists()
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(evaluate(load(out), {"x": x})["y"], x @ w, rtol=1e-5)


def test_save_onnx_is_atomic_and_leaves_no_temp_file(tmp_path):
    g = load(make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])]))
    out = tmp_path / "m.onnx"
    save_onnx(g, out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    onnx.checker.check_model(str(out))


def test_export_ir_version_is_accepted_by_onnxruntime():
    for opset in (9, 13, 17, 21):
        g = load(make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])], opset=opset))
        model = to_onnx(g)
        assert model.ir_version <= MAX_IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        x = np.array([-1.0, 2.0], np.float32)
        assert ort_outputs(model, {"x": x})["y"].tolist() == [0.0, 2.0]


def test_absent_optional_inputs_and_outputs_survive_the_round_trip():
    # Dropout without its mask output, Clip with only a max: the positions matter.
    model = make_model(
        [
            helper.make_node("Dropout", ["x"], ["d", ""], name="drop"),
            helper.make_node("Clip", ["d", "", "hi"], ["y"], name="clip"),
        ],
        [f32("x", [4])], [f32("y", [4])], [numpy_helper.from_array(np.array(0.5, np.float32), "hi")],
    )
    g = load(model)
    drop, clip = g.nodes
    assert len(drop.outputs) == 1 or drop.outputs[1].name == ""
    assert clip.inputs[1] is None
    g.verify()
    out = to_onnx(g)
    assert list(out.graph.node[1].input) == ["d", "", "hi"]
    x = np.array([-1.0, 0.25, 0.75, 2.0], np.float32)
    assert ort_outputs(out, {"x": x})["y"].tolist() == [-1.0, 0.25, 0.5, 0.5]


def test_if_subgraph_reads_outer_values_and_round_trips():
    then = helper.make_graph([helper.make_node("Add", ["x", "one"], ["t"])], "then", [], [f32("t", [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [f32("e", [2])])
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [f32("x", [2]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [f32("y", [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "one")],
    )
    g = load(model)
    g.verify()
    x = g.inputs[0]
    assert {u.node.op_type for u in x.uses} == {"Add", "Neg"}  # uses from inside the branches
    feeds = {"x": np.array([1.0, 2.0], np.float32), "c": np.array(True)}
    out = to_onnx(g)
    onnx.checker.check_model(out)
    for c in (True, False):
        feeds["c"] = np.array(c)
        cmp = compare("rt", ort_outputs(out, feeds), ort_outputs(model, feeds), 1e-6, 0)
        assert cmp.passed
        cmp = compare("eval", evaluate(g, feeds), ort_outputs(model, feeds), 1e-6, 0)
        assert cmp.passed


def test_bfloat16_and_float16_constants_round_trip():
    bf = numpy_helper.from_array(np.array([1.5, -2.0], dtype=DType.BFLOAT16.numpy), "bf")
    model = make_model(
        [helper.make_node("Cast", ["bf"], ["b32"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "b32"], ["y"])],
        [f32("x", [2])], [f32("y", [2])], [bf],
    )
    g = load(model)
    assert g.constants["bf"].dtype is DType.BFLOAT16
    out = to_onnx(g)
    x = np.zeros(2, np.float32)
    assert ort_outputs(out, {"x": x})["y"].tolist() == [1.5, -2.0]


def test_unsupported_element_type_is_named():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    with pytest.raises(ModelLoadError, match="element type string"):
        load(model)


def test_kiln_top_level_api(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])])
    p = tmp_path / "m.onnx"
    p.write_bytes(model.SerializeToString())
    g = kiln.load(p)
    kiln.save_onnx(g, tmp_path / "o.onnx")
    assert kiln.load(tmp_path / "o.onnx").nodes[0].op_type == "Relu"
