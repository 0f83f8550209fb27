"""Lowerings of ONNX's tensor-manipulation ops: gathers and scatters, Pad, Tile, Expand, Range,
Shape/Size, ConstantOfShape, Slice, Trilu, OneHot, CumSum/CumProd, TopK, DepthToSpace/SpaceToDepth,
EyeLike.

Sizes that decide an output shape (Expand's shape, Tile's repeats, TopK's k, OneHot's depth)
are taken from the declared output shape, which kiln's shape inference settled; values that only
decide *where* data goes (Slice starts and steps, Pad's pads, Range's start and delta, Trilu's k)
are read at run time inside the kernel, so they may be graph inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.codegen.lower import CodegenError, Lowerer, lowers
from kiln.codegen.lower_shapes import const_ints, out_dims
from kiln.ir import Node, Value


def _dims(lw: Lowerer, node: Node, v: Value | None = None) -> list[Any]:
    dims = out_dims(lw, v if v is not None else node.outputs[0])
    if dims is None:
        raise CodegenError(f"node {node.label()}: the output shape is not known well enough to compile")
    return dims


def _scalar(t: Any, *i: Any) -> Any:
    """Element ``i`` of a 1-D tensor, or the value of a 0-d (or one-element) tensor."""
    if i:
        return t[i]
    return t[tuple(0 for _ in t.shape)]


def _wrap(i: Any, n: Any) -> Any:
    """A possibly negative index into a dim of size ``n``, made non-negative."""
    from tvm import tirx

    i = i.astype("int64") if str(i.dtype) != "int64" else i
    return tirx.Select(i < 0, i + n, i)


def _axis(node: Node, rank: int, default: int = 0) -> int:
    a = node.attr("axis", default)
    return a + rank if a < 0 else a


# =========================================================================== gathers and scatters


@lowers("Gather")
def _gather(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = _axis(node, node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        k = len(idx.shape)
        shape = [*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]]

        def body(*i: Any) -> Any:
            j = _wrap(idx[i[axis:axis + k]] if k else idx[()], x.shape[axis])
            return x[(*i[:axis], j, *i[axis + k:])]

        return te.compute(shape, body, name="gather")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather")]


@lowers("GatherElements")
def _gather_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    axis = _axis(node, node.input(0).rank or 0)

    def compute(x: Any, idx: Any) -> Any:
        def body(*i: Any) -> Any:
            j = _wrap(idx[i], x.shape[axis])
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
            coords = [_wrap(idx[(*i[:q], k)], x.shape[b + k]) for k in range(m)]
            return x[(*i[:b], *coords, *i[q:])]

        return te.compute(shape, body, name="gather_nd")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="gather_nd")]


_SCATTER_MODES = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


@lowers("ScatterElements")
def _scatter_elements(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    axis = _axis(node, node.input(0).rank or 0)
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


# =========================================================================== shapes as values


@lowers("Shape", "Size", reads=())
def _shape(lw: Lowerer, node: Node) -> list[Any]:
    """The input's shape (or element count) as a computed int64 tensor; symbolic dims are variables."""
    from tvm import te, tirx

    x = node.input(0)
    if x.shape is None:
        raise CodegenError(f"node {node.label()}: the input's rank is unknown")
    dims = [lw.dim(d) for d in x.shape]
    if node.op_type == "Size":
        n: Any = 1
        for d in dims:
            n = n * d
        return [lw.emit(lambda: te.compute((), lambda: tirx.IntImm("int64", n) if isinstance(n, int) else n,
                                            name="size"), name="size")]
    start, end = node.attr("start", 0), node.attr("end")
    dims = dims[slice(start, end)]

    def body(i: Any) -> Any:
        out: Any = tirx.const(0, "int64")
        for k, d in enumerate(dims):
            out = tirx.Select(i == k, tirx.const(d, "int64") if isinstance(d, int) else d, out)
        return out

    return [lw.emit(lambda: te.compute((len(dims),), body, name="shape"), name="shape")]


def _fill(dims: list[Any], value: Any, dt: str, name: str) -> Any:
    from tvm import te, tirx

    return te.compute(dims, lambda *i: tirx.const(value, dt), name=name)


