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

With ``--accuracy-budget cosine>=X`` (or ``argmax>=X``) and ``--calib SAMPLES.npz``, step 2 prunes
less where the model is sensitive (:func:`budgeted_exclusions`): each group is pruned alone at the
uniform fraction and scored on the samples (onnxruntime running the folded graph, pruned and not),
then the most sensitive groups are kept whole, one at a time, the rest pruning more to keep the MAC
target, until the whole pruned model meets the budget.
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
    block = target.layout_block or 16
    search: dict[str, Any] = {}
    exclude: frozenset[str] = frozenset()
    if options.budget is not None:
        calib = read_samples(options.calib, graph.inputs)
        exclude, search = budgeted_exclusions(graph, options, block, calib, say)
    pruned = prune_channels(graph, options.ratio, norm=options.norm, block=block, exclude=exclude)
    spec = f"prune-channels{{ratio={options.ratio:g},norm={options.norm}}}"
    result = compile_graph(graph, output, target=target, level=level, tuning_db=tuning_db,
                           source=(file_sha256(model), Path(model).name),
                           applied=[*(p.describe() for p in prep), spec], progress=say, baseline=baseline)
    entry = dict(result.compression or {})
    entry["pruning"] = {**pruned.to_json(), **search}
    if samples is not None:
        say(f"measuring accuracy on {len(samples)} samples against the unpruned model (onnxruntime)")
        entry.update(accuracy_record(model, output, samples, target))
    set_manifest_entry(output, "compression", entry)
    result.compression = entry
    return result


#: calibration samples the budget search scores each candidate on
BUDGET_SAMPLES = 8


def budgeted_exclusions(graph: Any, options: PruneOptions, block: int, samples: list[dict],
                        say: Callable[[str], None]) -> tuple[frozenset[str], dict[str, Any]]:
    """The channel groups to keep whole so that the pruned model meets ``options.budget`` on
    ``samples``, and the search's record for the manifest (budget, per-group sensitivity, groups
    kept whole, the score reached)."""
    from kiln.passes.prune import prunable_groups, prune_channels
    from kiln.quantize.accuracy import compare

    budget, feeds = options.budget, samples[:BUDGET_SAMPLES]
    names = [v.name for v in graph.outputs]
    reference = _run_on_onnxruntime(graph, feeds)

    def score(exclude: frozenset[str], fraction: float | None = None) -> tuple[float, float]:
        g = graph.clone()
        report = prune_channels(g, options.ratio, norm=options.norm, block=block, exclude=exclude, fraction=fraction)
        return budget.score(compare(reference, _run_on_onnxruntime(g, feeds), names)), report.fraction

    groups = prunable_groups(graph, block)
    uniform, fraction = score(frozenset())
    record: dict[str, Any] = {"budget": str(budget), "budget_samples": len(feeds), "uniform_score": round(uniform, 6)}
    if uniform >= budget.value:
        say(f"accuracy budget {budget}: pruning every group alike scores {uniform:.5f}; nothing kept whole")
        return frozenset(), {**record, "kept_whole": [], "score": round(uniform, 6), "budget_met": True}
    say(f"accuracy budget {budget}: pruning alike scores {uniform:.5f}; measuring {len(groups)} groups one at a time")
    alone = {name: score(frozenset(groups) - {name}, fraction)[0] for name in groups}
    order = sorted(groups, key=lambda name: alone[name])  # the most sensitive (lowest score) first
    kept: list[str] = []
    reached = uniform
    for name in order:
        kept.append(name)
        reached, _ = score(frozenset(kept))
        if reached >= budget.value:
            break
    say(f"accuracy budget {budget}: {len(kept)} of {len(groups)} groups kept whole; the pruned model scores "
        f"{reached:.5f}")
    return frozenset(kept), {**record, "sensitivity": {n: round(alone[n], 6) for n in order},
                             "kept_whole": kept, "score": round(reached, 6), "budget_met": reached >= budget.value}


def _run_on_onnxruntime(graph: Any, samples: list[dict]) -> list[dict]:
    """``graph``'s outputs on each of ``samples``, through onnxruntime (one session)."""
    from kiln.ir import to_onnx
    from kiln.ir.oracle import onnxruntime_session

    sess = onnxruntime_session(to_onnx(graph).SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, feeds))) for feeds in samples]
