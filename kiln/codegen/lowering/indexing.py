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
from kiln.codegen.lowering.te import checked_indices, full, int64_vector, output_dims, pick, prod, scalar, static_shape, wrap_index
from kiln.ir import Node, const_ints, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


# =========================================================================== gathers and scatters


def _out_of_range(node: Node, axis: int | None = None) -> str:
    """The run-time refusal of ``node``'s indices, as one line."""
    where = f"axis {axis} of the data" if axis is not None else "the data's dims"
    return f"{node.op_type} node '{node.name}': an index is out of range for {where} (valid: -n to n-1 for a dim of size n)"


@lowers("Gather")
def _gather(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        k = len(idx.shape)
        shape = [*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]]
        idx = checked_indices(idx, lambda _: x.shape[axis], _out_of_range(node, axis))

        def body(*i: Any) -> Any:
            j = idx[i[axis:axis + k]] if k else idx[()]
            return x[(*i[:axis], j, *i[axis + k:])]

        return te.compute(shape, body, name="gather")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather")]


@lowers("GatherElements")
def _gather_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        checked = checked_indices(idx, lambda _: x.shape[axis], _out_of_range(node, axis))

        def body(*i: Any) -> Any:
            return x[(*i[:axis], checked[i], *i[axis + 1:])]

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
        idx = checked_indices(idx, lambda i: pick(i[-1], list(x.shape[b:b + m])), _out_of_range(node))

        def body(*i: Any) -> Any:
            coords = [idx[(*i[:q], k)] for k in range(m)]
            return x[(*i[:b], *coords, *i[q:])]

        return te.compute(shape, body, name="gather_nd")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather_nd")]


@lowers("ArrayFeatureExtractor", domain="ai.onnx.ml")
def _array_feature_extractor(lw: Lowerer, node: Node) -> list[Any]:
    """The columns ``indices`` of the last axis."""
    from tvm import te, topi

    def compute(x: Any, idx: Any) -> Any:
        last = len(x.shape) - 1
        flat = topi.reshape(idx, (prod(idx.shape),))
        # the chosen columns, however the indices are shaped; a 1-D input gives [1, n] (as onnxruntime)
        dims = [*x.shape[:-1], flat.shape[0]] if last else [1, flat.shape[0]]
        lead = len(dims) - 1
        flat = checked_indices(flat, lambda _: x.shape[last], _out_of_range(node, last))
        return te.compute(dims, lambda *i: x[(*i[:last], flat[i[lead]])],
                          name="array_feature_extractor")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="array_feature_extractor")]


_SCATTER_MODES = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


@lowers("ScatterElements")
def _scatter_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    axis = normalize_axis(node.attr("axis", 0), node.input(0).rank or 0)
    mode = _SCATTER_MODES[node.attr("reduction", "none")]

    def compute(x: Any, idx: Any, upd: Any) -> Any:
        j = checked_indices(idx, lambda _: x.shape[axis], _out_of_range(node, axis))
        return topi.scatter_elements(x, j, upd, axis, mode)

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="scatter_elements")]


@lowers("ScatterND")
def _scatter_nd(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    mode = _SCATTER_MODES[node.attr("reduction", "none")]

    def compute(x: Any, idx: Any, upd: Any) -> Any:
        r = len(idx.shape)
        # negative indices count from the end of their dim, as in onnxruntime (topi's scatter_nd takes them as they are)
        wrapped = checked_indices(idx, lambda i: pick(i[-1], list(x.shape)), _out_of_range(node))
        return topi.scatter_nd(x, topi.transpose(wrapped, [r - 1, *range(r - 1)]), upd, mode)

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

        def chosen(*i: Any) -> Any:
            out = scans[-1][i]
            for k in range(rank - 2, -1, -1):
                out = tirx.Select(a == k, scans[k][i], out)
            return out

        return te.compute(t.shape, chosen, name="cumulative")

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name=node.op_type.lower())]


def _k_reads(node: Node) -> tuple[int, ...]:
    x = node.input(0)
    axis = normalize_axis(node.attr("axis", -1), x.rank or 0)
    k = (node.outputs[0].shape or [None] * (axis + 1))[axis]
    return (0,) if isinstance(k, int) or node.attr("k") is not None else (0, 1)


@lowers("TopK", reads=_k_reads)
def _topk(lw: Lowerer, node: Node) -> list[Any]:
    """TopK by ranking: each element's rank is how many beat it (ties: lower index first), and
    output p takes the element of rank p. Pure TE: topi.topk calls tvm.contrib.sort, a packed
    function of the compiler library that the deployed runtime does not have. A k that the
    declared shape does not give is read at run time."""
    from tvm import relax, te, tirx

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", -1), x.rank or 0)
    k = (node.outputs[0].shape or [None] * (axis + 1))[axis]
    if not isinstance(k, int):
        (k,) = lw.computed_dims(lambda t: int64_vector(t, 1), lw.get(node.input(1)), count=1, name="k")
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


