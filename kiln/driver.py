"""The compile driver: the one place kiln's pipeline is assembled.

    model.onnx -> load -> pin shapes -> passes -> lower -> build -> model.kiln

:func:`compile` runs all of it (``kiln compile``, ``kiln bench``, the int8 observers and
the Python API call it); :func:`optimize` runs the passes alone (``kiln optimize`` and
``kiln tune``, so that tuning sees the kernels compilation will build). With ``quantize``,
:func:`compile` hands over to :mod:`kiln.quantize`, which calibrates the float model and
then builds through :func:`compile_graph` here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.codegen.build import BuildReport
    from kiln.codegen.target import Target
    from kiln.ir import Graph
    from kiln.ir.summary import Summary
    from kiln.passes.manager import Pass, PipelineReport
    from kiln.quantize import DynamicQuantizeOptions, PruneOptions, QuantizeOptions

ShapeSpecs = Mapping[str, Sequence[int | str]]

#: The level ``kiln optimize`` (which writes ONNX) runs unless told otherwise; compilation's is
#: ``kiln.passes.pipeline.DEFAULT_COMPILE_LEVEL`` (O3), see :func:`compile_level`.
DEFAULT_OPTIMIZE_LEVEL = "O2"


@dataclass
class CompileResult:
    """What :func:`compile` did: the artifact, the optimized graph, and every stage's report."""

    path: Path
    target: Target
    level: str | None
    graph: Graph  # after the passes: what was lowered
    pipeline: PipelineReport
    build: BuildReport
    passes: list[str] = field(default_factory=list)  # the passes that ran, as specs
    tuning: dict[str, Any] | None = None  # the tuning database's manifest entry
    quantization: dict[str, Any] | None = None  # the manifest's quantization entry (with --quantize)
    precision: dict[str, Any] | None = None  # the manifest's precision entry (with --precision bf16)
    extra: dict[str, Any] = field(default_factory=dict)  # what the quantizer reports beyond the manifest
    compression: dict[str, Any] | None = None  # the manifest's compression entry (kiln.ir.summary.compression_entry)
    signer: Any = None  # who signed the artifact (kiln.runtime.signing.Signer), with sign_key
    named_dims: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # unknown input dims kiln named

    def symbolic_dims(self) -> list[tuple[str, int, str]]:
        """The input dims that stayed symbolic in the artifact: (input, axis, symbol)."""
        return [(v.name, i, d) for v in self.graph.inputs if not v.sequence
                for i, d in enumerate(v.shape or ()) if isinstance(d, str)]


def load_model(model: str | os.PathLike | Graph, input_shapes: ShapeSpecs | None = None, *,
               min_opset: int | None = None) -> Graph:
    """Import ``model`` (a path, or a ``Graph``, copied) and pin ``input_shapes``.

    ``input_shapes`` maps input names to dims: ints, or names for symbolic dims (a name may
    free a dim the model fixed at export).
    """
    from kiln.ir import Graph, SequenceShape, load, set_input_shapes

    graph = model.clone() if isinstance(model, Graph) else load(Path(model), min_opset=min_opset)
    if input_shapes:
        set_input_shapes(graph, {k: v if isinstance(v, SequenceShape) else tuple(v) for k, v in input_shapes.items()})
    return graph


def pipeline_passes(level: str | None = None, passes: str | Sequence[str] | None = None, *,
                    target: Target | None = None) -> list[Pass]:
    """The passes of ``level`` (or the explicit pass specs), fitted to ``target``'s layout and
    compute precision (a bf16 target adds the bf16 pass)."""
    from kiln.passes.pipeline import passes_for

    names = list(passes) if isinstance(passes, list | tuple) else passes
    if target is None:
        return passes_for(level, names or None)
    return passes_for(level, names or None, block=target.layout_block, precision=target.precision)


def optimize(graph: Graph, level: str | None = None, *, passes: str | Sequence[str] | None = None,
             target: Target | None = None, verify_each: bool = False, print_after: Sequence[str] = (),
             printer: Callable[[str], None] = print) -> tuple[Graph, PipelineReport]:
    """Run ``level``'s passes (``DEFAULT_OPTIMIZE_LEVEL`` when neither is given) to a fixed point.

    ``passes`` replaces the level with pass specs (``"fold-constants,layout{block=8},dce"``).
    With a ``target``, the layout pass uses its vector width (and is left out for CUDA).
    Returns the optimized graph and the pipeline report (per-pass changes, times, rule fire
    counts and near misses).
    """
    from kiln.passes import PassManager

    if not passes:
        level = level or DEFAULT_OPTIMIZE_LEVEL
    manager = PassManager(pipeline_passes(level, passes, target=target), verify_each=verify_each,
                          print_after=print_after, printer=printer)
    return manager.run(graph)


