"""``kiln report``: what the compiler did to a model, in one self-contained HTML page.

:func:`collect` gathers the page's facts: the summary (model, target, compile time, artifact
size, kiln and TVM versions), the pass pipeline run after run (nodes before and after, changes,
time) and every rule's fire count and nearest miss from that run's :class:`PipelineReport`,
pictures of the graph before and after the passes (:mod:`.graphs`), the artifact's per-kernel
profile with FLOPs, GFLOP/s and the share of a measured peak (:mod:`.profile`), a quantized
artifact's accuracy, sensitivity and float layers (from its manifest), and a ``kiln check``
result when one ran. :func:`render` fills the Jinja2 template ``report.html.j2`` with them:
CSS, SVG and the little script are inline, and the page fetches nothing.

The report runs the pass pipeline once more on the model (it is deterministic: the graph the
artifact was built from), to record the graph after each pass; a quantized artifact's pipeline
cannot be re-run without its calibration, so its page shows the pipeline only when it comes
from the compile that made it (``kiln compile --quantize ... --report``).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from kiln import __version__
from kiln.errors import KilnError
from kiln.report.graphs import GraphPicture, render as render_graph
from kiln.report.profile import KernelRow, Peak, is_quantized, kernel_rows, measure_peak, recorded_passes
from kiln.runtime.cpu import host_cpu_name

if TYPE_CHECKING:
    from kiln.check import CheckReport
    from kiln.driver import CompileResult
    from kiln.ir import Graph
    from kiln.passes.manager import PipelineReport

__all__ = ["PassRun", "ReportData", "check_output", "collect", "render", "write_report"]

TEMPLATE = "report.html.j2"
PROFILE_RUNS = 10


@dataclass
class PassRun:
    """One run of a pass in the pipeline: nodes before and after it, its changes and time."""

    iteration: int
    name: str
    spec: str
    nodes_before: int
    nodes_after: int
    changes: int
    seconds: float


@dataclass
class ReportData:
    """Everything the page shows (the template reads only this)."""

    title: str
    summary: dict[str, Any]
    runs: list[PassRun] = field(default_factory=list)
    pipeline: PipelineReport | None = None
    pipeline_note: str = ""
    before: GraphPicture | None = None
    after: GraphPicture | None = None
    kernels: list[KernelRow] = field(default_factory=list)
    kernels_note: str = ""
    peak: Peak | None = None
    quantization: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    check_text: str = ""

    def pass_rows(self) -> list[dict[str, Any]]:
        """Per pass of the pipeline: runs, changes, time, and the nodes its runs added or removed."""
        if self.pipeline is None:
            return []
        total = sum(st.seconds for st in self.pipeline.stats.values()) or 1.0
        rows = []
        for name, st in self.pipeline.stats.items():
            mine = [r for r in self.runs if r.name == name]
            rows.append({"name": name, "runs": st.runs, "changes": st.changes, "seconds": st.seconds,
                         "share": st.seconds / total, "delta": sum(r.nodes_after - r.nodes_before for r in mine),
                         "changed_runs": len(mine)})
        return rows

    def rule_rows(self) -> list[dict[str, Any]]:
        """Every rule each pass tried: its fire count and nearest miss; fired rules first, then near misses."""
        if self.pipeline is None:
            return []
        rows = []
        for pass_name, st in self.pipeline.stats.items():
            for rule, run in st.rules.items():
                miss = run.miss
                rows.append({"pass": pass_name, "rule": rule, "root": run.root_op, "fired": run.fired,
                             "miss_node": miss.node if miss else "", "miss_reason": miss.reason if miss else "",
                             "miss_depth": miss.depth if miss else 0, "miss_iteration": miss.iteration if miss else 0})
        return sorted(rows, key=lambda r: (-r["fired"], -r["miss_depth"], r["pass"], r["rule"]))

    def to_json(self) -> dict[str, Any]:
        """The page's figures as JSON (not the pictures)."""
        return {"summary": self.summary, "runs": [r.__dict__ for r in self.runs], "passes": self.pass_rows(),
                "rules": self.rule_rows(),
                "kernels": [k.to_json() for k in self.kernels], "peak": self.peak.__dict__ if self.peak else None,
                "check": self.check}


