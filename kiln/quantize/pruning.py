"""Structured pruning as a compile job: fold, prune, compile, and report the accuracy lost.

``kiln compile MODEL --prune-channels RATIO [--eval SAMPLES.npz]`` runs :func:`compile_pruned`:

1. the model is imported, and folded with the float passes, so that each BatchNorm's gamma
   scales the conv filter it belongs to before filters are ranked;
2. :func:`kiln.passes.prune.prune_channels` removes the least important output channels of
   every prunable channel group until the MACs fall by ``RATIO``;
3. the pruned graph compiles through the driver like any other, and the manifest's
   ``compression`` entry gets the ``pruning`` record;
4. with ``--eval``, the artifact runs on the samples against onnxruntime running the unpruned
   model (cosine, max abs error and argmax agreement per output, as int8 reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.quantize.accuracy import accuracy_record
from kiln.quantize.calibration import read_samples
from kiln.quantize.options import PruneOptions

if TYPE_CHECKING:
    from kiln.driver import CompileResult


def compile_pruned(model: str | os.PathLike, output: str | os.PathLike, options: PruneOptions, *, target: Any,
                   level: str | None = None, input_shapes: dict[str, tuple] | None = None, tuning_db: Any = None,
                   progress: Callable[[str], None] | None = None) -> CompileResult:
    """Prune ``model``'s channels by ``options.ratio`` of its MACs and compile it into ``output``."""
    from kiln.codegen.build import file_sha256, set_manifest_entry
    from kiln.driver import compile_graph, load_model
    from kiln.ir.summary import summarize
    from kiln.passes import PassManager
    from kiln.passes.pipeline import FLOAT_PREP, passes_for
    from kiln.passes.prune import prune_channels

    say = progress or (lambda _: None)
    say("importing")
    graph = load_model(model, input_shapes)
    samples = read_samples(options.eval, graph.inputs) if options.eval else None
    say(f"pruning channels ({options.ratio:g} of the MACs, {options.norm} importance)")
    prep = passes_for(names=FLOAT_PREP)
    graph, _ = PassManager(prep).run(graph)
    baseline = summarize(graph)  # "before": folded and exact, so every product's shapes are known
    pruned = prune_channels(graph, options.ratio, norm=options.norm, block=target.layout_block or 16)
    spec = f"prune-channels{{ratio={options.ratio:g},norm={options.norm}}}"
    result = compile_graph(graph, output, target=target, level=level, tuning_db=tuning_db,
                           source=(file_sha256(model), Path(model).name),
                           applied=[*(p.describe() for p in prep), spec], progress=say, baseline=baseline)
    entry = dict(result.compression or {})
    entry["pruning"] = pruned.to_json()
    if samples is not None:
        say(f"measuring accuracy on {len(samples)} samples against the unpruned model (onnxruntime)")
        entry.update(accuracy_record(model, output, samples, target))
    set_manifest_entry(output, "compression", entry)
    result.compression = entry
    return result
