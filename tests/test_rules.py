"""Every registered rewrite rule, verified numerically on its own example graph."""

from __future__ import annotations

import pytest

import kiln.passes.pipeline  # noqa: F401 - registers kiln's rules
from kiln.passes import RULES, RewriteRule
from kiln.passes.verification import RuleVerificationError, verify_rule


def test_there_are_rules_to_verify():
    assert "conv-bn" in RULES


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_is_numerically_verified(name):
    report = verify_rule(RULES[name])
    assert report.fired >= 1
    assert [c.passed for c in report.comparisons] == [True, True]


def test_a_rule_without_an_example_fails_verification():
    rule = RewriteRule("no-example", lambda op, x: op.Relu(x), lambda op, x: op.Relu(x))
    with pytest.raises(RuleVerificationError, match="has no example graph"):
        verify_rule(rule)


def test_a_wrong_rule_fails_verification():
    """A rule that replaces Relu(x) by x changes the numbers, and verification says so."""
    from kiln.ir import DType
    from kiln.passes.rules import example_graph

    rule = RewriteRule(
        "wrong", lambda op, x: op.Relu(x), lambda op, x: op.Identity(x),
        example=lambda: example_graph("w", {"x": (DType.FLOAT32, (8,))}, lambda op, x: op.Relu(x)),
    )
    with pytest.raises(RuleVerificationError, match="changed the numbers"):
        verify_rule(rule)


def test_custom_rule_example_runs(tmp_path):
    """examples/custom_rule.py, as a user runs it, and through `kiln optimize --load`."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "examples/custom_rule.py"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fired: {'hardswish': 1}" in proc.stdout
    assert "needs 1/6 and 0.5" in proc.stdout

    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
         helper.make_node("Mul", ["h", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    ), opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "optimize", str(src), "-o", str(tmp_path / "o.onnx"),
         "--load", "examples/custom_rule.py", "--passes", "hardswish,dce"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hardswish x1" in proc.stdout
