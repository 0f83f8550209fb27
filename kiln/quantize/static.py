"""Static int8: calibrate a float model, choose its int8 layers, compile it, and report accuracy.

``kiln compile MODEL --quantize int8 --calib SAMPLES.npz`` runs :func:`compile_int8`:

1. **Prepare.** The model is imported (upgraded to opset 13 if older) and simplified with
   the float passes, so that BatchNorms are folded into their convs before anything is
   measured. The layers kiln can run in int8 are listed (``quantizable_layers``).
2. **Observe.** The float model runs on the calibration samples with every tensor the int8
   layers would read as an extra output: compiled by kiln (the observer artifact), or
   through the evaluator when the model is tiny. Observers keep each tensor's min and max,
   and for ``percentile`` and ``entropy`` a 2048-bin histogram from a second pass.
3. **Measure.** With ``sensitivity`` (or a budget), a second float model fake-quantizes
   each layer behind a mask input, so that one compile serves every "one layer in int8"
   run: a layer's error is measured on held-out samples with only it quantized.
4. **Choose.** ``exclude`` names layers kept in float; a budget keeps the most sensitive
   layers in float until it holds on the mask model.
5. **Quantize, build and report.** The ``quantize`` pass inserts Q/DQ, the driver's pipeline
   turns it into VNNI kernels, and the artifact is run on the held-out samples against the
   float outputs (cosine, max abs error and argmax agreement per output). If a budget misses on
   the compiled artifact, one more layer stays float and it is built again, up to 3 times.
   The result goes into the manifest's ``quantization`` entry.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from kiln.quantize.accuracy import Budget, OutputAccuracy, compare
from kiln.quantize.calibration import METHODS, Observer, read_samples
from kiln.quantize.options import QuantizeError, QuantizeOptions

if TYPE_CHECKING:
    from kiln.driver import CompileResult

#: Below this many multiply-accumulates (model MACs x samples) observers use the evaluator.
EVALUATOR_MACS = 2e8
#: Samples the sensitivity and budget searches use (the final report uses every held-out one).
SEARCH_SAMPLES = 16
#: Extra builds when the compiled artifact misses the budget the mask model met.
BUDGET_RETRIES = 3
#: The kiln ops that are int8 kernels.
INT8_KERNELS = ("QBlockedConv", "QDense")


class GraphRunner:
    """Runs a float graph on feeds and returns the named values: compiled by kiln, or evaluated."""

    def __init__(self, graph: Any, outputs: Sequence[str], *, compiled: bool, target: Any, workdir: str,
                 label: str):
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
            from kiln.driver import compile_graph
            from kiln.runtime import load

            path = os.path.join(workdir, f"{label}.kiln")
            compile_graph(g, path, target=target)
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
        from kiln.codegen.build import check_compilable_signature
        from kiln.driver import load_model, optimize
        from kiln.passes.pipeline import FLOAT_PREP
        from kiln.passes.quantize import quantizable_layers

        if self.options.method not in METHODS:
            raise QuantizeError(f"calibration method '{self.options.method}'; methods: {', '.join(METHODS)}")
        graph = load_model(self.model, min_opset=13)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in graph.walk_nodes()):
            raise QuantizeError(f"{self.model} is already quantized (it has QuantizeLinear/DequantizeLinear); "
                                f"compile it without --quantize")
        if self.input_shapes:
            from kiln.ir import set_input_shapes

            set_input_shapes(graph, self.input_shapes)
        check_compilable_signature(graph)  # calibration runs the model: its input shapes must be known
        from kiln.ir.summary import summarize

        self.baseline = summarize(graph)  # the float model as given: the compression report's "before"
        self.graph, _ = optimize(graph, passes=FLOAT_PREP)
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


def format_sensitivity(items: list[LayerSensitivity], top: int = 10) -> str:
    lines = [f"  {'layer':40s} {'kind':5s} {'1 - cosine':>11s} {'argmax':>7s}"]
    for s in items[:top]:
        agree = "" if s.argmax_agreement is None else f"{100 * s.argmax_agreement:6.1f}%"
        lines.append(f"  {s.name[:40]:40s} {s.kind:5s} {s.error:11.3e} {agree:>7s}")
    if len(items) > top:
        lines.append(f"  ... {len(items) - top} more (all in the manifest)")
    return "\n".join(lines)


def compile_int8(model: str | os.PathLike, output: str | os.PathLike, options: QuantizeOptions, *, target: Any,
                 level: str | None = None, input_shapes: dict[str, tuple] | None = None, tuning_db: Any = None,
                 progress: Callable[[str], None] | None = None) -> CompileResult:
    """Calibrate, quantize and compile ``model`` into ``output``; see the module docstring.

    The result's ``quantization`` is the manifest entry; ``extra`` holds what the report needs
    beyond it (``sensitivity``, ``layers`` planned, ``calib_samples``, ``held_out_samples``,
    ``accuracy``, ``budget``).
    """
    from kiln.codegen.build import file_sha256, set_manifest_entry
    from kiln.driver import compile_graph

    if target.kind != "cpu":
        raise QuantizeError("--quantize int8 builds CPU kernels (VNNI); CUDA int8 is not built yet")
    say = progress or (lambda _: None)
    budget = options.budget
    session = QuantizeSession(str(model), options, target, dict(input_shapes or {}), say=say)
    source = (file_sha256(model), Path(model).name)
    try:
        say("importing and preparing the float model")
        session.prepare()
        session.calibrate()
        if options.sensitivity or budget is not None:
            session.measure_sensitivity()
        if budget is not None:
            session.fit_budget(budget)
        for attempt in range(BUDGET_RETRIES + 1):
            result = compile_graph(session.quantized_graph(), output, target=target, level=level,
                                   tuning_db=tuning_db, source=source, applied=["quantize"], progress=say,
                                   baseline=session.baseline)
            accuracy = session.evaluate(output)
            if budget is None or budget.holds(accuracy) or attempt == BUDGET_RETRIES or not session.keep_more():
                break
            say(f"the compiled model misses {budget} ({budget.metric} {budget.score(accuracy):.4f}); "
                f"keeping one more layer in float")
        record = session.record(accuracy, budget)
        record["int8_kernels"] = sum(1 for n in result.graph.walk_nodes()
                                     if n.domain == "kiln" and n.op_type in INT8_KERNELS)
        set_manifest_entry(output, "quantization", record)
    finally:
        session.close()
    result.quantization = record
    result.extra = {
        "sensitivity": session.sensitivity,
        "planned_kernels": sum(1 for ly in session.layers if ly.kind != "add" and record["layers"].get(ly.name) == "int8"),
        "calib_samples": len(session.calib),
        "held_out_samples": len(session.held_out),
        "accuracy": accuracy,
        "budget": budget,
    }
    return result
