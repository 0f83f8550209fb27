"""``kiln check --bisect``: which pass, rule, node and kernel made the numbers wrong.

Two stages, on the same inputs as the check:

1. **Graph passes.** The pipeline runs again with a snapshot of the graph after every pass run
   that changed it (the pass manager's ``on_pass`` hook). The evaluator runs the graph before
   the passes (the reference) and, by binary search, the snapshots: the first pass run whose
   outputs depart names the pass. Inside it, the pass runs again on the graph before it, stopped
   after its first *k* rule applications; a binary search on *k* names the rule whose
   application made the outputs depart, and the node it rewrote.
2. **Codegen.** The optimized graph is compiled with every intermediate value as an extra output
   and compared, value by value, with the evaluator on the same graph. The first node in
   topological order whose output departs (its inputs still agree) names the node and its op;
   the lowerer's record of which node each prim func came from names its kernel in the checked
   artifact.

A value *departs* when its max abs error exceeds ``atol + rtol * max|reference|``: errors on the
scale of the tensor, so float rounding at elements near zero does not count. Where the evaluator
cannot run a graph (onnx's reference MaxPool fails on some 3-D pools, as the blocked layout makes
them), onnxruntime runs kiln's export of it instead, and the report says so.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from kiln.errors import EvaluationError, KilnError
from kiln.ir import Evaluator, Graph, infer_shapes, to_onnx
from kiln.ir.oracle import run_onnxruntime


class BisectError(KilnError):
    """Bisection cannot run on this artifact (a quantized one, ...)."""


# =========================================================================== results


@dataclass
class PassCulprit:
    """The first pass run whose outputs depart, and the rule application inside it."""

    pass_name: str
    spec: str  # the pass as a spec item (layout{block=8})
    iteration: int  # the pipeline iteration (1: the first sweep over the passes)
    output: str  # the graph output that departs most
    max_abs: float
    rule: str | None = None  # None: not a rewrite-rule pass, or no single application departs
    node: str | None = None  # the node the rule rewrote (its root)
    op: str | None = None
    applications: int = 0  # rule applications in that pass run

    def to_json(self) -> dict[str, Any]:
        """The culprit as JSON."""
        return {"pass": self.pass_name, "spec": self.spec, "iteration": self.iteration, "rule": self.rule,
                "node": self.node, "op": self.op, "output": self.output, "max_abs": float(f"{self.max_abs:.6g}"),
                "applications": self.applications}


@dataclass
class NodeCulprit:
    """The first node whose compiled output departs from the evaluator's."""

    node: str
    op: str
    value: str
    max_abs: float
    scale: float  # max |reference| of that value
    kernels: list[str] = field(default_factory=list)  # the checked artifact's kernels that compute it
    funcs: list[str] = field(default_factory=list)  # the prim funcs lowered for it

    def to_json(self) -> dict[str, Any]:
        """The culprit as JSON."""
        return {"node": self.node, "op": self.op, "value": self.value, "max_abs": float(f"{self.max_abs:.6g}"),
                "scale": float(f"{self.scale:.6g}"), "kernels": self.kernels, "prim_funcs": self.funcs}


@dataclass
class Bisection:
    """What :func:`bisect` found: the pass (and rule), the node (and kernel), and notes on how."""

    level: str | None
    passes: PassCulprit | None = None
    codegen: NodeCulprit | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """A pass or a node was named."""
        return self.passes is not None or self.codegen is not None

    def chain(self) -> str:
        """The culprits in one line: "O3 pass `layout`, rule `r`, node `n` -> kernel `k`: max err 0.41"."""
        where = self.level or "pipeline"
        parts = []
        if self.passes is not None:
            p = self.passes
            text = f"{where} pass `{p.pass_name}`" + (f" (iteration {p.iteration})" if p.iteration > 1 else "")
            if p.rule:
                text += f", rule `{p.rule}`, node `{p.node}` ({p.op})"
            parts.append(f"{text}: max err {p.max_abs:.3g} on output `{p.output}`")
        if self.codegen is not None:
            c = self.codegen
            kernel = ", ".join(f"`{k}`" for k in c.kernels) or ", ".join(f"`{f}`" for f in c.funcs) or "(no kernel)"
            parts.append(f"{where} codegen: node `{c.node}` ({c.op}) -> kernel {kernel}: max err {c.max_abs:.3g} "
                         f"(values up to {c.scale:.3g})")
        return "; ".join(parts) if parts else "no pass and no node departs at the scale of its values"

    def lines(self) -> list[str]:
        """The report's lines: the chain, then the notes."""
        return [f"bisect: {self.chain()}", *(f"  note: {n}" for n in self.notes)]

    def to_json(self) -> dict[str, Any]:
        """The bisection as JSON."""
        return {"level": self.level, "chain": self.chain(),
                "pass": self.passes.to_json() if self.passes else None,
                "codegen": self.codegen.to_json() if self.codegen else None, "notes": self.notes}


# =========================================================================== comparing values


