"""Lowerings of the sequence ops: SequenceEmpty, SequenceConstruct, SplitToSequence, SequenceAt,
SequenceInsert, SequenceErase, SequenceLength and ConcatFromSequence.

A sequence is lowered away: while lowering it is a Python list of its elements' Relax values,
known when compiling (its length, and each element's shape), and the ops that read it become
tensor kernels (a concat, a pick by a run-time index) or constants (its length). So the positions
that change a sequence's length (SequenceInsert's and SequenceErase's, SplitToSequence's split)
must be constants; a sequence whose length only the data decides does not compile. A graph output
that is a sequence becomes a tuple of its elements, which the runtime returns as a list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import full, static_shape
from kiln.ir import Node, Value, const_ints, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _sequence(lw: Lowerer, node: Node, i: int = 0) -> list[Any]:
    seq = lw.get(node.input(i))
    if not isinstance(seq, list):
        raise CodegenError(f"node {node.label()}: input {i} is not a sequence kiln knows the length of when compiling")
    return seq


def _position(node: Node, i: int, length: int, default: int, *, insert: bool = False) -> int:
    """A constant position input (negative counts from the end), or ``default`` when it is absent."""
    v = node.input(i)
    if v is None:
        return default
    pos = const_ints(v)
    if pos is None:
        raise CodegenError(f"node {node.label()}: the position must be a constant to compile (it changes the "
                           "sequence's length, which kiln fixes when compiling)")
    p = pos[0] + length + (1 if insert else 0) if pos[0] < 0 else pos[0]
    if not 0 <= p <= (length if insert else length - 1):
        raise CodegenError(f"node {node.label()}: position {pos[0]} is out of range for a sequence of {length}")
    return p


@lowers("SequenceEmpty", reads=())
def _sequence_empty(lw: Lowerer, node: Node) -> list[Any]:
    return [[]]


@lowers("SequenceConstruct")
def _sequence_construct(lw: Lowerer, node: Node) -> list[Any]:
    return [[lw.get(v) for v in node.inputs]]


@lowers("SequenceInsert")
def _sequence_insert(lw: Lowerer, node: Node) -> list[Any]:
    seq = list(_sequence(lw, node))
    seq.insert(_position(node, 2, len(seq), len(seq), insert=True), lw.get(node.input(1)))
    return [seq]


@lowers("SequenceErase")
def _sequence_erase(lw: Lowerer, node: Node) -> list[Any]:
    seq = list(_sequence(lw, node))
    if not seq:
        raise CodegenError(f"node {node.label()}: SequenceErase of an empty sequence")
    del seq[_position(node, 1, len(seq), len(seq) - 1)]
    return [seq]


@lowers("SequenceLength")
def _sequence_length(lw: Lowerer, node: Node) -> list[Any]:
    n = len(_sequence(lw, node))
    return [lw.emit(lambda: full((), n, "int64", "length"), name="sequence_length")]


@lowers("SequenceAt")
def _sequence_at(lw: Lowerer, node: Node) -> list[Any]:
    """The element at a constant position; at a run-time position, a pick among elements of one shape."""
    from tvm import te, tirx

    seq = _sequence(lw, node)
    if not seq:
        raise CodegenError(f"node {node.label()}: SequenceAt of an empty sequence")
    pos = const_ints(node.input(1))
    if pos is not None:
        return [seq[_position(node, 1, len(seq), 0)]]
    shapes = {tuple(int(d) for d in e.ty.shape.values) if _static(e) else None for e in seq}
    if None in shapes or len(shapes) != 1 or len({e.ty.dtype for e in seq}) != 1:
        raise CodegenError(f"node {node.label()}: SequenceAt with a run-time position needs elements of one static "
                           "shape and dtype to compile")
    n = len(seq)

    def pick(index: Any, *elems: Any) -> Any:
        k = index[()] if not index.shape else index[0]
        k = tirx.Select(k < 0, k + n, k).astype("int64")

        def body(*i: Any) -> Any:
            out = elems[-1][i]
            for j in range(n - 2, -1, -1):
                out = tirx.Select(k == j, elems[j][i], out)
            return out

        return te.compute(elems[0].shape, body, name="sequence_at")

    return [lw.emit(pick, lw.get(node.input(1)), *seq, name="sequence_at")]


def _static(e: Any) -> bool:
    values = getattr(getattr(e.ty, "shape", None), "values", None)
    return values is not None and all(isinstance(getattr(d, "value", None), int) for d in values)


@lowers("SplitToSequence")
def _split_to_sequence(lw: Lowerer, node: Node) -> list[Any]:
    """Split into a sequence: by a constant size per part (a scalar: parts of that size, the last smaller;
    a list: those sizes), or into parts of 1 (squeezed unless ``keepdims=1``) without one."""
    from tvm import te, topi

    x = node.input(0)
    shape = static_shape(x)
    axis = normalize_axis(node.attr("axis", 0), x.rank or 0)
    if shape is None:
        raise CodegenError(f"node {node.label()}: SplitToSequence needs a static input shape to compile")
    dim = shape[axis]
    split: Value | None = node.input(1)
    squeeze = split is None and not node.attr("keepdims", 1)
    if split is None:
        sizes = [1] * dim
    else:
        given = const_ints(split)
        if given is None:
            raise CodegenError(f"node {node.label()}: SplitToSequence needs constant split sizes to compile (they "
                               "decide the sequence's length)")
        if split.shape == () or split.rank == 0:
            chunk = given[0]
            sizes = [chunk] * (dim // chunk) + ([dim % chunk] if dim % chunk else [])
        else:
            sizes = list(given)
    starts = [int(s) for s in np.cumsum([0, *sizes])[:-1]]
    if not sizes:
        return [[]]

    def part(t: Any, start: int, size: int) -> Any:
        dims = [size if k == axis else d for k, d in enumerate(t.shape)]
        return te.compute(dims, lambda *i: t[(*i[:axis], i[axis] + start, *i[axis + 1:])], name="part")

    def parts(t: Any) -> Any:
        out = [part(t, start, size) for start, size in zip(starts, sizes)]
        out = [topi.squeeze(p, [axis]) for p in out] if squeeze else out
        return out if len(out) > 1 else out[0]

    result = lw.emit(parts, lw.get(x), name="split_to_sequence")
    return [[result] if len(sizes) == 1 else lw.unpack_all(result, len(sizes))]


@lowers("ConcatFromSequence")
def _concat_from_sequence(lw: Lowerer, node: Node) -> list[Any]:
    """Concatenate the elements along ``axis``, or stack them on a new axis (``new_axis=1``)."""
    from tvm import topi

    seq = _sequence(lw, node)
    if not seq:
        raise CodegenError(f"node {node.label()}: ConcatFromSequence of an empty sequence")
    new_axis = bool(node.attr("new_axis", 0))
    rank = len(seq[0].ty.shape.values) + (1 if new_axis else 0)
    axis = normalize_axis(node.attr("axis"), rank)

    def concat(*elems: Any) -> Any:
        parts = [topi.expand_dims(e, axis, 1) for e in elems] if new_axis else list(elems)
        return topi.concatenate(parts, axis)

    return [lw.emit(concat, *seq, name="concat_from_sequence")]