def run_pipeline(graph: Graph, pass_list: Sequence[Any]) -> tuple[Graph, PipelineReport, list[PassRun]]:
    """Run the passes on ``graph`` (in place) to a fixed point, recording every run that changed it."""
    from kiln.passes import PassManager

    runs: list[PassRun] = []
    count = [len(list(graph.walk_nodes()))]
    clock = [time.perf_counter()]

    def record(p: Any, iteration: int, g: Graph, result: Any) -> None:
        now, nodes = time.perf_counter(), len(list(g.walk_nodes()))
        if result.changed:
            runs.append(PassRun(iteration, p.name, p.describe(), count[0], nodes, result.changes, now - clock[0]))
        count[0], clock[0] = nodes, now

    optimized, report = PassManager(list(pass_list), on_pass=record).run(graph)
    return optimized, report, runs


def collect(
    model: str | os.PathLike,
    *,
    artifact: str | os.PathLike | None = None,
    compiled: CompileResult | None = None,
    level: str | None = None,
    passes: str | Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    check: bool | CheckReport = False,
    compile_seconds: float | None = None,
    profile_runs: int = PROFILE_RUNS,
    progress: Callable[[str], None] | None = None,
) -> ReportData:
    """The facts of the report on ``model``.

    The artifact is ``artifact``, or ``compiled``'s (a :class:`~kiln.driver.CompileResult`), or
    the model compiled now at ``level`` (O3) or with ``passes``, ``input_shapes`` pinned. The
    profile runs on ``inputs``, else on seeded inputs (``input_shapes`` gives sizes to symbolic
    dims). ``check`` adds a ``kiln check`` result: the one given, or with ``True``, a check of the
    artifact run now on the same inputs.
    """
    from kiln.check import artifact_manifest
    from kiln.codegen.build import file_sha256
    from kiln.driver import compile as compile_model, load_model

    say = progress or (lambda _: None)
    src = Path(model)
    with tempfile.TemporaryDirectory(prefix="kiln-report-") as tmp:
        if artifact is None and compiled is None:
            out = Path(tmp) / f"{src.stem}.kiln"
            t = time.perf_counter()
            compiled = compile_model(src, out, level=level, passes=passes, input_shapes=input_shapes, progress=say)
            compile_seconds = time.perf_counter() - t
        path = Path(artifact) if artifact is not None else compiled.path  # type: ignore[union-attr]
        manifest = artifact_manifest(path, src)
        if compiled is not None and compile_seconds is None:
            compile_seconds = sum(compiled.build.seconds.values())
        shapes = {s["name"]: tuple(s["shape"]) for s in manifest["inputs"]}
        recorded = list(manifest.get("passes") or [])
        data = ReportData(f"kiln report: {src.name}", _summary(src, path, manifest, file_sha256(src), compile_seconds,
                                                                 compiled))
        say("drawing the graph before the passes")
        before = load_model(src, shapes)
        data.before = render_graph(before, "before")
        optimized: Graph | None = None
        if is_quantized(recorded):
            if compiled is not None:
                optimized, data.pipeline = compiled.graph, compiled.pipeline
                data.pipeline_note = ("a quantized artifact: the rules and near misses are the compile's own run; "
                                      "per-run node counts are not recorded for it")
            else:
                data.pipeline_note = ("a quantized artifact: its passes need the calibration session, so they are not "
                                      f"re-run here; it was built with {', '.join(recorded)}")
        else:
            say("running the pass pipeline")
            optimized, data.pipeline, data.runs = run_pipeline(before.clone(), recorded_passes(recorded))
        if optimized is not None:
            say("drawing the graph after the passes")
            data.after = render_graph(optimized, "after")
        say("profiling the kernels")
        data.peak = measure_peak()
        feeds = _feeds(before, inputs, input_shapes)
        data.kernels, data.kernels_note = kernel_rows(path, feeds, optimized, data.peak, runs=profile_runs)
        data.summary["profile_inputs"] = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feeds.items())
        data.quantization = manifest.get("quantization")
        if check is True:
            from kiln.check import check_model

            say("checking the artifact against onnxruntime")
            check = check_model(src, artifact=path, inputs=inputs, input_shapes=input_shapes, progress=say)
    if check:
        data.check, data.check_text = check.to_json(), check.format()  # type: ignore[union-attr]
    return data


