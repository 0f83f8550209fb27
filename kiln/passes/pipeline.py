"""kiln's pipelines, top to bottom: which passes each optimisation level runs.

    O0  nothing
    O1  QDQ import (qdq: quantized convs as QLinearConv), then cleanup and folding: fold-constants,
        inline-if (Ifs on constants), simplify (no-ops and algebra), cse, dce
    O2  O1, then dead-channels (channels with all-zero weights, or that nobody reads, removed exactly),
        then the fusions: fuse-conv, fuse-transformer, fuse-gemm (bias and activation epilogues of
        products by constant weights, once the GELUs are made)
    O3  O2, then layout: convs in NCHW[b]c with pre-packed weights (b from the target's vector width)

``--precision bf16`` adds the bf16 pass (blocked convs in bfloat16) right after the layout pass.

Levels are lists of pass specs (``"layout{block=8}"`` sets a field); this module only names passes,
which the pass files register when ``kiln.passes`` is imported.
"""

from __future__ import annotations

import dataclasses

from kiln.passes.manager import Pass, PassError, parse_passes

#: Folding and cleanup, to a fixed point with the rest of a level.
CLEANUP = ["fold-constants", "inline-if", "simplify", "cse", "dce"]

O1 = ["qdq", *CLEANUP]
O2 = O1 + ["dead-channels", "fuse-conv", "fuse-transformer", "fuse-gemm", "dce"]
O3 = O2 + ["layout", "fold-constants", "cse", "dce"]

LEVELS: dict[str, list[str]] = {"O0": [], "O1": O1, "O2": O2, "O3": O3}

#: The level ``kiln compile`` and ``kiln bench`` use unless told otherwise.
DEFAULT_COMPILE_LEVEL = "O3"

#: The float passes ``--quantize int8`` runs before it observes and quantizes: folding, and
#: the constant folds into convs (BatchNorm, bias, scale, pads; no activation fusion), so that the ranges measured are the ones the
#: int8 kernels will see.
FLOAT_PREP = CLEANUP + ["fold-into-conv", "dce"]


#: The float32 compute precisions ``--precision`` takes, and the passes each adds after the layout pass.
PRECISIONS: dict[str, list[str]] = {"fp32": [], "bf16": ["bf16"]}


def passes_for(level: str | None = None, names: list[str] | str | None = None, *,
               block: int | None = None, precision: str = "fp32") -> list[Pass]:
    """The passes of an optimisation level, or of explicit pass specs (a list, or one spec string).

    ``block`` is the layout pass's block (float32 lanes per vector of the target); 0 leaves
    the layout pass out (targets without a blocked layout, such as CUDA). ``precision`` adds its
    passes (:data:`PRECISIONS`) right after the layout pass, whose blocked convs they rewrite.
    """
    if not names:
        level = level or "O2"
        if level not in LEVELS:
            raise PassError(f"no optimisation level '{level}'; levels: {', '.join(LEVELS)}")
        names = LEVELS[level]
    if precision not in PRECISIONS:
        raise PassError(f"no precision '{precision}'; precisions: {', '.join(PRECISIONS)}")
    specs = [names] if isinstance(names, str) else names
    passes = [p for spec in specs for p in parse_passes(spec)]
    extra = [p for spec in PRECISIONS[precision] for p in parse_passes(spec)]
    if extra:
        at = [i for i, p in enumerate(passes) if p.name == "layout"]
        if not at or block == 0:
            raise PassError(f"--precision {precision} rewrites the layout pass's blocked convs: it needs level O3 "
                            f"(or a layout pass) and a CPU target")
        passes[at[-1] + 1:at[-1] + 1] = extra
    if block == 0:
        return [p for p in passes if p.name != "layout"]
    if block:
        passes = [dataclasses.replace(p, block=block) if p.name == "layout" else p for p in passes]
    return passes
