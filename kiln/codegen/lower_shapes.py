"""Compile-time facts the lowerings share: constant ints, and what the declared shapes imply.

An ONNX op may take its axes, sizes or repeats as a runtime input. kiln compiles for the shapes
that shape inference settled, so where the input and output shapes determine such a value
uniquely (the sizes of a Split) it is read from the shapes; where several values fit (the axes a
Reduce dropped), the lowering computes each candidate and picks one at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.codegen.lower import CodegenError
from kiln.ir import Node, Value


def const_ints(v: Value | None) -> list[int] | None:
    """A constant input's values as ints (None when absent or computed at run time)."""
    if v is None or not v.is_constant:
        return None
    return [int(x) for x in np.asarray(v.numpy()).reshape(-1)]


def static_shape(v: Value | None) -> list[int] | None:
    """The value's shape when every dim is a known int."""
    if v is None or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return list(v.shape)  # type: ignore[arg-type]


def norm_axes(axes: list[int], rank: int) -> list[int]:
    """Axes made non-negative and sorted."""
    return sorted(a + rank if a < 0 else a for a in axes)


def candidate_axes(node: Node, inp: Value, out: Value, keepdims: bool, count: int | None) -> list[list[int]]:
    """Every set of ``count`` axes a reduction could drop (or keep as 1) to turn the declared input
    shape into the declared output shape; raises when there is none."""
    from itertools import combinations

    si, so = static_shape(inp), static_shape(out)
    if si is None or so is None:
        raise CodegenError(f"node {node.label()}: runtime axes need static input and output shapes to compile")
    found: list[list[int]] = []
    if keepdims:
        if len(si) == len(so) and all(a == b or b == 1 for a, b in zip(si, so)):
            need = [k for k, (a, b) in enumerate(zip(si, so)) if a != b]
            ones = [k for k, a in enumerate(si) if a == 1]
            sizes = [count - len(need)] if count is not None else range(len(ones) + 1)
            found = [sorted(need + list(c)) for n in sizes if 0 <= n <= len(ones) for c in combinations(ones, n)]
    else:
        drop = len(si) - len(so)
        for c in combinations(range(len(si)), drop):
            if (count is None or count == drop) and [d for k, d in enumerate(si) if k not in c] == so:
                found.append(list(c))
    if not found:
        raise CodegenError(f"node {node.label()}: no axes turn {si} into {so}")
    return found


def out_dims(lw: Any, v: Value) -> list[Any] | None:
    """The value's shape as TIR dims (named symbols as int64 vars, derived ones as the expressions
    the lowerer learnt for them), or None when a dim is unknown."""
    from kiln.codegen.lower import _known_shape

    if not _known_shape(v, lw.derived):
        return None
    return [lw.dim(d) for d in v.shape]
