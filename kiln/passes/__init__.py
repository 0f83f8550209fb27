"""Graph passes: the pass manager, the pattern-rewrite engine, and kiln's rules.

Write a rule as pattern, check and rewrite functions (see ``kiln.passes.pattern``)
and register it with :func:`kiln.passes.rules.register_rule`.
"""

from __future__ import annotations

from kiln.passes.manager import PASSES, Pass, PassError, PassManager, PassResult, register_pass
from kiln.passes.pattern import Const, MatchResult, Optional, Var, copy_attrs
from kiln.passes.rules import (
    RULES, RewritePass, RewriteRule, RuleSet, apply_rules, example_graph, explain, register_rule, register_rule_set,
)
from kiln.passes.verification import RuleVerificationError, verify_rule

__all__ = [
    "PASSES", "RULES", "Const", "MatchResult", "Optional", "Pass", "PassError", "PassManager", "PassResult",
    "RewritePass", "RewriteRule", "RuleSet", "RuleVerificationError", "Var", "apply_rules", "copy_attrs",
    "example_graph", "explain", "register_pass", "register_rule", "register_rule_set", "verify_rule",
]
