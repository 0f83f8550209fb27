"""``kiln check``: are kiln's numbers right?

It imports the model, verifies the IR, and runs the model in onnxruntime on seeded (or given)
inputs: the reference. Three engines are compared with it, output by output:

- the ONNX round trip (kiln's export of what it imported, in onnxruntime; rtol 1e-6);
- kiln's reference evaluator (rtol 1e-4, atol 1e-5 for floats);
- the compiled artifact: the one given, or the model compiled now (O3 unless told; rtol 1e-3,
  atol 1e-4 unless told).

Per output it reports the max absolute and relative error, the cosine similarity, argmax
agreement along the last axis, each engine's count of NaN and Inf, and pass or fail (numpy's
``allclose`` at the tolerances, NaN equal to NaN). With ``bisect``, a failing artifact is
narrowed down to the pass, rule, node and kernel whose output departs (:mod:`kiln.bisect`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.ir import Graph, SequenceShape, evaluate, load, to_onnx
from kiln.ir.interpreter import check_inputs
from kiln.ir.oracle import Comparison, compare, run_onnxruntime, seeded_inputs
from kiln.runtime.npz import read_npz  # noqa: F401 - kiln.check.read_npz, as the CLI and report use it

if TYPE_CHECKING:
    from kiln.bisect import Bisection

__all__ = ["CheckReport", "Comparison", "EngineCheck", "OutputCheck", "check_model", "compare", "compare_outputs",
           "parse_shape_overrides", "seeded_inputs"]

ROUND_TRIP_RTOL = 1e-6
EVAL_RTOL, EVAL_ATOL = 1e-4, 1e-5
#: The compiled artifact against onnxruntime, unless ``--rtol``/``--atol`` say otherwise. Compiled kernels sum
#: in another order than onnxruntime's (blocked convs, fused epilogues): over DenseNet-121's 121 layers at O3
#: that reaches 2.3e-4 relative (7.1e-5 absolute), so 1e-4 does not hold there; 1e-3 and 1e-4 are the
#: tolerances kiln's own compiled-model tests use (docs/check-and-report.md has each model's figures).
ARTIFACT_RTOL, ARTIFACT_ATOL = 1e-3, 1e-4


class CheckError(KilnError):
    """``kiln check`` cannot compare: an artifact from another model, inputs that do not fit, ..."""


def parse_shape_overrides(specs: list[str] | None) -> dict[str, tuple[int | str, ...]]:
    """``["x=1x3x48xW"]`` → ``{"x": (1, 3, 48, "W")}``: ints, or names for symbolic dims; ``x=`` is a scalar;
    ``s=3*2x4`` (3 tensors of 2x4) and ``s=2x4,2x1`` pin a sequence input, as a :class:`~kiln.ir.SequenceShape`."""
    out: dict[str, tuple[int | str, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise InputError(f"--input-shape '{spec}' must look like NAME=1x3x224x224 (a name, like W, for a symbolic dim)")
        length, star, rest = dims.partition("*")
        if star and not length.isdigit():
            raise InputError(f"--input-shape '{spec}': a sequence is pinned as NAME=N*DxD (N tensors of DxD)")

        def parse(text: str) -> tuple[int | str, ...]:
            parsed: list[int | str] = []
            for d in text.split("x") if text else []:
                if d.isdigit():
                    parsed.append(int(d))
                elif d.isidentifier():
                    parsed.append(d)
                else:
                    raise InputError(f"--input-shape '{spec}': each dim is an integer or a name, separated by 'x'")
            return tuple(parsed)

        if star:
            out[name] = SequenceShape((parse(rest),) * int(length))
        elif "," in dims:
            out[name] = SequenceShape(tuple(parse(e) for e in dims.split(",")))
        else:
            out[name] = parse(dims)
    return out


# =========================================================================== comparing outputs


@dataclass
class OutputCheck:
    """How one output of an engine compares with the reference."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0  # max |got - want| / |want| over the elements where want != 0
    cosine: float | None = None  # over the elements both engines give finite
    argmax: float | None = None  # share of rows (along the last axis) whose argmax agrees
    nan: tuple[int, int] = (0, 0)  # (this engine, the reference)
    inf: tuple[int, int] = (0, 0)
    note: str = ""  # why it could not be compared element by element (a shape, a missing output)

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON (non-finite numbers as null)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "passed": self.passed,
                "max_abs": _finite(self.max_abs), "max_rel": _finite(self.max_rel), "cosine": _finite(self.cosine),
                "argmax_agreement": self.argmax, "nan": {"got": self.nan[0], "want": self.nan[1]},
                "inf": {"got": self.inf[0], "want": self.inf[1]}, "note": self.note or None}