def compile(
    model: str | os.PathLike | Graph,
    output: str | os.PathLike,
    *,
    target: str | Target | None = None,
    arch: str | None = None,
    threads: int | None = None,
    level: str | None = None,
    passes: str | Sequence[str] | None = None,
    input_shapes: ShapeSpecs | None = None,
    tune_db: str | os.PathLike | None = None,
    quantize: QuantizeOptions | DynamicQuantizeOptions | None = None,
    prune: PruneOptions | None = None,
    precision: str = "fp32",
    eval: str | os.PathLike | None = None,
    sign_key: str | os.PathLike | None = None,
    signer: str = "",
    progress: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile ``model`` into the artifact ``output``; the Python form of ``kiln compile``.

    ``target`` is ``"cpu"`` (the default: this machine's CPU), ``"cuda"`` (with ``arch``, e.g.
    ``"sm_90"``), a JSON target dict, or a :class:`~kiln.codegen.target.Target`. ``level`` is
    O0..O3 (default O3); ``passes`` replaces it with pass specs. ``tune_db`` schedules kernels
    from a tuning database; ``quantize`` (:class:`kiln.quantize.QuantizeOptions`) calibrates and
    quantizes the model to int8 first; ``prune`` (:class:`kiln.quantize.PruneOptions`) removes
    its least important channels first. ``precision="bf16"`` runs the convs in bfloat16 on a CPU
    with AVX-512 BF16 (``eval``, a samples file, adds its accuracy against the float model to the
    manifest). ``sign_key`` (an ed25519 private key file) signs the
    artifact's manifest, by ``signer``. ``progress`` is told each stage as it starts.
    """
    from kiln.codegen.build import file_sha256
    from kiln.codegen.target import Target, parse_target

    dst = Path(output)
    is_path = not _is_graph(model)
    if is_path:
        src = Path(model)  # type: ignore[arg-type]
        if dst.exists() and src.exists() and dst.resolve() == src.resolve():
            raise KilnError(f"{dst}: refusing to overwrite the input model; choose another output path")
    tgt = target if isinstance(target, Target) else parse_target(target, arch=arch, threads=threads)
    db = _tuning_database(tune_db)
    if quantize is not None and prune is not None:
        raise KilnError("--quantize and --prune-channels are separate jobs today; prune, then quantize the pruned "
                        "model (kiln optimize writes it)")
    from kiln.passes.pipeline import PRECISIONS

    if precision not in PRECISIONS:
        raise KilnError(f"unknown precision '{precision}'; use {' or '.join(PRECISIONS)}")
    if precision == "bf16" and (quantize is not None or prune is not None):
        raise KilnError("--precision bf16 is a float job of its own; it does not combine with --quantize or "
                        "--prune-channels")
    if precision == "bf16":
        from kiln.codegen.target import with_bf16
        from kiln.quantize.precision import compile_bf16

        if not is_path:
            raise KilnError("--precision bf16 takes a model file (not a Graph)")
        result = compile_bf16(model, dst, target=with_bf16(tgt), level=level, passes=passes,  # type: ignore[arg-type]
                              input_shapes=input_shapes, tuning_db=db, eval=eval, progress=progress)
    elif prune is not None:
        from kiln.quantize import compile_pruned

        if not is_path or passes:
            raise KilnError("pruning takes a model file and an optimisation level (not a Graph, not --passes)")
        result = compile_pruned(model, dst, prune, target=tgt, level=level, input_shapes=input_shapes,
                                tuning_db=db, progress=progress)
    elif quantize is not None:
        from kiln.quantize import DynamicQuantizeOptions, compile_int8, compile_int8_dynamic

        if not is_path or passes:
            raise KilnError("quantization takes a model file and an optimisation level (not a Graph, not --passes)")
        job = compile_int8_dynamic if isinstance(quantize, DynamicQuantizeOptions) else compile_int8
        result = job(model, dst, quantize, target=tgt, level=level, input_shapes=input_shapes, tuning_db=db,
                     progress=progress)
    else:
        say = progress or (lambda _: None)
        say("importing")
        graph = load_model(model, input_shapes)
        source = (file_sha256(model), Path(model).name) if is_path else (None, None)  # type: ignore[arg-type]
        result = compile_graph(graph, dst, target=tgt, level=level, passes=passes, tuning_db=db, source=source,
                               progress=progress)
    if sign_key is not None:
        from kiln.runtime.artifact import sign_artifact

        result.signer = sign_artifact(dst, sign_key, signer).signer
    return result


def optimize_for(graph: Graph, target: Target, level: str | None = None, passes: str | Sequence[str] | None = None,
                 *, progress: Callable[[str], None] | None = None,
                 before_layout: Callable[[Graph], None] | None = None) -> tuple[Graph, PipelineReport, list[Pass]]:
    """The passes compilation runs for ``target``: ``level`` (default O3) or explicit pass specs.

    ``kiln tune`` optimizes through here too, so that it tunes the kernels compilation will build.
    ``before_layout`` is shown the graph once, as it is just before the first layout pass runs
    (or as optimized, when no layout pass runs): the compression report counts channels there,
    before the blocked layout pads them. Returns the optimized graph, the pipeline report and the
    passes that ran.
    """
    from kiln.passes import PassManager

    level = compile_level(level, passes)
    if progress is not None:
        progress(f"optimizing ({level or 'passes: ' + _spec_text(passes)})")
    pass_list = pipeline_passes(level, passes, target=target)
    first_layout = next((i for i, p in enumerate(pass_list) if p.name == "layout"), None)
    if before_layout is not None and first_layout == 0:
        before_layout(graph)
    on_pass = None
    if before_layout is not None and first_layout:
        ahead = pass_list[first_layout - 1]

        def on_pass(p: Pass, iteration: int, g: Graph, _result: Any) -> None:
            if iteration == 1 and p is ahead:  # the pass just before the first layout run
                before_layout(g)

    optimized, report = PassManager(pass_list, on_pass=on_pass).run(graph)
    if before_layout is not None and first_layout is None:
        before_layout(optimized)
    return optimized, report, pass_list


def compile_graph(graph: Graph, output: str | os.PathLike, *, target: Target, level: str | None = None,
                  passes: str | Sequence[str] | None = None, tuning_db: Any = None,
                  source: tuple[str | None, str | None] = (None, None), applied: Sequence[str] = (),
                  progress: Callable[[str], None] | None = None, baseline: Summary | None = None) -> CompileResult:
    """Optimize an imported ``graph`` and build it into ``output`` (the steps after import).

    ``source`` is the source model's (sha256, file name) for the manifest; ``applied`` names
    passes that already ran before this pipeline (the quantizer's, the pruner's), recorded first;
    ``baseline`` summarizes the model as given, before them (default: ``graph``), for the
    manifest's compression entry. Unknown
    input dims (unnamed, ``-1``, ``?``) are named first (``x_0``), in ``graph`` itself, so that
    they compile as symbolic dims.
    """
    from kiln.codegen.build import build
    from kiln.ir import name_unknown_dims, window_minimums
    from kiln.ir.summary import compression_entry, summarize

    say = progress or (lambda _: None)
    named = name_unknown_dims(graph)  # an unknown dim compiles as a symbol: the artifact runs at any size
    minimums = window_minimums(graph)  # before the layout pass moves the convs' dims
    before = baseline if baseline is not None else summarize(graph)
    after: list[Summary] = []
    optimized, report, pass_list = optimize_for(graph, target, level, passes, progress=say,
                                                before_layout=lambda g: after.append(summarize(g)))
    compression = compression_entry(before, after[0])
    names = [*applied, *(p.describe() for p in pass_list)]
    built = build(optimized, output, target=target, source_sha256=source[0], source_name=source[1], passes=names,
                  progress=say, tuning_db=tuning_db, dim_minimums=minimums, compression=compression)
    return CompileResult(Path(output), target, compile_level(level, passes), optimized, report, built, names,
                         tuning_db.manifest() if tuning_db is not None else None, named_dims=named,
                         compression=compression)


def compile_level(level: str | None, passes: str | Sequence[str] | None) -> str | None:
    """The level compilation runs: the one asked for, else O3; None when explicit passes replace it."""
    from kiln.passes.pipeline import DEFAULT_COMPILE_LEVEL

    return None if passes else (level or DEFAULT_COMPILE_LEVEL)


def _tuning_database(path: str | os.PathLike | None) -> Any:
    if path is None:
        return None
    from kiln.codegen.tune import TuningDatabase

    return TuningDatabase(path)


def _is_graph(model: Any) -> bool:
    from kiln.ir import Graph
    from kiln.ir.summary import Summary

    return isinstance(model, Graph)


def _spec_text(passes: str | Sequence[str] | None) -> str:
    return passes if isinstance(passes, str) else ",".join(passes or ())


def stage_printer(stream: Any = None) -> Callable[[str], None]:
    """A progress callback that prints ``[kiln] <stage>`` lines (on stderr by default)."""
    out = stream or sys.stderr

    def say(text: str) -> None:
        print(f"[kiln] {text}", file=out, flush=True)

    return say
