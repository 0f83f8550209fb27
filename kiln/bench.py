"""``kiln bench``: kiln against baselines on the same seeded input, fairly.

Each engine runs in its own worker process, so no two thread pools share a
process. After a warm-up, the parent asks the workers for timed runs in turn,
one engine at a time (A B A B ...), for several rounds, and reports per engine
the median latency, its spread (10th to 90th percentile), the throughput and
the ratio kiln / baseline. onnxruntime runs with ``ORT_ENABLE_ALL``, the same
thread count, and spin-waiting off, so an idle worker never holds a core.

Engines: ``kiln`` (an artifact), ``onnxruntime``, ``openvino`` (its CPU plugin, fp32, the
latency hint, the same thread count, the model reshaped to the feeds' static shapes as its
users do for latency; ``pip install 'kiln-compiler[bench]'``), and ``tvm`` (TVM's own
``from_onnx`` + default ``tvm.compile`` pipeline, untuned).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.cpu import host_cpu_name

ENGINES = ("kiln", "onnxruntime", "openvino", "tvm")
#: An engine named ``kiln:PATH`` runs another artifact of the same model (the unpruned one, say).
OTHER_ARTIFACT = "kiln:"


@dataclass
class EngineResult:
    """Latencies of one engine, in seconds, and the figures derived from them."""

    engine: str
    latencies: list[float] = field(default_factory=list)
    pid: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1e3

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3


def _worker(conn: Any, engine: str, spec: dict) -> None:
    """One engine in its own process: load it, then time runs on request."""
    threads = spec["threads"]
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        feeds = {k: np.asarray(v) for k, v in spec["feeds"].items()}
        run = _load_engine(engine, spec, feeds)
        run()  # first call outside the timings
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            times = []
            for _ in range(msg[1]):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            conn.send(("times", times))
    except Exception as e:  # noqa: BLE001 - report the engine's failure to the parent in one line
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    finally:
        conn.close()


def _load_engine(engine: str, spec: dict, feeds: dict[str, np.ndarray]) -> Any:
    if engine == "kiln" or engine.startswith(OTHER_ARTIFACT):
        import kiln.runtime

        path = spec["artifact"] if engine == "kiln" else engine[len(OTHER_ARTIFACT):]
        model = kiln.runtime.load(path, threads=spec["threads"])
        return lambda: model.run(feeds)
    if engine == "onnxruntime":
        from kiln.ir.oracle import onnxruntime_session

        session = onnxruntime_session(spec["model"], threads=spec["threads"], spinning=False)
        return lambda: session.run(None, feeds)
    if engine == "openvino":
        return _openvino(spec["model"], feeds, spec["threads"])
    if engine == "tvm":
        from kiln.codegen.baseline import tvm_pipeline

        return tvm_pipeline(spec["model"], feeds, spec["threads"])
    raise KilnError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")


def _openvino(model: str, feeds: dict[str, np.ndarray], threads: int) -> Any:
    """An OpenVINO CPU infer request on ``model`` at the feeds' shapes; returns its run function."""
    try:
        import openvino as ov
    except ImportError:
        raise KilnError("the openvino engine needs OpenVINO: pip install 'kiln-compiler[bench]'") from None
    core = ov.Core()
    net = core.read_model(model)
    names = {p.get_any_name() for p in net.inputs}
    net.reshape({k: ov.PartialShape(list(v.shape)) for k, v in feeds.items() if k in names})
    compiled = core.compile_model(net, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                               "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    inputs = {k: v for k, v in feeds.items() if k in names}
    return lambda: request.infer(inputs)


@dataclass
class BenchReport:
    """The results of one benchmark."""

    model: str
    threads: int
    rounds: int
    iterations: int
    batch: int
    results: dict[str, EngineResult]
    kernels: list[Any] = field(default_factory=list)  # kiln's kernels (report.profile.KernelRow), if profiled
    peak: Any = None  # the practical peak their GFLOP/s are a share of (report.profile.Peak)
    kernels_note: str = ""

    def ratio(self, baseline: str) -> float | None:
        if "kiln" not in self.results or baseline not in self.results:
            return None
        return self.results["kiln"].median_ms / self.results[baseline].median_ms

    def to_json(self) -> dict:
        return {
            "model": self.model, "threads": self.threads, "rounds": self.rounds, "iterations": self.iterations,
            "batch": self.batch, "isolation": "one process per engine; onnxruntime spinning off",
            "cpu": host_cpu_name(),
            "engines": {
                name: {"median_ms": r.median_ms, "p10_ms": r.percentile_ms(10), "p90_ms": r.percentile_ms(90),
                       "throughput_per_s": self.batch / (r.median_ms / 1e3), "samples": len(r.latencies),
                       "pid": r.pid}
                for name, r in self.results.items()
            },
            "ratios": {f"kiln/{b}": self.ratio(b) for b in self.results if b != "kiln"},
            "kernels": [{"name": k.name, "calls": k.calls, "ms": k.ms, "gflops": k.gflops, "peak_share": k.peak_share}
                        for k in self.kernels],
            "peak_gflops": self.peak.gflops if self.peak is not None else None,
        }

    def format(self) -> str:
        lines = [f"{self.model}: batch {self.batch}, {self.threads} thread(s), {self.rounds} alternating rounds x "
                 f"{self.iterations} runs; each engine in its own process, onnxruntime spinning off"]
        lines.append(f"  {'engine':<12} {'median':>10} {'p10..p90':>20} {'throughput':>14}")
        for name, r in self.results.items():
            spread = f"{r.percentile_ms(10):.2f}..{r.percentile_ms(90):.2f} ms"
            lines.append(f"  {name:<12} {r.median_ms:>7.2f} ms {spread:>20} {self.batch / (r.median_ms / 1e3):>10.1f} /s")
        for b in self.results:
            if b != "kiln" and self.ratio(b) is not None:
                lines.append(f"  kiln / {b}: {self.ratio(b):.3f}")
        if self.kernels:
            lines.append(format_kernels(self.kernels, self.peak, self.kernels_note))
        return "\n".join(lines)


def format_kernels(kernels: list[Any], peak: Any = None, note: str = "", top: int = 15) -> str:
    """kiln's per-kernel profile as a table (``report.profile.KernelRow``s): the ``top`` slowest, with
    their GFLOP/s and share of ``peak`` where their FLOPs are known, then the rest summed."""
    total = sum(k.ms for k in kernels) or 1.0
    lines = [f"  kiln per kernel (VM instrument hook; {total:.2f} ms per run in all"
             + (f"; peak {peak.gflops:.0f} GFLOP/s: {peak.how}" if peak is not None else "") + "):",
             f"    {'ms/run':>8} {'share':>6} {'calls':>5} {'GFLOP/s':>8} {'of peak':>7}  kernel"]
    for k in kernels[:top]:
        rate = f"{k.gflops:8.1f}" if k.gflops else f"{'':8}"
        share = f"{k.peak_share:7.0%}" if k.peak_share else f"{'':7}"
        lines.append(f"    {k.ms:8.3f} {k.ms / total:6.1%} {k.calls:5d} {rate} {share}  {k.name}")
    rest = kernels[top:]
    if rest:
        ms = sum(k.ms for k in rest)
        lines.append(f"    {ms:8.3f} {ms / total:6.1%} {sum(k.calls for k in rest):5d} {'':8} {'':7}  "
                     f"({len(rest)} more kernels)")
    if note:
        lines.append(f"  ({note})")
    return "\n".join(lines)


def bench(
    model: str | os.PathLike,
    *,
    artifact: str | os.PathLike | None = None,
    against: tuple[str, ...] = ("onnxruntime",),
    threads: int | None = None,
    batch: int = 1,
    rounds: int = 10,
    iterations: int = 5,
    warmup: int = 3,
    input_shapes: dict[str, tuple[int | str, ...]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    tune_db: str | os.PathLike | None = None,
    profile: bool = False,
) -> BenchReport:
    """Benchmark kiln (compiling ``model`` if no ``artifact`` is given) against ``against``.

    Every engine runs the same feeds: ``inputs`` when given (silero's sample rate must be a
    real one), else seeded random inputs at ``batch``. ``tune_db`` compiles with that tuning
    database; ``profile`` adds kiln's per-kernel times, taken after the timed rounds.
    """
    from kiln.driver import load_model
    from kiln.ir.oracle import seeded_inputs

    threads = threads or os.cpu_count() or 1
    graph = load_model(model, input_shapes)
    sizes = {v.name: tuple(batch if not isinstance(d, int) and i == 0 else d for i, d in enumerate(v.shape or ()))
             for v in graph.inputs}
    feeds = dict(inputs) if inputs is not None else seeded_inputs(graph, sizes, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        baseline_model = str(model)
        if input_shapes and _frees_a_static_dim(model, graph):
            # a dim fixed at export (batch 1) was freed: the baselines get the same model with that
            # dim free too (kiln's export of the graph, its hard-coded Reshape targets freed)
            from kiln.ir import save_onnx

            baseline_model = str(Path(tmp) / "baseline.onnx")
            save_onnx(graph, baseline_model)
        built = None
        if artifact is None:
            from kiln.codegen.target import cpu_target
            from kiln.driver import compile as compile_model

            artifact = Path(tmp) / "bench.kiln"
            built = compile_model(graph, artifact, target=cpu_target(threads), tune_db=tune_db).graph
        spec = {"model": baseline_model, "artifact": str(artifact), "threads": threads, "feeds": feeds}
        engines = ["kiln", *[e for e in against if e != "kiln"]]
        ctx = mp.get_context("spawn")
        workers: dict[str, Any] = {}
        results = {e: EngineResult(e) for e in engines}
        try:
            for e in engines:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, e, spec), daemon=True)
                proc.start()
                msg = _recv(parent, proc, e)
                if msg[0] == "error":
                    raise KilnError(f"engine {e} failed to load: {msg[1]}")
                results[e].pid = msg[1]
                workers[e] = (proc, parent)
            for e in engines:  # warm-up
                _ask(workers[e], warmup, e)
            for _ in range(rounds):  # A B A B ...: one engine at a time
                for e in engines:
                    results[e].latencies.extend(_ask(workers[e], iterations, e))
            if profile:  # in this process, while the engines' processes wait
                from kiln.report.profile import artifact_graph, kernel_rows, measure_peak
                from kiln.runtime.artifact import read_artifact

                if built is None:  # an --artifact: its graph re-derived from its recorded passes
                    built = artifact_graph(graph, list(read_artifact(artifact).manifest.get("passes") or []))
                peak = measure_peak()
                kernels, note = kernel_rows(artifact, feeds, built, peak, runs=max(iterations, 5), threads=threads)
        finally:
            for proc, conn in workers.values():
                try:
                    conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    if not profile:
        return BenchReport(str(model), threads, rounds, iterations, batch, results)
    return BenchReport(str(model), threads, rounds, iterations, batch, results, kernels, peak, note)


def _frees_a_static_dim(model: str | os.PathLike, graph: Any) -> bool:
    """Whether an input of ``graph`` has a named dim where ``model`` declares a number."""
    from kiln.ir import load

    declared = {i.name: i.shape for i in load(model).inputs}
    return any(declared.get(v.name) is not None and v.shape is not None and any(
        isinstance(d, int) and isinstance(s, str) for d, s in zip(declared[v.name], v.shape)) for v in graph.inputs)


def _recv(conn: Any, proc: Any, engine: str) -> tuple:
    try:
        return conn.recv()
    except (EOFError, OSError):
        proc.join(timeout=5)
        raise KilnError(f"engine {engine}'s worker process exited unexpectedly (exit code {proc.exitcode})") from None


def _ask(worker: tuple[Any, Any], n: int, engine: str) -> list[float]:
    proc, conn = worker
    conn.send(("run", n))
    msg = _recv(conn, proc, engine)
    if msg[0] == "error":
        raise KilnError(f"engine {engine} failed: {msg[1]}")
    return msg[1]