@dataclass
class EngineCheck:
    """One engine against the reference, output by output, at a tolerance."""

    name: str
    rtol: float
    atol: float
    outputs: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every output passes."""
        return all(o.passed for o in self.outputs)

    @property
    def worst(self) -> float:
        """The largest max abs error over the outputs."""
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """The comparison as JSON."""
        return {"name": self.name, "rtol": self.rtol, "atol": self.atol, "passed": self.passed,
                "outputs": [o.to_json() for o in self.outputs]}


def compare_outputs(name: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float,
                    atol: float) -> EngineCheck:
    """Compare an engine's outputs with the reference's, name by name (cosine and argmax as int8 accuracy does)."""
    from kiln.quantize.accuracy import compare as accuracy

    check = EngineCheck(name, rtol, atol)
    for key, expected in want.items():
        w = np.asarray(expected)
        if key not in got:
            check.outputs.append(OutputCheck(key, w.shape, w.dtype.name, False, math.inf, math.inf,
                                             note="missing from this engine's outputs"))
            continue
        g = np.asarray(got[key])
        counts = _nonfinite(g), _nonfinite(w)
        nan, inf = (counts[0][0], counts[1][0]), (counts[0][1], counts[1][1])
        if g.shape != w.shape:
            check.outputs.append(OutputCheck(key, w.shape, w.dtype.name, False, math.inf, math.inf, nan=nan, inf=inf,
                                             note=f"shape {list(g.shape)}, the reference's {list(w.shape)}"))
            continue
        if w.dtype.kind not in "fc":
            diff = np.abs(g.astype(np.int64) - w.astype(np.int64)) if w.size and w.dtype.kind in "iub" else None
            same = bool(np.array_equal(g, w))
            err = 0.0 if same else float(diff.max()) if diff is not None else math.inf
            check.outputs.append(OutputCheck(key, w.shape, w.dtype.name, same, err, 0.0 if same else math.inf))
            continue
        finite = np.isfinite(g) & np.isfinite(w)
        a, b = np.where(finite, g, 0).astype(np.float64), np.where(finite, w, 0).astype(np.float64)
        diff = np.abs(a - b)
        nonzero = b != 0
        (acc,) = accuracy([{key: b.astype(w.dtype)}], [{key: a.astype(w.dtype)}], [key]) if w.size else (None,)
        check.outputs.append(OutputCheck(
            key, w.shape, w.dtype.name, bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)),
            float(diff.max(initial=0.0)), float((diff[nonzero] / np.abs(b[nonzero])).max(initial=0.0)),
            acc.cosine if acc is not None else None, acc.argmax_agreement if acc is not None else None, nan, inf))
    return check


def _nonfinite(a: np.ndarray) -> tuple[int, int]:
    if a.dtype.kind not in "fc":
        return 0, 0
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


# =========================================================================== the report


@dataclass
class CheckReport:
    """The result of :func:`check_model`."""

    graph: Graph
    inputs: dict[str, np.ndarray]
    comparisons: list[EngineCheck]
    model: Path | None = None
    inputs_from: str = "seeded"  # "seeded (seed 0)", or the .npz file
    artifact: Path | None = None  # the artifact compared (None when none was)
    artifact_kept: bool = False  # the artifact was given (else compiled for the check, then removed)
    level: str | None = None
    passes: list[str] = field(default_factory=list)  # the passes the artifact was built with
    seconds: dict[str, float] = field(default_factory=dict)
    bisection: Bisection | None = None

    @property
    def passed(self) -> bool:
        """Every comparison passes."""
        return all(c.passed for c in self.comparisons)

    @property
    def artifact_check(self) -> EngineCheck | None:
        """The compiled artifact's comparison, if one ran."""
        return next((c for c in self.comparisons if c.name.startswith("kiln artifact")), None)

    def to_json(self) -> dict[str, Any]:
        """Everything the check measured, as JSON."""
        return {
            "model": str(self.model) if self.model else None,
            "inputs": {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for k, v in self.inputs.items()},
            "inputs_from": self.inputs_from,
            "artifact": str(self.artifact) if self.artifact and self.artifact_kept else None,
            "level": self.level, "passes": self.passes,
            "passed": self.passed,
            "comparisons": [c.to_json() for c in self.comparisons],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "bisect": self.bisection.to_json() if self.bisection is not None else None,
        }

    def format(self) -> str:
        """The human-readable report: one table per comparison, then the bisection."""
        g = self.graph
        shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in self.inputs.items())
        lines = [f"imported '{g.name}': {sum(1 for _ in g.walk_nodes())} nodes, verify() ok",
                 f"inputs: {shapes} ({self.inputs_from})"]
        for cmp in self.comparisons:
            status = "ok" if cmp.passed else "MISMATCH"
            lines.append(f"{cmp.name}: {status}  (max abs error {cmp.worst:.3g}; rtol {cmp.rtol:g}, atol {cmp.atol:g})")
            lines.extend(format_table(cmp))
        if self.bisection is not None:
            lines.extend(self.bisection.lines())
        return "\n".join(lines)


