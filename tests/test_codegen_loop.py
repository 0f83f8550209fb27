"""Compiled Loop and Scan against onnxruntime: run-time trip counts and conditions, loop-carried values,
scan outputs, outer-scope reads, Scan's axes and directions, and 10,000 iterations without a deep stack."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.runtime
from kiln.check import compare
from kiln.codegen.build import build
from kiln.codegen.lowering import CodegenError
from helpers import f32, make_model, ort_outputs

INT64_MAX = np.iinfo(np.int64).max


def _i64(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _bool(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.BOOL, shape)


def _loop_model(width=4, *, batch: int | str = 3, early_exit=False, scans=True, outer_weight=True,
                trip_count="input", cond_input=False, read_scans=True):
    """``Loop`` over ``h [batch, width]``: ``h = tanh(h @ W + x * i)``, scanning ``h`` and ``sum(h)`` per iteration.

    ``W`` is an outer initializer (a graph input without ``outer_weight``) and ``x`` an outer graph input (outer-scope
    reads). With ``early_exit`` the body's
    condition is ``sum(h) < limit`` (``limit`` a graph input); ``trip_count`` is "input", "absent" or an int constant.
    """
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.5).astype(np.float32), "W")]
    body_nodes = [
        helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "fi"], ["xi"]),
        helper.make_node("MatMul", ["h", "W"], ["hw"]),
        helper.make_node("Add", ["hw", "xi"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h2"]),
        helper.make_node("ReduceSum", ["h2"], ["total"], keepdims=0),
    ]
    if early_exit:
        body_nodes.append(helper.make_node("Less", ["total", "limit"], ["c2"]))
    else:
        body_nodes.append(helper.make_node("Identity", ["c"], ["c2"]))
    outs = [_bool("c2", []), f32("h2", [batch, width])]
    if scans:
        body_nodes.append(helper.make_node("Identity", ["h2"], ["h_scan"]))
        outs += [f32("h_scan", [batch, width]), f32("total", [])]
    body = helper.make_graph(body_nodes, "body", [_i64("i", []), _bool("c", []), f32("h", [batch, width])], outs)
    inputs = [f32("h0", [batch, width]), f32("x", [batch, width])]
    if not outer_weight:
        inputs.append(f32("W", [width, width]))
        inits = []
    loop_in = ["", "", "h0"]
    if trip_count == "input":
        inputs.append(_i64("M", []))
        loop_in[0] = "M"
    elif isinstance(trip_count, int):
        inits.append(numpy_helper.from_array(np.array(trip_count, np.int64), "M"))
        loop_in[0] = "M"
    if cond_input:
        inputs.append(_bool("go", []))
        loop_in[1] = "go"
    if early_exit:
        inputs.append(f32("limit", []))
    loop_outs = ["h_final"] + ((["hs", "totals"] if read_scans else ["hs_unread", "totals_unread"]) if scans else [])
    nodes = [helper.make_node("Loop", loop_in, loop_outs, body=body, name="loop")]
    outputs = [f32(o, None) for o in loop_outs if not o.endswith("_unread")]
    return make_model(nodes, inputs, outputs, inits)


def _feeds(batch=3, width=4, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return {"h0": rng.standard_normal((batch, width)).astype(np.float32),
            "x": (rng.standard_normal((batch, width)) * 0.01).astype(np.float32), **extra}


def _compile(model, tmp_path, **build_kw):
    out = tmp_path / "m.kiln"
    build(kiln.load(model), out, **build_kw)
    return kiln.runtime.load(out)


def _check(compiled, model, feeds):
    got = compiled.run(feeds)
    want = ort_outputs(model, feeds)
    for k, w in want.items():
        assert got[k].shape == w.shape, (k, got[k].shape, w.shape)
    cmp = compare("m", got, want, rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_loop_with_run_time_trip_count_and_scan_outputs(tmp_path):
    model = _loop_model()
    compiled = _compile(model, tmp_path)
    for m in (0, 1, 5, 37):
        _check(compiled, model, _feeds(M=np.array(m, np.int64)))


def test_ten_thousand_iterations_do_not_overflow_a_stack(tmp_path):
    model = _loop_model()
    compiled = _compile(model, tmp_path)
    _check(compiled, model, _feeds(M=np.array(10_000, np.int64)))


def test_early_exit_by_condition_sizes_the_scan_outputs(tmp_path):
    model = _loop_model(early_exit=True)
    compiled = _compile(model, tmp_path)
    feeds = _feeds(M=np.array(20, np.int64))
    feeds["x"] = np.abs(feeds["x"]) * 5  # the running sum grows with i
    totals = ort_outputs(model, {**feeds, "limit": np.array(1e9, np.float32)})["totals"]
    lengths = set()
    for limit in (-1e9, *np.quantile(totals, [0.2, 0.5, 0.8]), 1e9):  # stops after 1 iteration, ..., runs all 20
        feeds["limit"] = np.array(limit, np.float32)
        _check(compiled, model, feeds)
        lengths.add(len(compiled.run(feeds)["totals"]))
    assert len(lengths) >= 4, lengths


def test_torch_style_while_loop_without_trip_count(tmp_path):
    """No trip count (torch exports a while as M = INT64_MAX or absent), a run-time first condition, no scans."""
    for trip in ("absent", INT64_MAX):
        model = _loop_model(early_exit=True, scans=False, trip_count=trip, cond_input=True)
        compiled = _compile(model, tmp_path)
        for go, limit in ((True, 2.0), (True, -100.0), (False, 2.0)):
            feeds = _feeds(seed=1, go=np.array(go), limit=np.array(limit, np.float32))
            feeds["x"] = np.abs(feeds["x"]) + 0.02  # the sum grows with i, so the loop ends
            _check(compiled, model, feeds)


def test_a_while_loop_with_scan_outputs(tmp_path):
    """Without a trip count nothing sizes the scan outputs: refused in one line, unless no one reads them."""
    model = _loop_model(early_exit=True, trip_count="absent", cond_input=True)
    with pytest.raises(CodegenError, match=r"node 'loop' \(Loop\): a Loop with scan outputs \('h_scan'\) needs a trip "
                                           r"count") as e:
        build(kiln.load(model), tmp_path / "m.kiln")
    assert "\n" not in str(e.value)
    model = _loop_model(early_exit=True, trip_count="absent", cond_input=True, read_scans=False)
    compiled = _compile(model, tmp_path)
    feeds = _feeds(seed=1, go=np.array(True), limit=np.array(2.0, np.float32))
    feeds["x"] = np.abs(feeds["x"]) + 0.02
    _check(compiled, model, feeds)


def test_symbolic_batch_and_constant_trip_count(tmp_path):
    model = _loop_model(batch="N", trip_count=6, outer_weight=False, width=5)
    compiled = _compile(model, tmp_path)
    w = (np.random.default_rng(3).standard_normal((5, 5)) * 0.5).astype(np.float32)
    for n in (1, 5):
        _check(compiled, model, _feeds(batch=n, width=5, W=w))


def test_nested_loops(tmp_path):
    """An inner Loop in the body, reading the outer body's value and the main graph's initializer."""
    inner_body = helper.make_graph(
        [helper.make_node("Add", ["a", "step"], ["a2"]), helper.make_node("Identity", ["c"], ["c2"]),
         helper.make_node("Mul", ["a2", "v"], ["prod"])],
        "inner", [_i64("j", []), _bool("c", []), f32("a", [2])], [_bool("c2", []), f32("a2", [2]), f32("prod", [2])])
    body = helper.make_graph(
        [helper.make_node("Loop", ["k", "", "v"], ["v2", "prods"], body=inner_body),
         helper.make_node("Identity", ["c"], ["c2"]),
         helper.make_node("ReduceSum", ["prods"], ["s"], keepdims=0)],
        "outer", [_i64("i", []), _bool("c", []), f32("v", [2])], [_bool("c2", []), f32("v2", [2]), f32("s", [])])
    inits = [numpy_helper.from_array(np.array([0.5, -0.25], np.float32), "step"),
             numpy_helper.from_array(np.array(3, np.int64), "k")]
    model = make_model([helper.make_node("Loop", ["M", "", "v0"], ["v_end", "sums"], body=body)],
                       [_i64("M", []), f32("v0", [2])], [f32("v_end", None), f32("sums", None)], inits)
    compiled = _compile(model, tmp_path)
    for m in (0, 4):
        _check(compiled, model, {"M": np.array(m, np.int64), "v0": np.array([1.0, 2.0], np.float32)})


def _scan_model(*, axis=0, reverse=False, out_axis=0, out_reverse=False, seq: int | str = 6):
    """``Scan`` (opset 11): a running sum and product over ``x [.., seq, ..]``, scanning ``acc * y``."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "xt"], ["acc2"]), helper.make_node("Mul", ["acc2", "yt"], ["out"]),
         helper.make_node("Mul", ["out", "scale"], ["out2"])],
        "body", [f32("acc", [3]), f32("xt", [3]), f32("yt", [3])], [f32("acc2", [3]), f32("out2", [3])])
    x_shape = [seq, 3] if axis == 0 else [3, seq]
    attrs = dict(num_scan_inputs=2, scan_input_axes=[axis, axis], scan_input_directions=[int(reverse), 0],
                 scan_output_axes=[out_axis], scan_output_directions=[int(out_reverse)])
    inits = [numpy_helper.from_array(np.array([1.0, 0.5, 2.0], np.float32), "scale")]
    return make_model([helper.make_node("Scan", ["acc0", "x", "y"], ["acc_end", "outs"], body=body, **attrs)],
                      [f32("acc0", [3]), f32("x", x_shape), f32("y", x_shape)],
                      [f32("acc_end", None), f32("outs", None)], inits, opset=11)


