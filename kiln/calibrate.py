"""Post-training int8 quantization of float models: calibration, accuracy, sensitivity, budget.

``kiln compile MODEL --quantize int8 --calib SAMPLES.npz`` runs here:

1. **Prepare.** The model is imported (upgraded to opset 13 if older) and simplified with
   the float passes, so that BatchNorms are folded into their convs before anything is
   measured. The layers kiln can run in int8 are listed (``quantizable_layers``).
2. **Observe.** The float model runs on the calibration samples with every tensor the int8
   layers would read as an extra output: compiled by kiln (the observer artifact), or
   through the evaluator when the model is tiny. Observers keep each tensor's min and max,
   and for ``percentile`` and ``entropy`` a 2048-bin histogram from a second pass.
3. **Measure.** With ``--sensitivity`` (or a budget), a second float model fake-quantizes
   each layer behind a mask input, so that one compile serves every "one layer in int8"
   run: a layer's error is measured on held-out samples with only it quantized.
4. **Choose.** ``--exclude`` names layers kept in float; ``--accuracy-budget`` keeps the most
   sensitive layers in float until the budget holds on the mask model.
5. **Quantize and report.** The ``quantize`` pass inserts Q/DQ, the normal pipeline turns it
   into VNNI kernels, and the artifact is run on the held-out samples against the float
   outputs: cosine, max abs error and argmax agreement per output, recorded in the manifest.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kiln.errors import KilnError

METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99  # percent of each tensor's values inside the percentile method's range
BINS = 2048
#: Below this many multiply-accumulates (model MACs x samples) observers use the evaluator.
EVALUATOR_MACS = 2e8
#: Samples the sensitivity and budget searches use (the final report uses every held-out one).
SEARCH_SAMPLES = 16


class QuantizeError(KilnError):
    """A quantization request kiln cannot carry out (bad samples, names, budget)."""


@dataclass
class QuantizeOptions:
    """What ``kiln compile --quantize int8`` was asked for."""

    calib: str
    method: str = "minmax"
    per_channel: bool = True
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    eval: str | None = None
    sensitivity: bool = False
    observer: str = "auto"  # auto | compiled | evaluator


# ----------------------------------------------------------------------------- samples


def read_samples(path: str | os.PathLike, inputs: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz keyed by input name with a leading sample axis, one feed dict each.

    An input of shape ``[1, 3, H, W]`` takes arrays ``[N, 3, H, W]`` or ``[N, 1, 3, H, W]``.
    """
    from kiln.check import read_npz

    arrays = read_npz(str(path))
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise QuantizeError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays) or 'none'}")
    feeds: list[dict[str, np.ndarray]] = []
    count = None
    per_input: dict[str, list[np.ndarray]] = {}
    for v in inputs:
        a = arrays[v.name]
        want = np.dtype(v.dtype.numpy)
        if a.dtype != want:
            raise QuantizeError(f"{path}: '{v.name}' is {a.dtype}; the model takes {want}")
        rank = len(v.shape or ())
        if a.ndim == rank + 1:
            items = [a[i] for i in range(a.shape[0])]
        elif a.ndim == rank and rank and (v.shape[0] == 1 or isinstance(v.shape[0], str)):
            items = [a[i:i + 1] for i in range(a.shape[0])]
        else:
            raise QuantizeError(f"{path}: '{v.name}' has shape {list(a.shape)}; want a leading sample axis before "
                                f"the input's shape {list(v.shape or ())}")
        for it in items:
            if len(it.shape) != rank or any(isinstance(d, int) and d != s for d, s in zip(v.shape, it.shape)):
                raise QuantizeError(f"{path}: a '{v.name}' sample has shape {list(it.shape)}; the model takes "
                                    f"{list(v.shape)}")
        if count is not None and len(items) != count:
            raise QuantizeError(f"{path}: inputs hold different sample counts ({count} and {len(items)})")
        count = len(items)
        per_input[v.name] = items
    for i in range(count or 0):
        feeds.append({n: np.ascontiguousarray(per_input[n][i]) for n in names})
    if not feeds:
        raise QuantizeError(f"{path}: no samples")
    return feeds


# ----------------------------------------------------------------------------- observers and ranges


