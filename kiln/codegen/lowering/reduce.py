"""Lowerings of ONNX's reductions: ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare
and ArgMax/ArgMin.

Axes come from the attribute (older opsets), a constant input, or, when the input is computed
at run time, the declared shapes (``_candidate_axes``): where they settle the axes, those;
where several sets fit, the lowering reduces over each and picks one at run time. No axes
reduces everything, unless ``noop_with_empty_axes`` makes the op an identity.
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import full, static_shape, wrap_index
from kiln.ir import Node, Value, const_ints, normalize_axes, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _candidate_axes(node: Node, inp: Value, out: Value, keepdims: bool, count: int | None) -> list[list[int]]:
    """Every set of ``count`` axes a reduction could drop (or keep as 1) to turn the declared input
    shape into the declared output shape; raises when there is none."""
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


_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceSumSquare")


def _axes(node: Node) -> list[list[int]] | None:
    """The candidate sets of reduced axes (sorted, non-negative): one unless the axes are a run-time
    input that the shapes do not settle; None reduces everything; [[]] is the identity."""
    x, out = node.input(0), node.outputs[0]
    rank = x.rank or 0
    keep = bool(node.attr("keepdims", 1))
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = const_ints(node.input(1))
        shape = node.input(1).shape
        count = shape[0] if shape and isinstance(shape[0], int) else None
        if axes is None and count != 0:
            return _candidate_axes(node, x, out, keep, count)
    if not axes:
        return [[]] if node.attr("noop_with_empty_axes", 0) else None
    return [normalize_axes(axes, rank)]


def _reduce(op: str, t: Any, axes: list[int] | None, keep: bool) -> Any:
    from tvm import topi

    if str(t.dtype) == "bool":  # any/all as max/min over 0/1
        return topi.cast(_reduce(op, topi.cast(t, "uint8"), axes, keep), "bool")

    if op == "ReduceSum":
        return topi.sum(t, axes, keep)
    if op == "ReduceMax":
        return topi.max(t, axes, keep)
    if op == "ReduceMin":
        return topi.min(t, axes, keep)
    if op == "ReduceProd":
        return topi.prod(t, axes, keep)
    if op == "ReduceL1":
        return topi.sum(topi.abs(t), axes, keep)
    if op == "ReduceSumSquare":
        return topi.sum(topi.multiply(t, t), axes, keep)
    if op == "ReduceL2":
        sq = topi.sum(topi.multiply(t, t), axes, keep)
        return topi.sqrt(sq) if str(sq.dtype).startswith("float") else topi.cast(topi.sqrt(topi.cast(sq, "float64")), sq.dtype)
    if op == "ReduceLogSum":
        return topi.log(topi.sum(t, axes, keep))
    if op == "ReduceLogSumExp":
        m = topi.max(t, axes, True)
        m = topi.where(topi.isinf(m), topi.full_like(m, 0.0), m)  # keeps -inf/+inf inputs exact
        s = topi.log(topi.sum(topi.exp(topi.subtract(t, m)), axes, True))
        y = topi.add(s, m)
        if not keep:
            dims = [d for k, d in enumerate(y.shape) if k not in (axes if axes is not None else range(len(y.shape)))]
            y = topi.reshape(y, dims)
        return y
    if op == "ReduceMean":
        n = 1
        for k in axes if axes is not None else range(len(t.shape)):
            n = n * t.shape[k]
        s = topi.sum(t, axes, keep)
        return topi.divide(s, topi.cast(n, s.dtype) if not isinstance(n, int) else n)
    raise CodegenError(f"no reduction {op}")


#: What each reduction gives over no elements (ONNX's "empty set" cases).
_EMPTY = {"ReduceSum": 0.0, "ReduceMean": float("nan"), "ReduceMax": float("-inf"), "ReduceMin": float("inf"),
          "ReduceProd": 1.0, "ReduceL1": 0.0, "ReduceL2": 0.0, "ReduceLogSum": float("-inf"),
          "ReduceLogSumExp": float("-inf"), "ReduceSumSquare": 0.0}


@lowers(*_REDUCE)
def _reduction(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    cands = _axes(node)
    x = node.input(0)
    if cands == [[]]:
        return [lw.get(x)]
    keep = bool(node.attr("keepdims", 1))
    op = node.op_type
    rank = x.rank or 0
    if cands is not None and len(cands) == 1 and any(x.shape[k] == 0 for k in cands[0]) or \
            cands is None and 0 in (x.shape or []):
        out = node.outputs[0]
        dt = out.dtype.numpy
        value = _EMPTY[op]
        if dt.kind in "iub" and not np.isfinite(value):  # integer max/min identities
            value = (np.iinfo(dt).min if value < 0 else np.iinfo(dt).max) if dt.kind != "b" else (value > 0)
        dims = [lw.dim(d) for d in out.shape]
        return [lw.emit(lambda t: full(dims, value, dt.name, "full"), lw.get(x), name=f"{op.lower()}_empty")]
    if cands is None or len(cands) == 1:
        axes = None if cands is None else cands[0]
        return [lw.emit(lambda t: _reduce(op, t, axes, keep), lw.get(x), name=op.lower())]

    def pick(t: Any, ax: Any) -> Any:
        # the axes are a run-time input that several axis sets fit: reduce over each, keep the asked one
        outs = [_reduce(op, t, c, keep) for c in cands]

        def chosen(c: list[int]) -> Any:
            norm = [wrap_index(ax[j], rank) for j in range(len(c))]
            return tirx.all(*[tirx.any(*[a == k for k in c]) for a in norm])

        def body(*i: Any) -> Any:
            v = outs[-1][i]
            for c, o in zip(cands[-2::-1], outs[-2::-1]):
                v = tirx.Select(chosen(c), o[i], v)
            return v

        return te.compute(outs[0].shape, body, name="pick_axes")

    return [lw.emit(pick, lw.get(x), lw.get(node.input(1)), name=op.lower())]


@lowers("ArgMax", "ArgMin")
def _arg(lw: Lowerer, node: Node) -> list[Any]:
    """ArgMax/ArgMin with ``select_last_index``, as a two-value reduction (value, index)."""
    from tvm import te, tirx

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", 0), x.rank or 0)
    keep = bool(node.attr("keepdims", 1))
    last = bool(node.attr("select_last_index", 0))
    is_max = node.op_type == "ArgMax"

    def compute(t: Any) -> Any:
        def combine(a: Any, b: Any) -> Any:
            ai, av = a
            bi, bv = b
            better = (bv > av) if is_max else (bv < av)
            tie = bv == av
            take_b = tirx.Or(better, tirx.And(tie, (bi > ai) if last else (bi < ai)))
            return tirx.Select(take_b, bi, ai), tirx.Select(take_b, bv, av)

        def identity(t0: Any, t1: Any) -> Any:
            return tirx.const(-1, t0), (tirx.min_value(t1) if is_max else tirx.max_value(t1))

        argred = te.comm_reducer(combine, identity, name="argred")
        r = te.reduce_axis((0, t.shape[axis]), "r")
        oshape = [1 if k == axis else d for k, d in enumerate(t.shape)] if keep else \
            [d for k, d in enumerate(t.shape) if k != axis]

        def body(*i: Any) -> Any:
            idx = list(i)
            if keep:
                idx[axis] = r
            else:
                idx.insert(axis, r)
            return argred((r.var.astype("int64"), t[tuple(idx)]), axis=[r])

        pair = te.compute(oshape, body, name="argreduce")
        return pair[0]

    return [lw.emit(compute, lw.get(x), name=node.op_type.lower())]
