"""bf16 as a compile job: ``kiln compile MODEL --precision bf16 [--eval SAMPLES.npz]``.

The target gains AVX-512 BF16 code (:func:`kiln.codegen.target.with_bf16`), so the pipeline runs the
``bf16`` pass after the layout pass: every blocked group-1 conv becomes ``kiln::BF16BlockedConv``
(bf16 inputs and weights, float32 sums, ``vdpbf16ps``). The manifest's ``precision`` entry says how
many convs run in bf16 and which stayed float32, and with ``--eval`` the accuracy against
onnxruntime running the float model (cosine, max abs error, argmax agreement), as int8 reports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.quantize.accuracy import accuracy_record
from kiln.quantize.calibration import read_samples

if TYPE_CHECKING:
    from kiln.driver import CompileResult

#: the float32 convs the bf16 pass looks at, and the one it makes
FLOAT_CONVS = ("BlockedConv",)
BF16_CONVS = ("BF16BlockedConv",)


def compile_bf16(model: str | os.PathLike, output: str | os.PathLike, *, target: Any, level: str | None = None,
                 passes: Any = None, input_shapes: dict[str, tuple] | None = None, tuning_db: Any = None,
                 eval: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None) -> CompileResult:
    """Compile ``model`` into ``output`` with its convs in bf16 on ``target`` (a bf16 target)."""
    from kiln.codegen.build import file_sha256, set_manifest_entry
    from kiln.driver import compile_graph, load_model

    say = progress or (lambda _: None)
    say("importing")
    graph = load_model(model, input_shapes)
    samples = read_samples(eval, graph.inputs) if eval else None
    result = compile_graph(graph, output, target=target, level=level, passes=passes, tuning_db=tuning_db,
                           source=(file_sha256(model), Path(model).name), progress=say)
    record = precision_record(result)
    if samples is not None:
        say(f"measuring accuracy on {len(samples)} samples against the float model (onnxruntime)")
        record.update(accuracy_record(model, output, samples, target))
    set_manifest_entry(output, "precision", record)
    result.precision = record
    return result


def precision_record(result: CompileResult) -> dict[str, Any]:
    """The manifest's ``precision`` entry: what ran in bf16, and the convs that stayed float32 with why."""
    nodes = list(result.graph.walk_nodes())
    kept = {n.name: _why_float(n) for n in nodes if n.domain == "kiln" and n.op_type in FLOAT_CONVS}
    bf16 = [n for n in nodes if n.domain == "kiln" and n.op_type in BF16_CONVS]
    return {
        "compute": "bf16",
        "scheme": "convs: inputs rounded to bf16 (nearest even), bf16 weights, float32 sums (vdpbf16ps); "
                  "activations between kernels and every other op in float32",
        "bf16_convs": len(bf16),
        "bf16_weight_bytes": sum(n.input(1).numpy().nbytes for n in bf16),  # half their float32 bytes
        "kept_float": kept,
    }


def _why_float(node: Any) -> str:
    """Why the bf16 rule leaves ``node`` in float32 (its check's reason)."""
    from kiln.passes.precision import CONV_BF16

    attempt = CONV_BF16.try_match(node)
    return getattr(attempt, "reason", None) or "not matched"
