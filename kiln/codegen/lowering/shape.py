"""Lowerings of the ops that reshape, reorder or cut tensors: Reshape, Squeeze, Unsqueeze, Flatten,
Transpose, Concat, Split, Shape/Size, Expand, Tile, Slice, Pad, DepthToSpace/SpaceToDepth and
CenterCropPad.

Sizes that decide an output shape (Expand's shape, Tile's repeats, a Reshape target computed at
run time) are taken from the declared output shape, which kiln's shape inference settled; values
that only decide *where* data goes (Slice starts and steps, Pad's pads) are read at run time
inside the kernel, so they may be graph inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import get_topi, known_shape, output_dims, prod, scalar, simplify, static_shape, wrap_index
from kiln.ir import Node, const_ints, is_unknown_dim, normalize_axes, normalize_axis
from kiln.ir.shape_rules import shape_value

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


@lowers("Reshape", reads=(0,))
def _reshape(lw: Lowerer, node: Node) -> list[Any]:
    out = node.outputs[0]
    if known_shape(out, lw.derived):
        dims = [lw.dim(d) for d in out.shape]
        return [lw.emit(lambda x: get_topi().reshape(x, dims), lw.get(node.input(0)), name=node.op_type.lower())]
    target = shape_value(node.input(1)) if node.op_type == "Reshape" else None
    src_shape = list(node.input(0).shape or [])
    if target is None or target[1] or node.attr("allowzero", 0) or any(
            d is None or (isinstance(d, str) and d not in src_shape and d not in lw.derived
                          and (is_unknown_dim(d) or d not in lw.syms))
            for d in target[0]):
        raise CodegenError(f"node {node.label()}: the output shape {out.type_str()} is not known well enough to compile")
    entries = target[0]

    def reshape(x: Any) -> Any:
        # resolve 0 (copy), -1 (the rest) and dims read from the input's own shape against its
        # actual (symbolic) TE shape; a named input symbol is its TIR variable
        def resolve(i: int, d: Any) -> Any:
            if isinstance(d, str):
                return x.shape[src_shape.index(d)] if d in src_shape else lw.dim(d)
            return x.shape[i] if d == 0 else d

        dims: list[Any] = [resolve(i, d) for i, d in enumerate(entries)]
        if -1 in entries:
            k = entries.index(-1)
            dims[k] = simplify(prod(x.shape) // prod([d for i, d in enumerate(dims) if i != k]))
        return get_topi().reshape(x, dims)

    return [lw.emit(reshape, lw.get(node.input(0)), name="reshape")]


def _constant_axes(node: Node, rank: int) -> list[int] | None:
    """Squeeze's or Unsqueeze's axes (the attribute, or a constant input), sorted and non-negative."""
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = const_ints(node.input(1))
    return None if axes is None else normalize_axes(axes, rank)


@lowers("Squeeze", reads=(0,))
def _squeeze(lw: Lowerer, node: Node) -> list[Any]:
    if known_shape(node.outputs[0], lw.derived):
        return _reshape(lw, node)  # axes computed at run time: the declared shape settles them
    x = node.input(0)
    axes = _constant_axes(node, x.rank or 0)
    if axes is None and (node.input(1) is not None or not all(isinstance(d, int) for d in x.shape or [None])):
        raise CodegenError(f"node {node.label()}: Squeeze needs constant axes (or a static input) to compile")
    axes = axes if axes is not None else [i for i, d in enumerate(x.shape) if d == 1]

    def squeeze(t: Any) -> Any:
        return get_topi().reshape(t, [d for i, d in enumerate(t.shape) if i not in axes])

    return [lw.emit(squeeze, lw.get(x), name="squeeze")]


@lowers("Unsqueeze", reads=(0,))
def _unsqueeze(lw: Lowerer, node: Node) -> list[Any]:
    if known_shape(node.outputs[0], lw.derived):
        return _reshape(lw, node)
    x = node.input(0)
    axes = _constant_axes(node, (x.rank or 0) + len(node.attr("axes") or const_ints(node.input(1)) or []))
    if axes is None:
        raise CodegenError(f"node {node.label()}: Unsqueeze needs constant axes to compile")

    def unsqueeze(t: Any) -> Any:
        dims = list(t.shape)
        for a in axes:
            dims.insert(a, 1)
        return get_topi().reshape(t, dims)

    return [lw.emit(unsqueeze, lw.get(x), name="unsqueeze")]


@lowers("Flatten")
def _flatten(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    axis = normalize_axis(node.attr("axis", 1), x.rank or 0)

    def flatten(t: Any) -> Any:
        return get_topi().reshape(t, (prod(t.shape[:axis]), prod(t.shape[axis:])))

    return [lw.emit(flatten, lw.get(x), name="flatten")]


@lowers("Transpose")
def _transpose(lw: Lowerer, node: Node) -> list[Any]:
    perm = node.attr("perm")
    return [lw.emit(lambda x: get_topi().transpose(x, list(perm) if perm else None), lw.get(node.input(0)),
                    name="transpose")]


@lowers("Concat")
def _concat(lw: Lowerer, node: Node) -> list[Any]:
    axis = node.attr("axis")
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(lambda *xs: get_topi().concatenate(list(xs), axis), *ins, name="concat")]


@lowers("Split", reads=(0,))
def _split(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", 0), x.rank)
    sizes = const_ints(node.input(1)) if node.input(1) is not None else node.attr("split")
    outs = [o for o in node.outputs if o.name]
    declared = [o.shape[axis] if o.shape is not None and len(o.shape) > axis else None for o in node.outputs]
    if sizes is None and all(isinstance(d, int) for d in declared):
        sizes = declared  # sizes computed at run time, or num_outputs: the declared shapes settle them
    if sizes is None:
        dim = x.shape[axis]
        if not isinstance(dim, int) or dim % len(node.outputs):
            raise CodegenError(f"node {node.label()}: Split needs constant sizes or an evenly divisible static dim")
        sizes = [dim // len(node.outputs)] * len(node.outputs)
    bounds = [int(b) for b in np.cumsum([0, *sizes])]  # zero-size parts are allowed

    def parts(t: Any) -> list[Any]:
        return [get_topi().strided_slice(t, [lo], [hi], [1], [axis]) for lo, hi in zip(bounds, bounds[1:])]

    tup = lw.emit(parts, lw.get(x), name="split")
    return [lw.bb.emit(relax.TupleGetItem(tup, i)) for i in range(len(outs))]


@lowers("Shape", "Size", reads=())
def _shape(lw: Lowerer, node: Node) -> list[Any]:
    """The input's shape (or element count) as a computed int64 tensor; symbolic dims are variables."""
    from tvm import te, tirx

    x = node.input(0)
    if x.shape is None:
        raise CodegenError(f"node {node.label()}: the input's rank is unknown")
    dims = [lw.dim(d) for d in x.shape]
    if node.op_type == "Size":
        n = prod(dims)
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


