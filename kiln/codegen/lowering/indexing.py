"""Lowerings of the ops that read or write by index, select or sort: Gather, GatherElements,
GatherND, ScatterElements, ScatterND, TensorScatter, OneHot, Trilu, CumSum/CumProd, TopK,
Compress, NonZero, ReverseSequence and ``ai.onnx.ml`` ArrayFeatureExtractor.

Output sizes (TopK's k, OneHot's depth, the count of Compress and NonZero) come from the
declared output shape; the indices themselves are read at run time, and negative ones wrap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import output_dims, scalar, wrap_index
from kiln.ir import Node, const_ints, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


# =========================================================================== gathers and scatters


@lowers("Gather")
def _gather(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        k = len(idx.shape)
        shape = [*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]]

        def body(*i: Any) -> Any:
            j = wrap_index(idx[i[axis:axis + k]] if k else idx[()], x.shape[axis])
            return x[(*i[:axis], j, *i[axis + k:])]

        return te.compute(shape, body, name="gather")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather")]


@lowers("GatherElements")
def _gather_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        def body(*i: Any) -> Any:
            j = wrap_index(idx[i], x.shape[axis])
            return x[(*i[:axis], j, *i[axis + 1:])]

        return te.compute(idx.shape, body, name="gather_elements")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather_elements")]


@lowers("GatherND")
def _gather_nd(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    b = node.attr("batch_dims", 0)

    def compute(x: Any, idx: Any) -> Any:
        m = int(idx.shape[-1])
        shape = [*idx.shape[:-1], *x.shape[b + m:]]
        q = len(idx.shape) - 1

        def body(*i: Any) -> Any:
            coords = [wrap_index(idx[(*i[:q], k)], x.shape[b + k]) for k in range(m)]
            return x[(*i[:b], *coords, *i[q:])]

        return te.compute(shape, body, name="gather_nd")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather_nd")]


@lowers("ArrayFeatureExtractor", domain="ai.onnx.ml")
def _array_feature_extractor(lw: Lowerer, node: Node) -> list[Any]:
    """The columns ``indices`` of the last axis."""
    from tvm import te

    dims = output_dims(lw, node)

    def compute(x: Any, idx: Any) -> Any:
        last = len(x.shape) - 1
        return te.compute(dims, lambda *i: x[(*i[:last], idx[i[last]])], name="array_feature_extractor")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="array_feature_extractor")]


_SCATTER_MODES = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


@lowers("ScatterElements")
def _scatter_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)
    mode = _SCATTER_MODES[node.attr("reduction", "none")]

    def compute(x: Any, idx: Any, upd: Any) -> Any:
        j = topi.where(topi.less(idx, topi.full_like(idx, 0)), topi.add(idx, topi.full_like(idx, x.shape[axis])), idx)
        return topi.scatter_elements(x, j, upd, axis, mode)

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="scatter_elements")]


@lowers("ScatterND")
def _scatter_nd(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    mode = _SCATTER_MODES[node.attr("reduction", "none")]

    def compute(x: Any, idx: Any, upd: Any) -> Any:
        r = len(idx.shape)
        return topi.scatter_nd(x, topi.transpose(idx, [r - 1, *range(r - 1)]), upd, mode)

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="scatter_nd")]


@lowers("TensorScatter")
def _tensor_scatter(lw: Lowerer, node: Node) -> list[Any]:
    """A KV-cache write: ``update`` goes into ``past_cache`` along ``axis`` from each batch entry's
    write index (wrapping with mode="circular")."""
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank or 0
    axis = normalize_axis(node.attr("axis", -2), rank)
    circular = node.attr("mode", "linear") == "circular"
    has_idx = node.input(2) is not None

    def compute(cache: Any, upd: Any, *wi: Any) -> Any:
        n_max, n_upd = cache.shape[axis], upd.shape[axis]

        def body(*i: Any) -> Any:
            start = wi[0][i[0]].astype("int64") if wi else tirx.const(0, "int64")
            rel = i[axis].astype("int64") - start
            if circular:
                rel = tirx.floormod(rel, n_max)
            ok = tirx.all(rel >= 0, rel < n_upd)
            src = list(i)
            src[axis] = tirx.max(tirx.min(rel, n_upd - 1), 0)
            return tirx.Select(ok, upd[tuple(src)], cache[i])

        return te.compute(cache.shape, body, name="tensor_scatter")

    ins = [lw.get(x), lw.get(node.input(1))] + ([lw.get(node.input(2))] if has_idx else [])
    return [lw.emit(compute, *ins, name="tensor_scatter")]


@lowers("OneHot", reads=(0, 2))
def _one_hot(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    dims = output_dims(lw, node)
    axis = normalize_axis(node.attr("axis", -1), len(dims))
    depth = dims[axis]

    def compute(idx: Any, values: Any) -> Any:
        def body(*i: Any) -> Any:
            j = idx[(*i[:axis], *i[axis + 1:])]
            j = tirx.Cast("int64", j) if not str(j.dtype).startswith("int") else j.astype("int64")
            j = wrap_index(j, depth)
            return tirx.Select(j == i[axis], values[1], values[0])

        return te.compute(dims, body, name="one_hot")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(2)), name="one_hot")]


# =========================================================================== masks, scans and sorting


@lowers("Trilu")
def _trilu(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    upper = bool(node.attr("upper", 1))
    has_k = node.input(1) is not None

    def compute(t: Any, *k: Any) -> Any:
        kk = scalar(k[0]).astype("int64") if k else tirx.const(0, "int64")

        def body(*i: Any) -> Any:
            r, c = i[-2], i[-1]
            keep = (c - r >= kk) if upper else (c - r <= kk)
            return tirx.Select(keep, t[i], tirx.const(0, t.dtype))

        return te.compute(t.shape, body, name="trilu")

    return [lw.emit(compute, lw.get(node.input(0)), *([lw.get(node.input(1))] if has_k else []), name="trilu")]


@lowers("ReverseSequence")
def _reverse_sequence(lw: Lowerer, node: Node) -> list[Any]:
    """Reverse the first ``sequence_lens[b]`` steps along time_axis for each batch entry b."""
    from tvm import te, tirx

    taxis, baxis = node.attr("time_axis", 0), node.attr("batch_axis", 1)

    def compute(x: Any, lens: Any) -> Any:
        def body(*i: Any) -> Any:
            n = lens[i[baxis]].astype("int64")
            t = i[taxis].astype("int64")
            src = list(i)
            src[taxis] = tirx.Select(t < n, n - 1 - t, t)
            return x[tuple(src)]

        return te.compute(x.shape, body, name="reverse_sequence")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="reverse_sequence")]


def _scan(t: Any, axis: int, exclusive: bool, reverse: bool, prod: bool) -> Any:
    """Cumulative sum or product along ``axis`` as a reduction per output element."""
    from tvm import te, tirx

    n = t.shape[axis]
    r = te.reduce_axis((0, n), "r")
    unit = tirx.const(1 if prod else 0, t.dtype)
    red = te.comm_reducer(lambda a, b: a * b, lambda dt: tirx.const(1, dt), name="prod") if prod else te.sum

    def body(*i: Any) -> Any:
        src = (*i[:axis], r, *i[axis + 1:])
        j = i[axis]
        if reverse:
            take = (r > j) if exclusive else (r >= j)
        else:
            take = (r < j) if exclusive else (r <= j)
        return red(tirx.Select(take, t[src], unit), axis=[r])

    return te.compute(t.shape, body, name="cumprod" if prod else "cumsum")


@lowers("CumSum", "CumProd")
def _cumulative(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank or 0
    exclusive, reverse = bool(node.attr("exclusive", 0)), bool(node.attr("reverse", 0))
    prod = node.op_type == "CumProd"
    axis = const_ints(node.input(1))

    def compute(t: Any, ax: Any) -> Any:
        if axis is not None:
            return _scan(t, normalize_axis(axis[0], rank), exclusive, reverse, prod)
        # the axis is a run-time input: scan along each axis, pick the one asked for
        scans = [_scan(t, a, exclusive, reverse, prod) for a in range(rank)]
        a = wrap_index(scalar(ax), rank)

        def pick(*i: Any) -> Any:
            out = scans[-1][i]
            for k in range(rank - 2, -1, -1):
                out = tirx.Select(a == k, scans[k][i], out)
            return out

        return te.compute(t.shape, pick, name="cumulative")

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name=node.op_type.lower())]


@lowers("TopK", reads=(0,))
def _topk(lw: Lowerer, node: Node) -> list[Any]:
    """TopK by ranking: each element's rank is how many beat it (ties: lower index first), and
    output p takes the element of rank p. Pure TE: topi.topk calls tvm.contrib.sort, a packed
    function of the compiler library that the deployed runtime does not have."""
    from tvm import relax, te, tirx

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", -1), x.rank or 0)
    k = (node.outputs[0].shape or [None] * (axis + 1))[axis]
    if not isinstance(k, int):
        raise CodegenError(f"node {node.label()}: TopK needs a static k to compile")
    largest = bool(node.attr("largest", 1))

    def compute(t: Any) -> Any:
        n = t.shape[axis]

        def at(i: tuple[Any, ...], j: Any) -> Any:
            return t[(*i[:axis], j, *i[axis + 1:])]

        r = te.reduce_axis((0, n), "r")

        def rank_of(*i: Any) -> Any:
            mine, other = t[i], at(i, r)
            beats = (other > mine) if largest else (other < mine)
            return te.sum(tirx.Select(tirx.Or(beats, tirx.And(other == mine, r < i[axis])),
                                      tirx.const(1, "int64"), tirx.const(0, "int64")), axis=[r])

        rank = te.compute(t.shape, rank_of, name="rank")
        r2 = te.reduce_axis((0, n), "r2")
        oshape = [k if d == axis else s for d, s in enumerate(t.shape)]

        def index_of(*i: Any) -> Any:
            return te.min(tirx.Select(rank[(*i[:axis], r2, *i[axis + 1:])] == i[axis], r2.var.astype("int64"),
                                      tirx.const(1 << 62, "int64")), axis=[r2])

        idx = te.compute(oshape, index_of, name="topk_indices")
        vals = te.compute(oshape, lambda *i: at(i, idx[i]), name="topk_values")
        return [vals, idx]

    tup = lw.emit(compute, lw.get(x), name="topk")
    return [lw.bb.emit(relax.TupleGetItem(tup, i)) for i in range(2)]


# =========================================================================== selection by a condition


def _scan_bool(cond: Any, n: int) -> Any:
    from tvm import te, tirx

    r = te.reduce_axis((0, n), "s")
    return te.compute((n,), lambda i: te.sum(tirx.Select(tirx.all(r <= i, cond[r]), tirx.const(1, "int64"),
                                                         tirx.const(0, "int64")), axis=[r]), name="true_count")


@lowers("Compress")
def _compress(lw: Lowerer, node: Node) -> list[Any]:
    """Compress whose output size the declared shape gives (the condition is read at run time)."""
    from tvm import te, tirx, topi

    x = node.input(0)
    dims = output_dims(lw, node)
    axis = node.attr("axis")

    def compute(t: Any, cond: Any) -> Any:
        src = t if axis is not None else topi.reshape(t, (int(np.prod([int(d) for d in t.shape])),))
        a = 0 if axis is None else normalize_axis(axis, len(t.shape))
        n = int(cond.shape[0])
        count = _scan_bool(cond, n)
        r = te.reduce_axis((0, n), "r")
        pick = te.compute((dims[a],), lambda p: te.min(tirx.Select(
            tirx.all(cond[r], count[r] == p + 1), r.var.astype("int64"), tirx.const(1 << 62, "int64")), axis=[r]),
            name="picked")
        return te.compute(dims, lambda *i: src[(*i[:a], pick[i[a]], *i[a + 1:])], name="compress")

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name="compress")]


@lowers("NonZero")
def _nonzero(lw: Lowerer, node: Node) -> list[Any]:
    """NonZero whose count the declared output shape gives: coordinates of the nonzero elements."""
    from tvm import te, tirx

    dims = output_dims(lw, node)

    def compute(x: Any) -> Any:
        shape = [int(d) for d in x.shape]
        total = int(np.prod(shape))
        strides = [int(np.prod(shape[k + 1:])) for k in range(len(shape))]

        def flat_at(j: Any) -> Any:
            return x[tuple(tirx.floormod(tirx.floordiv(j, s), d) for s, d in zip(strides, shape))]

        def nonzero(j: Any) -> Any:
            v = flat_at(j)
            return v if str(v.dtype) == "bool" else v != tirx.const(0, v.dtype)

        r = te.reduce_axis((0, total), "r")
        count = te.compute((total,), lambda i: te.sum(tirx.Select(tirx.all(r <= i, nonzero(r)), tirx.const(
            1, "int64"), tirx.const(0, "int64")), axis=[r]), name="count")
        r2 = te.reduce_axis((0, total), "r2")
        pick = te.compute((dims[1],), lambda p: te.min(tirx.Select(tirx.all(nonzero(r2), count[r2] == p + 1),
                                                                   r2.var.astype("int64"),
                                                                   tirx.const(1 << 62, "int64")), axis=[r2]),
                          name="picked")
        return te.compute(dims, lambda k, p: tirx.floormod(tirx.floordiv(pick[p], _pick_int(k, strides)),
                                                           _pick_int(k, shape)), name="nonzero")

    return [lw.emit(compute, lw.get(node.input(0)), name="nonzero")]


def _pick_int(k: Any, values: list[int]) -> Any:
    """values[k] for a run-time index k into a static list of ints."""
    from tvm import tirx

    out: Any = tirx.const(values[-1], "int64")
    for j in range(len(values) - 2, -1, -1):
        out = tirx.Select(k == j, tirx.const(values[j], "int64"), out)
    return out
