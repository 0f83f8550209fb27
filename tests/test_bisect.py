"""``kiln check --bisect`` names the broken rule and the broken lowering planted here.

Each bug is planted only inside its test: a rewrite rule appended to O3's ``fuse-conv`` rule set,
and a lowering in the table replaced; both are removed again afterwards. The check compiles the
bundled example at O3, finds the mismatch, and bisection names the pass, rule and node, or the
node, op and kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.bisect import departure
from kiln.cli import main
from kiln.codegen.lowering import LOWERINGS
from kiln.passes import PASSES, RULES
from kiln.passes.pattern import MatchFailure
from kiln.passes.rules import RewriteRule
from kiln.report.kernels import KernelMap, kernel_funcs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
PLANTED_RULE = "planted-residual-scale"


def _pattern(op, x, y):
    return op.Add(x, y)


def _check(ctx, x, y) -> None:
    if x.is_constant or y.is_constant:
        raise MatchFailure("one side is a constant")
    if y.producer is not None and y.producer.op_type == "Mul":
        raise MatchFailure("already scaled")  # fire once per Add


def _rewrite(op, x, y):
    return op.Add(x, op.Mul(y, op.constant(np.array(1.25, np.float32))))  # the bug: the residual branch x1.25


@pytest.fixture
def planted_rule():
    """A wrong rule inside O3's fuse-conv pass (ahead of its own rules), removed after the test."""
    rule = RewriteRule(PLANTED_RULE, _pattern, _rewrite, check=_check, priority=100)
    rule_set = PASSES["fuse-conv"]().rule_set
    rule_set.rules.append(rule)
    RULES[rule.name] = rule
    yield rule
    rule_set.rules.remove(rule)
    del RULES[rule.name]


@pytest.fixture
def planted_lowering():
    """ReduceMean (the blocked global pool at O3) lowered as itself times 1.5, restored after the test."""
    from tvm import te

    key = ("", "ReduceMean")
    original = LOWERINGS[key]

    def broken(lw, node):
        (out,) = original(lw, node)
        return [lw.emit(lambda t: te.compute(t.shape, lambda *i: t(*i) * 1.5, name="planted"), out,
                        name="planted_scale")]

    LOWERINGS[key] = broken
    yield key
    LOWERINGS[key] = original


def _check_bisect(tmp_path: Path, capsys) -> tuple[str, dict]:
    out = tmp_path / "check.json"
    rc = main(["check", str(EXAMPLE), "--input-shape", "input=1x3x64x64", "--bisect", "--no-evaluator",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1, text  # the artifact disagrees with onnxruntime
    return text, json.loads(out.read_text())["bisect"]


def test_bisect_names_the_broken_rule(planted_rule, tmp_path, capsys):
    text, bis = _check_bisect(tmp_path, capsys)
    assert "bisect: O3 pass `fuse-conv`, rule `planted-residual-scale`, node `block.add` (Add): max err" in text
    assert bis["pass"]["pass"] == "fuse-conv" and bis["pass"]["rule"] == PLANTED_RULE
    assert bis["pass"]["node"] == "block.add" and bis["pass"]["iteration"] == 1
    assert bis["codegen"] is None  # the compiled code is faithful to the (wrong) optimized graph


def test_bisect_names_the_broken_lowering_and_its_kernel(planted_lowering, tmp_path, capsys):
    text, bis = _check_bisect(tmp_path, capsys)
    assert bis["pass"] is None  # the passes keep the numbers
    c = bis["codegen"]
    assert c["node"] == "reducemean" and c["op"] == "ReduceMean"
    assert "planted_scale" in c["prim_funcs"]
    (kernel,) = c["kernels"]
    assert "planted_scale" in kernel_funcs(kernel, c["prim_funcs"])  # the artifact's kernel holds the planted func
    assert f"O3 codegen: node `reducemean` (ReduceMean) -> kernel `{kernel}`: max err" in text
    assert c["max_abs"] == pytest.approx(0.5 * c["scale"], rel=1e-3)  # 1.5x the values: half the largest off


def test_the_planted_bugs_are_gone_afterwards(capsys):
    assert PLANTED_RULE not in RULES and not any(r.name == PLANTED_RULE for r in PASSES["fuse-conv"]().rule_set.rules)
    assert main(["check", str(EXAMPLE), "--input-shape", "input=1x3x64x64", "--no-evaluator", "--bisect"]) == 0
    assert "bisect" not in capsys.readouterr().out  # nothing to bisect when every output agrees


def test_departure_is_on_the_scale_of_the_values():
    want = np.array([1000.0, 0.0, -500.0], np.float32)
    assert departure(want + np.float32(1e-3), want, 1e-4, 1e-5) is None  # rounding near zero does not count
    assert departure(want * 1.01, want, 1e-4, 1e-5) == pytest.approx(10.0, rel=1e-4)
    assert departure(np.array([1.0, np.nan]), np.array([1.0, 2.0]), 1e-4, 1e-5) == float("inf")
    assert departure(np.array([1.0, np.nan]), np.array([1.0, np.nan]), 1e-4, 1e-5) is None
    assert departure(np.zeros(3), np.zeros(4), 1e-4, 1e-5) == float("inf")


def test_fused_kernel_names_read_back_into_their_funcs():
    funcs = {"add": ["a"], "add1": ["b"], "from_blocked": ["f"], "from_blocked1": ["g"], "concat": ["c"],
             "fused_conv2d_relu": ["k"]}
    assert kernel_funcs("fused_from_blocked1_add_concat", funcs) == ["from_blocked1", "add", "concat"]
    assert kernel_funcs("fused_add1_add1", funcs) == ["add1"]
    assert kernel_funcs("fused_conv2d_relu", funcs) == ["fused_conv2d_relu"]  # kiln's own name, not a fusion
    assert kernel_funcs("(vm builtins)", funcs) == [] and kernel_funcs("fused_mystery", funcs) == []
    kmap = KernelMap(funcs)
    assert kmap.nodes_of("fused_from_blocked1_add_concat") == ["g", "a", "c"]
    assert kmap.kernels_of("a", ["add", "fused_from_blocked1_add_concat", "concat"]) == [
        "add", "fused_from_blocked1_add_concat"]
