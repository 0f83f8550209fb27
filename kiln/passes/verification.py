"""Verified rewrites: run a rule's example before and after the rule, and compare.

``verify_rule(rule)`` builds the rule's example graph twice, applies only that
rule to one copy, checks the rule fired and the graph still verifies, then runs
both copies on the same seeded inputs through kiln's evaluator and through
onnxruntime, and compares the numbers with the rule's tolerances (float32
defaults: rtol 1e-5, atol 1e-6; float16/bfloat16 get 1e-2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import KilnError
from kiln.ir import DType, evaluate, to_onnx
from kiln.ir.oracle import Comparison, compare, run_onnxruntime, seeded_inputs
from kiln.passes.rules import RewriteRule, apply_rules

_HALF_TOLERANCE = 1e-2


class RuleVerificationError(KilnError):
    """A rule has no example, did not fire on it, or changed its numbers."""


@dataclass
class RuleReport:
    """The outcome of :func:`verify_rule`."""

    rule: str
    fired: int
    nodes_before: int
    nodes_after: int
    comparisons: list[Comparison] = field(default_factory=list)


def verify_rule(rule: RewriteRule, *, seed: int = 0, use_onnxruntime: bool = True) -> RuleReport:
    """Check ``rule`` numerically on its own example; raise ``RuleVerificationError`` if it fails."""
    if rule.example is None:
        raise RuleVerificationError(f"rule '{rule.name}' has no example graph; give RewriteRule(example=...)")
    before, after = rule.example(), rule.example()
    stats = apply_rules(after, [rule])
    fired = stats.fired.get(rule.name, 0)
    if not fired:
        miss = stats.near_miss.get(rule.name)
        why = f": {miss.reason}" if miss else ""
        raise RuleVerificationError(f"rule '{rule.name}' did not fire on its own example{why}")
    after.verify()
    feeds = seeded_inputs(before, {}, seed)
    rtol, atol = rule.rtol, rule.atol
    if any(v.dtype in (DType.FLOAT16, DType.BFLOAT16) for v in before.outputs):
        rtol, atol = max(rtol, _HALF_TOLERANCE), max(atol, _HALF_TOLERANCE)
    report = RuleReport(rule.name, fired, len(before), len(after))
    report.comparisons.append(compare("evaluator: after vs before", evaluate(after, feeds), evaluate(before, feeds),
                                      rtol, atol))
    if use_onnxruntime:
        want = run_onnxruntime(to_onnx(before).SerializeToString(), feeds)
        got = run_onnxruntime(to_onnx(after).SerializeToString(), feeds)
        report.comparisons.append(compare("onnxruntime: after vs before", got, want, rtol, atol))
    for c in report.comparisons:
        if not c.passed:
            worst = max(c.max_abs.values())
            raise RuleVerificationError(
                f"rule '{rule.name}' changed the numbers ({c.name}): max abs error {worst:.3g} "
                f"beyond rtol {rtol:g}, atol {atol:g}"
            )
    return report
