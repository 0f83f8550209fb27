"""The ONNX backend node suite, compiled: import -> O2 -> TVM codegen (cpu) -> runtime.

Each case of :mod:`test_node_suite` (same loader) whose inputs and outputs are all float32,
float64, int, uint or bool tensors goes through ``kiln.load`` ->
``PassManager(passes_for("O2"))`` -> ``kiln.codegen.build.build`` -> ``kiln.runtime.load(...).run``
and is compared with the suite's expected outputs at the ONNX backend test's own tolerance
(rtol 1e-3, atol 1e-7) for floats, exactly for ints and bools; NaN must match NaN, and shapes and
dtypes must match exactly. Cases with random ops check shape and dtype only.

Known failures are listed with a reason in ``node_suite_codegen_xfail.txt`` (``codegen <case>
# <reason>``) and marked ``xfail(strict=True)``.

Compiling is the slow part (0.33 s a case on average, 3 s for Attention; 4.4 min for the module
with -n 2 on 2 cores, 17 s cached), so artifacts are cached outside the repo in
``$KILN_NODE_SUITE_CACHE`` (default ``~/.cache/kiln/node-suite-artifacts``): one folder per hash of
every file under ``kiln/`` and the TVM version, one artifact per sha256 of a case's model bytes.
Any change to kiln's code starts a new folder, so a cached run tests exactly the current code;
folders no run used for two days are removed. A build error is cached the same way (as its
message), since it too is a function of model and code.

A cached run loads each artifact in a process that never imported the compiler, as a deployment
does; an uncached run builds and loads in one process, where a kernel that calls into the
compiler library (topi.topk's tvm.contrib.sort) still works. Run it cached once before trusting
a new lowering.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
from onnx import TensorProto

import kiln
import kiln.runtime
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import artifact_cache  # noqa: E402
from node_cases import CASES as ALL_CASES
from node_cases import NodeCase, check_random_draw, compare, first_line, read_xfails

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

REPO = Path(__file__).resolve().parent.parent
XFAIL_FILE = Path(__file__).with_name("node_suite_codegen_xfail.txt")
MODE = "codegen"
CACHE = Path(os.environ.get("KILN_NODE_SUITE_CACHE", Path.home() / ".cache" / "kiln" / "node-suite-artifacts"))
STALE_DAYS = 2  # a folder of artifacts from other kiln code that no run used for this long is removed

#: Left out on top of test_node_suite's filter: cases with a float16 or bfloat16 input or output
#: (narrow floats in codegen are separate work). This keeps the issue's "plain float/int/uint/bool
#: tensors": 1,589 cases with onnx 1.23.2. (The issue's figure, ~1,460, is what this filter gives
#: if bool cases are dropped too, 1,459; that contradicts its wording, so bools stay in.)
NARROW_FLOATS = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
#: How many cases the filter keeps with onnx 1.23.2 (1,589 of 1,884); a filter bug moves it out of range.
EXPECTED_CASES = (1560, 1620)
#: The floor: the share of cases that must compile and pass (95%, issue 13).
MIN_PASS_RATE = 0.95


def _wide(case: NodeCase) -> bool:
    g = case.model.graph
    return all(vi.type.tensor_type.elem_type not in NARROW_FLOATS for vi in [*g.input, *g.output])


CASES = [c for c in ALL_CASES if _wide(c)]
CASE_NAMES = [c.name for c in CASES]
XFAILS = read_xfails(XFAIL_FILE)
_XFAIL_BY_CASE = {k.case: k.reason for k in XFAILS if k.mode == MODE}


# =========================================================================== the artifact cache


class BuildFailed(Exception):
    """The case did not compile (the message is the first line of the original error)."""


def _compile(case: NodeCase, path: Path) -> None:
    from kiln.codegen.build import build
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for

    graph, _ = PassManager(passes_for("O2")).run(kiln.load(case.source))
    build(graph, path)


def _cache_dir() -> Path:
    """This code's folder of artifacts (see tools/artifact_cache.py)."""
    return artifact_cache.cache_dir(CACHE, STALE_DAYS)


def artifact(case: NodeCase) -> Path:
    """The case's compiled artifact, from the cache or built now (raises BuildFailed)."""
    cache = _cache_dir()
    key = hashlib.sha256(case.model_bytes).hexdigest()
    path, err = cache / f"{key}.kiln", cache / f"{key}.err"
    if path.exists():
        return path
    if err.exists():
        raise BuildFailed(err.read_text())
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    os.close(fd)
    try:
        try:
            _compile(case, Path(tmp))
        except Exception as e:  # noqa: BLE001 - any import, pass or build error is the case's result
            message = f"{type(e).__name__}: {first_line(e)}"
            Path(tmp).write_text(message)
            os.replace(tmp, err)
            raise BuildFailed(message) from e
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# =========================================================================== the tests


def _params() -> list:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=_XFAIL_BY_CASE[c.name], strict=True)]
                         if c.name in _XFAIL_BY_CASE else []) for c in CASES]


def test_case_count():
    """The filter keeps the wide plain-tensor cases; a silent filter bug moves the count out of range."""
    lo, hi = EXPECTED_CASES
    assert lo <= len(CASES) <= hi, f"{len(CASES)} node cases kept, expected {lo}..{hi}"


@pytest.mark.parametrize("case", _params())
def test_compiled(case: NodeCase):
    model = kiln.runtime.load(artifact(case), threads=1)
    out_names = [o.name for o in case.model.graph.output]
    for n, (inputs, expected) in enumerate(case.data_sets):
        results = model.run(case.feeds(inputs))
        assert len(results) == len(expected), f"{len(results)} outputs, the suite expects {len(expected)}"
        for i, (name, e) in enumerate(zip(out_names, expected)):
            what = f"data set {n}, output {i} '{name}'"
            if case.is_random:
                check_random_draw(results[name], e, what)
            else:
                compare(results[name], e, what, rtol=1e-3, atol=1e-7, narrow_rtol=1e-3, narrow_atol=1e-7)


def test_codegen_pass_rate():
    """The xfail list is well-formed and at least 95% of the cases compile and pass."""
    names = set(CASE_NAMES)
    bad = [k for k in XFAILS if k.mode != MODE or k.case not in names or not k.reason]
    assert not bad, f"bad lines in {XFAIL_FILE.name}: " + "; ".join(f"line {k.line}: {k.mode} {k.case}" for k in bad)
    keys = [k.case for k in XFAILS]
    assert len(keys) == len(set(keys)), f"listed twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    n = len(CASES)
    rate = (n - len(XFAILS)) / n
    print(f"\nnode suite through codegen: {n} cases; {n - len(XFAILS)} expected to pass, {len(XFAILS)} xfail ({rate:.1%})")
    assert rate >= MIN_PASS_RATE, f"codegen pass rate {rate:.1%} is below {MIN_PASS_RATE:.0%}"