@dataclass
class Observer:
    """One tensor's statistics over the calibration samples."""

    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None

    def see_range(self, a: np.ndarray) -> None:
        if a.size:
            self.lo = min(self.lo, float(a.min()))
            self.hi = max(self.hi, float(a.max()))

    def see_histogram(self, a: np.ndarray) -> None:
        lo, hi = self.edges()
        h, _ = np.histogram(a, bins=BINS, range=(lo, hi))
        self.hist = h if self.hist is None else self.hist + h

    def edges(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def range(self, method: str) -> tuple[float, float]:
        """The range to quantize: the observed one, or clipped by ``method``."""
        if method == "minmax" or self.hist is None or self.hist.sum() == 0:
            return (self.lo, self.hi)
        lo, hi = self.edges()
        width = (hi - lo) / BINS
        if method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            tail = (100 - PERCENTILE) / 100
            a = int(np.searchsorted(cdf, tail, side="left"))
            b = int(np.searchsorted(cdf, 1 - tail, side="left"))
            return (max(self.lo, lo + a * width) if self.lo < 0 else self.lo, min(self.hi, lo + (b + 1) * width))
        return self._entropy_range(lo, width)

    def _entropy_range(self, lo: float, width: float) -> tuple[float, float]:
        """The clipping threshold that minimises KL(observed || quantized) on the larger side of 0."""
        assert self.hist is not None
        zero = int(round(-lo / width))
        pos, neg = self.hist[zero:], self.hist[:zero][::-1]
        side = pos if pos.sum() >= neg.sum() else neg
        levels = 255 if self.lo >= 0 else 128
        t = _kl_threshold(side.astype(np.float64), levels) * width
        if side is pos:
            return (max(self.lo, -t) if self.lo < 0 else self.lo, min(self.hi, t))
        return (max(self.lo, -t), min(self.hi, t))


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Bins to keep (from 0 outwards) so that quantizing to ``levels`` loses the least (KL)."""
    n = len(hist)
    if n <= levels:
        return n
    best, best_i = math.inf, n
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:
            part = hist[c]
            nz = part > 0
            if nz.any():
                q[c[nz]] = part.sum() / nz.sum()
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i


# ----------------------------------------------------------------------------- accuracy


@dataclass
class OutputAccuracy:
    """How one output of the quantized model compares with the float model's."""

    name: str
    cosine: float  # mean over samples of each sample's cosine similarity
    cosine_min: float
    max_abs_error: float
    argmax_agreement: float | None  # fraction of rows (argmax over the last axis) that agree

    def to_json(self) -> dict[str, Any]:
        return {"cosine": round(self.cosine, 6), "cosine_min": round(self.cosine_min, 6),
                "max_abs_error": float(f"{self.max_abs_error:.6g}"),
                "argmax_agreement": None if self.argmax_agreement is None else round(self.argmax_agreement, 4)}


def compare(reference: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]],
            names: Iterable[str]) -> list[OutputAccuracy]:
    """Per-output accuracy of ``got`` against ``reference`` over the same samples."""
    report = []
    for name in names:
        cos, err, agree, rows = [], 0.0, 0, 0
        for r, g in zip(reference, got):
            a, b = np.asarray(r[name], np.float64).ravel(), np.asarray(g[name], np.float64).ravel()
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos.append(1.0 if na == 0 and nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
            err = max(err, float(np.abs(a - b).max(initial=0)))
            ra = np.asarray(r[name])
            if ra.ndim >= 1 and ra.shape[-1] > 1 and np.issubdtype(ra.dtype, np.floating):
                x, y = ra.reshape(-1, ra.shape[-1]), np.asarray(g[name]).reshape(-1, ra.shape[-1])
                agree += int((x.argmax(-1) == y.argmax(-1)).sum())
                rows += x.shape[0]
        report.append(OutputAccuracy(name, float(np.mean(cos)), float(np.min(cos)), err,
                                     agree / rows if rows else None))
    return report


@dataclass(frozen=True)
class Budget:
    """``argmax>=0.99`` or ``cosine>=0.999``: the worst output must reach ``value``."""

    metric: str
    value: float

    @staticmethod
    def parse(text: str) -> Budget:
        m = re.fullmatch(r"\s*(argmax|cosine)\s*(?:>=|≥)\s*([0-9.]+)\s*(%?)\s*", text)
        if not m:
            raise QuantizeError(f"accuracy budget '{text}': write argmax>=0.99 (or 99%) or cosine>=0.999")
        value = float(m.group(2)) / (100 if m.group(3) else 1)
        if not 0 < value <= 1:
            raise QuantizeError(f"accuracy budget '{text}': the value must be in (0, 1] (or a percentage)")
        return Budget(m.group(1), value)

    def score(self, report: list[OutputAccuracy]) -> float:
        if self.metric == "cosine":
            return min(r.cosine for r in report)
        values = [r.argmax_agreement for r in report if r.argmax_agreement is not None]
        if not values:
            raise QuantizeError("an argmax budget needs an output with a last axis longer than 1; use cosine>=X")
        return min(values)

    def holds(self, report: list[OutputAccuracy]) -> bool:
        return self.score(report) >= self.value

    def __str__(self) -> str:
        return f"{self.metric}>={self.value:g}"


# ----------------------------------------------------------------------------- running float graphs


class GraphRunner:
    """Runs a float graph on feeds and returns the named values: compiled by kiln, or evaluated."""

    def __init__(self, graph: Any, outputs: Sequence[str], *, compiled: bool, target: Any, workdir: str,
                 label: str, extra_inputs: Sequence[Any] = ()):
        g = graph.clone()
        values = {v.name: v for v in g.values()}
        present = {v.name for v in g.outputs}
        for name in outputs:
            if name not in present:
                g.outputs.append(values[name])
                present.add(name)
        self.outputs = list(outputs)
        self.compiled = compiled
        if compiled:
            from kiln.codegen.build import build
            from kiln.passes import PassManager
            from kiln.passes.pipeline import DEFAULT_COMPILE_LEVEL, passes_for
            from kiln.runtime import load

            g, _ = PassManager(passes_for(DEFAULT_COMPILE_LEVEL, block=target.layout_block)).run(g)
            path = os.path.join(workdir, f"{label}.kiln")
            build(g, path, target=target)
            self._model = load(path, threads=target.threads)
        else:
            from kiln.ir import Evaluator

            self._model = Evaluator(g)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.compiled:
            return self._model.run(feeds)
        return self._model.run(feeds, self.outputs)


def _progress(items: Sequence[Any], label: str, say: Callable[[str], None]) -> Iterable[Any]:
    """``items`` with a progress bar on a terminal, and a line per quarter elsewhere."""
    import sys

    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(label, total=len(items))
            for it in items:
                yield it
                bar.advance(task)
        say(f"{label}: {len(items)} done")
        return
    step = max(1, len(items) // 4)
    for i, it in enumerate(items):
        yield it
        if (i + 1) % step == 0 or i + 1 == len(items):
            say(f"{label}: {i + 1}/{len(items)}")


# ----------------------------------------------------------------------------- the whole job


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    error: float  # 1 - worst output's mean cosine with only this layer in int8
    argmax_agreement: float | None


@dataclass
class QuantizeSession:
    """One ``--quantize int8`` job: the float graph, its samples, ranges and decisions."""

    model: str
    options: QuantizeOptions
    target: Any
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    say: Callable[[str], None] = lambda _: None
    graph: Any = None
    layers: list = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    calib: list = field(default_factory=list)
    held_out: list = field(default_factory=list)
    reference: list = field(default_factory=list)  # float outputs on the held-out samples
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # layer -> why
    budget_search: list[dict[str, Any]] = field(default_factory=list)
    observer_compiled: bool = False  # whether the float model ran compiled (else the evaluator)
    int8_layers: list[str] = field(default_factory=list)  # what the last quantized_graph() put in int8
    params: dict[str, Any] = field(default_factory=dict)  # tensor -> QParams, from the last quantized_graph()
    _tmp: Any = None
    _gated: GraphRunner | None = None  # the fake-quant model behind its layer mask
    _mask_name: str = ""
    _mask_layers: list[str] = field(default_factory=list)  # the mask's entries, in order

    # -- 1. prepare
    def prepare(self) -> None:
        from kiln.ir import load, set_input_shapes
        from kiln.passes import PassManager
        from kiln.passes.pipeline import FLOAT_PREP, passes_for
        from kiln.passes.quantize import quantizable_layers

        if self.options.method not in METHODS:
            raise QuantizeError(f"calibration method '{self.options.method}'; methods: {', '.join(METHODS)}")
        graph = load(Path(self.model), min_opset=13)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in graph.walk_nodes()):
            raise QuantizeError(f"{self.model} is already quantized (it has QuantizeLinear/DequantizeLinear); "
                                f"compile it without --quantize")
        if self.input_shapes:
            set_input_shapes(graph, self.input_shapes)
        from kiln.codegen.build import check_compilable_signature

        check_compilable_signature(graph)  # calibration runs the model: its input shapes must be known
        self.graph, _ = PassManager(passes_for(names=FLOAT_PREP)).run(graph)
        self.layers = quantizable_layers(self.graph)
        if not self.layers:
            raise QuantizeError(f"{self.model}: no layer kiln can run in int8 (it quantizes 2-D convs and their "
                                f"residual adds)")
        names = {ly.name for ly in self.layers}
        unknown = [n for n in self.options.exclude if n not in names]
        if unknown:
            raise QuantizeError(f"--exclude {unknown[0]}: no quantizable layer of that name; layers: "
                                f"{', '.join(ly.name for ly in self.layers[:6])}{', ...' if len(names) > 6 else ''}")
        self.kept_float = {n: "--exclude" for n in self.options.exclude}
        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-quantize-")

    def _use_compiled(self, samples: int) -> bool:
        if self.options.observer != "auto":
            return self.options.observer == "compiled"
        from kiln.ir.summary import summarize

        macs = summarize(self.graph).total_macs
        per_sample = macs.constant() if macs.is_constant else EVALUATOR_MACS
        return per_sample * samples >= EVALUATOR_MACS

    # -- 2. observe
    def calibrate(self) -> None:
        from kiln.passes.quantize import quantized_tensors

        samples = read_samples(self.options.calib, self.graph.inputs)
        if self.options.eval:
            self.calib, self.held_out = samples, read_samples(self.options.eval, self.graph.inputs)
        elif len(samples) >= 2:
            cut = len(samples) - max(1, len(samples) // 4)
            self.calib, self.held_out = samples[:cut], samples[cut:]
        else:
            raise QuantizeError(f"{self.options.calib}: one sample leaves none held out for the accuracy report; "
                                f"give more samples or --eval SAMPLES.npz")
        tensors = [v.name for v in quantized_tensors(self.graph, self.layers)]
        outputs = [v.name for v in self.graph.outputs]
        compiled = self._use_compiled(len(self.calib) + len(self.held_out))
        self.say(f"calibrating on {len(self.calib)} samples ({self.options.method}; {len(tensors)} tensors observed "
                 f"through {'a compiled float model' if compiled else 'the evaluator'})")
        runner = GraphRunner(self.graph, [*outputs, *tensors], compiled=compiled, target=self.target,
                             workdir=self._tmp.name, label="observer")
        observers = {n: Observer() for n in tensors}
        for feeds in _progress(self.calib, "calibration ranges", self.say):
            out = runner.run(feeds)
            for n in tensors:
                observers[n].see_range(out[n])
        if self.options.method != "minmax":
            for feeds in _progress(self.calib, f"calibration histograms ({self.options.method})", self.say):
                out = runner.run(feeds)
                for n in tensors:
                    observers[n].see_histogram(out[n])
        self.ranges = {n: o.range(self.options.method) for n, o in observers.items()}
        self.reference = [{n: runner.run(f)[n] for n in outputs} for f in self.held_out]
        self.observer_compiled = compiled

    # -- 3. sensitivity
    def measure_sensitivity(self) -> None:
        from kiln.passes.quantize import Quantize, fake_quant_model

        q = Quantize(ranges=self.ranges, per_channel=self.options.per_channel, symmetric=self.options.symmetric,
                     keep_float=frozenset(self.options.exclude))
        layers, params = q.plan(self.graph)
        self._mask_layers = [ly.name for ly in layers]
        gated, mask_name = fake_quant_model(self.graph, layers, params, per_channel=self.options.per_channel)
        outputs = [v.name for v in self.graph.outputs]
        self.say(f"measuring sensitivity: {len(layers)} layers, one at a time, on "
                 f"{min(len(self.held_out), SEARCH_SAMPLES)} held-out samples")
        self._gated = GraphRunner(gated, outputs, compiled=self.observer_compiled, target=self.target,
                                  workdir=self._tmp.name, label="sensitivity")
        self._mask_name = mask_name
        n = len(layers)
        self.sensitivity = []
        for i in _progress(list(range(n)), "sensitivity", self.say):
            mask = np.zeros(n, np.float32)
            mask[i] = 1
            rep = self._masked_report(mask)
            agree = [r.argmax_agreement for r in rep if r.argmax_agreement is not None]
            self.sensitivity.append(LayerSensitivity(layers[i].name, layers[i].kind,
                                                     1 - min(r.cosine for r in rep), min(agree) if agree else None))
        self.sensitivity.sort(key=lambda s: -s.error)

    def _masked_report(self, mask: np.ndarray) -> list:
        held = self.held_out[:SEARCH_SAMPLES]
        got = [self._gated.run({**f, self._mask_name: mask}) for f in held]
        return compare(self.reference[:len(held)], got, [v.name for v in self.graph.outputs])

    # -- 4. budget
    def fit_budget(self, budget: Budget) -> None:
        """Keep the most sensitive layers in float until ``budget`` holds on the mask model."""
        order = [s.name for s in self.sensitivity]
        index = {n: i for i, n in enumerate(self._mask_layers)}
        for k in range(len(order) + 1):
            mask = np.ones(len(index), np.float32)
            for name in order[:k]:
                mask[index[name]] = 0
            score = budget.score(self._masked_report(mask))
            self.budget_search.append({"kept_float": k, budget.metric: round(score, 6)})
            if score >= budget.value:
                for name in order[:k]:
                    self.kept_float.setdefault(name, "accuracy budget")
                self.say(f"accuracy budget {budget}: holds with {k} layer(s) in float ({budget.metric} {score:.4f})")
                return
        raise QuantizeError(f"accuracy budget {budget} does not hold even with every layer in float")

    def keep_more(self) -> bool:
        """One more of the most sensitive layers in float; False when none is left."""
        for s in self.sensitivity:
            if s.name not in self.kept_float:
                self.kept_float[s.name] = "accuracy budget"
                return True
        return False

    # -- 5. quantize
    def quantized_graph(self) -> Any:
        from kiln.passes import PassManager
        from kiln.passes.manager import get_pass
        from kiln.passes.quantize import Quantize

        g = self.graph.clone()
        q = Quantize(ranges=self.ranges, per_channel=self.options.per_channel, symmetric=self.options.symmetric,
                     keep_float=frozenset(self.kept_float))
        g, _ = PassManager([q, get_pass("dce")], max_iterations=1).run(g)
        self.int8_layers, self.params = q.int8_layers, q.params
        return g

    def evaluate(self, artifact: str | os.PathLike) -> list[OutputAccuracy]:
        from kiln.runtime import load

        model = load(artifact, threads=self.target.threads)
        got = [model.run(f) for f in _progress(self.held_out, "accuracy on held-out samples", self.say)]
        return compare(self.reference, got, [v.name for v in self.graph.outputs])

    def record(self, accuracy: list[OutputAccuracy], budget: Budget | None) -> dict[str, Any]:
        """The manifest's ``quantization`` entry."""
        from kiln.codegen.build import file_sha256

        per_layer = {ly.name: ("int8" if ly.name in self.int8_layers else "fp32") for ly in self.layers}
        return {
            "scheme": {
                "activations": "uint8 per tensor, " + ("symmetric (zero point 0 or 128)" if self.options.symmetric
                                                       else "asymmetric"),
                "weights": "int8 symmetric, " + ("per output channel" if self.options.per_channel else "per tensor"),
                "bias": "int32 at x_scale * w_scale",
            },
            "calibration": {"method": self.options.method, "samples": len(self.calib),
                            "held_out_samples": len(self.held_out), "calib_sha256": file_sha256(self.options.calib),
                            "observer": "compiled" if self.observer_compiled else "evaluator"},
            "layers": per_layer,
            "kept_float": {**self.kept_float, **{ly.name: "its output stays float (a graph output, or read only by "
                                                          "float layers)" for ly in self.layers
                                                 if ly.name not in self.int8_layers and ly.name not in self.kept_float}},
            "tensors": {n: {"scale": p.scale, "zero_point": p.zero_point} for n, p in sorted(self.params.items())},
            "accuracy": {r.name: r.to_json() for r in accuracy},
            "budget": str(budget) if budget else None,
            "budget_search": self.budget_search or None,
            "sensitivity": [{"layer": s.name, "kind": s.kind, "error": float(f"{s.error:.6g}"),
                             "argmax_agreement": s.argmax_agreement} for s in self.sensitivity] or None,
        }

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def format_accuracy(report: list[OutputAccuracy]) -> str:
    lines = []
    for r in report:
        agree = "" if r.argmax_agreement is None else f", argmax agreement {100 * r.argmax_agreement:.1f}%"
        lines.append(f"  {r.name}: cosine {r.cosine:.5f} (min {r.cosine_min:.5f}), max abs error "
                     f"{r.max_abs_error:.4g}{agree}")
    return "\n".join(lines)


def format_sensitivity(items: list[LayerSensitivity], top: int = 10) -> str:
    lines = [f"  {'layer':40s} {'kind':5s} {'1 - cosine':>11s} {'argmax':>7s}"]
    for s in items[:top]:
        agree = "" if s.argmax_agreement is None else f"{100 * s.argmax_agreement:6.1f}%"
        lines.append(f"  {s.name[:40]:40s} {s.kind:5s} {s.error:11.3e} {agree:>7s}")
    if len(items) > top:
        lines.append(f"  ... {len(items) - top} more (all in the manifest)")
    return "\n".join(lines)