def _feeds(graph: Graph, inputs: Mapping[str, np.ndarray] | None,
           shapes: Mapping[str, Sequence[int | str]] | None) -> dict[str, np.ndarray]:
    from kiln.check import checked_feeds
    from kiln.ir.oracle import seeded_inputs

    if inputs is not None:
        return checked_feeds(graph, inputs, "the profile's inputs")
    dims = {k: getattr(v, "dims", v) for k, v in (shapes or {}).items()}  # a sequence's pin: its elements' dims
    sizes = {k: tuple(v) for k, v in dims.items() if all(isinstance(d, int) for d in v)}
    return seeded_inputs(graph, sizes, 0)


def _summary(src: Path, artifact: Path, manifest: Mapping[str, Any], sha: str, compile_seconds: float | None,
             compiled: CompileResult | None) -> dict[str, Any]:
    from kiln.check import level_of

    target = manifest.get("target") or {}
    return {
        "model": src.name, "model_sha256": sha, "artifact": artifact.name,
        "artifact_bytes": artifact.stat().st_size,
        "target": f"{target.get('kind', '?')} {target.get('mcpu') or target.get('arch') or ''}".strip(),
        "cpu_features": ", ".join(target.get("cpu_features") or []),
        "threads": target.get("threads") or os.cpu_count(),
        "passes": ", ".join(manifest.get("passes") or []) or "none",
        "level": level_of(list(manifest.get("passes") or [])),
        "compile_seconds": compile_seconds,
        "compile_stages": {k: round(v, 2) for k, v in compiled.build.seconds.items()} if compiled is not None else {},
        "kernels_built": compiled.build.num_kernels if compiled is not None else None,
        "kiln_version": manifest.get("kiln_version") or __version__,
        "tvm_version": manifest.get("tvm_version") or metadata.version("apache-tvm"),
        "report_kiln_version": __version__,
        "cpu": host_cpu_name(),
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "inputs": [f"{s['name']}: {s['dtype']}[{','.join(map(str, s['shape']))}]" for s in manifest["inputs"]],
        "outputs": [f"{s['name']}: {s['dtype']}[{','.join(map(str, s['shape'] or []))}]" for s in manifest["outputs"]],
    }


def render(data: ReportData) -> str:
    """The page: ``report.html.j2`` filled with ``data`` (autoescaped; the SVG pictures are inserted as they are)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["si"] = _si
    env.filters["ms"] = lambda s: f"{s * 1e3:.1f} ms" if s is not None else "-"
    return env.get_template(TEMPLATE).render(d=data)


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".strip()


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse a report path that is one of ``inputs`` (the model, the artifact), before any work is done."""
    dst = Path(output).absolute()
    for given in filter(None, inputs):
        if Path(given).absolute() == dst or (dst.exists() and Path(given).exists() and dst.samefile(given)):
            raise KilnError(f"{output}: the report would overwrite {given}; choose another path")


def write_report(model: str | os.PathLike, output: str | os.PathLike, **kwargs: Any) -> tuple[Path, ReportData]:
    """Collect the report on ``model`` (see :func:`collect`) and write the page to ``output`` atomically."""
    dst = Path(output)
    compiled = kwargs.get("compiled")
    check_output(dst, model, kwargs.get("artifact"), compiled.path if compiled is not None else None)
    data = collect(model, **kwargs)
    html = render(data)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, dst)
    return dst, data