@lowers("Expand", reads=(0,))
def _expand(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    dims = output_dims(lw, node)
    return [lw.emit(lambda x: topi.broadcast_to(x, dims), lw.get(node.input(0)), name="expand")]


@lowers("Tile", reads=(0,))
def _tile(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    dims = output_dims(lw, node)

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
    dims = output_dims(lw, node)
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
                a = tirx.const(j, "int64") if axes is None else wrap_index(axes[j], rank)
                st = tirx.const(1, "int64") if steps is None else steps[j].astype("int64")
                s = wrap_index(starts[j], d)
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
    si = static_shape(node.input(0))
    starts = const_ints(node.input(1))
    axes = const_ints(node.input(3)) if node.input(3) is not None else list(range(len(starts or [])))
    steps = const_ints(node.input(4)) if node.input(4) is not None else [1] * len(starts or [])
    if si is None or starts is None or axes is None or steps is None:
        return None
    origin = [(0, 1)] * len(si)
    for s, a, st in zip(starts, axes, steps):
        a = normalize_axis(a, len(si))
        d = si[a]
        s = s + d if s < 0 else s
        origin[a] = (max(min(s, d if st > 0 else d - 1), 0), st)
    return origin


def _slice_attrs(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    starts, ends = list(node.attr("starts")), list(node.attr("ends"))
    axes = [normalize_axis(a, x.rank) for a in node.attr("axes") or range(len(starts))]
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
    dims = output_dims(lw, node)
    pads_attr = node.attr("pads")
    value_attr = node.attr("value", 0.0)
    axes: list[int] | None = list(range(rank))
    n_axes = rank
    if node.input(3) is not None:
        axes_c = const_ints(node.input(3))
        axes = None if axes_c is None else [normalize_axis(a, rank) for a in axes_c]
        n_axes = len(axes) if axes is not None else (node.input(3).shape or [0])[0]
    has_pads, has_value = pads_attr is None and node.input(1) is not None, node.input(2) is not None
    has_axes = axes is None
    ins = [lw.get(x)] + ([lw.get(node.input(1))] if has_pads else []) + \
        ([lw.get(node.input(2))] if has_value else []) + ([lw.get(node.input(3))] if has_axes else [])

    def compute(t: Any, *rest: Any) -> Any:
        rest_l = list(rest)
        pads = rest_l.pop(0) if has_pads else None
        cval = scalar(rest_l.pop(0)) if has_value else tirx.const(value_attr, t.dtype)
        axes_t = rest_l.pop(0) if has_axes else None
        befores: list[Any] = [tirx.const(0, "int64")] * rank
        for j in range(n_axes):
            p = pads[j].astype("int64") if pads is not None else tirx.const(int(pads_attr[j]), "int64")
            if axes_t is None:
                befores[axes[j]] = p
            else:  # axes read at run time: each entry pads the dim it names
                a = wrap_index(axes_t[j], rank)
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


@lowers("DepthToSpace", "SpaceToDepth")
def _depth_space(lw: Lowerer, node: Node) -> list[Any]:
    """Both directions, both channel orders: DCR (depth, column, row) and CRD."""
    from tvm import te

    b = node.attr("blocksize")
    crd = node.attr("mode", "DCR") == "CRD"
    dims = output_dims(lw, node)

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
