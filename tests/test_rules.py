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