@pytest.mark.parametrize("axis,reverse,out_axis,out_reverse", [
    (0, False, 0, False), (1, True, 0, False), (0, False, 1, True), (1, False, -1, False), (0, True, 1, True)])
def test_scan_axes_and_directions(axis, reverse, out_axis, out_reverse, tmp_path):
    model = _scan_model(axis=axis, reverse=reverse, out_axis=out_axis, out_reverse=out_reverse)
    compiled = _compile(model, tmp_path)
    rng = np.random.default_rng(2)
    shape = (6, 3) if axis == 0 else (3, 6)
    _check(compiled, model, {"acc0": rng.standard_normal(3).astype(np.float32),
                             "x": rng.standard_normal(shape).astype(np.float32),
                             "y": rng.standard_normal(shape).astype(np.float32)})


def test_scan_over_a_symbolic_sequence(tmp_path):
    model = _scan_model(seq="T", reverse=True)
    compiled = _compile(model, tmp_path)
    rng = np.random.default_rng(4)
    for t in (1, 9, 2000):
        _check(compiled, model, {"acc0": rng.standard_normal(3).astype(np.float32),
                                 "x": (rng.standard_normal((t, 3)) * 0.01).astype(np.float32),
                                 "y": np.ones((t, 3), np.float32)})


def test_a_loop_carried_value_that_changes_shape_is_refused_in_one_line(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Concat", ["v", "v"], ["v2"], axis=0), helper.make_node("Identity", ["c"], ["c2"])],
        "body", [_i64("i", []), _bool("c", []), f32("v", None)], [_bool("c2", []), f32("v2", None)])
    model = make_model([helper.make_node("Loop", ["M", "", "v0"], ["v_end"], body=body, name="grow")],
                       [_i64("M", []), f32("v0", [2])], [f32("v_end", None)])
    with pytest.raises(CodegenError, match=r"node 'grow' \(Loop\): the loop-carried value 'v' \(f32\[2\] on entry\) does not keep one shape") as e:
        build(kiln.load(model), tmp_path / "m.kiln")
    assert "\n" not in str(e.value)