def format_table(cmp: EngineCheck) -> list[str]:
    """One line per output: errors, cosine, argmax agreement, NaN/Inf counts, verdict."""
    rows = [("output", "max abs", "max rel", "cosine", "argmax", "NaN got/ref", "Inf got/ref", "result")]
    for o in cmp.outputs:
        rows.append((o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                     "-" if o.cosine is None else f"{o.cosine:.6f}",
                     "-" if o.argmax is None else f"{100 * o.argmax:.1f}%",
                     f"{o.nan[0]}/{o.nan[1]}", f"{o.inf[0]}/{o.inf[1]}",
                     ("ok" if o.passed else "FAIL") + (f" ({o.note})" if o.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


# =========================================================================== the check


def check_model(
    path: str | os.PathLike,
    *,
    artifact: str | os.PathLike | None = None,
    compile: bool = True,
    level: str | None = None,
    passes: str | Sequence[str] | None = None,
    target: Any = None,
    input_shapes: Mapping[str, tuple[int | str, ...]] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    inputs_from: str | None = None,
    seed: int = 0,
    use_evaluator: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    bisect: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check ``path`` against onnxruntime: round trip, evaluator, and the compiled artifact.

    ``artifact`` compares that artifact (it must come from this model: its manifest's source
    sha256); otherwise, with ``compile``, the model is compiled now at ``level`` (O3 by
    default) or with ``passes``, for ``target`` (the host CPU), with ``input_shapes`` pinned.
    ``inputs`` are the feeds (from ``inputs_from``, an .npz file), else seeded random ones.
    ``rtol``/``atol`` replace the evaluator's and the artifact's tolerances. With ``bisect``, a
    mismatching artifact is bisected (:func:`kiln.bisect.bisect`).
    """
    say = progress or (lambda _: None)
    src = Path(path)
    graph = load(src)
    graph.verify()
    manifest = artifact_manifest(artifact, src) if artifact is not None else None
    pinned = dict(input_shapes or {})
    feed_graph = graph
    if manifest is not None:  # the artifact's signature: the model at the shapes it was compiled for
        from kiln.driver import load_model

        feed_graph = load_model(src, {s["name"]: SequenceShape(tuple(map(tuple, s["elements"]))) if s.get("sequence")
                                      else tuple(s["shape"]) for s in manifest["inputs"]})
    if inputs is not None:
        feeds = checked_feeds(feed_graph, inputs, inputs_from or "the inputs")
        what = str(inputs_from or "given")
    else:
        feeds = seeded_inputs(feed_graph, pinned, seed)
        what = f"seeded, seed {seed}"
    t = time.perf_counter()
    reference = run_onnxruntime(str(src), feeds)
    report = CheckReport(graph, feeds, [], src, what)
    report.seconds["onnxruntime"] = time.perf_counter() - t
    round_trip = run_onnxruntime(to_onnx(graph).SerializeToString(), feeds)
    report.comparisons.append(compare_outputs("ONNX round trip vs original (onnxruntime)", round_trip, reference,
                                              ROUND_TRIP_RTOL, 0.0))
    if use_evaluator:
        t = time.perf_counter()
        got = evaluate(graph, feeds)
        report.seconds["evaluator"] = time.perf_counter() - t
        report.comparisons.append(compare_outputs("kiln evaluator vs onnxruntime", got, reference,
                                                  EVAL_RTOL if rtol is None else rtol, EVAL_ATOL if atol is None else atol))
    if manifest is None and not compile:
        return report
    with tempfile.TemporaryDirectory(prefix="kiln-check-") as tmp:
        if manifest is None:
            from kiln.driver import compile as compile_model

            out = Path(tmp) / f"{src.stem}.kiln"
            t = time.perf_counter()
            result = compile_model(src, out, target=target, level=level, passes=passes, input_shapes=pinned or None,
                                   progress=say)
            report.seconds["compile"] = time.perf_counter() - t
            report.artifact, report.level, report.passes = out, result.level, list(result.passes)
            built = f"{result.level or 'passes ' + ','.join(result.passes)}, compiled now"
        else:
            report.artifact, report.artifact_kept = Path(artifact), True  # type: ignore[arg-type]
            report.passes = list(manifest.get("passes") or [])
            report.level = level_of(report.passes)
            built = report.artifact.name
        import kiln.runtime

        model = kiln.runtime.load(report.artifact)
        t = time.perf_counter()
        got = model.run(feeds)
        report.seconds["artifact"] = time.perf_counter() - t
        cmp = compare_outputs(f"kiln artifact ({built}) vs onnxruntime", got, reference, ARTIFACT_RTOL if rtol is None else rtol,
                              ARTIFACT_ATOL if atol is None else atol)
        report.comparisons.append(cmp)
        if bisect and not cmp.passed:
            from kiln.bisect import bisect as run_bisect

            say("bisecting")
            t = time.perf_counter()
            shapes = {s.name: s.shape for s in model.inputs}
            report.bisection = run_bisect(src, feeds, artifact=report.artifact, passes=report.passes,
                                          level=report.level, input_shapes=shapes, rtol=cmp.rtol, atol=cmp.atol,
                                          progress=say)
            report.seconds["bisect"] = time.perf_counter() - t
    return report


def artifact_manifest(artifact: str | os.PathLike, model: str | os.PathLike) -> dict[str, Any]:
    """The artifact's verified manifest; refuses, in one line, one built from another model than ``model``."""
    from kiln.codegen.build import file_sha256
    from kiln.runtime.artifact import read_artifact

    manifest = read_artifact(artifact).manifest
    source = manifest.get("source") or {}
    built_from, ours = source.get("sha256"), file_sha256(model)
    if built_from is None:
        raise CheckError(f"{artifact}: its manifest records no source model, so kiln cannot tell it was built from "
                         f"{model}; compile {model} with kiln compile and check that artifact")
    if built_from != ours:
        raise CheckError(f"{artifact} was built from another model ({source.get('name') or '?'}, sha256 "
                         f"{built_from[:12]}...), not {model} (sha256 {ours[:12]}...); check it against its own model")
    return manifest


def level_of(passes: Sequence[str]) -> str | None:
    """The level whose passes an artifact records, if they are exactly one level's."""
    from kiln.passes.pipeline import LEVELS

    names = [p.split("{")[0] for p in passes]
    return next((lvl for lvl, specs in LEVELS.items() if names == [s.split("{")[0] for s in specs] and specs), None)


def checked_feeds(graph: Graph, feeds: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``feeds`` if they fit the graph's inputs; else one line naming the problem and the expected signature."""
    sig = ", ".join(f"{v.name}: {v.type_str()}" for v in graph.inputs)
    try:
        return check_inputs(graph, feeds)
    except InputError as e:
        msg = str(e)
        if not msg.endswith(f"expected {sig}"):
            msg = f"{msg}; the model expects {sig}"
        raise InputError(f"{source}: {msg}") from None
