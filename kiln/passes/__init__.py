"""Graph passes: the pass manager, the pattern-rewrite engine, and kiln's rules.

A rewrite rule is a ``pattern`` (its parameters are exactly the variables it binds:
``def pattern(op, x, w=Const()): return op.Conv(x, w)``), an optional ``check`` that
raises :class:`MatchFailure` with a reason when a match must not be used, and a
``rewrite``; see ``kiln.passes.pattern`` and ``docs/writing-a-fusion-pattern.md``.
``register_rule_set(name, rules)`` registers the rules and a pass of that name; other
passes are classes decorated with ``@register_pass``. Each pass file registers its own
passes and rule sets when it is imported, and importing this package imports them all.
``parse_passes("layout{block=8},dce")`` builds passes from a spec, ``kiln.passes.pipeline``
names the optimisation levels, and ``PassManager(...).run(graph)`` returns the graph and a
``PipelineReport`` whose ``explain(rule)`` says why a rule did or did not fire.
"""

from __future__ import annotations

from kiln.passes.manager import (
    PASSES, NearMiss, Pass, PassError, PassManager, PassResult, PipelineReport, RuleRun, get_pass, parse_passes,
    register_pass,
)
from kiln.passes.pattern import Const, MatchFailure, Optional, Var, copy_attrs
from kiln.passes.rules import (
    RULES, RewritePass, RewriteRule, RuleSet, apply_rules, example_graph, register_rule, register_rule_set,
)
from kiln.passes.verification import RuleVerificationError, verify_rule

# The pass files: importing them registers their passes and rule sets.
from kiln.passes import (  # noqa: E402,F401  isort: skip
    cleanup, control_flow, fold_constants, fuse_conv, fuse_transformer, layout, precision, prune, quantize, simplify,
)

__all__ = [
    "PASSES", "RULES", "Const", "MatchFailure", "NearMiss", "Optional", "Pass", "PassError", "PassManager",
    "PassResult", "PipelineReport", "RewritePass", "RewriteRule", "RuleRun", "RuleSet", "RuleVerificationError",
    "Var", "apply_rules", "copy_attrs", "example_graph", "get_pass", "parse_passes", "register_pass",
    "register_rule", "register_rule_set", "verify_rule",
]
