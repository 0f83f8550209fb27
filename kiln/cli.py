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
from typing import Any, Callable, Sequence

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

    graph, unevaluable = load_with_report(args.model)
    summary = summarize(graph, unevaluable)
    if not unevaluable:
        from kiln.codegen.lowering import uncompilable

        summary.cannot_compile = uncompilable(graph)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.format())
    if unevaluable:
        raise UnsupportedOpError(format_unsupported(unevaluable, str(args.model)), unevaluable)
    return 0


def _inspect_artifact(args: argparse.Namespace) -> int:
    """``kiln inspect OUT.kiln``: the verified manifest (hashes checked; not the host)."""
    from kiln.runtime.artifact import describe, read_artifact

    art = read_artifact(args.model, check_host=False, trusted=[])  # inspecting runs nothing: no trust policy
    if args.json:
        signer = None if art.signer is None else {"key_id": art.signer.key_id, "signer": art.signer.name}
        print(json.dumps({**art.manifest, "signature": signer}, indent=2, sort_keys=True))
    else:
        print(describe(art.manifest, art.signer))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from kiln.check import check_model, parse_shape_overrides, read_npz

    if args.artifact and (args.level or args.passes):
        raise KilnError("--artifact is already compiled: --level and --passes apply when check compiles the model")
    if args.no_compile and (args.artifact or args.bisect):
        raise KilnError("--no-compile checks the import only; it takes neither --artifact nor --bisect")
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not value >= 0:
            raise KilnError(f"{flag} must be a number >= 0, not {value}")
    report = check_model(
        args.model, artifact=args.artifact, compile=not args.no_compile, level=args.level, passes=args.passes,
        input_shapes=parse_shape_overrides(args.input_shape), inputs=read_npz(args.inputs) if args.inputs else None,
        inputs_from=args.inputs, seed=args.seed, use_evaluator=not args.no_evaluator, rtol=args.rtol, atol=args.atol,
        bisect=args.bisect, progress=_stage,
    )
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.passed else EXIT_MISMATCH


def _cmd_optimize(args: argparse.Namespace) -> int:
    from kiln.check import parse_shape_overrides
    from kiln.driver import DEFAULT_OPTIMIZE_LEVEL, load_model, optimize
    from kiln.ir import save_onnx

    for plugin in args.load or ():
        _load_plugin(plugin)
    _check_rule_name(args.explain)
    src, dst = Path(args.model), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise KilnError(f"{dst}: refusing to overwrite the input model; choose another -o")
    graph = load_model(src, parse_shape_overrides(args.input_shape))
    graph, report = optimize(graph, args.level, passes=args.passes, verify_each=args.verify_each,
                             print_after=args.print_after or ())
    save_onnx(graph, dst)
    summary = {
        "input": str(src), "output": str(dst), "level": None if args.passes else (args.level or DEFAULT_OPTIMIZE_LEVEL),
        "nodes": {"before": report.nodes_before, "after": report.nodes_after},
        "iterations": report.iterations,
        "passes": {n: {"runs": s.runs, "changes": s.changes, "seconds": round(s.seconds, 6)}
                   for n, s in report.stats.items()},
        "rules": dict(sorted(report.rule_counts().items())),
    }
    print(_format_optimize(summary))
    if args.explain:
        print(report.explain(args.explain))
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _check_rule_name(name: str | None) -> None:
    """Refuse ``--explain`` of an unknown rule before any work is done."""
    if name is None:
        return
    from kiln.passes import RULES

    if name not in RULES:
        raise KilnError(f"no rule named '{name}'; known rules: {', '.join(sorted(RULES))}")


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


