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
from kiln.codegen.lowering.te import full, pick, static_shape, wrap_index
from kiln.ir import Node, Value, const_ints, normalize_axes, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _candidate_axes(node: Node, inp: Value, out: Value, keepdims: bool, count: int | None) -> list[list[int]]:
    """Every set of ``count`` axes a reduction could drop (or keep as 1) to turn the declared input
    shape into the declared output shape; raises when there is none."""
    si, so = static_shape(inp), static_shape(out)
    if si is None or so is None or count is None:
        return RUN_TIME
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


#: ``_axes``' answer for axes read at run time that the declared shapes do not settle: the output's
#: shape is computed at run time too (``_reduce_at_run_time``).
RUN_TIME: list[list[int]] = [[-1]]

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


def extreme_reducer(kind: str) -> Any:
    """te's max/min, but starting from -inf/+inf: te.max starts from the type's lowest finite value,
    so the max of a row of -inf (a fully masked attention row) came out -3.4e38 instead of -inf."""
    from tvm import te, tirx

    if kind == "max":
        return te.comm_reducer(lambda a, b: tirx.max(a, b), lambda dt: tirx.const(float("-inf"), dt), name="max_inf")
    return te.comm_reducer(lambda a, b: tirx.min(a, b), lambda dt: tirx.const(float("inf"), dt), name="min_inf")


def _float_extreme(kind: str, t: Any, axes: list[int] | None, keep: bool) -> Any:
    """The max or min of float ``t`` over ``axes`` (None: all), from an infinite identity."""
    from tvm import te

    rank = len(t.shape)
    red = list(range(rank)) if axes is None else sorted(axes)
    raxes = {k: te.reduce_axis((0, t.shape[k]), f"r{k}") for k in red}
    shape = [1 if k in raxes else d for k, d in enumerate(t.shape) if keep or k not in raxes]
    reducer = extreme_reducer(kind)

    def body(*o: Any) -> Any:
        it = iter(o)
        idx = []
        for k in range(rank):
            if k in raxes:
                if keep:
                    next(it)
                idx.append(raxes[k].var)
            else:
                idx.append(next(it))
        return reducer(t[tuple(idx)], axis=list(raxes.values()))

    return te.compute(shape, body, name=f"reduce_{kind}")


def _reduce(op: str, t: Any, axes: list[int] | None, keep: bool) -> Any:
    """The reduction ``op`` of ``t`` over ``axes`` (None: all of them; []: none, which with
    ``noop_with_empty_axes`` applies the op to each element alone: x² for ReduceSumSquare, |x| for
    ReduceL1, log x for ReduceLogSum, as onnxruntime and onnx's reference do)."""
    from tvm import topi

    if str(t.dtype) == "bool":  # any/all as max/min over 0/1
        return topi.cast(_reduce(op, topi.cast(t, "uint8"), axes, keep), "bool")

    def agg(kind: str, v: Any, keepdims: bool = keep) -> Any:
        if axes == []:
            return v
        if kind in ("max", "min") and str(v.dtype).startswith("float"):
            return _float_extreme(kind, v, axes, keepdims)
        return getattr(topi, kind)(v, axes, keepdims)

    if op in ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"):
        return agg({"ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod"}[op], t)
    if op == "ReduceL1":
        return agg("sum", topi.abs(t))
    if op == "ReduceSumSquare":
        return agg("sum", topi.multiply(t, t))
    if op == "ReduceL2":
        sq = agg("sum", topi.multiply(t, t))
        return topi.sqrt(sq) if str(sq.dtype).startswith("float") else topi.cast(topi.sqrt(topi.cast(sq, "float64")), sq.dtype)
    if str(t.dtype) != "float64" and not str(t.dtype).startswith("float") and op in ("ReduceLogSum", "ReduceLogSumExp"):
        # ints: computed in float64, then cast back to the input's type (the output has it)
        return topi.cast(_reduce(op, topi.cast(t, "float64"), axes, keep), t.dtype)
    if op == "ReduceLogSum":
        return topi.log(agg("sum", t))
    if op == "ReduceLogSumExp":
        m = agg("max", t, True)
        m = topi.where(topi.isinf(m), topi.full_like(m, 0.0), m)  # keeps -inf/+inf inputs exact
        s = topi.log(agg("sum", topi.exp(topi.subtract(t, m)), True))
        y = topi.add(s, m)
        if not keep and axes != []:
            dims = [d for k, d in enumerate(y.shape) if k not in (axes if axes is not None else range(len(y.shape)))]
            y = topi.reshape(y, dims)
        return y
    if op == "ReduceMean":
        n = 1
        for k in axes if axes is not None else range(len(t.shape)):
            n = n * t.shape[k]
        s = agg("sum", t)
        return topi.divide(s, topi.cast(n, s.dtype) if not isinstance(n, int) else n)
    raise CodegenError(f"no reduction {op}")


