"""``kiln check``: does kiln read this model faithfully?

It imports the model, verifies the IR, writes it back out as ONNX, and runs the
original and the round-tripped model in onnxruntime on the same seeded inputs
(they must agree to rtol 1e-6). Then it runs kiln's reference evaluator on the
same inputs and compares it with onnxruntime (rtol 1e-4, atol 1e-5 for floats).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.ir import Graph, evaluate, load, to_onnx
from kiln.ir.interpreter import check_inputs
from kiln.ir.oracle import Comparison, compare, run_onnxruntime, seeded_inputs

__all__ = ["CheckReport", "Comparison", "check_model", "compare", "parse_shape_overrides", "seeded_inputs"]

ROUND_TRIP_RTOL = 1e-6
EVAL_RTOL, EVAL_ATOL = 1e-4, 1e-5


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name; a clear error for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as e:
        raise KilnError(f"{p}: not a readable .npz file ({e})") from None


def parse_shape_overrides(specs: list[str] | None) -> dict[str, tuple[int | str, ...]]:
    """``["x=1x3x48xW"]`` → ``{"x": (1, 3, 48, "W")}``: ints, or names for symbolic dims; ``x=`` is a scalar."""
    out: dict[str, tuple[int | str, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise InputError(f"--input-shape '{spec}' must look like NAME=1x3x224x224 (a name, like W, for a symbolic dim)")
        parsed: list[int | str] = []
        for d in dims.split("x") if dims else []:
            if d.isdigit():
                parsed.append(int(d))
            elif d.isidentifier():
                parsed.append(d)
            else:
                raise InputError(f"--input-shape '{spec}': each dim is an integer or a name, separated by 'x'")
        out[name] = tuple(parsed)
    return out


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
    reference = run_onnxruntime(str(Path(path)), feeds)
    round_trip = run_onnxruntime(to_onnx(graph).SerializeToString(), feeds)
    comparisons = [compare("ONNX round trip vs original (onnxruntime)", round_trip, reference, ROUND_TRIP_RTOL, 0.0)]
    if use_evaluator:
        got = evaluate(graph, feeds)
        comparisons.append(compare("kiln evaluator vs onnxruntime", got, reference, EVAL_RTOL, EVAL_ATOL))
    return CheckReport(graph, feeds, comparisons)