def _print_symbolic_dims(result: Any) -> None:
    """Say which input dims stayed symbolic, and the ``--input-shape`` flags that would pin them."""
    dims = result.symbolic_dims()
    if not dims:
        return
    named_by_kiln = {(n, i) for n, pairs in result.named_dims.items() for i, _ in pairs}
    listed = ", ".join(f"{n}[{i}] as {d}" + (" (unnamed in the model)" if (n, i) in named_by_kiln else "")
                       for n, i, d in dims)
    from kiln.codegen.build import pin_flags

    flags = pin_flags([v for v in result.graph.inputs if any(n == v.name for n, _, _ in dims)])
    print(f"symbolic dims: {listed}; the artifact runs at any size of them. Pinning them "
          f"({flags}, each ? a size) lets kiln specialise its kernels for speed")


def _cmd_compile(args: argparse.Namespace) -> int:
    from kiln.check import parse_shape_overrides
    from kiln.driver import compile as compile_model

    _check_rule_name(args.explain)
    _check_job_flags(args)
    if args.report:
        from kiln.report import check_output

        check_output(args.report, args.model, args.output)
        if args.target != "cpu":
            raise KilnError("--report profiles the artifact on this machine's CPU; it takes --target cpu")
    result = compile_model(args.model, args.output, target=args.target, arch=args.arch, threads=args.threads,
                           level=args.level, passes=args.passes, input_shapes=parse_shape_overrides(args.input_shape),
                           tune_db=args.tune_db, quantize=_quantize_options(args), prune=_prune_options(args),
                           precision=args.precision, eval=args.eval if args.precision != "fp32" else None,
                           sign_key=args.sign,
                           signer=args.signer, progress=_stage)
    dst, report, target = result.path, result.build, result.target
    code = 0
    if result.quantization is not None and result.quantization.get("dynamic"):
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {report.num_kernels} kernels, target "
              f"{target.tvm.get('mcpu', target.kind)})")
        code = _print_dynamic(result.quantization)
    elif result.quantization is None:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {report.num_kernels} kernels, "
              f"target {target.tvm.get('mcpu', target.kind)}; {times})")
    else:
        code = _print_int8(result, args)
    if result.precision is not None:
        _print_precision(result.precision)
    _print_compression(result)
    _print_symbolic_dims(result)
    if result.tuning is not None:
        info = result.tuning
        print(f"tuning database {args.tune_db}: {info['kernels_from_database']} kernels scheduled from it "
              f"({info['kernels_tuned']} tuned, {info['kernels_default_kept']} kept kiln's default); "
              f"sha256 {info['sha256'][:12]}")
    if result.signer is not None:
        print(f"signed by {result.signer}")
    if args.explain:
        print(result.pipeline.explain(args.explain))
    if args.report:
        from kiln.report import write_report

        page, _ = write_report(args.model, args.report, compiled=result, input_shapes=parse_shape_overrides(
            args.input_shape), progress=_stage)
        print(f"wrote {page}")
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from kiln.check import parse_shape_overrides, read_npz
    from kiln.report import write_report

    if args.artifact and (args.level or args.passes):
        raise KilnError("--artifact is already compiled: --level and --passes apply when report compiles the model")
    page, data = write_report(args.model, args.output, artifact=args.artifact, level=args.level, passes=args.passes,
                              input_shapes=parse_shape_overrides(args.input_shape),
                              inputs=read_npz(args.inputs) if args.inputs else None, check=args.check,
                              progress=_stage)
    kernels = data.kernels
    slowest = f"; slowest kernel {kernels[0].name} ({100 * kernels[0].share:.0f}%)" if kernels else ""
    verdict = "" if data.check is None else f"; check {'passed' if data.check['passed'] else 'MISMATCH'}"
    print(f"wrote {page} ({page.stat().st_size / 1e3:.0f} KB: {len(data.runs)} pass runs, {len(kernels)} kernels"
          f"{slowest}{verdict})")
    return 0 if data.check is None or data.check["passed"] else EXIT_MISMATCH