@lowers("ConstantOfShape", reads=())
def _constant_of_shape(lw: Lowerer, node: Node) -> list[Any]:
    value = node.attr("value")
    arr = np.asarray(value.numpy() if hasattr(value, "numpy") else (value if value is not None else 0.0))
    dt = node.outputs[0].dtype.numpy.name
    v = arr.reshape(-1)[0].item() if arr.size else 0
    dims = _dims(lw, node)
    return [lw.emit(lambda: _fill(dims, v, dt, "constant_of_shape"), name="constant_of_shape")]


@lowers("EyeLike", reads=())
def _eye_like(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    k = node.attr("k", 0)
    dt = node.outputs[0].dtype.numpy.name
    dims = _dims(lw, node)
    return [lw.emit(lambda: te.compute(dims, lambda i, j: tirx.Select(j - i == k, tirx.const(1, dt), tirx.const(0, dt)),
                                        name="eye_like"), name="eye_like")]


@lowers("Range")
def _range(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    dims = _dims(lw, node)
    dt = node.outputs[0].dtype.numpy.name

    def compute(start: Any, limit: Any, delta: Any) -> Any:
        return te.compute(dims, lambda i: _scalar(start) + tirx.Cast(dt, i) * _scalar(delta), name="range")

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="range")]


# =========================================================================== reshaping copies


