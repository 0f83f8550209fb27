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

#: the bf16 kernels the bf16 pass makes
BF16_KERNELS = ("BF16BlockedConv", "BF16Dense")


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
    """The manifest's ``precision`` entry: what ran in bf16, and the convs and dense layers by constant
    weights that stayed float32, with why."""
    from kiln.passes.precision import RULES

    nodes = list(result.graph.walk_nodes())
    kept: dict[str, str] = {}
    for node in nodes:
        for rule in RULES:
            if (node.domain, node.op_type) == (rule.root.node.domain, rule.root.node.op_type):
                reason = getattr(rule.try_match(node), "reason", "")
                if reason.startswith("check failed: "):  # not a pattern miss (a product of two activations)
                    kept[node.name] = reason.removeprefix("check failed: ")
    bf16 = [n for n in nodes if n.domain == "kiln" and n.op_type in BF16_KERNELS]
    return {
        "compute": "bf16",
        "scheme": "convs and dense layers by constant weights: inputs rounded to bf16 (nearest even), bf16 "
                  "weights, float32 sums (vdpbf16ps); activations between kernels and every other op in float32",
        "bf16_convs": sum(1 for n in bf16 if n.op_type == "BF16BlockedConv"),
        "bf16_dense": sum(1 for n in bf16 if n.op_type == "BF16Dense"),
        "bf16_weight_bytes": sum(n.input(1).numpy().nbytes for n in bf16),  # half their float32 bytes
        "kept_float": kept,
    }
