"""Compile-time facts the lowerings share: constant ints, and what the declared shapes imply.

An ONNX op may take its axes, sizes or repeats as a runtime input. kiln compiles for the shapes
that shape inference settled, so where the input and output shapes determine such a value
uniquely (the axes a Reduce dropped, the sizes of a Split) it is read from the shapes; where they
do not, the lowering refuses with a CodegenError.
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


def reduced_axes(node: Node, inp: Value, out: Value, keepdims: bool) -> list[int]:
    """The axes a reduction-like op drops (or keeps as 1), from its declared input and output shapes."""
    si, so = static_shape(inp), static_shape(out)
    if si is None or so is None:
        raise CodegenError(f"node {node.label()}: runtime axes need static input and output shapes to compile")
    if keepdims:
        if len(si) != len(so) or any(a != b and b != 1 for a, b in zip(si, so)):
            raise CodegenError(f"node {node.label()}: the shapes {si} -> {so} are not a reduction")
        if any(a == 1 for a in si):
            raise CodegenError(f"node {node.label()}: runtime axes over an input with size-1 dims are ambiguous")
        return [k for k, (a, b) in enumerate(zip(si, so)) if a != b]
    # keepdims=0: the output is the input with some dims dropped; the match must be unique
    matches: list[list[int]] = []

    def walk(i: int, j: int, dropped: list[int]) -> None:
        if len(matches) > 1:
            return
        if j == len(so):
            matches.append(dropped + list(range(i, len(si))))
            return
        if i == len(si):
            return
        if si[i] == so[j]:
            walk(i + 1, j + 1, dropped)
        walk(i + 1, j, dropped + [i])

    walk(0, 0, [])
    if len(matches) != 1 or len(si) - len(so) != len(matches[0]):
        raise CodegenError(f"node {node.label()}: runtime axes cannot be read from the shapes {si} -> {so}")
    return matches[0]


def out_dims(lw: Any, v: Value) -> list[Any] | None:
    """The value's shape as TIR dims (symbols as int64 vars), or None when a dim is unknown."""
    from kiln.ir import is_unknown_dim

    if v.shape is None or any(d is None or is_unknown_dim(d) for d in v.shape):
        return None
    return [lw.dim(d) for d in v.shape]
