"""Numerical oracles: compare two engines' outputs, run onnxruntime, make seeded inputs.

Used by ``kiln check``, the verified-rewrite machinery and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.ir.core import Graph, Value, shape_example
from kiln.ir.dtypes import DType


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


def onnxruntime_session(model: str | bytes, *, threads: int | None = None, spinning: bool = True,
                        optimize: bool = True) -> Any:
    """An onnxruntime CPU session (``ORT_ENABLE_ALL`` unless ``optimize`` is off), quiet logs.

    Turn ``spinning`` off when another engine shares the machine: idle onnxruntime
    threads otherwise spin-wait and take cores from it.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _ort_error(e) from None


def run_onnxruntime(model: str | bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs, by name, for a model path or serialized model bytes."""
    sess = onnxruntime_session(model)
    try:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, dict(feeds))))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _ort_error(e) from None


def _ort_error(e: Exception) -> KilnError:
    """onnxruntime's exception as kiln's one-line error."""
    text = str(e).strip()
    return KilnError(f"onnxruntime failed: {text.splitlines()[0] if text else type(e).__name__}")


def concrete_shape(v: Value, overrides: Mapping[str, tuple[int | str, ...]]) -> tuple[int, ...]:
    """The shape to feed for input ``v``: its static shape, or the user's override."""
    if v.name in overrides:
        shape = getattr(overrides[v.name], "dims", overrides[v.name])  # a sequence's pin: its elements' dims
        if not all(isinstance(d, int) for d in shape):
            raise InputError(f"--input-shape for '{v.name}' must give sizes here, not symbols")
        if v.shape is not None and (
            len(shape) != len(v.shape) or any(isinstance(d, int) and d != s for d, s in zip(v.shape, shape))
        ):
            raise InputError(f"--input-shape for '{v.name}' is {'x'.join(map(str, shape))}, but the model says {v.type_str()}")
        return shape  # type: ignore[return-value]
    if v.shape is None or any(not isinstance(d, int) for d in v.shape):
        example = shape_example(v.shape or ("1",))
        raise InputError(
            f"input '{v.name}' is {v.type_str()}, which has symbolic dims; give sizes with --input-shape {v.name}={example}"
        )
    return tuple(v.shape)  # type: ignore[arg-type]


def seeded_inputs(graph: Graph, overrides: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's signature (normal floats, small ints, random bools); a list of
    arrays for a sequence input of pinned length."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}

    def draw(shape: tuple[int, ...], dtype: DType) -> np.ndarray:
        if dtype.is_float:
            return rng.standard_normal(shape).astype(dtype.numpy)
        if dtype is DType.BOOL:
            return rng.random(shape) < 0.5
        return rng.integers(0, 4, size=shape).astype(dtype.numpy)

    for v in graph.inputs:
        shape = concrete_shape(v, overrides)
        dtype = v.dtype or DType.FLOAT32
        if v.sequence:
            pin = overrides.get(v.name)
            elements = getattr(pin, "elements", None) or v.seq_shapes or ()
            if not all(isinstance(d, int) for e in elements for d in e):
                raise InputError(f"--input-shape for '{v.name}' must give sizes here, not symbols")
            feeds[v.name] = [draw(tuple(e), dtype) for e in elements]  # type: ignore[arg-type]
        else:
            feeds[v.name] = draw(shape, dtype)
    return feeds