#: What each reduction gives over no elements (ONNX's "empty set" cases). ReduceMean gives 0, as in
#: onnxruntime (onnx's reference gives NaN; the spec is silent, and users compare with onnxruntime).
_EMPTY = {"ReduceSum": 0.0, "ReduceMean": 0.0, "ReduceMax": float("-inf"), "ReduceMin": float("inf"),
          "ReduceProd": 1.0, "ReduceL1": 0.0, "ReduceL2": 0.0, "ReduceLogSum": float("-inf"),
          "ReduceLogSumExp": float("-inf"), "ReduceSumSquare": 0.0}


def _empty_value(op: str, dt: np.dtype) -> Any:
    """What ``op`` gives over no elements, in ``dt`` (integer max/min take the type's extremes)."""
    value = _EMPTY[op]
    if dt.kind in "iub" and not np.isfinite(value):
        value = (np.iinfo(dt).min if value < 0 else np.iinfo(dt).max) if dt.kind != "b" else (value > 0)
    return value


def _or_empty(op: str, t: Any, axes: list[int] | None, result: Any) -> Any:
    """``result``, or ``op``'s value over no elements where a reduced dim may be 0 at run time.

    A reduction loop that runs no times never runs its init either, so over an empty set TVM's
    kernel leaves its output unwritten; a static 0 is handled before lowering, a symbolic one here.
    """
    from tvm import te, tirx

    dims = [t.shape[k] for k in (range(len(t.shape)) if axes is None else axes)]
    if all(isinstance(d, tirx.IntImm) and int(d) > 0 for d in dims):
        return result
    empty = tirx.any(*[d == 0 for d in dims]) if len(dims) > 1 else dims[0] == 0
    value = tirx.const(_empty_value(op, np.dtype(str(result.dtype))), str(result.dtype))
    return te.compute(result.shape, lambda *o: tirx.Select(empty, value, result[o]), name="or_empty")


