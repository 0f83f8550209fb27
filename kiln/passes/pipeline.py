"""kiln's pipelines, top to bottom: which passes each optimisation level runs.

    O0  nothing
    O1  QDQ import (qdq: quantized convs as QLinearConv), then cleanup and folding: fold-constants, inline-if (Ifs on constants), simplify (no-ops and algebra), cse, dce
    O2  O1, then the fusions: fuse-conv, fuse-transformer
    O3  O2, then layout: convs in NCHW[b]c with pre-packed weights (b from the target's vector width)
"""

from __future__ import annotations

from kiln.passes import (  # noqa: F401 - registration
    cleanup, control_flow, fold_constants, fuse_conv, fuse_transformer, layout, quantize, simplify,
)
from kiln.passes.manager import Pass, PassError, get_pass
from kiln.passes.rules import register_rule_set

register_rule_set("qdq", quantize.RULES)
register_rule_set("simplify", [*simplify.NOOP_RULES, *simplify.ALGEBRA_RULES])
register_rule_set("fuse-conv", fuse_conv.RULES)
register_rule_set("fold-into-conv", fuse_conv.FOLD_RULES)
register_rule_set("fuse-transformer", fuse_transformer.RULES)

#: The level ``kiln compile`` and ``kiln bench`` use unless told otherwise.
DEFAULT_COMPILE_LEVEL = "O3"

#: The float passes ``--quantize int8`` runs before it observes and quantizes: folding, and
#: the constant folds into convs (BatchNorm, bias, scale, pads; no activation fusion), so that the ranges measured are the ones the
#: int8 kernels will see.
FLOAT_PREP = ["fold-constants", "inline-if", "simplify", "cse", "dce", "fold-into-conv", "dce"]

LEVELS: dict[str, list[str]] = {
    "O0": [],
    "O1": ["qdq", "fold-constants", "inline-if", "simplify", "cse", "dce"],
    "O2": ["qdq", "fold-constants", "inline-if", "simplify", "cse", "dce", "fuse-conv", "fuse-transformer", "dce"],
    "O3": ["qdq", "fold-constants", "inline-if", "simplify", "cse", "dce", "fuse-conv", "fuse-transformer", "dce", "layout",
           "fold-constants", "cse", "dce"],
}


def passes_for(level: str | None = None, names: list[str] | None = None, *, block: int | None = None) -> list[Pass]:
    """The passes of an optimisation level, or of an explicit list of pass names.

    ``block`` is the layout pass's block (float32 lanes per vector of the target); 0 leaves
    the layout pass out (targets without a blocked layout, such as CUDA).
    """
    if not names:
        level = level or "O2"
        if level not in LEVELS:
            raise PassError(f"no optimisation level '{level}'; levels: {', '.join(LEVELS)}")
        names = LEVELS[level]
    passes = [get_pass(n) for n in names]
    if block == 0:
        passes = [p for p in passes if not isinstance(p, layout.Layout)]
    for p in passes:
        if isinstance(p, layout.Layout) and block:
            p.block = block
    return passes
