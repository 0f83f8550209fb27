"""DFT, STFT and Col2Im compiled through kiln and compared with onnxruntime, with their parameters
as constants and read at run time."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.runtime
from kiln.codegen.build import build
from helpers import f32, make_model, ort_outputs

#: onnxruntime's DFT and numpy's FFT differ by up to 2e-5 on these unit-scale signals of up to 32
#: points, so a direct transform in float32 is compared at this tolerance.
TOL = dict(rtol=1e-4, atol=1e-4)


def _i64(name: str, shape: list) -> object:
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _check(model, tmp_path, feeds) -> None:
    path = tmp_path / "m.kiln"
    build(kiln.load(model.SerializeToString()), path)
    got = kiln.runtime.load(path, threads=1).run(feeds)
    want = ort_outputs(model, feeds)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        np.testing.assert_allclose(got[name], w, err_msg=name, **TOL)


@pytest.mark.parametrize("complex_in", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("inverse,onesided", [(0, 0), (0, 1), (1, 0)], ids=["forward", "onesided", "inverse"])
@pytest.mark.parametrize("length", [None, 12, 20], ids=["own-length", "truncated", "padded"])
def test_dft_matches_onnxruntime(tmp_path, complex_in, inverse, onesided, length):
    if onesided and complex_in:
        pytest.skip("a one-sided transform is of a real signal")
    c = 2 if complex_in else 1
    inputs = ["x"] + (["n"] if length else [""]) + ["axis"]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [], [1])]
    if length:
        inits.append(helper.make_tensor("n", TensorProto.INT64, [], [length]))
    node = helper.make_node("DFT", inputs, ["y"], inverse=inverse, onesided=onesided)
    model = make_model([node], [f32("x", ["batch", 16, c])], [f32("y", None)], inits=inits, opset=20)
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        _check(model, tmp_path, {"x": rng.standard_normal((batch, 16, c), np.float32)})


def test_dft17_over_an_inner_axis(tmp_path):
    model = make_model([helper.make_node("DFT", ["x"], ["y"], axis=1)], [f32("x", [2, 10, 3, 1])],
                       [f32("y", None)], opset=17)
    _check(model, tmp_path, {"x": np.random.default_rng(6).standard_normal((2, 10, 3, 1), np.float32)})


def test_dft_axis_read_at_run_time(tmp_path):
    model = make_model([helper.make_node("DFT", ["x", "", "axis"], ["y"])],
                       [f32("x", [2, 6, 6, 1]), _i64("axis", [])], [f32("y", [2, 6, 6, 2])], opset=20)
    x = np.random.default_rng(7).standard_normal((2, 6, 6, 1), np.float32)
    for axis in (0, 1, -2):
        _check(model, tmp_path, {"x": x, "axis": np.array(axis, np.int64)})


@pytest.mark.parametrize("window", [False, True], ids=["no-window", "hann"])
@pytest.mark.parametrize("run_time", [False, True], ids=["constant-step", "run-time-step"])
def test_stft_matches_onnxruntime(tmp_path, window, run_time):
    inits = [helper.make_tensor("length", TensorProto.INT64, [], [16])]
    inputs = [f32("x", [2, 128, 1])]
    if run_time:
        inputs.append(_i64("step", []))
    else:
        inits.append(helper.make_tensor("step", TensorProto.INT64, [], [8]))
    if window:
        hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)
        inits.append(helper.make_tensor("w", TensorProto.FLOAT, [16], hann.astype(np.float32)))
    node = helper.make_node("STFT", ["x", "step", "w" if window else "", "length"], ["y"])
    model = make_model([node], inputs, [f32("y", [2, 15, 9, 2] if run_time else None)], inits=inits, opset=17)
    feeds = {"x": np.random.default_rng(8).standard_normal((2, 128, 1), np.float32)}
    if run_time:
        feeds["step"] = np.array(8, np.int64)
    _check(model, tmp_path, feeds)


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2]}, {"pads": [1, 0, 1, 2]}, {"dilations": [2, 1]}],
                         ids=["plain", "strides", "pads", "dilations"])
@pytest.mark.parametrize("run_time", [False, True], ids=["constant-shapes", "run-time-shapes"])
def test_col2im_matches_onnxruntime(tmp_path, attrs, run_time):
    image, block = [7, 6], [3, 2]
    strides, pads, dil = attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]), attrs.get("dilations", [1, 1])
    counts = [(image[d] + pads[d] + pads[d + 2] - dil[d] * (block[d] - 1) - 1) // strides[d] + 1 for d in range(2)]
    cols = int(np.prod(counts))
    shapes = [helper.make_tensor("image", TensorProto.INT64, [2], image),
              helper.make_tensor("block", TensorProto.INT64, [2], block)]
    inputs = [f32("x", [2, 2 * 6, cols])] + ([_i64("image", [2]), _i64("block", [2])] if run_time else [])
    model = make_model([helper.make_node("Col2Im", ["x", "image", "block"], ["y"], **attrs)], inputs,
                       [f32("y", [2, 2, 7, 6])], inits=[] if run_time else shapes, opset=18)
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 12, cols), np.float32)}
    if run_time:
        feeds.update(image=np.array(image, np.int64), block=np.array(block, np.int64))
    _check(model, tmp_path, feeds)


def test_output_sizes_follow_parameters_read_at_run_time(tmp_path):
    # no declared output shapes: the bins, frames and image dims are computed from the values at run time
    rng = np.random.default_rng(10)
    dft = make_model([helper.make_node("DFT", ["x", "n"], ["y"], onesided=1)], [f32("x", [1, 12, 1]), _i64("n", [])],
                     [f32("y", None)], opset=20)
    for n in (6, 17):
        _check(dft, tmp_path, {"x": rng.standard_normal((1, 12, 1), np.float32), "n": np.array(n, np.int64)})
    stft = make_model([helper.make_node("STFT", ["x", "step", "", "length"], ["y"])],
                      [f32("x", [2, 40, 1]), _i64("step", []), _i64("length", [])], [f32("y", None)], opset=17)
    for step, length in ((4, 8), (7, 11)):
        _check(stft, tmp_path, {"x": rng.standard_normal((2, 40, 1), np.float32), "step": np.array(step, np.int64),
                                "length": np.array(length, np.int64)})
    col2im = make_model([helper.make_node("Col2Im", ["x", "image", "block"], ["y"])],
                        [f32("x", [1, 8, 12]), _i64("image", [2]), _i64("block", [2])], [f32("y", None)], opset=18)
    for image, block in (([4, 5], [2, 2]), ([5, 4], [2, 2]), ([3, 7], [1, 4])):
        _check(col2im, tmp_path, {"x": rng.standard_normal((1, 8, 12), np.float32),
                                  "image": np.array(image, np.int64), "block": np.array(block, np.int64)})