def _cmd_sign(args: argparse.Namespace) -> int:
    from kiln.runtime.artifact import sign_artifact

    art = sign_artifact(args.artifact, args.key, args.signer, output=args.output)
    print(f"signed {art.path} by {art.signer}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from kiln.runtime.signing import generate_key, key_id, load_public_key

    private, public = generate_key(args.key)
    print(f"wrote {private} (private: keep it secret) and {public} (public: give it to kiln run --trust); "
          f"key {key_id(load_public_key(public))}")
    return 0


def _check_job_flags(args: argparse.Namespace) -> None:
    """Refuse a compression job's flag given without its job, rather than ignore it."""
    job = args.quantize or args.prune_channels is not None or args.precision != "fp32"
    if args.eval and not job:
        raise KilnError("--eval reports the accuracy of --quantize, --prune-channels or --precision bf16 against "
                        "the float model; a plain compile changes no numbers to report")
    if args.calib and not (args.quantize == "int8" or (args.prune_channels is not None and args.accuracy_budget)):
        raise KilnError("--calib gives --quantize int8 its calibration samples (or --prune-channels "
                        "--accuracy-budget its samples to measure on); it does nothing here")


def _quantize_options(args: argparse.Namespace):
    """``--quantize int8`` and its flags as :class:`kiln.quantize.QuantizeOptions` (None without it)."""
    if not args.quantize:
        return None
    from kiln.quantize import Budget, DynamicQuantizeOptions, QuantizeOptions

    if args.quantize == "int8-dynamic":
        if args.calib or args.accuracy_budget or args.exclude or args.sensitivity:
            raise KilnError("--quantize int8-dynamic needs no calibration: it takes --eval SAMPLES.npz, not --calib, "
                            "--accuracy-budget, --exclude or --sensitivity")
        return DynamicQuantizeOptions(eval=args.eval)

    if not args.calib:
        raise KilnError("--quantize int8 needs --calib SAMPLES.npz (arrays keyed by input name, leading sample axis)")
    budget = Budget.parse(args.accuracy_budget) if args.accuracy_budget else None
    exclude = tuple(n for part in (args.exclude or []) for n in part.split(",") if n)
    return QuantizeOptions(args.calib, method=args.calib_method, per_channel=args.per_channel,
                           symmetric=args.symmetric, exclude=exclude, eval=args.eval,
                           sensitivity=args.sensitivity or budget is not None, budget=budget)


def _prune_options(args: argparse.Namespace):
    """``--prune-channels RATIO`` and its flags as :class:`kiln.quantize.PruneOptions` (None without it)."""
    if args.prune_channels is None:
        if args.accuracy_budget and not args.quantize:
            raise KilnError("--accuracy-budget steers --quantize int8 or --prune-channels; give one of them")
        return None
    from kiln.quantize import Budget, PruneOptions

    budget = Budget.parse(args.accuracy_budget) if args.accuracy_budget else None
    if budget is not None and not args.calib:
        raise KilnError("--prune-channels with --accuracy-budget needs --calib SAMPLES.npz to measure it on "
                        "(arrays keyed by input name, leading sample axis)")
    return PruneOptions(args.prune_channels, norm=args.prune_norm, eval=args.eval, budget=budget, calib=args.calib)


def _print_compression(result) -> None:
    """The compression line (every compile), and pruning's record and accuracy when it ran."""
    from kiln.runtime.artifact import accuracy_lines, compression_line

    entry = result.compression
    if not entry:
        return
    print(compression_line(entry))
    prune = entry.get("pruning")
    if prune:
        print(f"pruned {prune['removed_channels']} channels from {prune['groups']} channel groups "
              f"({prune['fraction']:.1%} of each, {prune['norm']} importance; see kiln inspect for the groups kept)")
        if "budget" in prune:
            kept = prune.get("kept_whole") or []
            print(f"accuracy budget {prune['budget']} on {prune['budget_samples']} samples: {len(kept)} sensitive "
                  f"groups kept whole; pruned model scores {prune['score']:.5f} (every group alike: "
                  f"{prune['uniform_score']:.5f}); planned MAC cut {prune.get('planned_mac_rate', 0):.1%}")
    for line in accuracy_lines(entry.get("accuracy"), f"against the unpruned model on {entry.get('accuracy_samples')} "
                                                      f"samples"):
        print(line)


def _print_precision(record: dict) -> None:
    """The ``--precision bf16`` report: the convs in bf16, those kept in float32, accuracy."""
    from kiln.runtime.artifact import accuracy_lines

    kept = record["kept_float"]
    mb = record["bf16_weight_bytes"] / 1e6
    print(f"bf16: {record['bf16_convs']} convs and {record['bf16_dense']} dense layers on vdpbf16ps (bf16 inputs "
          f"and weights, float32 sums; their weights "
          f"{mb:.1f} MB, {2 * mb:.1f} MB in float32); {len(kept)} kept in float32"
          + (f" ({'; '.join(sorted(set(kept.values())))})" if kept else ""))
    for line in accuracy_lines(record.get("accuracy"), f"against the float model on {record.get('accuracy_samples')} "
                                                        f"samples"):
        print(line)


def _print_dynamic(record: dict) -> int:
    """The ``--quantize int8-dynamic`` report: layers and kernels, what stayed float, accuracy."""
    from kiln.runtime.artifact import accuracy_lines

    layers = record["layers"]
    int8 = sum(1 for v in layers.values() if v == "int8")
    print(f"dynamic int8: {int8} of {len(layers)} layers in {record['int8_kernels']} int8 kernels "
          f"({record['scheme']['weights']})")
    if record["int8_kernels"] < int8:
        print(f"kiln: warning: {int8 - record['int8_kernels']} of {int8} quantized layers did not become int8 "
              f"kernels", file=sys.stderr)
    for line in accuracy_lines(record.get("accuracy"), f"against the float model on {record.get('accuracy_samples')} "
                                                        f"samples"):
        print(line)
    return 0


def _print_int8(result, args: argparse.Namespace) -> int:
    """The ``--quantize int8`` report: layers and kernels, what stayed float, accuracy; 1 if the budget missed."""
    from kiln.quantize import format_accuracy, format_sensitivity

    record, extra, dst = result.quantization, result.extra, result.path
    if extra["sensitivity"]:
        print("sensitivity (one layer in int8 at a time, most sensitive first):")
        print(format_sensitivity(extra["sensitivity"]))
    layers, kernels = record["layers"], record["int8_kernels"]
    int8 = sum(1 for v in layers.values() if v == "int8")
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {result.build.num_kernels} kernels, int8: {int8} of "
          f"{len(layers)} layers in {kernels} int8 kernels; calibration {args.calib_method} on "
          f"{extra['calib_samples']} samples)")
    planned = extra["planned_kernels"]
    if kernels < planned:
        print(f"kiln: warning: {planned - kernels} of {planned} int8 convs and dense layers did not become int8 "
              f"kernels and run in float", file=sys.stderr)
    kept = list(record["kept_float"].items())
    if kept:
        more = f", and {len(kept) - 12} more (kiln inspect {dst})" if len(kept) > 12 else ""
        print("kept in float: " + ", ".join(f"{n} ({why})" for n, why in kept[:12]) + more)
    print(f"accuracy against the float model on {extra['held_out_samples']} held-out samples:")
    print(format_accuracy(extra["accuracy"]))
    budget = extra["budget"]
    if budget is not None and not budget.holds(extra["accuracy"]):
        print(f"kiln: warning: the compiled model misses the budget {budget} ({budget.metric} "
              f"{budget.score(extra['accuracy']):.4f})", file=sys.stderr)
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
    from kiln.check import parse_shape_overrides
    from kiln.codegen.target import parse_target
    from kiln.codegen.tune import RPCTracker, tune
    from kiln.driver import load_model, optimize_for

    if args.rpc_key and not args.rpc:
        raise KilnError("--rpc-key goes with --rpc HOST:PORT (the RPC tracker)")
    rpc = RPCTracker.parse(args.rpc, args.rpc_key) if args.rpc else None
    budget = parse_duration(args.budget) if args.budget else None
    if args.trials is not None and args.trials < 1:
        raise KilnError("--trials must be at least 1")
    if budget is None and args.trials is None:
        raise KilnError("give a tuning budget: --budget (e.g. 30m) and/or --trials N")
    target = parse_target(args.target, threads=args.threads)
    _stage("importing")
    graph = load_model(args.model, parse_shape_overrides(args.input_shape))
    graph, _, _ = optimize_for(graph, target, args.level, progress=_stage)
    try:
        with _TuneProgress() as show:
            report = tune(graph, target, args.db, budget_seconds=budget, max_trials=args.trials,
                          max_kernels=args.kernels, on_status=show.update, say=show.say, rpc=rpc)
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

    model = kiln.runtime.load(args.artifact, threads=args.threads, trusted_keys=args.trust)
    from kiln.check import read_npz

    outputs = model.run(read_npz(args.inputs))
    dst = Path(args.output)
    tmp = dst.with_name(f".{dst.name}.tmp.npz")
    np.savez(tmp, **outputs)
    os.replace(tmp, dst)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in outputs.items())
    print(f"wrote {dst}: {shapes}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kiln.serve import options_from_args, serve

    serve(args.artifact, options_from_args(args))
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from kiln.batch import batch_from_args, format_report

    print(format_report(batch_from_args(args)))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kiln.bench import ENGINES, OTHER_ARTIFACT, bench
    from kiln.check import parse_shape_overrides, read_npz

    against = tuple(a.strip() for a in args.against.split(",") if a.strip())
    bad = [a for a in against if a not in ENGINES and not a.startswith(OTHER_ARTIFACT)]
    if bad:
        raise KilnError(f"--against: unknown engine {bad[0]!r}; choose from {', '.join(e for e in ENGINES if e != 'kiln')}, "
                        f"or {OTHER_ARTIFACT}OTHER.kiln")
    for a in against:
        if a.startswith(OTHER_ARTIFACT) and not Path(a[len(OTHER_ARTIFACT):]).is_file():
            raise KilnError(f"--against {a}: no such artifact")
    if args.artifact and args.tune_db:
        raise KilnError("--tune-db applies when bench compiles the model; an --artifact is already compiled")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise KilnError(f"--batch '{args.batch}' must be integers separated by commas, e.g. 1,8") from None
    if args.inputs and batches != [1]:
        raise KilnError("--inputs gives the feeds, batch included; it takes no --batch")
    inputs = read_npz(args.inputs) if args.inputs else None
    reports = []
    for batch in batches:
        report = bench(args.model, artifact=args.artifact, against=against, threads=args.threads, batch=batch,
                       rounds=args.rounds, iterations=args.iterations,
                       input_shapes=parse_shape_overrides(args.input_shape), tune_db=args.tune_db,
                       profile=args.profile, inputs=inputs)
        print(report.format())
        reports.append(report.to_json())
    if args.json:
        Path(args.json).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
    return 0


def _parent(*add: Callable[[argparse.ArgumentParser], object]) -> argparse.ArgumentParser:
    """A parent parser holding one shared option (each verb that takes it lists the parent)."""
    parent = argparse.ArgumentParser(add_help=False)
    for fn in add:
        fn(parent)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = _parent(lambda p: p.add_argument("--debug", action="store_true", help="show tracebacks for errors"))
    shapes = _parent(lambda p: p.add_argument(
        "--input-shape", action="append", metavar="NAME=DxDxD",
        help="an input's dims, ints or names for symbolic dims (repeatable); pinning them lets shape "
             "computations fold away, and a name frees a dim the model fixed at export; a sequence input is "
             "pinned as NAME=N*DxD (N tensors of DxD) or NAME=DxD,DxD (one shape per element)"))
    threads = _parent(lambda p: p.add_argument("--threads", type=int, help="threads at run time (default: all cores)"))
    level = _parent(lambda p: p.add_argument(
        "--level", help="optimisation level O0..O3 (default O3, which adds the blocked layout; kiln optimize: O2)"))
    passes = _parent(lambda p: p.add_argument(
        "--passes", metavar="SPECS", help='run these passes instead of a level, e.g. "fold-constants,layout{block=8},dce"'))
    explain = _parent(lambda p: p.add_argument(
        "--explain", metavar="RULE", help="say how often RULE fired in each pass of the run, or its nearest miss"))

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
        "check", parents=[common, shapes, level, passes],
        help="compare the compiled model, kiln's evaluator and the ONNX round trip with onnxruntime, output by output",
    )
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--artifact", metavar="A.kiln", help="check this artifact, built from MODEL (default: compile MODEL)")
    p.add_argument("--inputs", metavar="IN.npz", help="inputs keyed by graph input name (default: seeded random)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--rtol", type=float,
                   help="relative tolerance of the evaluator and the artifact (default 1e-4 and 1e-3)")
    p.add_argument("--atol", type=float,
                   help="absolute tolerance of the evaluator and the artifact (default 1e-5 and 1e-4)")
    p.add_argument("--json", metavar="OUT.json", help="write every figure as JSON")
    p.add_argument("--bisect", action="store_true",
                   help="when the artifact disagrees, name the pass, rule, node and kernel whose output departs")
    p.add_argument("--no-compile", action="store_true", help="check the import only (round trip and evaluator)")
    p.add_argument("--no-evaluator", action="store_true", help="skip the reference-evaluator comparison")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("optimize", parents=[common, level, shapes, passes, explain],
                       help="rewrite a model with kiln's passes and write ONNX")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the optimized model")
    p.add_argument("--report", metavar="REPORT.json", help="write node counts, pass times and rule counts as JSON")
    p.add_argument("--verify-each", action="store_true", help="run Graph.verify() after every pass")
    p.add_argument("--print-after", action="append", metavar="PASS", help="print the graph after PASS")
    p.add_argument("--load", action="append", metavar="RULES.py",
                   help="a Python file that registers extra rules or passes (repeatable)")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("compile", parents=[common, level, shapes, threads, passes, explain],
                       help="compile a model ahead of time into a .kiln artifact")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.kiln")
    p.add_argument("--target", default="cpu", help="cpu (default; the host's CPU), cuda, or a JSON target dict")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90")
    p.add_argument("--tune-db", metavar="DIR", help="schedule kernels from this tuning database (see kiln tune)")
    p.add_argument("--sign", metavar="KEY.pem", help="sign the artifact with this ed25519 private key (see kiln keygen)")
    p.add_argument("--signer", default="", help="a name recorded with the signature (with --sign)")
    p.add_argument("--report", metavar="REPORT.html",
                   help="also write the HTML report: passes, rules, graphs, kernels (see docs/check-and-report.md)")
    q = p.add_argument_group("int8 quantization (see docs/int8.md)")
    q.add_argument("--quantize", choices=["int8", "int8-dynamic"],
                   help="int8: static, from calibration samples (--calib); int8-dynamic: int8 weights, activations "
                        "quantized on every call (no samples)")
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
                   help="keep the most sensitive layers in float (with --prune-channels: whole) until it holds: "
                        "argmax>=0.99 or cosine>=0.999")
    q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: convs with bf16 inputs and weights and float32 sums (AVX-512 BF16); --eval "
                        "SAMPLES.npz reports the accuracy against the float model")
    c = p.add_argument_group("structured pruning (see docs/compression.md)")
    c.add_argument("--prune-channels", type=float, metavar="RATIO",
                   help="remove the least important conv and dense channels until the MACs fall by RATIO (0..1); "
                        "--eval SAMPLES.npz reports the accuracy against the unpruned model")
    c.add_argument("--prune-norm", default="l1", choices=["l1", "l2"],
                   help="a channel's importance: the L1 (default) or L2 norm of its filters")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("tune", parents=[common, level, shapes, threads],
                       help="search faster schedules for a model's kernels into a tuning database")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--db", required=True, metavar="DIR",
                   help="the tuning database (created if missing; a killed run resumes from it)")
    p.add_argument("--budget", metavar="TIME", help="time for this model in this database, e.g. 30m (counts earlier runs)")
    p.add_argument("--trials", type=int, help="measured candidates for this model in this database (counts earlier runs)")
    p.add_argument("--kernels", type=int, help="tune only the N heaviest kernels")
    p.add_argument("--target", default="cpu", help="cpu (default: the host's CPU) or a JSON llvm target dict")
    p.add_argument("--rpc", metavar="HOST:PORT",
                   help="measure on the runners of this TVM RPC tracker (building stays here; docs/tuning.md)")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the RPC servers registered with (with --rpc)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("run", parents=[common, threads], help="run a .kiln artifact on inputs from an .npz file")
    p.add_argument("artifact", help="a .kiln file (it contains native code: only run trusted artifacts)")
    p.add_argument("--inputs", required=True, metavar="IN.npz", help="arrays keyed by input name")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="where to write the outputs")
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="load only an artifact signed by this public key (file or folder; repeatable; "
                        "default: $KILN_TRUSTED_KEYS)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sign", parents=[common], help="sign a .kiln artifact with an ed25519 private key")
    p.add_argument("artifact", help="a .kiln file (signed in place unless -o is given)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="the ed25519 private key (see kiln keygen)")
    p.add_argument("--signer", default="", help="a name recorded with the signature")
    p.add_argument("-o", "--output", metavar="OUT.kiln", help="write the signed artifact here instead")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("keygen", parents=[common], help="make an ed25519 key pair for signing artifacts")
    p.add_argument("key", help="where to write the private key (PEM); the public key goes beside it as .pub")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("report", parents=[common, level, shapes, passes],
                       help="write one HTML page on what kiln did to a model: passes, rules, graphs, kernel profile")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="REPORT.html", help="where to write the page")
    p.add_argument("--artifact", metavar="A.kiln", help="report on this artifact, built from MODEL (default: compile it)")
    p.add_argument("--inputs", metavar="IN.npz", help="inputs for the profile and the check (default: seeded random)")
    p.add_argument("--check", action="store_true", help="also run kiln check on the artifact and show the result")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", parents=[common, shapes, threads],
                       help="time kiln against onnxruntime (OpenVINO, TVM's own pipeline), alternating, one process each")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--artifact", metavar="A.kiln", help="a compiled artifact (default: compile the model first)")
    p.add_argument("--against", default="onnxruntime",
                   help="baselines: onnxruntime, openvino, tvm, or kiln:OTHER.kiln (another artifact of the model, "
                        "e.g. the unpruned one; comma-separated)")
    p.add_argument("--batch", default="1", help="batch sizes for a symbolic batch dim, e.g. 1,8")
    p.add_argument("--inputs", metavar="IN.npz", help="the feeds every engine runs, keyed by graph input name "
                                                      "(default: seeded random at --batch)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    p.add_argument("--iterations", type=int, default=5, help="timed runs per engine per round (default 5)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--tune-db", metavar="DIR", help="compile with this tuning database (see kiln tune)")
    p.add_argument("--profile", action="store_true", help="also print kiln's time per kernel (VM instrument hook)")
    p.set_defaults(func=_cmd_bench)

    from kiln.batch import add_batch_arguments
    from kiln.serve.options import add_serve_arguments

    p = sub.add_parser("serve", parents=[common, threads],
                       help="serve a .kiln artifact over HTTP (FastAPI, uvicorn) with dynamic batching")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("batch", parents=[common, threads],
                       help="run a .kiln artifact over a file of samples (npz, Parquet), here or on Ray")
    add_batch_arguments(p)
    p.set_defaults(func=_cmd_batch)
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
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`kiln inspect MODEL | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