@lowers("Expand", reads=(0,))
def _expand(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    dims = _dims(lw, node)
    return [lw.emit(lambda x: topi.broadcast_to(x, dims), lw.get(node.input(0)), name="expand")]


@lowers("Tile", reads=(0,))
def _tile(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    dims = _dims(lw, node)

    def compute(x: Any) -> Any:
        return te.compute(dims, lambda *i: x[tuple(tirx.floormod(j, d) for j, d in zip(i, x.shape))], name="tile")

    return [lw.emit(compute, lw.get(node.input(0)), name="tile")]


@lowers("Slice")
def _slice(lw: Lowerer, node: Node) -> list[Any]:
    """Slice with starts/axes/steps read at run time (the declared output shape gives the sizes)."""
    from tvm import te, tirx

    x = node.input(0)
    if node.attr("starts") is not None:  # opset 1-9: attributes
        return _slice_attrs(lw, node)
    dims = _dims(lw, node)
    rank = x.rank or 0
    n = (node.input(1).shape or [0])[0]
    if not isinstance(n, int):
        raise CodegenError(f"node {node.label()}: Slice needs a static number of starts")
    has_axes, has_steps = node.input(3) is not None, node.input(4) is not None
    fixed = _static_slice_origin(node)
    if fixed is not None:  # constant starts/axes/steps: offsets and steps are immediates
        return [lw.emit(lambda t: te.compute(dims, lambda *i: t[tuple(s + j * st for j, (s, st) in zip(i, fixed))],
                                             name="slice"), lw.get(x), name="slice")]
    ins = [lw.get(node.input(i)) for i in range(5) if node.input(i) is not None]

    def compute(t: Any, starts: Any, ends: Any, *rest: Any) -> Any:
        rest_l = list(rest)
        axes = rest_l.pop(0) if has_axes else None
        steps = rest_l.pop(0) if has_steps else None

        def origin(k: int) -> tuple[Any, Any]:
            d = t.shape[k]
            start: Any = tirx.const(0, "int64")
            step: Any = tirx.const(1, "int64")
            for j in range(n):
                a = tirx.const(j, "int64") if axes is None else _wrap(axes[j], rank)
                st = tirx.const(1, "int64") if steps is None else steps[j].astype("int64")
                s = _wrap(starts[j], d)
                hi = tirx.Select(st > 0, d, d - 1)
                s = tirx.max(tirx.min(s, hi), tirx.const(0, "int64"))
                start = tirx.Select(a == k, s, start)
                step = tirx.Select(a == k, st, step)
            return start, step

        org = [origin(k) for k in range(rank)]
        return te.compute(dims, lambda *i: t[tuple(s + j * st for j, (s, st) in zip(i, org))], name="slice")

    return [lw.emit(compute, *ins, name="slice")]


def _static_slice_origin(node: Node) -> list[tuple[int, int]] | None:
    """(start, step) per input axis when starts, axes and steps are constants over static dims."""
    from kiln.codegen.lower_shapes import static_shape

    si = static_shape(node.input(0))
    starts = const_ints(node.input(1))
    axes = const_ints(node.input(3)) if node.input(3) is not None else list(range(len(starts or [])))
    steps = const_ints(node.input(4)) if node.input(4) is not None else [1] * len(starts or [])
    if si is None or starts is None or axes is None or steps is None:
        return None
    origin = [(0, 1)] * len(si)
    for s, a, st in zip(starts, axes, steps):
        a = a + len(si) if a < 0 else a
        d = si[a]
        s = s + d if s < 0 else s
        origin[a] = (max(min(s, d if st > 0 else d - 1), 0), st)
    return origin


def _slice_attrs(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    starts, ends = list(node.attr("starts")), list(node.attr("ends"))
    axes = list(node.attr("axes") or range(len(starts)))
    axes = [a + x.rank if a < 0 else a for a in axes]
    begin, end = [], []
    for s, e, a in zip(starts, ends, axes):
        lo, hi, _ = slice(s, e, 1).indices(x.shape[a])
        begin.append(lo)
        end.append(max(lo, hi))
    return [lw.emit(lambda t: topi.strided_slice(t, begin, end, [1] * len(axes), axes), lw.get(x), name="slice")]


@lowers("Pad")
def _pad(lw: Lowerer, node: Node) -> list[Any]:
    """Pad in every mode, with pads (and the constant) read at run time; opset < 11 takes attributes."""
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank or 0
    mode = node.attr("mode", "constant")
    dims = _dims(lw, node)
    pads_attr = node.attr("pads")
    value_attr = node.attr("value", 0.0)
    axes: list[int] | None = list(range(rank))
    n_axes = rank
    if node.input(3) is not None:
        axes_c = const_ints(node.input(3))
        axes = None if axes_c is None else [a + rank if a < 0 else a for a in axes_c]
        n_axes = len(axes) if axes is not None else (node.input(3).shape or [0])[0]
    has_pads, has_value = pads_attr is None and node.input(1) is not None, node.input(2) is not None
    has_axes = axes is None
    ins = [lw.get(x)] + ([lw.get(node.input(1))] if has_pads else []) + \
        ([lw.get(node.input(2))] if has_value else []) + ([lw.get(node.input(3))] if has_axes else [])

    def compute(t: Any, *rest: Any) -> Any:
        rest_l = list(rest)
        pads = rest_l.pop(0) if has_pads else None
        cval = _scalar(rest_l.pop(0)) if has_value else tirx.const(value_attr, t.dtype)
        axes_t = rest_l.pop(0) if has_axes else None
        befores: list[Any] = [tirx.const(0, "int64")] * rank
        for j in range(n_axes):
            p = pads[j].astype("int64") if pads is not None else tirx.const(int(pads_attr[j]), "int64")
            if axes_t is None:
                befores[axes[j]] = p
            else:  # axes read at run time: each entry pads the dim it names
                a = _wrap(axes_t[j], rank)
                befores = [tirx.Select(a == k, p, b) for k, b in enumerate(befores)]

        def body(*i: Any) -> Any:
            src, inside = [], []
            for k in range(rank):
                d = t.shape[k]
                s = i[k] - befores[k]
                inside.append(tirx.all(s >= 0, s < d))
                if mode == "edge":
                    s = tirx.max(tirx.min(s, d - 1), tirx.const(0, "int64"))
                elif mode == "reflect":
                    period = tirx.max(2 * d - 2, tirx.const(1, "int64"))
                    m = tirx.floormod(s, period)
                    s = tirx.Select(m < d, m, period - m)
                elif mode == "wrap":
                    s = tirx.floormod(s, d)
                src.append(s)
            if mode == "constant":
                safe = [tirx.max(tirx.min(s, t.shape[k] - 1), tirx.const(0, "int64")) for k, s in enumerate(src)]
                return tirx.Select(tirx.all(*inside) if inside else tirx.const(True), t[tuple(safe)], cval)
            return t[tuple(src)]

        return te.compute(dims, body, name="pad")

    return [lw.emit(compute, *ins, name="pad")]


@lowers("Trilu")
def _trilu(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    upper = bool(node.attr("upper", 1))
    has_k = node.input(1) is not None

    def compute(t: Any, *k: Any) -> Any:
        kk = _scalar(k[0]).astype("int64") if k else tirx.const(0, "int64")

        def body(*i: Any) -> Any:
            r, c = i[-2], i[-1]
            keep = (c - r >= kk) if upper else (c - r <= kk)
            return tirx.Select(keep, t[i], tirx.const(0, t.dtype))

        return te.compute(t.shape, body, name="trilu")

    return [lw.emit(compute, lw.get(node.input(0)), *([lw.get(node.input(1))] if has_k else []), name="trilu")]


@lowers("OneHot", reads=(0, 2))
def _one_hot(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    dims = _dims(lw, node)
    axis = node.attr("axis", -1)
    axis = axis + len(dims) if axis < 0 else axis
    depth = dims[axis]

    def compute(idx: Any, values: Any) -> Any:
        def body(*i: Any) -> Any:
            j = idx[(*i[:axis], *i[axis + 1:])]
            j = tirx.Cast("int64", j) if not str(j.dtype).startswith("int") else j.astype("int64")
            j = tirx.Select(j < 0, j + depth, j)
            return tirx.Select(j == i[axis], values[1], values[0])

        return te.compute(dims, body, name="one_hot")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(2)), name="one_hot")]


# =========================================================================== scans and sorting


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
            a = axis[0] + rank if axis[0] < 0 else axis[0]
            return _scan(t, a, exclusive, reverse, prod)
        # the axis is a run-time input: scan along each axis, pick the one asked for
        scans = [_scan(t, a, exclusive, reverse, prod) for a in range(rank)]
        a = _wrap(_scalar(ax), rank)

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
    axis = _axis(node, x.rank or 0, -1)
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


@lowers("DepthToSpace", "SpaceToDepth")
def _depth_space(lw: Lowerer, node: Node) -> list[Any]:
    """Both directions, both channel orders: DCR (depth, column, row) and CRD."""
    from tvm import te

    b = node.attr("blocksize")
    crd = node.attr("mode", "DCR") == "CRD"
    dims = _dims(lw, node)

    def to_space(t: Any) -> Any:
        c_out = dims[1]

        def body(n: Any, c: Any, h: Any, w: Any) -> Any:
            bh, bw = h % b, w % b
            src_c = c * b * b + bh * b + bw if crd else (bh * b + bw) * c_out + c
            return t[n, src_c, h // b, w // b]

        return te.compute(dims, body, name="depth_to_space")

    def to_depth(t: Any) -> Any:
        c_in = t.shape[1]

        def body(n: Any, c: Any, h: Any, w: Any) -> Any:
            if crd:
                src_c, blk = c // (b * b), c % (b * b)
            else:
                src_c, blk = c % c_in, c // c_in
            return t[n, src_c, h * b + blk // b, w * b + blk % b]

        return te.compute(dims, body, name="space_to_depth")

    fn = to_space if node.op_type == "DepthToSpace" else to_depth
    return [lw.emit(fn, lw.get(node.input(0)), name=node.op_type.lower())]


@lowers("CenterCropPad", reads=(0,))
def _center_crop_pad(lw: Lowerer, node: Node) -> list[Any]:
    """Crop (centred, extra to the end) or zero-pad (centred) each axis to the declared output size."""
    from tvm import te, tirx

    from kiln.codegen.lower_shapes import static_shape

    si, so = static_shape(node.input(0)), static_shape(node.outputs[0])
    if si is None or so is None:
        raise CodegenError(f"node {node.label()}: CenterCropPad needs static shapes to compile")
    shift = [(d - o) // 2 if d >= o else -((o - d) // 2) for d, o in zip(si, so)]

    def compute(t: Any) -> Any:
        def body(*i: Any) -> Any:
            src = [j + s for j, s in zip(i, shift)]
            ok = [tirx.all(s >= 0, s < d) for s, d, o in zip(src, si, so) if o > d]
            safe = [tirx.max(tirx.min(s, d - 1), 0) for s, d in zip(src, si)]
            return tirx.Select(tirx.all(*ok), t[tuple(safe)], tirx.const(0, t.dtype)) if ok else t[tuple(safe)]

        return te.compute(so, body, name="center_crop_pad")

    return [lw.emit(compute, lw.get(node.input(0)), name="center_crop_pad")]


@lowers("ArrayFeatureExtractor", domain="ai.onnx.ml")
def _array_feature_extractor(lw: Lowerer, node: Node) -> list[Any]:
    """The columns ``indices`` of the last axis."""
    from tvm import te

    dims = _dims(lw, node)

    def compute(x: Any, idx: Any) -> Any:
        last = len(x.shape) - 1
        return te.compute(dims, lambda *i: x[(*i[:last], idx[i[last]])], name="array_feature_extractor")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="array_feature_extractor")]


@lowers("OptionalHasElement", reads=())
def _optional_has_element(lw: Lowerer, node: Node) -> list[Any]:
    """An optional holding a plain tensor: whether it is present is known when compiling."""
    from tvm import te, tirx

    present = node.input(0) is not None
    return [lw.emit(lambda: te.compute((), lambda: tirx.const(present, "bool"), name="has_element"),
                    name="optional_has_element")]


@lowers("OptionalGetElement")
def _optional_get_element(lw: Lowerer, node: Node) -> list[Any]:
    if node.input(0) is None:
        raise CodegenError(f"node {node.label()}: OptionalGetElement of an empty optional")
    return [lw.get(node.input(0))]


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


@lowers("AffineGrid", reads=(0,))
def _affine_grid(lw: Lowerer, node: Node) -> list[Any]:
    """Sampling grids from affine matrices theta (N, 2, 3) or (N, 3, 4), over the declared output size."""
    from tvm import te, tirx

    dims = _dims(lw, node)
    align = bool(node.attr("align_corners", 0))
    nd = len(dims) - 2  # (N, H, W, 2) or (N, D, H, W, 3)
    spatial = [int(d) for d in dims[1:1 + nd]]

    def compute(theta: Any) -> Any:
        f = theta.dtype

        def base(k: int, i: Any) -> Any:
            # normalised coordinate of index i along spatial axis k (of size n), in [-1, 1]
            n = spatial[k]
            if n == 1:
                return tirx.const(0, f)
            x = tirx.Cast(f, i)
            if align:
                return tirx.const(-1, f) + x * tirx.const(2 / (n - 1), f)
            return (x * tirx.const(2, f) + tirx.const(1, f)) / tirx.const(n, f) - tirx.const(1, f)

        def body(b: Any, *rest: Any) -> Any:
            *pos, c = rest
            coords = [base(k, pos[k]) for k in range(nd)][::-1]  # x (width) first
            acc = theta[b, c, nd]
            for k, v in enumerate(coords):
                acc = acc + theta[b, c, k] * v
            return acc

        return te.compute(dims, body, name="affine_grid")

    return [lw.emit(compute, lw.get(node.input(0)), name="affine_grid")]


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
    dims = _dims(lw, node)
    axis = node.attr("axis")

    def compute(t: Any, cond: Any) -> Any:
        src = t if axis is not None else topi.reshape(t, (int(np.prod([int(d) for d in t.shape])),))
        a = 0 if axis is None else (axis + len(t.shape) if axis < 0 else axis)
        n = int(cond.shape[0])
        count = _scan_bool(cond, n)
        r = te.reduce_axis((0, n), "r")
        pick = te.compute((dims[a],), lambda p: te.min(tirx.Select(
            tirx.all(cond[r], count[r] == p + 1), r.var.astype("int64"), tirx.const(1 << 62, "int64")), axis=[r]),
            name="picked")
        return te.compute(dims, lambda *i: src[(*i[:a], pick[i[a]], *i[a + 1:])], name="compress")

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name="compress")]


@lowers("TensorScatter")
def _tensor_scatter(lw: Lowerer, node: Node) -> list[Any]:
    """A KV-cache write: ``update`` goes into ``past_cache`` along ``axis`` from each batch entry's
    write index (wrapping with mode="circular")."""
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank or 0
    axis = node.attr("axis", -2)
    axis = axis % rank
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


@lowers("NonZero")
def _nonzero(lw: Lowerer, node: Node) -> list[Any]:
    """NonZero whose count the declared output shape gives: coordinates of the nonzero elements."""
    from tvm import te, tirx

    dims = _dims(lw, node)

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
