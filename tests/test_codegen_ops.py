"""Focused checks of lowerings (and runtime input handling) that the node-suite work fixed or
widened, each compiled through kiln and compared with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.runtime
from kiln.codegen.build import build
from helpers import f32, make_model, ort_outputs


def _artifact(model, tmp_path: Path, threads: int = 1) -> kiln.runtime.CompiledModel:
    """``model`` compiled once and loaded, to run at several sizes."""
    path = tmp_path / "m.kiln"
    build(kiln.load(model.SerializeToString()), path)
    return kiln.runtime.load(path, threads=threads)


def _compiled(model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _artifact(model, tmp_path).run(feeds)


def _check(model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> None:
    got, want = _compiled(model, tmp_path, feeds), ort_outputs(model, feeds)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].dtype == w.dtype, name
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_matmul_broadcasts_batch_dims_from_both_sides(tmp_path):
    # batch dims (2, 1) and (5,): the old lowering took a's batch dims and failed to compile
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [f32("a", [2, 1, 3, 4]), f32("b", [5, 4, 2])], [f32("y", [2, 5, 3, 2])])
    rng = np.random.default_rng(0)
    _check(model, tmp_path, {"a": rng.standard_normal((2, 1, 3, 4), np.float32),
                             "b": rng.standard_normal((5, 4, 2), np.float32)})


@pytest.mark.parametrize("a_shape,b_shape,sizes", [
    # attention's Q.Kt with 37 keys (N padded to the vectors), and its P.V
    ([2, 3, 37, 16], [2, 3, 16, 37], [{}]),
    ([2, 3, 37, 37], [2, 3, 37, 24], [{}]),
    # K of 600: summed in blocks; B's batch broadcast
    ([2, 5, 600], [1, 600, 40], [{}]),
    # symbolic batch, heads and length (two symbolic extents beside N's panels)
    (["B", "H", "S", 16], ["B", "H", 16, "S"], [{"B": 1, "H": 2, "S": 5}, {"B": 2, "H": 3, "S": 19}]),
])
def test_batched_matmul_runs_the_dense_schedule_and_matches(tmp_path, a_shape, b_shape, sizes):
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])], [f32("a", a_shape), f32("b", b_shape)],
                       [f32("y", None)])
    compiled = _artifact(model, tmp_path, threads=2)
    rng = np.random.default_rng(2)
    for dims in sizes:
        feeds = {n: rng.standard_normal([dims.get(d, d) for d in shape]).astype(np.float32)
                 for n, shape in (("a", a_shape), ("b", b_shape))}
        np.testing.assert_allclose(compiled.run(feeds)["y"], ort_outputs(model, feeds)["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,sizes", [([3, 4, 37], [{}]), (["B", 2, "S", "S"], [{"B": 1, "S": 3}, {"B": 2, "S": 21}])])
def test_softmax_over_the_last_axis_matches_with_infinities_and_nans(tmp_path, shape, sizes):
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [f32("x", shape)], [f32("y", None)],
                       opset=17)
    compiled = _artifact(model, tmp_path, threads=2)
    rng = np.random.default_rng(3)
    for dims in sizes:
        x = (rng.standard_normal([dims.get(d, d) for d in shape]) * 20).astype(np.float32)
        flat = x.reshape(-1, x.shape[-1])
        flat[0] = -np.inf  # a fully masked row: NaN, as onnxruntime gives
        flat[-1, :2] = -np.inf
        flat[-1, -1] = np.nan
        if len(flat) > 2:
            flat[1, 1] = np.inf
        got, want = compiled.run({"x": x})["y"], ort_outputs(model, {"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(np.isnan(got), np.isnan(want))


def test_matmul_with_vector_operands(tmp_path):
    model = make_model([helper.make_node("MatMul", ["v", "m"], ["y"])],
                       [f32("v", [4]), f32("m", [3, 4, 2])], [f32("y", [3, 2])])
    rng = np.random.default_rng(1)
    _check(model, tmp_path, {"v": rng.standard_normal(4, np.float32), "m": rng.standard_normal((3, 4, 2), np.float32)})


def test_split_sizes_given_at_run_time(tmp_path):
    # the old lowering ignored a computed sizes input and split evenly
    i64 = helper.make_tensor_value_info("sizes", TensorProto.INT64, [2])
    model = make_model([helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=0)],
                       [f32("x", [6]), i64], [f32("a", [2]), f32("b", [4])], opset=18)
    _check(model, tmp_path, {"x": np.arange(6, dtype=np.float32), "sizes": np.array([2, 4], np.int64)})


def test_cast_float_to_bool_is_nonzero(tmp_path):
    model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BOOL)],
                       [f32("x", [5])], [helper.make_tensor_value_info("y", TensorProto.BOOL, [5])])
    _check(model, tmp_path, {"x": np.array([0.0, 0.25, -2.0, -0.0, 7.0], np.float32)})


def test_clip_on_ints_with_tensor_bounds(tmp_path):
    # the old lowering refused bounds that are not constants
    def i32(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.INT32, shape)

    model = make_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                       [i32("x", [6]), i32("lo", []), i32("hi", [])], [i32("y", [6])], opset=13)
    _check(model, tmp_path, {"x": np.array([-9, -1, 0, 3, 8, 100], np.int32),
                             "lo": np.array(-2, np.int32), "hi": np.array(5, np.int32)})


@pytest.mark.parametrize("shape", [(), (0, 3)], ids=["0-d", "empty"])
def test_runtime_takes_0d_and_empty_inputs(tmp_path, shape):
    # np.ascontiguousarray made 0-d inputs 1-d; empty arrays had odd strides and unaligned data
    model = make_model([helper.make_node("Add", ["x", "x"], ["y"])], [f32("x", list(shape))], [f32("y", list(shape))])
    x = np.full(shape, 1.5, np.float32)
    _check(model, tmp_path, {"x": x})


def test_runtime_takes_read_only_inputs(tmp_path):
    model = make_model([helper.make_node("Neg", ["x"], ["y"])], [f32("x", [4])], [f32("y", [4])])
    x = np.arange(4, dtype=np.float32)
    x.flags.writeable = False
    _check(model, tmp_path, {"x": x})


def test_slice_with_constant_negative_steps(tmp_path):
    # constant starts/axes/steps take the immediate-offset path; the old lowering refused steps != 1
    from onnx import numpy_helper

    consts = {"starts": [-1, 1], "ends": [-100, 5], "axes": [1, 0], "steps": [-2, 2]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    model = make_model([helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])],
                       [f32("x", [6, 7])], [f32("y", [2, 4])], inits=inits, opset=13)
    _check(model, tmp_path, {"x": np.arange(42, dtype=np.float32).reshape(6, 7)})


def _sequence_model():
    """y = ConcatFromSequence(s, axis=1) + SequenceLength(s), over a sequence input s of f32[2, ?]."""
    nodes = [helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=1),
             helper.make_node("SequenceLength", ["s"], ["n"])]
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2, None])
    return make_model(nodes, [seq], [f32("y", None), helper.make_tensor_value_info("n", TensorProto.INT64, [])])


def test_a_sequence_input_runs_from_a_list_of_arrays_at_the_pinned_length(tmp_path):
    from kiln.check import parse_shape_overrides

    model = _sequence_model()
    shapes = parse_shape_overrides(["s=2x3,2x1,2x2"])
    path = tmp_path / "m.kiln"
    kiln.compile(kiln.load(model.SerializeToString()), path, input_shapes=shapes)
    rt = kiln.runtime.load(path, threads=1)
    rng = np.random.default_rng(0)
    feeds = {"s": [rng.standard_normal((2, k), np.float32) for k in (3, 1, 2)]}
    got, want = rt.run(feeds), ort_outputs(model, feeds)
    np.testing.assert_array_equal(got["y"], want["y"])
    assert got["n"] == want["n"] == 3
    assert str(rt.inputs[0]) == "s: [float32[2,3], float32[2,1], float32[2,2]]"
    with pytest.raises(kiln.runtime.InputError, match=r"input 's' is a list of 2; expected s: \["):
        rt.run({"s": feeds["s"][:2]})
    with pytest.raises(kiln.runtime.InputError, match=r"input 's\[1\]' has shape \[2, 3\]"):
        rt.run({"s": [feeds["s"][0]] * 3})


def test_a_sequence_input_without_a_pin_is_refused_naming_the_flag(tmp_path):
    from kiln.check import parse_shape_overrides
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"input 's' is a sequence of tensors, whose length kiln fixes when compiling; "
                                        r"give it with --input-shape 's=N\*2x1'"):
        kiln.compile(kiln.load(_sequence_model().SerializeToString()), tmp_path / "m.kiln")
    with pytest.raises(KilnError, match=r"input 's' is a sequence of tensors: pin it as s=N\*2x1"):
        kiln.compile(kiln.load(_sequence_model().SerializeToString()), tmp_path / "m.kiln",
                     input_shapes=parse_shape_overrides(["s=2x3"]))
    assert str(parse_shape_overrides(["s=3*2x4"])["s"]) == "3*2x4"


@pytest.mark.parametrize("mode,ctm", [("nearest", "asymmetric"), ("linear", "half_pixel"), ("linear", "align_corners"),
                                      ("cubic", "pytorch_half_pixel")])
def test_resize_of_a_symbolic_input_computes_its_size_at_run_time(tmp_path, mode, ctm):
    """Resize by constant scales, and to the run-time shape of another tensor (an FPN's upsample
    to its skip connection), on an input whose height and width are symbolic."""
    from onnx import numpy_helper

    model = make_model([
        helper.make_node("Resize", ["x", "", "scales"], ["up"], mode=mode, coordinate_transformation_mode=ctm),
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Resize", ["p", "", "", "s"], ["back"], mode=mode, coordinate_transformation_mode=ctm),
    ], [f32("x", ["N", 4, "H", "W"])], [f32("up", None), f32("back", None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    compiled = _artifact(model, tmp_path)
    rng = np.random.default_rng(0)
    for shape in ((1, 4, 6, 10), (2, 4, 9, 4)):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        got, want = compiled.run(feeds), ort_outputs(model, feeds)
        for name, w in want.items():
            assert got[name].shape == w.shape, name
            np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5, err_msg=f"{name} at {shape}")


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceLogSumExp",
                                "ReduceL2"])
@pytest.mark.parametrize("axes", ["static", "run-time"])
def test_reduction_over_a_dim_that_is_empty_at_run_time(tmp_path, op, axes):
    # a reduction loop that runs no times skips its init too: the output was left unwritten (garbage)
    x = f32("x", [2, "n", 4])
    if axes == "static":
        node, inputs, feeds = helper.make_node(op, ["x", "axes"], ["y"], keepdims=1), [x], {}
        init = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    else:
        node, init = helper.make_node(op, ["x", "axes"], ["y"], keepdims=1), []
        inputs, feeds = [x, helper.make_tensor_value_info("axes", TensorProto.INT64, [1])], {"axes": np.array([1])}
    model = make_model([node], inputs, [f32("y", None)], opset=18, inits=init)
    for n in (0, 3):
        _check(model, tmp_path, {"x": np.linspace(-1, 1, 8 * n, dtype=np.float32).reshape(2, n, 4), **feeds})


def test_kernels_sized_by_a_computed_length_run_after_it(tmp_path):
    # BlackmanWindow's expansion: Range's length is computed at run time, then elementwise ops fuse;
    # FuseOps put the length's match_cast after the kernels it sizes ("... has not been computed")
    i32 = helper.make_tensor_value_info("n", TensorProto.INT32, [])
    nodes = [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["nf", "one"], ["m"]),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["nf", "z"], ["size"]),
             helper.make_node("Div", ["tau", "size"], ["step"]),
             helper.make_node("Range", ["zero", "nf", "one"], ["r"]),
             helper.make_node("Mul", ["r", "step"], ["angle"]),
             helper.make_node("Mul", ["angle", "two"], ["angle2"]),
             helper.make_node("Cos", ["angle2"], ["c2"]),
             helper.make_node("Mul", ["a2", "c2"], ["t2"]),
             helper.make_node("Cos", ["angle"], ["c1"]),
             helper.make_node("Mul", ["a1", "c1"], ["t1"]),
             helper.make_node("Sub", ["a0", "t1"], ["t0"]),
             helper.make_node("Add", ["t0", "t2"], ["y"])]
    values = (("zero", 0.0), ("one", 1.0), ("two", 2.0), ("tau", 6.2831855), ("a0", 0.42), ("a1", 0.5), ("a2", 0.08))
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in values]
    model = make_model(nodes, [i32], [f32("y", None)], inits=inits, opset=17)
    for n in (10, 1):
        _check(model, tmp_path, {"n": np.array(n, np.int32)})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [(1, 1, 2, 2), (1, 1, 1.5, 2.5)])
def test_upsample_is_an_asymmetric_resize(tmp_path, mode, scales):
    sc = helper.make_tensor("scales", TensorProto.FLOAT, [4], list(scales))
    model = make_model([helper.make_node("Upsample", ["x", "scales"], ["y"], mode=mode)],
                       [f32("x", [1, 2, 3, 4])], [f32("y", None)], inits=[sc], opset=9)
    _check(model, tmp_path, {"x": np.random.default_rng(3).standard_normal((1, 2, 3, 4), np.float32)})


def test_reshape_to_its_own_derived_symbolic_shape_compiles(tmp_path):
    # wav2vec2's feature extractor: a strided conv gives length samples // 5 - 1, and a Reshape to the
    # conv's own Shape was a copy kernel whose two sides FuseTIR sized by two variables; TVM's index
    # simplifier then aborted ("the padding factor is not divisible"). The reshape is now no kernel.
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 10], np.random.default_rng(0).standard_normal(80))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[5]), helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Reshape", ["c", "s"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Relu", ["t"], ["y"])]
    model = make_model(nodes, [f32("x", ["batch", 1, "samples"])], [f32("y", None)], inits=[w], opset=17)
    rng = np.random.default_rng(1)
    compiled = _artifact(model, tmp_path)
    for shape in ((1, 1, 100), (2, 1, 163)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(compiled.run({"x": x})["y"], ort_outputs(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_chain_of_1d_convs_with_a_symbolic_length_matches_onnxruntime(tmp_path):
    # simplify runs 1-D convs as 2-D ones of height 1; the first conv's length is the input's
    # symbol, the strided one's a derived length (samples // 2 - 1), which stays 1-D
    rng = np.random.default_rng(5)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, s, rng.standard_normal(int(np.prod(s))))
             for n, s in (("w1", [6, 2, 3]), ("b1", [6]), ("w2", [4, 6, 4]), ("w3", [4, 4, 1]))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2]), helper.make_node("Tanh", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"])]
    model = make_model(nodes, [f32("x", ["batch", 2, "samples"])], [f32("y", None)], inits=inits, opset=17)
    compiled = _artifact(model, tmp_path)
    for shape in ((1, 2, 40), (3, 2, 57)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(compiled.run({"x": x})["y"], ort_outputs(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_upsample7_takes_its_scales_from_the_attribute(tmp_path):
    model = make_model([helper.make_node("Upsample", ["x"], ["y"], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])],
                       [f32("x", [1, 2, 3, 4])], [f32("y", None)], opset=7)
    _check(model, tmp_path, {"x": np.random.default_rng(4).standard_normal((1, 2, 3, 4), np.float32)})


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceLogSumExp"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduction_of_infinite_rows_keeps_the_infinity(tmp_path, op, keepdims):
    # te.max starts from -FLT_MAX: the max of a row of -inf (a fully masked attention row) was -3.4e38
    model = make_model([helper.make_node(op, ["x"], ["y"], axes=[-1], keepdims=keepdims)],
                       [f32("x", [3, 4])], [f32("y", None)], opset=17)
    x = np.array([[-np.inf] * 4, [np.inf] * 4, [1.0, -np.inf, 2.0, np.inf]], np.float32)
    _check(model, tmp_path, {"x": x})


def test_if_whose_branches_give_different_lengths_feeds_later_kernels(tmp_path):
    # then: the first 2 elements, else: all of x; the If's result has a rank but no dims until run time
    then_g = helper.make_graph([helper.make_node("Slice", ["x", "s0", "s2"], ["t"])], "then", [], [f32("t", None)],
                               initializer=[helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
                                            helper.make_tensor("s2", TensorProto.INT64, [1], [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [f32("e", None)])
    nodes = [helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["r", "r"], ["sq"]),
             helper.make_node("Add", ["sq", "one"], ["y"])]
    model = make_model(nodes, [f32("x", [5]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [f32("y", None)], inits=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])], opset=17)
    x = np.arange(5, dtype=np.float32)
    for c in (True, False):
        _check(model, tmp_path, {"x": x, "c": np.array(c)})


_I64 = TensorProto.INT64
_INDEXED = {  # op: (attrs, data shape, indices shape, updates shape or None, in-range indices, out-of-range indices)
    "Gather": ({"axis": 1}, [4, 3], [2], None, [2, -3], [0, 3]),
    "GatherElements": ({"axis": 0}, [4, 3], [2, 3], None, [[0, 3, -4], [1, 2, 3]], [[0, 0, 0], [4, 0, 0]]),
    "GatherND": ({}, [4, 3], [2, 2], None, [[0, 2], [-1, -3]], [[0, 1], [1, -4]]),
    "ScatterElements": ({"axis": 1}, [4, 3], [4, 1], [4, 1], [[0], [1], [-1], [2]], [[0], [3], [0], [0]]),
    "ScatterND": ({}, [4, 3], [2, 1], [2, 3], [[1], [-1]], [[1], [-5]]),
}


@pytest.mark.parametrize("op", sorted(_INDEXED))
def test_run_time_indices_are_checked_as_onnxruntime_checks_them(tmp_path, op):
    """In-range indices (negative ones too) give onnxruntime's numbers; one out of range is a one-line
    refusal of the run (onnxruntime fails it too), never a read or write outside the tensor."""
    attrs, xs, ishape, ushape, good, bad = _INDEXED[op]
    names = ["x", "i"] + (["u"] if ushape else [])
    inputs = [f32("x", xs), helper.make_tensor_value_info("i", _I64, ishape)] + ([f32("u", ushape)] if ushape else [])
    model = make_model([helper.make_node(op, names, ["y"], name="ix", **attrs)], inputs,
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=16)
    path = tmp_path / "m.kiln"
    build(kiln.load(model.SerializeToString()), path)
    runtime = kiln.runtime.load(path, threads=1)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(xs).astype(np.float32)}
    if ushape:
        feeds["u"] = rng.standard_normal(ushape).astype(np.float32)
    ok = {**feeds, "i": np.array(good, np.int64)}
    np.testing.assert_array_equal(runtime.run(ok)["y"], ort_outputs(model, ok)["y"])
    wrong = {**feeds, "i": np.array(bad, np.int64)}
    with pytest.raises(Exception):
        ort_outputs(model, wrong)
    with pytest.raises(kiln.errors.InputError, match=rf"^{op} node 'ix': an index is out of range") as e:
        runtime.run(wrong)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("op", ["Erf", "Tanh"])
def test_vector_erf_and_tanh_match_onnxruntime_over_their_range(tmp_path, op):
    """kiln's polynomial erf and exp-based tanh (TIR's run one libm call per lane), from the tails to
    around 0 where tanh's formula switches, with NaN, infinities and signed zeros."""
    x = np.concatenate([np.linspace(-12, 12, 20001), np.linspace(-0.3, 0.3, 20001),
                        [np.nan, np.inf, -np.inf, 0.0, -0.0, 0.25, -0.25]]).astype(np.float32)
    model = make_model([helper.make_node(op, ["x"], ["y"])], [f32("x", [x.size])], [f32("y", [x.size])])
    got, want = _compiled(model, tmp_path, {"x": x})["y"], ort_outputs(model, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=5e-7, equal_nan=True)
    assert np.array_equal(np.signbit(got[-7:-2]), np.signbit(want[-7:-2]))