def _positions(x: Any, n: int, flat: Any = None) -> list[Any]:
    """For the first ``n`` elements of 1-D ``x`` (or of ``flat(j)``): [the count of nonzero ones as a
    1-element tensor, a tensor whose first ``count`` entries are their positions, in order].

    O(n): an inclusive prefix sum of 0/1 flags (topi's serial scan) gives each nonzero position its
    slot, and a scatter (serial, in order) writes it there; the others go to a spare last slot.
    """
    from tvm import te, tirx, topi

    if n == 0:
        return [full((1,), 0, "int64", "count"), full((1,), 0, "int64", "positions")]
    flags = _flags(x, n, flat)
    csum = topi.cumsum(flags, 0, "int64")
    count = te.compute((1,), lambda _: csum[n - 1], name="count")
    slots = te.compute((n,), lambda j: tirx.Select(flags[j] != 0, csum[j] - 1, tirx.Cast("int64", n)), name="slot")
    where = topi.scatter_elements(topi.full((n + 1,), "int64", 0), slots,
                                  te.compute((n,), lambda j: tirx.Cast("int64", j), name="position"), 0, "update")
    return [count, where]


def _flags(x: Any, n: Any, flat: Any = None) -> Any:
    """0/1 int64 flags of the first ``n`` elements of 1-D ``x`` (or of ``flat(j)``): nonzero (NaN counts)."""
    from tvm import te, tirx

    def nonzero(j: Any) -> Any:
        v = flat(j) if flat is not None else x[j]
        one, zero = tirx.const(1, "int64"), tirx.const(0, "int64")
        if str(v.dtype) == "bool":
            return tirx.Select(v, one, zero)
        return tirx.Select(v == tirx.const(0, v.dtype), zero, one)  # (v != 0 is false for NaN)

    return te.compute((n,), nonzero, name="flags")


@lowers("Compress")
def _compress(lw: Lowerer, node: Node) -> list[Any]:
    """Compress: the slices (or, without an axis, the flat elements) where the condition is true.

    How many is known at run time: the condition is read into a count (:meth:`Lowerer.runtime_dims`),
    and the picked positions are found in O(n) (:func:`_positions`). A condition shorter than the
    axis selects from its first entries only."""
    from tvm import te, topi

    x = node.input(0)
    axis = node.attr("axis")
    rank = x.rank or 0
    a = 0 if axis is None else normalize_axis(axis, rank)
    cond_len = (node.input(1).shape or [None])[0]
    if not isinstance(cond_len, int):
        raise CodegenError(f"node {node.label()}: Compress needs a condition of static length to compile")

    def select(t: Any) -> Any:
        return t if axis is not None else topi.reshape(t, (int(np.prod([int(d) for d in t.shape])),))

    def find(t: Any, cond: Any) -> list[Any]:
        src = select(t)
        return _positions(cond, min(cond_len, int(src.shape[a])))

    found = lw.emit(find, lw.get(x), lw.get(node.input(1)), name="compress_find")
    count, where = lw.unpack_all(found, 2)
    (m,) = lw.runtime_dims(count, 1, "count")

    def gather(t: Any, pos: Any) -> Any:
        src = select(t)
        dims = [m if k == a else d for k, d in enumerate(src.shape)]
        return te.compute(dims, lambda *i: src[(*i[:a], pos[i[a]], *i[a + 1:])], name="compress")

    return [lw.emit(gather, lw.get(x), where, name="compress")]


@lowers("NonZero")
def _nonzero(lw: Lowerer, node: Node) -> list[Any]:
    """NonZero: the coordinates of the nonzero elements (NaN is nonzero), as (rank, count); a 0-d
    input gives (1, count). The count is read at run time (:meth:`Lowerer.runtime_dims`)."""
    from tvm import te, tirx

    x = node.input(0)
    shape = static_shape(x)
    if shape is None:
        raise CodegenError(f"node {node.label()}: NonZero needs a static input shape to compile")
    total = int(np.prod(shape))
    strides = [int(np.prod(shape[k + 1:])) for k in range(len(shape))]

    def find(t: Any) -> list[Any]:
        def flat(j: Any) -> Any:
            return t[tuple(tirx.floormod(tirx.floordiv(j, s), d) for s, d in zip(strides, shape))]

        return _positions(t, total, flat)

    found = lw.emit(find, lw.get(x), name="nonzero_find")
    count, where = lw.unpack_all(found, 2)
    (m,) = lw.runtime_dims(count, 1, "count")
    rank = max(len(shape), 1)
    dims = shape or [1]
    steps = strides or [1]

    def coords(pos: Any) -> Any:
        return te.compute((rank, m), lambda k, p: tirx.floormod(tirx.floordiv(pos[p], pick(k, steps)),
                                                                pick(k, dims)), name="nonzero")

    return [lw.emit(coords, where, name="nonzero")]