def departure(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> float | None:
    """The max abs error of ``got`` if it departs from ``want`` (beyond ``atol + rtol * max|want|``), else None.

    A different shape, or NaN/Inf where the other is finite, departs (as an infinite error).
    """
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape:
        return float("inf")
    if w.dtype.kind not in "fc":
        return None if np.array_equal(g, w) else float("inf")
    bad_g, bad_w = ~np.isfinite(g), ~np.isfinite(w)
    if bad_g.any() or bad_w.any():
        inf = np.isinf(w)
        if not np.array_equal(bad_g, bad_w) or not np.array_equal(np.isnan(g), np.isnan(w)) \
                or not np.array_equal(g[inf], w[inf]):
            return float("inf")
    fin = ~bad_w
    if not fin.any():
        return None
    a, b = g[fin].astype(np.float64), w[fin].astype(np.float64)
    err = float(np.abs(a - b).max())
    return err if err > atol + rtol * float(np.abs(b).max()) else None


class Runner:
    """Evaluates graphs with kiln's evaluator, or with onnxruntime where the evaluator cannot (noted once)."""

    def __init__(self, feeds: Mapping[str, np.ndarray], notes: list[str]):
        self.feeds = dict(feeds)
        self.notes = notes

    def run(self, graph: Graph, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The values ``names`` (default: the outputs) of ``graph`` on the feeds."""
        try:
            return Evaluator(graph).run(self.feeds, outputs=names)
        except EvaluationError as e:
            note = f"onnxruntime ran kiln's export of graphs the evaluator could not run ({e})"
            if not any(n.startswith("onnxruntime ran") for n in self.notes):
                self.notes.append(note)
        wanted = list(names) if names is not None else [v.name for v in graph.outputs]
        exposed = with_outputs(graph, wanted)
        return {k: v for k, v in run_onnxruntime(to_onnx(exposed).SerializeToString(), self.feeds).items() if k in wanted}


def with_outputs(graph: Graph, names: Sequence[str]) -> Graph:
    """A copy of ``graph`` whose outputs are its own followed by the values ``names`` (top-level node outputs)."""
    g = graph.clone()
    values = {o.name: o for n in g.nodes for o in n.outputs if o.name}
    have = {v.name for v in g.outputs}
    g.outputs.extend(values[n] for n in names if n not in have and n in values)
    return g


# =========================================================================== stage 1: the passes


@dataclass
class _Step:
    """A pass run that changed the graph: the pass and the graph before and after it."""

    pass_: Any
    iteration: int
    before: Graph
    after: Graph


def bisect_passes(graph: Graph, pass_list: Sequence[Any], runner: Runner, rtol: float, atol: float,
                  progress: Callable[[str], None] | None = None) -> tuple[PassCulprit | None, Graph]:
    """Run ``pass_list`` on ``graph`` (changed in place) to a fixed point, snapshotting each change; find the first departure.

    Returns the culprit (or None) and the optimized graph.
    """
    from kiln.passes import PassManager

    say = progress or (lambda _: None)
    reference = runner.run(graph)
    steps: list[_Step] = []
    last = [graph.clone()]

    def snapshot(p: Any, iteration: int, g: Graph, result: Any) -> None:
        if result.changed:
            after = g.clone()
            steps.append(_Step(p, iteration, last[0], after))
            last[0] = after

    optimized, _ = PassManager(list(pass_list), on_pass=snapshot).run(graph)
    say(f"bisecting {len(steps)} pass runs that changed the graph")

    def departs(g: Graph) -> tuple[str, float] | None:
        got = runner.run(g)
        worst = [(k, e) for k in reference if (e := departure(got[k], reference[k], rtol, atol)) is not None]
        return max(worst, key=lambda kv: kv[1]) if worst else None

    if not steps or departs(steps[-1].after) is None:
        return None, optimized
    lo, hi = -1, len(steps) - 1  # steps[lo].after agrees (lo = -1: the graph before the passes); steps[hi].after departs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if departs(steps[mid].after) is None:
            lo = mid
        else:
            hi = mid
    step = steps[hi]
    output, err = departs(step.after)  # type: ignore[misc]
    culprit = PassCulprit(step.pass_.name, step.pass_.describe(), step.iteration, output, err)
    _find_rule(step, culprit, departs)
    return culprit, optimized


class _Stop(Exception):
    """Raised inside a pass run to stop it after a number of rule applications."""


@contextmanager
def _rule_applications(log: list[tuple[str, str, str]], limit: int | None) -> Iterator[None]:
    """Record every rewrite-rule application (rule, node, op) while inside; stop the pass after ``limit`` of them.

    Rules are applied only through ``RewriteRule.apply``, whichever pass applies them, so that is
    where they are counted: for the duration of the block, and restored after it.
    """
    from kiln.passes.rules import RewriteRule

    original = RewriteRule.apply

    def apply(rule: Any, m: Any) -> bool:
        if limit is not None and len(log) >= limit:
            raise _Stop
        log.append((rule.name, m.root.name, m.root.qualified_op))
        return original(rule, m)

    RewriteRule.apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        RewriteRule.apply = original  # type: ignore[method-assign]


def _find_rule(step: _Step, culprit: PassCulprit, departs: Callable[[Graph], tuple[str, float] | None]) -> None:
    """Name the rule application in ``step`` after which the outputs depart (binary search on their count)."""
    log: list[tuple[str, str, str]] = []
    g = step.before.clone()
    with _rule_applications(log, None):
        step.pass_.run(g)
    culprit.applications = len(log)
    if not log:
        return

    def after(k: int) -> Graph:
        trial = step.before.clone()
        with _rule_applications([], k):
            try:
                step.pass_.run(trial)
            except _Stop:
                infer_shapes(trial)  # what the rule engine does when a sweep ends
        return trial

    lo, hi = 0, len(log)  # after lo applications the outputs agree; after hi they depart
    if departs(after(hi)) is None:
        return
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if departs(after(mid)) is None:
            lo = mid
        else:
            hi = mid
    culprit.rule, culprit.node, culprit.op = log[hi - 1]


# =========================================================================== stage 2: codegen


def bisect_codegen(graph: Graph, runner: Runner, rtol: float, atol: float, *, target: Any = None,
                   kernels: Sequence[str] = (), workdir: str | os.PathLike | None = None,
                   progress: Callable[[str], None] | None = None) -> NodeCulprit | None:
    """Compile ``graph`` with every intermediate value exposed, and name the first node whose output departs.

    ``kernels`` are the checked artifact's kernel names; the culprit's are those that compute it.
    """
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.codegen.lowering.registry import needed_nodes
    from kiln.report.kernels import kernel_map

    say = progress or (lambda _: None)
    order = [(n, o.name) for n in needed_nodes(graph) for o in n.outputs if o.name and o.dtype is not None]
    names = [v for _, v in order]
    exposed = with_outputs(graph, names)
    say(f"compiling the optimized graph with its {len(names)} intermediate values as outputs")
    with tempfile.TemporaryDirectory(prefix="kiln-bisect-", dir=workdir) as tmp:
        out = Path(tmp) / "exposed.kiln"
        build(exposed, out, target=target)
        got = kiln.runtime.load(out).run(runner.feeds)
    want = runner.run(graph, names)
    for node, value in order:
        if value not in got or value not in want:
            continue
        err = departure(got[value], want[value], rtol, atol)
        if err is None:
            continue
        ref = np.asarray(want[value])
        scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)) if ref.dtype.kind in "fc" else 0.0
        kmap = kernel_map(graph)
        return NodeCulprit(node.name, node.qualified_op, value, err, scale, kmap.kernels_of(node.name, kernels),
                           kmap.funcs_of(node.name))
    return None


# =========================================================================== both


def bisect(model: str | os.PathLike, feeds: Mapping[str, np.ndarray], *, artifact: str | os.PathLike | None = None,
           level: str | None = None, passes: Sequence[str] | None = None,
           input_shapes: Mapping[str, Sequence[int | str]] | None = None, target: Any = None, rtol: float = 1e-4,
           atol: float = 1e-5, progress: Callable[[str], None] | None = None) -> Bisection:
    """Bisect ``model``'s compilation on ``feeds``: the graph passes, then codegen (see the module docstring).

    ``passes`` are the pass specs the artifact was built with (its manifest's), else ``level``'s
    (O3 by default) for ``target`` (the host CPU). ``input_shapes`` pins the inputs as the
    artifact did. ``artifact`` is the checked artifact, whose kernel names the culprit's kernel is
    taken from.
    """
    from kiln.codegen.target import cpu_target
    from kiln.driver import compile_level, load_model, pipeline_passes

    if passes and passes[0].split("{")[0] == "quantize":
        raise BisectError("bisection re-runs the passes, and a quantized artifact's 'quantize' pass needs its "
                          "calibration session; check and bisect the float model (kiln check MODEL --bisect)")
    tgt = target or cpu_target()
    specs = list(passes) if passes else None
    bis = Bisection(level or compile_level(level, specs))
    runner = Runner(feeds, bis.notes)
    graph = load_model(model, input_shapes)
    pass_list = pipeline_passes(compile_level(level, specs), specs, target=tgt)
    bis.passes, optimized = bisect_passes(graph, pass_list, runner, rtol, atol, progress)
    kernels: list[str] = []
    if artifact is not None:
        import kiln.runtime

        kernels = [k.name for k in kiln.runtime.load(artifact).profile(runner.feeds, runs=1)]
    bis.codegen = bisect_codegen(optimized, runner, rtol, atol, target=tgt, kernels=kernels, progress=progress)
    if bis.passes is not None and bis.passes.rule is None and bis.passes.applications:
        bis.notes.append(f"no single rule application in pass '{bis.passes.pass_name}' departs on its own")
    if not bis.found:
        bis.notes.append("every pass and every compiled node agrees at the scale of its values: the mismatch is "
                         "rounding at elements near zero (a larger --atol) or error that accumulates over many nodes")
    return bis
