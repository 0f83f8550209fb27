"""The ONNX backend node suite, run through kiln.

Every case of ``onnx.backend.test.loader.load_model_tests(kind="node")`` whose
model inputs and outputs are all plain tensors of a float, int, uint or bool
element type is run twice:

* ``test_evaluator``: ``kiln.ir.load`` -> ``kiln.ir.evaluate``, compared with the
  suite's expected outputs;
* ``test_round_trip``: ``kiln.ir.to_onnx(kiln.ir.load(...))``, checked by
  ``onnx.checker`` and run in onnxruntime, compared with onnxruntime running the
  original model (skipped when onnxruntime cannot run the original).

Tolerances: the evaluator is compared with rtol 1e-4 / atol 1e-5 for float32 and
float64, rtol 1e-2 / atol 1e-2 (in float32) for float16 and bfloat16, exactly for
ints and bools; NaN must match NaN and shapes and dtypes must match exactly. The
round trip is compared with rtol 1e-6 / atol 0. Two documented exceptions:
``FOUR_DECIMAL_LITERALS`` (hand-typed expected values, rtol 1e-3) and cases with
random ops (``RANDOM_OPS``: only shape, dtype and support are checked).

Known failures are listed, with their cause, in ``node_suite_xfail.txt`` beside
this file and marked ``xfail(strict=True)``: a listed case that starts passing
fails the run until its line is removed.

With onnx 1.23 the node cases are generated in memory (the wheel ships no
``data/node`` directory): ``case.model`` is the ``ModelProto`` and
``case.data_sets`` the (inputs, outputs) pairs. Cases read from a directory
(``case.model_dir`` with ``model.onnx`` and ``test_data_set_*/``) are handled too.
"""

from __future__ import annotations

import onnx
import pytest

import kiln.ir
from node_cases import (
    CASE_NAMES, CASES, EXPECTED_CASES, FOUR_DECIMAL_LITERALS, MODES, XFAILS, NodeCase, check_random_draw,
    compare, first_line, xfail_reason,
)

# Reference kernels (and the suite's own generators) overflow and divide by zero on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _params(mode: str) -> list:
    params = []
    for c in CASES:
        reason = xfail_reason(mode, c.name)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason is not None else []
        params.append(pytest.param(c, id=c.name, marks=marks))
    return params


# =========================================================================== comparison


def test_case_count():
    """The filter keeps the plain-tensor cases; a silent filter bug moves the count out of range."""
    lo, hi = EXPECTED_CASES
    assert lo <= len(CASES) <= hi, f"{len(CASES)} node cases kept, expected {lo}..{hi}"
    assert len(set(CASE_NAMES)) == len(CASE_NAMES)
    assert FOUR_DECIMAL_LITERALS <= set(CASE_NAMES), FOUR_DECIMAL_LITERALS - set(CASE_NAMES)


@pytest.mark.parametrize("case", _params("eval"))
def test_evaluator(case: NodeCase):
    graph = kiln.ir.load(case.source)
    graph.verify()  # every imported graph is well-formed and fully typed
    out_names = [v.name for v in graph.outputs]
    evaluator = kiln.ir.Evaluator(graph)
    for n, (inputs, expected) in enumerate(case.data_sets):
        results = evaluator.run(case.feeds(inputs))
        got = [results[name] for name in out_names]
        assert len(got) == len(expected), f"{len(got)} outputs, the suite expects {len(expected)}"
        rtol = 1e-3 if case.name in FOUR_DECIMAL_LITERALS else 1e-4
        for i, (g, e) in enumerate(zip(got, expected)):
            what = f"data set {n}, output {i} '{out_names[i]}'"
            if case.is_random:
                check_random_draw(g, e, what)
            else:
                compare(g, e, what, rtol=rtol, atol=1e-5, narrow_rtol=1e-2, narrow_atol=1e-2)


def _ort_session(model_bytes: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", _params("roundtrip"))
def test_round_trip(case: NodeCase):
    data = case.data_sets
    try:
        sess = _ort_session(case.model_bytes)
        reference = [sess.run(None, case.feeds(inputs)) for inputs, _ in data]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        pytest.skip(f"onnxruntime cannot run the original model: {first_line(e)}")

    exported = kiln.ir.to_onnx(kiln.ir.load(case.source))
    onnx.checker.check_model(exported)
    orig_outs = [o.name for o in case.model.graph.output]
    assert [o.name for o in exported.graph.output] == orig_outs
    sess = _ort_session(exported.SerializeToString())
    for n, ((inputs, _), ref) in enumerate(zip(data, reference)):
        got = sess.run(None, case.feeds(inputs))
        assert len(got) == len(ref)
        for i, (g, r) in enumerate(zip(got, ref)):
            what = f"data set {n}, output {i} '{orig_outs[i]}'"
            if case.is_random:
                check_random_draw(g, r, what)
            else:
                compare(g, r, what, rtol=1e-6, atol=0, narrow_rtol=1e-6, narrow_atol=0)


def test_node_suite_pass_rate():
    """The xfail list is well-formed and the evaluator passes >= 95% of the suite."""
    names = set(CASE_NAMES)
    bad = [k for k in XFAILS if k.mode not in MODES or k.case not in names or not k.reason]
    assert not bad, "bad lines in node_suite_xfail.txt: " + "; ".join(f"line {k.line}: {k.mode} {k.case}" for k in bad)
    keys = [(k.mode, k.case) for k in XFAILS]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    assert not dups, f"listed twice in node_suite_xfail.txt: {dups}"
    n = len(CASES)
    counts = {m: sum(k.mode == m for k in XFAILS) for m in MODES}
    rate = (n - counts["eval"]) / n
    print(
        f"\nnode suite: {n} cases; eval: {n - counts['eval']} expected to pass, {counts['eval']} xfail "
        f"({rate:.1%}); roundtrip: at most {n - counts['roundtrip']} expected to pass, "
        f"{counts['roundtrip']} xfail (plus skips where onnxruntime cannot run the original)"
    )
    assert rate >= 0.95, f"evaluator pass rate {rate:.1%} is below 95%"