@lowers("Unique")
def _unique(lw: Lowerer, node: Node) -> list[Any]:
    """Unique elements (or slices along ``axis``), sorted or in order of first occurrence, with the first
    index of each, every element's index into them, and their counts; how many is read at run time.

    Equality and order are found by comparing all pairs (O(n²) for n elements or slices); the outputs
    are then scattered in O(n). Slices compare lexicographically, in row-major order."""
    from tvm import te, tirx, topi

    x = node.input(0)
    shape = static_shape(x)
    if shape is None:
        raise CodegenError(f"node {node.label()}: Unique needs a static input shape to compile")
    axis_attr = node.attr("axis")
    flat = axis_attr is None
    axis = 0 if flat else normalize_axis(axis_attr, len(shape))
    dims = [int(np.prod(shape))] if flat else shape
    n = dims[axis]
    before, after = int(np.prod(dims[:axis])), int(np.prod(dims[axis + 1:]))
    k = before * after
    in_order = not node.attr("sorted", 1)
    i64 = "int64"

    def at(t: Any, j: Any, q: Any) -> Any:
        """Element q (row-major over the other dims) of slice j."""
        src = topi.reshape(t, dims) if flat else t
        qb, qa = tirx.floordiv(q, after), tirx.floormod(q, after)
        idx = [*_unravel(qb, dims[:axis]), j, *_unravel(qa, dims[axis + 1:])]
        return src[tuple(idx)]

    def analyse(t: Any) -> list[Any]:
        one, zero = tirx.const(1, i64), tirx.const(0, i64)
        if n == 0:
            return [full((1,), 0, i64, "count"), full((1,), 0, i64, "ids"), full((1,), 0, i64, "pos"),
                    full((1,), 0, i64, "counts")]
        rq = te.reduce_axis((0, k), "q")
        same = te.compute((n, n), lambda i, j: te.min(tirx.Select(at(t, i, rq) == at(t, j, rq), one, zero), axis=[rq]),
                          name="same")
        ri = te.reduce_axis((0, n), "i")
        first = te.compute((n,), lambda j: te.min(tirx.Select(tirx.Or(ri == j, same[ri, j] == 1), ri.var.astype(i64),
                                                              tirx.const(n, i64)), axis=[ri]), name="first")
        is_first = te.compute((n,), lambda j: tirx.Select(first[j] == j, one, zero), name="is_first")
        if in_order:
            seen = topi.cumsum(is_first, 0, i64)
            ids = te.compute((n,), lambda j: seen[first[j]] - 1, name="ids")
        else:
            rd = te.reduce_axis((0, k), "d")
            differ = te.compute((n, n), lambda i, j: te.min(tirx.Select(at(t, i, rd) != at(t, j, rd), rd.var.astype(i64),
                                                                        tirx.const(k, i64)), axis=[rd]), name="differ")

            def less(i: Any, j: Any) -> Any:
                d = tirx.min(differ[i, j], tirx.const(max(k - 1, 0), i64))
                return tirx.all(differ[i, j] < k, at(t, i, d) < at(t, j, d))

            rl = te.reduce_axis((0, n), "l")
            ids = te.compute((n,), lambda j: te.sum(tirx.Select(tirx.all(is_first[rl] == 1, less(rl, first[j])), one,
                                                                zero), axis=[rl]), name="ids")
        rc = te.reduce_axis((0, n), "c")
        count = te.compute((1,), lambda _: te.sum(is_first[rc], axis=[rc]), name="count")
        slots = te.compute((n,), lambda j: tirx.Select(is_first[j] == 1, ids[j], tirx.const(n, i64)), name="slots")
        pos = topi.scatter_elements(topi.full((n + 1,), i64, 0), slots,
                                    te.compute((n,), lambda j: tirx.Cast(i64, j), name="position"), 0, "update")
        counts = topi.scatter_elements(topi.full((n + 1,), i64, 0), ids, topi.full((n,), i64, 1), 0, "add")
        return [count, ids, pos, counts]

    count, ids, pos, counts = lw.unpack_all(lw.emit(analyse, lw.get(x), name="unique_find"), 4)
    (m,) = lw.runtime_dims(count, 1, "unique")

    def outputs(t: Any, ids_t: Any, pos_t: Any, counts_t: Any) -> list[Any]:
        ydims = [m if d == axis else s for d, s in enumerate(dims)]
        src = topi.reshape(t, dims) if flat else t
        y = te.compute(ydims, lambda *i: src[(*i[:axis], pos_t[i[axis]], *i[axis + 1:])], name="unique")
        first_idx = te.compute((m,), lambda p: pos_t[p], name="indices")
        inverse = te.compute((n,), lambda j: ids_t[j], name="inverse_indices")
        cnt = te.compute((m,), lambda p: counts_t[p], name="counts")
        return [y, first_idx, inverse, cnt]

    result = lw.emit(outputs, lw.get(x), ids, pos, counts, name="unique")
    return [v for v, o in zip(lw.unpack_all(result, 4), [*node.outputs, None, None, None]) if o is not None and o.name]


def _unravel(flat: Any, dims: list[int]) -> list[Any]:
    """Row-major coordinates of a flat index into ``dims``."""
    from tvm import tirx

    out = []
    for j, d in enumerate(dims):
        stride = int(np.prod(dims[j + 1:]))
        out.append(tirx.floormod(tirx.floordiv(flat, stride), d))
    return out