@lowers(*_REDUCE)
def _reduction(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    cands = _axes(node)
    x = node.input(0)
    if cands is RUN_TIME:
        return [_reduce_at_run_time(lw, node)]
    if cands == [[]] and node.op_type in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"):
        return [lw.get(x)]  # over no axes these are the identity
    keep = bool(node.attr("keepdims", 1))
    op = node.op_type
    rank = x.rank or 0
    if cands is not None and len(cands) == 1 and any(x.shape[k] == 0 for k in cands[0]) or \
            cands is None and 0 in (x.shape or []):
        out = node.outputs[0]
        dt = out.dtype.numpy
        value = _empty_value(op, dt)
        dims = [lw.dim(d) for d in out.shape]
        return [lw.emit(lambda t: full(dims, value, dt.name, "full"), lw.get(x), name=f"{op.lower()}_empty")]
    if cands is None or len(cands) == 1:
        axes = None if cands is None else cands[0]
        return [lw.emit(lambda t: _or_empty(op, t, axes, _reduce(op, t, axes, keep)), lw.get(x), name=op.lower())]

    def pick(t: Any, ax: Any) -> Any:
        # the axes are a run-time input that several axis sets fit: reduce over each, keep the asked one
        outs = [_or_empty(op, t, c, _reduce(op, t, c, keep)) for c in cands]

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


def _reduce_at_run_time(lw: Lowerer, node: Node) -> Any:
    """A reduction over axes read at run time whose output shape the declared shapes do not settle.

    Which dims are reduced is read from the axes into flags; the output's dims are computed from them
    (1, or gone without ``keepdims``) and read at run time; each reduction axis then runs over its dim
    where it is reduced and over a single index where it is not, so the work is one pass over the input.
    """
    from tvm import te, tirx

    x, op = node.input(0), node.op_type
    rank = x.rank or 0
    n = int(node.input(1).shape[0])
    keep = bool(node.attr("keepdims", 1))
    n_out = rank if keep else rank - n
    i64 = "int64"

    def flags(ax: Any) -> list[Any]:
        given = [wrap_index(ax[j], rank) for j in range(n)]
        return [tirx.any(*[a == k for a in given]) for k in range(rank)]

    def dims_of(t: Any, ax: Any) -> Any:
        red = flags(ax)
        sizes = [tirx.Cast(i64, d) for d in t.shape]
        if keep:
            values = [tirx.Select(r, tirx.const(1, i64), d) for r, d in zip(red, sizes)]
        else:  # output dim j: the j-th dim not reduced
            kept = [tirx.Cast(i64, tirx.Not(r)) for r in red]
            before = [sum(kept[:k + 1], tirx.const(0, i64)) for k in range(rank)]
            values = [sum((tirx.Select(tirx.all(tirx.Not(red[k]), before[k] == j + 1), sizes[k], tirx.const(0, i64))
                           for k in range(rank)), tirx.const(0, i64)) for j in range(n_out)]
        return te.compute((n_out,), lambda j: pick(j, values), name="reduce_dims")

    out_dims = lw.computed_dims(dims_of, lw.get(x), lw.get(node.input(1)), count=n_out, name="reduced")

    def compute(t: Any, ax: Any) -> Any:
        if str(t.dtype) == "bool":  # any/all as max/min over 0/1
            from tvm import topi

            return topi.cast(compute(topi.cast(t, "uint8"), ax), "bool")
        # A reduction loop that runs no times never runs its init either, so over an empty set the
        # kernel leaves its output unwritten: the op's value over no elements is selected instead.
        red = flags(ax)
        empty = tirx.any(*[tirx.all(red[k], t.shape[k] == 0) for k in range(rank)])
        value = tirx.const(_empty_value(op, np.dtype(str(t.dtype))), str(t.dtype))
        result = reduced(t, ax)
        return te.compute(out_dims, lambda *o: tirx.Select(empty, value, result[o]), name="reduce")

    def reduced(t: Any, ax: Any) -> Any:
        red = flags(ax)
        dt = str(t.dtype)
        f = dt if dt.startswith("float") else "float64"

        def source(o: tuple, rs: list[Any]) -> tuple:
            """The input index a reduction step reads for output index ``o``."""
            if keep:
                return tuple(tirx.Select(red[k], rs[k], o[k]) for k in range(rank))
            kept = [tirx.Cast(i64, tirx.Not(r)) for r in red]
            before = [sum(kept[:k + 1], tirx.const(0, i64)) for k in range(rank)]
            return tuple(tirx.Select(red[k], rs[k], pick(before[k] - 1, list(o)) if o else tirx.const(0, i64))
                         for k in range(rank))

        def reduce(kind: str, value: Any, name: str) -> Any:
            def body(*o: Any) -> Any:
                rs = [te.reduce_axis((0, tirx.Select(red[k], tirx.Cast(i64, t.shape[k]), tirx.const(1, i64))), f"r{k}")
                      for k in range(rank)]
                v = value(t[source(o, rs)], o)
                axis = rs
                if kind == "sum":
                    return te.sum(v, axis=axis)
                if kind in ("max", "min"):
                    return (extreme_reducer(kind) if f == dt else getattr(te, kind))(v, axis=axis)
                prod = te.comm_reducer(lambda a, b: a * b, lambda d: tirx.const(1, d), name="prod")
                return prod(v, axis=axis)

            return te.compute(out_dims, body, name=name)

        def wide(v: Any) -> Any:
            return v if str(v.dtype) == f else tirx.Cast(f, v)

        count = tirx.const(1, i64)
        for k in range(rank):
            count = count * tirx.Select(red[k], tirx.Cast(i64, t.shape[k]), tirx.const(1, i64))
        if op in ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"):
            kind = {"ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod"}[op]
            return reduce(kind, lambda v, o: v, "reduce")
        if op == "ReduceL1":
            return reduce("sum", lambda v, o: tirx.abs(v) if not dt.startswith("uint") else v, "reduce")
        if op == "ReduceSumSquare":
            return reduce("sum", lambda v, o: v * v, "reduce")
        if op == "ReduceMean":
            total = reduce("sum", lambda v, o: v, "reduce_sum")
            return te.compute(out_dims, lambda *o: tirx.Cast(dt, wide(total[o]) / tirx.Cast(f, count)), name="reduce")
        if op == "ReduceL2":
            total = reduce("sum", lambda v, o: v * v, "reduce_sum")
            return te.compute(out_dims, lambda *o: tirx.Cast(dt, tirx.sqrt(wide(total[o]))), name="reduce")
        if op == "ReduceLogSum":
            total = reduce("sum", lambda v, o: v, "reduce_sum")
            return te.compute(out_dims, lambda *o: tirx.Cast(dt, tirx.log(wide(total[o]))), name="reduce")
        # ReduceLogSumExp, shifted by the max (an infinite max shifts by 0, which keeps infinities exact)
        top = reduce("max", lambda v, o: wide(v), "reduce_max")

        def shift(o: tuple) -> Any:
            m = top[o]
            return tirx.Select(tirx.isinf(m), tirx.const(0, f), m)

        total = reduce("sum", lambda v, o: tirx.exp(wide(v) - shift(o)), "reduce_sum")
        return te.compute(out_dims, lambda *o: tirx.Cast(dt, tirx.log(total[o]) + shift(o)), name="reduce")

    return lw.emit(compute, lw.get(x), lw.get(node.input(1)), name=op.lower())


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
