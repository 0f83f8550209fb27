"""``kiln check``: does kiln read this model faithfully?

It imports the model, verifies the IR, writes it back out as ONNX, and runs the
original and the round-tripped model in onnxruntime on the same seeded inputs
(they must agree to rtol 1e-6). Then it runs kiln's reference evaluator on the
same inputs and compares it with onnxruntime (rtol 1e-4, atol 1e-5 for floats).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.ir import Graph, Value, evaluate, load, to_onnx
from kiln.ir.dtypes import DType
from kiln.ir.interpreter import check_inputs

ROUND_TRIP_RTOL = 1e-6
EVAL_RTOL, EVAL_ATOL = 1e-4, 1e-5


@dataclass
class Comparison:
    """How two engines' outputs compare, output by output."""

    name: str
    rtol: float
    atol: float
    max_abs: dict[str, float] = field(default_factory=dict)
    ok: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.ok.values())


def parse_shape_overrides(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224"]`` → ``{"x": (1, 3, 224, 224)}``; ``x=`` means a scalar."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise InputError(f"--input-shape '{spec}' must look like NAME=1x3x224x224")
        try:
            out[name] = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise InputError(f"--input-shape '{spec}': dims must be integers separated by 'x'") from None
    return out


def concrete_shape(v: Value, overrides: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape to feed for input ``v``: its static shape, or the user's override."""
    if v.name in overrides:
        shape = overrides[v.name]
        if v.shape is not None and (
            len(shape) != len(v.shape) or any(isinstance(d, int) and d != s for d, s in zip(v.shape, shape))
        ):
            raise InputError(f"--input-shape for '{v.name}' is {'x'.join(map(str, shape))}, but the model says {v.type_str()}")
        return shape
    if v.shape is None or any(not isinstance(d, int) for d in v.shape):
        example = "x".join(str(d) if isinstance(d, int) else "1" for d in (v.shape or ("1",)))
        raise InputError(
            f"input '{v.name}' is {v.type_str()}, which has symbolic dims; give sizes with --input-shape {v.name}={example}"
        )
    return tuple(v.shape)  # type: ignore[arg-type]


def seeded_inputs(graph: Graph, overrides: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's signature (normal floats, small ints, random bools)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        shape = concrete_shape(v, overrides)
        dtype = v.dtype or DType.FLOAT32
        if dtype.is_float:
            arr = rng.standard_normal(shape).astype(dtype.numpy)
        elif dtype is DType.BOOL:
            arr = rng.random(shape) < 0.5
        else:
            arr = rng.integers(0, 4, size=shape).astype(dtype.numpy)
        feeds[v.name] = arr
    return feeds


def compare(name: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float, atol: float) -> Comparison:
    """Compare two engines' outputs, name by name (NaNs equal NaNs; shapes must match)."""
    cmp = Comparison(name, rtol, atol)
    for key, expected in want.items():
        actual = np.asarray(got[key])
        expected = np.asarray(expected)
        if actual.shape != expected.shape:
            cmp.ok[key], cmp.max_abs[key] = False, float("inf")
            continue
        if expected.dtype.kind in "fc":
            diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
            cmp.max_abs[key] = float(np.nanmax(diff)) if diff.size else 0.0
            cmp.ok[key] = bool(np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True))
        else:
            cmp.ok[key] = bool(np.array_equal(actual, expected))
            cmp.max_abs[key] = 0.0 if cmp.ok[key] else float("inf")
    return cmp


def _ort_run(model: str | bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, dict(feeds))))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"onnxruntime failed: {msg}") from None


@dataclass
class CheckReport:
    """The result of :func:`check_model`."""

    graph: Graph
    inputs: dict[str, np.ndarray]
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def check_model(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    use_evaluator: bool = True,
) -> CheckReport:
    """Import, verify, round-trip and evaluate ``path``; compare everything with onnxruntime."""
    graph = load(path)
    graph.verify()
    feeds = check_inputs(graph, inputs) if inputs is not None else seeded_inputs(graph, input_shapes or {}, seed)
    reference = _ort_run(str(Path(path)), feeds)
    round_trip = _ort_run(to_onnx(graph).SerializeToString(), feeds)
    comparisons = [compare("ONNX round trip vs original (onnxruntime)", round_trip, reference, ROUND_TRIP_RTOL, 0.0)]
    if use_evaluator:
        got = evaluate(graph, feeds)
        comparisons.append(compare("kiln evaluator vs onnxruntime", got, reference, EVAL_RTOL, EVAL_ATOL))
    return CheckReport(graph, feeds, comparisons)
