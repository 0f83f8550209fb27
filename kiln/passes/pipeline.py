"""kiln's pipelines, top to bottom: which passes each optimisation level runs.

    O0  nothing
    O1  cleanup and folding: fold-constants, inline-if (Ifs on constants), simplify (no-ops and algebra), cse, dce
    O2  O1, then the fusions: fuse-conv, fuse-transformer
"""

from __future__ import annotations

from kiln.passes import cleanup, control_flow, fold_constants, fuse_conv, fuse_transformer, simplify  # noqa: F401 - registration
from kiln.passes.manager import Pass, PassError, get_pass
from kiln.passes.rules import register_rule_set

register_rule_set("simplify", [*simplify.NOOP_RULES, *simplify.ALGEBRA_RULES])
register_rule_set("fuse-conv", fuse_conv.RULES)
register_rule_set("fuse-transformer", fuse_transformer.RULES)

LEVELS: dict[str, list[str]] = {
    "O0": [],
    "O1": ["fold-constants", "inline-if", "simplify", "cse", "dce"],
    "O2": ["fold-constants", "inline-if", "simplify", "cse", "dce", "fuse-conv", "fuse-transformer", "dce"],
}


def passes_for(level: str | None = None, names: list[str] | None = None) -> list[Pass]:
    """The passes of an optimisation level, or of an explicit list of pass names."""
    if names:
        return [get_pass(n) for n in names]
    level = level or "O2"
    if level not in LEVELS:
        raise PassError(f"no optimisation level '{level}'; levels: {', '.join(LEVELS)}")
    return [get_pass(n) for n in LEVELS[level]]
