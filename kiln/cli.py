"""The ``kiln`` command line: one subcommand per user verb.

Errors a user can cause print one line on stderr and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from kiln import __version__
from kiln.errors import KilnError, UnsupportedOpError

EXIT_USAGE = 2  # bad input: the user's file, flags or data
EXIT_MISMATCH = 1  # the command ran, and found a numerical mismatch
EXIT_INTERNAL = 3  # a bug in kiln


def _cmd_inspect(args: argparse.Namespace) -> int:
    import zipfile

    if Path(args.model).is_file() and zipfile.is_zipfile(args.model):
        return _inspect_artifact(args)

    from kiln.ir.onnx_io import format_unsupported, load_with_report
    from kiln.ir.summary import summarize

    graph, unsupported = load_with_report(args.model)
    summary = summarize(graph, unsupported)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.format())
    if unsupported:
        raise UnsupportedOpError(format_unsupported(unsupported, str(args.model)), unsupported)
    return 0


def _inspect_artifact(args: argparse.Namespace) -> int:
    """``kiln inspect OUT.kiln``: the verified manifest (hashes checked; not the host)."""
    from kiln.runtime.artifact import describe, read_artifact

    art = read_artifact(args.model, check_host=False)
    print(json.dumps(art.manifest, indent=2, sort_keys=True) if args.json else describe(art.manifest))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import numpy as np

    from kiln.check import check_model, parse_shape_overrides

    feeds = None
    if args.inputs:
        from kiln.check import read_npz

        feeds = read_npz(args.inputs)
    report = check_model(
        args.model,
        input_shapes=parse_shape_overrides(args.input_shape),
        inputs=feeds,
        seed=args.seed,
        use_evaluator=not args.no_evaluator,
    )
    g = report.graph
    print(f"imported '{g.name}': {sum(1 for _ in g.walk_nodes())} nodes, verify() ok")
    shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in report.inputs.items())
    print(f"inputs: {shapes}")
    for cmp in report.comparisons:
        status = "ok" if cmp.passed else "MISMATCH"
        worst = max(cmp.max_abs.values(), default=0.0)
        print(f"{cmp.name}: {status}  (max abs error {worst:.3g}; rtol {cmp.rtol:g}, atol {cmp.atol:g})")
        for name, ok in cmp.ok.items():
            if not ok:
                print(f"  output '{name}' differs: max abs error {cmp.max_abs[name]:.3g}")
    return 0 if report.passed else EXIT_MISMATCH


def _cmd_optimize(args: argparse.Namespace) -> int:
    from kiln.ir import load, save_onnx
    from kiln.passes import PassManager, explain
    from kiln.passes.pipeline import passes_for

    for plugin in args.load or ():
        _load_plugin(plugin)
    src, dst = Path(args.model), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise KilnError(f"{dst}: refusing to overwrite the input model; choose another -o")
    graph = load(src)
    if args.input_shape:
        from kiln.check import parse_shape_overrides
        from kiln.ir import set_input_shapes

        set_input_shapes(graph, parse_shape_overrides(args.input_shape))
    names = [n.strip() for n in args.passes.split(",") if n.strip()] if args.passes else None
    manager = PassManager(passes_for(args.level, names), verify_each=args.verify_each,
                          print_after=args.print_after or ())
    graph, report = manager.run(graph)
    save_onnx(graph, dst)
    summary = {
        "input": str(src), "output": str(dst), "level": None if names else args.level,
        "nodes": {"before": report.nodes_before, "after": report.nodes_after},
        "iterations": report.iterations,
        "passes": {n: {"runs": s.runs, "changes": s.changes, "seconds": round(s.seconds, 6)}
                   for n, s in report.stats.items()},
        "rules": dict(sorted(report.rule_counts().items())),
    }
    print(_format_optimize(summary))
    if args.explain:
        try:
            remaining = explain(graph, args.explain)
        except KeyError as e:
            raise KilnError(str(e.args[0])) from None
        fired = report.rule_counts().get(args.explain, 0)
        if not fired:
            print(remaining)
        elif "nearest miss" in remaining:
            print(f"rule '{args.explain}' fired {fired} time(s); on the result, {remaining}")
        else:
            print(f"rule '{args.explain}' fired {fired} time(s); nothing is left for it to match")
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _load_plugin(path: str) -> None:
    """Run a Python file that registers rules or passes (``kiln optimize --load my_rules.py``)."""
    import importlib.util

    p = Path(path)
    if not p.is_file():
        raise KilnError(f"{p}: no such file (--load takes a Python file that registers rules or passes)")
    spec = importlib.util.spec_from_file_location(f"kiln_plugin_{p.stem}", p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except KilnError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: report it in one line
        raise KilnError(f"{p}: failed to load: {type(e).__name__}: {e}") from None


def _format_optimize(summary: dict) -> str:
    nodes = summary["nodes"]
    lines = [f"{summary['input']} -> {summary['output']}: {nodes['before']} -> {nodes['after']} nodes "
             f"({summary['iterations']} iteration(s) to a fixed point)"]
    if summary["passes"]:
        width = max(len(n) for n in summary["passes"])
        lines.append(f"  {'pass'.ljust(width)}  runs  changes  time")
        for name, s in summary["passes"].items():
            lines.append(f"  {name.ljust(width)}  {s['runs']:>4}  {s['changes']:>7}  {s['seconds'] * 1000:.1f} ms")
    if summary["rules"]:
        lines.append("  rules fired: " + ", ".join(f"{k} x{v}" for k, v in summary["rules"].items()))
    return "\n".join(lines)


def _stage(name: str) -> None:
    print(f"[kiln] {name}", file=sys.stderr, flush=True)


def _optimized(args: argparse.Namespace, target) -> tuple:
    """Import ``args.model``, pin ``--input-shape``, and run ``--level``'s passes for ``target``.

    ``kiln compile`` and ``kiln tune`` share this, so that tuning sees the kernels that
    compilation will build.
    """
    from kiln.check import parse_shape_overrides
    from kiln.ir import load, set_input_shapes
    from kiln.passes import PassManager
    from kiln.passes.pipeline import DEFAULT_COMPILE_LEVEL, passes_for

    level = args.level or DEFAULT_COMPILE_LEVEL
    _stage("importing")
    graph = load(Path(args.model))
    if args.input_shape:
        set_input_shapes(graph, parse_shape_overrides(args.input_shape))
    _stage(f"optimizing ({level})")
    passes = passes_for(level, block=target.layout_block)
    graph, _ = PassManager(passes).run(graph)
    return graph, passes


def _cmd_compile(args: argparse.Namespace) -> int:
    from kiln.codegen.build import build, file_sha256
    from kiln.codegen.target import parse_target

    src, dst = Path(args.model), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise KilnError(f"{dst}: refusing to overwrite the input model; choose another -o")
    target = parse_target(args.target, arch=args.arch, threads=args.threads)
    tuning_db = None
    if args.tune_db:
        from kiln.codegen.tune import TuningDatabase

        tuning_db = TuningDatabase(args.tune_db)
    if args.quantize:
        return _compile_int8(args, target, tuning_db)
    graph, passes = _optimized(args, target)
    report = build(graph, dst, target=target, source_sha256=file_sha256(src), source_name=src.name,
                   passes=[p.describe() for p in passes], progress=_stage, tuning_db=tuning_db)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {report.num_kernels} kernels, "
          f"target {target.tvm.get('mcpu', target.kind)}; {times})")
    if tuning_db is not None:
        info = tuning_db.manifest()
        print(f"tuning database {args.tune_db}: {info['kernels_from_database']} kernels scheduled from it "
              f"({info['kernels_tuned']} tuned, {info['kernels_default_kept']} kept kiln's default); "
              f"sha256 {info['sha256'][:12]}")
    return 0


def _compile_int8(args: argparse.Namespace, target, tuning_db) -> int:
    """``kiln compile --quantize int8``: calibrate, choose layers, compile, and report accuracy."""
    from kiln.calibrate import Budget, QuantizeOptions, QuantizeSession, format_accuracy, format_sensitivity
    from kiln.check import parse_shape_overrides
    from kiln.codegen.build import build, file_sha256, set_manifest_entry
    from kiln.passes import PassManager
    from kiln.passes.pipeline import DEFAULT_COMPILE_LEVEL, passes_for

    if args.quantize != "int8":
        raise KilnError(f"--quantize {args.quantize}: kiln quantizes to int8 only")
    if not args.calib:
        raise KilnError("--quantize int8 needs --calib SAMPLES.npz (arrays keyed by input name, leading sample axis)")
    if target.kind != "cpu":
        raise KilnError("--quantize int8 builds CPU kernels (VNNI); CUDA int8 is not built yet")
    budget = Budget.parse(args.accuracy_budget) if args.accuracy_budget else None
    exclude = tuple(n for part in (args.exclude or []) for n in part.split(",") if n)
    options = QuantizeOptions(args.calib, method=args.calib_method, per_channel=args.per_channel,
                              symmetric=args.symmetric, exclude=exclude, eval=args.eval,
                              sensitivity=args.sensitivity or budget is not None)
    src, dst = Path(args.model), Path(args.output)
    session = QuantizeSession(args.model, options, target, parse_shape_overrides(args.input_shape), say=_stage)
    level = args.level or DEFAULT_COMPILE_LEVEL
    try:
        _stage("importing and preparing the float model")
        session.prepare()
        session.calibrate()
        if options.sensitivity:
            session.measure_sensitivity()
            print("sensitivity (one layer in int8 at a time, most sensitive first):")
            print(format_sensitivity(session.sensitivity))
        if budget is not None:
            session.fit_budget(budget)
        for attempt in range(4):
            graph = session.quantized_graph()
            _stage(f"optimizing ({level})")
            passes = passes_for(level, block=target.layout_block)
            graph, _ = PassManager(passes).run(graph)
            kernels = sum(1 for n in graph.walk_nodes() if n.domain == "kiln" and n.op_type in ("QBlockedConv", "QDense"))
            report = build(graph, dst, target=target, source_sha256=file_sha256(src), source_name=src.name,
                           passes=["quantize", *(p.describe() for p in passes)], progress=_stage,
                           tuning_db=tuning_db)
            accuracy = session.evaluate(dst)
            if budget is None or budget.holds(accuracy) or attempt == 3 or not session.keep_more():
                break
            _stage(f"the compiled model misses {budget} ({budget.metric} {budget.score(accuracy):.4f}); "
                   f"keeping one more layer in float")
        record = session.record(accuracy, budget)
        record["int8_kernels"] = kernels
        set_manifest_entry(dst, "quantization", record)
    finally:
        session.close()
    layers = record["layers"]
    int8 = sum(1 for v in layers.values() if v == "int8")
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {report.num_kernels} kernels, int8: {int8} of "
          f"{len(layers)} layers in {kernels} int8 kernels; calibration {options.method} on {len(session.calib)} "
          f"samples)")
    planned = sum(1 for ly in session.layers if ly.kind != "add" and layers.get(ly.name) == "int8")
    if kernels < planned:
        print(f"kiln: warning: {planned - kernels} of {planned} int8 convs and dense layers did not become int8 "
              f"kernels and run in float", file=sys.stderr)
    kept = list(record["kept_float"].items())
    if kept:
        more = f", and {len(kept) - 12} more (kiln inspect {dst})" if len(kept) > 12 else ""
        print("kept in float: " + ", ".join(f"{n} ({why})" for n, why in kept[:12]) + more)
    print(f"accuracy against the float model on {len(session.held_out)} held-out samples:")
    print(format_accuracy(accuracy))
    if budget is not None and not budget.holds(accuracy):
        print(f"kiln: warning: the compiled model misses the budget {budget} ({budget.metric} "
              f"{budget.score(accuracy):.4f})", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``1h`` or ``1h30m``."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise KilnError(f"--budget '{text}' is not a duration; write e.g. 90s, 30m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _cmd_tune(args: argparse.Namespace) -> int:
    from kiln.codegen.target import parse_target
    from kiln.codegen.tune import tune
    budget = parse_duration(args.budget) if args.budget else None
    if args.trials is not None and args.trials < 1:
        raise KilnError("--trials must be at least 1")
    if budget is None and args.trials is None:
        raise KilnError("give a tuning budget: --budget (e.g. 30m) and/or --trials N")
    target = parse_target(args.target, threads=args.threads)
    graph, _ = _optimized(args, target)
    try:
        with _TuneProgress() as show:
            report = tune(graph, target, args.db, budget_seconds=budget, max_trials=args.trials,
                          max_kernels=args.kernels, on_status=show.update, say=show.say)
    except KeyboardInterrupt:
        print(f"kiln: interrupted; what was measured is kept in {args.db}: run the same command to resume",
              file=sys.stderr)
        return 130
    st = report.status
    default, best = st.model_estimate(st.default_seconds), st.model_estimate(st.best_seconds)
    print(f"tuned {len(st.kernels)} kernels in {args.db}: {st.trials} trials, {st.seconds:.0f} s in all"
          f"{' (resumed)' if report.resumed else ''}; stopped by {report.stopped_by}")
    if default > 0:
        print(f"their time per run: kiln's default {default * 1e3:.3f} ms, best in the database "
              f"{best * 1e3:.3f} ms ({best / default:.2f}x)")
    print(f"compile with: kiln compile {args.model} --tune-db {args.db} -o OUT.kiln"
          + "".join(f" --input-shape {s}" for s in args.input_shape or ()))
    return 0


class _TuneProgress:
    """A progress bar for ``kiln tune``: trials, elapsed time, best estimate and ETA.

    On a terminal it is a live bar; otherwise each update is one plain line.
    """

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = None
        self.task = None

    def __enter__(self) -> "_TuneProgress":
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("tuning"), BarColumn(), TextColumn("{task.fields[text]}"),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("tuning", total=1.0, text="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[kiln] {text}", markup=False, highlight=False)
        else:
            _stage(text)

    def update(self, st) -> None:
        frac = st.fraction
        eta = (st.seconds / frac - st.seconds) if 0 < frac < 1 else 0.0
        best, default = st.model_estimate(st.best_seconds), st.model_estimate(st.default_seconds)
        trials = f"{st.trials}/{st.max_trials}" if st.max_trials else f"{st.trials}"
        text = (f"trials {trials}  elapsed {_clock(st.seconds)}  best {best * 1e3:.3f} ms"
                f" (default {default * 1e3:.3f} ms)  ETA {_clock(eta)}")
        if self.progress is not None:
            self.progress.update(self.task, completed=frac, text=text)
        else:
            _stage(text)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    import kiln.runtime

    model = kiln.runtime.load(args.artifact, threads=args.threads)
    from kiln.check import read_npz

    outputs = model.run(read_npz(args.inputs))
    dst = Path(args.output)
    tmp = dst.with_name(f".{dst.name}.tmp.npz")
    np.savez(tmp, **outputs)
    os.replace(tmp, dst)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in outputs.items())
    print(f"wrote {dst}: {shapes}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kiln.bench import ENGINES, bench
    from kiln.check import parse_shape_overrides

    against = tuple(a.strip() for a in args.against.split(",") if a.strip())
    bad = [a for a in against if a not in ENGINES]
    if bad:
        raise KilnError(f"--against: unknown engine {bad[0]!r}; choose from {', '.join(e for e in ENGINES if e != 'kiln')}")
    if args.artifact and args.tune_db:
        raise KilnError("--tune-db applies when bench compiles the model; an --artifact is already compiled")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise KilnError(f"--batch '{args.batch}' must be integers separated by commas, e.g. 1,8") from None
    reports = []
    for batch in batches:
        report = bench(args.model, artifact=args.artifact, against=against, threads=args.threads, batch=batch,
                       rounds=args.rounds, iterations=args.iterations,
                       input_shapes=parse_shape_overrides(args.input_shape), tune_db=args.tune_db,
                       profile=args.profile)
        print(report.format())
        reports.append(report.to_json())
    if args.json:
        Path(args.json).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    parser = argparse.ArgumentParser(
        prog="kiln", parents=[common],
        description="kiln: an ahead-of-time compiler for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common],
                       help="summarise a model (signature, ops, parameters, MACs) or a .kiln artifact's manifest")
    p.add_argument("model", help="an .onnx file or a .kiln artifact")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "check", parents=[common],
        help="check that kiln imports a model faithfully (round trip and evaluator vs onnxruntime)",
    )
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD",
                   help="concrete sizes for an input with symbolic dims (repeatable)")
    p.add_argument("--inputs", metavar="IN.npz", help="inputs keyed by graph input name (default: seeded random)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--no-evaluator", action="store_true", help="skip the reference-evaluator comparison")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("optimize", parents=[common], help="rewrite a model with kiln's passes and write ONNX")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the optimized model")
    p.add_argument("--level", default="O2", help="optimisation level: O0 to O3 (default O2)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD",
                   help="pin an input's symbolic dims (repeatable); shape computations then fold away")
    p.add_argument("--passes", metavar="A,B", help="run these passes instead of a level")
    p.add_argument("--report", metavar="REPORT.json", help="write node counts, pass times and rule counts as JSON")
    p.add_argument("--explain", metavar="RULE", help="say why RULE did or did not fire")
    p.add_argument("--verify-each", action="store_true", help="run Graph.verify() after every pass")
    p.add_argument("--print-after", action="append", metavar="PASS", help="print the graph after PASS")
    p.add_argument("--load", action="append", metavar="RULES.py",
                   help="a Python file that registers extra rules or passes (repeatable)")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("compile", parents=[common], help="compile a model ahead of time into a .kiln artifact")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.kiln")
    p.add_argument("--target", default="cpu", help="cpu (default; the host's CPU), cuda, or a JSON target dict")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90")
    p.add_argument("--level", help="optimisation level: O0 to O3 (default O3, which adds the blocked layout)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD", help="pin an input's dims (repeatable)")
    p.add_argument("--threads", type=int, help="threads at run time (default: all cores)")
    p.add_argument("--tune-db", metavar="DIR", help="schedule kernels from this tuning database (see kiln tune)")
    q = p.add_argument_group("int8 quantization (see docs/int8.md)")
    q.add_argument("--quantize", choices=["int8"], help="quantize a float model to int8 from calibration samples")
    q.add_argument("--calib", metavar="SAMPLES.npz",
                   help="calibration inputs keyed by input name, with a leading sample axis")
    q.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy"],
                   help="how activation ranges are chosen (default minmax)")
    q.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="one weight scale per output channel (default; --no-per-channel: one per tensor)")
    q.add_argument("--symmetric", action="store_true", help="activation ranges centred on zero")
    q.add_argument("--exclude", action="append", metavar="NODE,...", help="layers to keep in float (repeatable)")
    q.add_argument("--eval", metavar="SAMPLES.npz",
                   help="held-out samples for the accuracy report (default: the last quarter of --calib)")
    q.add_argument("--sensitivity", action="store_true", help="measure and print each layer's int8 error")
    q.add_argument("--accuracy-budget", metavar="METRIC>=X",
                   help="keep the most sensitive layers in float until it holds: argmax>=0.99 or cosine>=0.999")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("tune", parents=[common],
                       help="search faster schedules for a model's kernels into a tuning database")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--db", required=True, metavar="DIR",
                   help="the tuning database (created if missing; a killed run resumes from it)")
    p.add_argument("--budget", metavar="TIME", help="time for this model in this database, e.g. 30m (counts earlier runs)")
    p.add_argument("--trials", type=int, help="measured candidates for this model in this database (counts earlier runs)")
    p.add_argument("--kernels", type=int, help="tune only the N heaviest kernels")
    p.add_argument("--target", default="cpu", help="cpu (default: the host's CPU) or a JSON llvm target dict")
    p.add_argument("--level", help="optimisation level, as for kiln compile (default O3)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD",
                   help="pin an input's dims (tuning needs static shapes; use the same pins for compile)")
    p.add_argument("--threads", type=int, help="threads the kernels run with (default: all cores)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("run", parents=[common], help="run a .kiln artifact on inputs from an .npz file")
    p.add_argument("artifact", help="a .kiln file (it contains native code: only run trusted artifacts)")
    p.add_argument("--inputs", required=True, metavar="IN.npz", help="arrays keyed by input name")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="where to write the outputs")
    p.add_argument("--threads", type=int, help="threads (default: all cores)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", parents=[common],
                       help="time kiln against onnxruntime (and TVM's own pipeline), alternating, one process each")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--artifact", metavar="A.kiln", help="a compiled artifact (default: compile the model first)")
    p.add_argument("--against", default="onnxruntime", help="baselines: onnxruntime, tvm (comma-separated)")
    p.add_argument("--batch", default="1", help="batch sizes for a symbolic batch dim, e.g. 1,8")
    p.add_argument("--threads", type=int, help="threads for every engine (default: all cores)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    p.add_argument("--iterations", type=int, default=5, help="timed runs per engine per round (default 5)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD", help="pin an input's dims (repeatable)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--tune-db", metavar="DIR", help="compile with this tuning database (see kiln tune)")
    p.add_argument("--profile", action="store_true", help="also print kiln's time per kernel (VM instrument hook)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KilnError as e:
        if args.debug:
            traceback.print_exc()
        print(f"kiln: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a raw traceback
        if args.debug:
            traceback.print_exc()
        print(
            f"kiln: internal error: {type(e).__name__}: {_one_line(str(e))} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
