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

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import (
    get_topi, is_one, known_shape, output_dims, pick, prod, scalar, settled, simplify, static_shape, wrap_index,
)
from kiln.ir import Node, const_ints, is_unknown_dim, normalize_axes, normalize_axis
from kiln.ir.shape_rules import shape_value

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _symbolic_target(node: Node) -> list[Any] | None:
    """A Reshape target that kiln's shape values settle (ints, 0, -1, the input's own dims), or None."""
    target = shape_value(node.input(1))
    src_shape = list(node.input(0).shape or [])
    # allowzero changes only what a 0 entry means: a target without one settles the shape as well
    if target is None or target[1] or (node.attr("allowzero", 0) and 0 in target[0]) or any(
            d is None or (isinstance(d, str) and d not in src_shape and is_unknown_dim(d)) for d in target[0]):
        return None
    return target[0]


def _target_reads(node: Node) -> tuple[int, ...]:
    """Reshape reads its target at run time only where neither the declared shape nor the target's shape values
    settle it (a target computed by a Shape subgraph is not compiled)."""
    return (0,) if settled(node.outputs[0]) or _symbolic_target(node) is not None else (0, 1)


@lowers("Reshape", reads=_target_reads)
def _reshape(lw: Lowerer, node: Node) -> list[Any]:
    out = node.outputs[0]
    if known_shape(out, lw.bound):
        dims = [lw.dim(d) for d in out.shape]
        if _provably_shaped(lw.get(node.input(0)), dims):  # no kernel: TVM cannot always see a copy as a reshape
            return [lw.get(node.input(0))]
        return [lw.emit(lambda x: get_topi().reshape(x, dims), lw.get(node.input(0)), name=node.op_type.lower())]
    entries = _symbolic_target(node) if node.op_type == "Reshape" else None
    src_shape = list(node.input(0).shape or [])
    if entries is None or any(isinstance(d, str) and d not in src_shape and d not in lw.bound for d in entries):
        if node.op_type == "Reshape" and _target_reads(node) == (0, 1):
            return [_reshape_at_run_time(lw, node)]
        raise CodegenError(f"node {node.label()}: the output shape {out.type_str()} is not known well enough to compile")

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


def _provably_shaped(value: Any, dims: list[Any]) -> bool:
    """Whether the lowered ``value`` provably has the shape ``dims`` already (a reshape to it is the identity).

    Such a reshape kernel is not only a wasted copy: with dims like ``samples // 5 - 1`` on both
    sides, FuseTIR gives each side its own variable, and TVM's index simplifier then aborts on it.
    """
    from tvm import relax
    from tvm.sym import Analyzer

    shape = getattr(value.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != len(dims):
        return False
    analyzer = Analyzer()
    return all(analyzer.can_prove_equal(s, d) for s, d in zip(shape.values, dims))


def _reshape_at_run_time(lw: Lowerer, node: Node) -> Any:
    """Reshape to a target read at run time: 0 copies the input's dim (unless ``allowzero``), -1 takes the rest."""
    from tvm import te, tirx

    n = (node.input(1).shape or [None])[0]
    if not isinstance(n, int):
        raise CodegenError(f"node {node.label()}: Reshape needs a target of static length to compile")
    allowzero = bool(node.attr("allowzero", 0))

    def dims(t: Any, target: Any) -> Any:
        one = tirx.const(1, "int64")
        vals = [target[k].astype("int64") for k in range(n)]
        own = [tirx.Cast("int64", t.shape[k]) if k < len(t.shape) else one for k in range(n)]
        given = [v if allowzero else tirx.Select(v == 0, d, v) for v, d in zip(vals, own)]
        known = prod([tirx.Select(v == -1, one, g) for v, g in zip(vals, given)])
        total = tirx.Cast("int64", prod(t.shape))
        resolved = [tirx.Select(v == -1, tirx.floordiv(total, tirx.max(known, one)), g) for v, g in zip(vals, given)]
        return te.compute((n,), lambda j: pick(j, resolved), name="reshape_dims")

    target = lw.computed_dims(dims, lw.get(node.input(0)), lw.get(node.input(1)), count=n, name="reshape")
    return lw.emit(lambda x: get_topi().reshape(x, target), lw.get(node.input(0)), name="reshape")


def _axes_reads(node: Node) -> tuple[int, ...]:
    return (0,) if settled(node.outputs[0]) or node.input(1) is None or const_ints(node.input(1)) is not None else (0, 1)


def _run_time_axes(t: Any, axes: Any, rank: int) -> list[Any]:
    """The axes of a run-time axes tensor, each made non-negative for a tensor of ``rank`` dims."""
    return [wrap_index(axes[m], rank) for m in range(int(axes.shape[0]))]


def _constant_axes(node: Node, rank: int) -> list[int] | None:
    """Squeeze's or Unsqueeze's axes (the attribute, or a constant input), sorted and non-negative."""
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = const_ints(node.input(1))
    return None if axes is None else normalize_axes(axes, rank)


@lowers("Squeeze", reads=_axes_reads)
def _squeeze(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    if known_shape(node.outputs[0], lw.bound):
        return _reshape(lw, node)  # axes computed at run time: the declared shape settles them
    x = node.input(0)
    rank = x.rank or 0
    axes = _constant_axes(node, rank)
    if axes is None and node.input(1) is not None and isinstance((node.input(1).shape or [None])[0], int):
        # axes read at run time: output dim j is the j-th input dim not squeezed
        def dims(t: Any, ax: Any) -> Any:
            gone = _run_time_axes(t, ax, rank)
            kept = [tirx.Not(tirx.any(*[a == k for a in gone])) if gone else tirx.const(True) for k in range(rank)]
            before = [sum((tirx.Cast("int64", f) for f in kept[:k + 1]), tirx.const(0, "int64")) for k in range(rank)]
            n_out = rank - len(gone)
            return te.compute((n_out,), lambda j: sum((tirx.Select(tirx.all(kept[k], before[k] == j + 1), tirx.Cast(
                "int64", t.shape[k]), tirx.const(0, "int64")) for k in range(rank)), tirx.const(0, "int64")),
                name="squeeze_dims")

        n_out = rank - int(node.input(1).shape[0])
        target = lw.computed_dims(dims, lw.get(x), lw.get(node.input(1)), count=n_out, name="squeeze")
        return [lw.emit(lambda t: get_topi().reshape(t, target), lw.get(x), name="squeeze")]
    if axes is None and (node.input(1) is not None or not all(isinstance(d, int) for d in x.shape or [None])):
        raise CodegenError(f"node {node.label()}: Squeeze needs constant axes (or a static input) to compile")
    axes = axes if axes is not None else [i for i, d in enumerate(x.shape) if d == 1]

    def squeeze(t: Any) -> Any:
        return get_topi().reshape(t, [d for i, d in enumerate(t.shape) if i not in axes])

    return [lw.emit(squeeze, lw.get(x), name="squeeze")]


@lowers("Unsqueeze", reads=_axes_reads)
def _unsqueeze(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    if known_shape(node.outputs[0], lw.bound):
        return _reshape(lw, node)
    x = node.input(0)
    rank = x.rank or 0
    axes = _constant_axes(node, rank + len(node.attr("axes") or const_ints(node.input(1)) or []))
    if axes is None and node.input(1) is not None and isinstance((node.input(1).shape or [None])[0], int):
        n_out = rank + int(node.input(1).shape[0])

        def dims(t: Any, ax: Any) -> Any:  # axes read at run time: 1 at each, the input's dims in order elsewhere
            new = _run_time_axes(t, ax, n_out)

            def body(j: Any) -> Any:
                earlier = sum((tirx.Cast("int64", a < j) for a in new), tirx.const(0, "int64"))
                own = pick(tirx.max(j - earlier, 0), list(t.shape)) if rank else tirx.const(1, "int64")
                return tirx.Select(tirx.any(*[a == j for a in new]), tirx.const(1, "int64"), own)

            return te.compute((n_out,), body, name="unsqueeze_dims")

        target = lw.computed_dims(dims, lw.get(x), lw.get(node.input(1)), count=n_out, name="unsqueeze")
        return [lw.emit(lambda t: get_topi().reshape(t, target), lw.get(x), name="unsqueeze")]
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


@lowers("Split", reads=(0, 1))
def _split(lw: Lowerer, node: Node) -> list[Any]:
    """Split into the parts the sizes give: constant (the input or ``split``), settled by the declared
    shapes, even (``num_outputs``: the last part smaller), or read at run time from the sizes input."""
    from tvm import te

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", 0), x.rank)
    n = len(node.outputs)
    given = node.input(1)
    sizes: list[Any] | None = const_ints(given) if given is not None else node.attr("split")
    declared = [o.shape[axis] if o.shape is not None and len(o.shape) > axis else None for o in node.outputs]
    if sizes is None and all(isinstance(d, int) for d in declared):
        sizes = declared
    if sizes is None and given is not None:  # sizes computed at run time, and the shapes do not settle them
        sizes = lw.runtime_dims(lw.get(given), n, "split")
    if sizes is None:
        dim = x.shape[axis]
        if not isinstance(dim, int):
            raise CodegenError(f"node {node.label()}: Split needs constant sizes or a static dim to compile")
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    starts: list[Any] = [0]
    for size in sizes[:-1]:
        starts.append(simplify(starts[-1] + size))

    def parts(t: Any) -> Any:
        def part(start: Any, size: Any) -> Any:
            dims = [size if k == axis else d for k, d in enumerate(t.shape)]
            return te.compute(dims, lambda *i: t[(*i[:axis], i[axis] + start, *i[axis + 1:])], name="split")

        out = [part(st, sz) for st, sz in zip(starts, sizes)]
        return out if len(out) > 1 else out[0]

    result = lw.emit(parts, lw.get(x), name="split")
    return [result] if n == 1 else lw.unpack(result, node)


@lowers("Shape", "Size", reads=())
def _shape(lw: Lowerer, node: Node) -> list[Any]:
    """The input's shape (or element count) as a computed int64 tensor; symbolic dims are variables.

    The dims go to the kernel as arguments: TVM's ``emit_te`` makes kernel parameters only of the
    variables it sees in arguments and shapes, not of those a compute body captures.
    """
    from tvm import te, tirx

    x = node.input(0)
    if x.shape is None:
        raise CodegenError(f"node {node.label()}: the input's rank is unknown")
    dims = [lw.dim(d) for d in x.shape]
    if node.op_type == "Size":
        def size(*ds: Any) -> Any:
            n = prod(ds)
            return te.compute((), lambda: tirx.IntImm("int64", n) if isinstance(n, int) else n, name="size")

        return [lw.emit(size, *dims, name="size")]
    dims = dims[slice(node.attr("start", 0), node.attr("end"))]

    def shape(*ds: Any) -> Any:
        return te.compute((len(ds),), lambda i: pick(i, ds) if ds else tirx.const(0, "int64"), name="shape")

    return [lw.emit(shape, *dims, name="shape")]


def _shape_reads(node: Node) -> tuple[int, ...]:
    """Expand, Tile, ConstantOfShape, ...: the shape input is read only where the declared shape does not settle it."""
    return (0,) if settled(node.outputs[0]) else (0, 1)


@lowers("Expand", reads=_shape_reads)
def _expand(lw: Lowerer, node: Node) -> list[Any]:
    """Broadcast to the declared shape, or to a shape read at run time (numpy broadcasting with the input's dims)."""
    from tvm import te, tirx, topi

    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
        return [lw.emit(lambda x: topi.broadcast_to(x, dims), lw.get(node.input(0)), name="expand")]
    x = node.input(0)
    n = (node.input(1).shape or [None])[0]
    if not isinstance(n, int) or x.shape is None:
        raise CodegenError(f"node {node.label()}: Expand needs a shape of static length to compile")
    rank = len(x.shape)
    out_rank = max(rank, n)

    def dims_of(t: Any, shape: Any) -> Any:
        def at(j: int) -> Any:
            s = shape[j - (out_rank - n)].astype("int64") if j >= out_rank - n else tirx.const(1, "int64")
            if j < out_rank - rank:
                return s
            d = t.shape[j - (out_rank - rank)]
            return s if is_one(d) else tirx.Select(tirx.Cast("int64", d) == 1, s, tirx.Cast("int64", d)) \
                if not isinstance(getattr(d, "value", None), int) else tirx.const(int(d), "int64")

        values = [at(j) for j in range(out_rank)]
        return te.compute((out_rank,), lambda j: pick(j, values), name="expand_dims")

    dims = lw.computed_dims(dims_of, lw.get(x), lw.get(node.input(1)), count=out_rank, name="expand")

    def expand(t: Any) -> Any:
        off = out_rank - rank
        return te.compute(dims, lambda *i: t[tuple(0 if is_one(d) else i[off + k] for k, d in enumerate(t.shape))],
                          name="expand")

    return [lw.emit(expand, lw.get(x), name="expand")]


@lowers("Tile", reads=_shape_reads)
def _tile(lw: Lowerer, node: Node) -> list[Any]:
    """Tile to the declared output shape, or, with repeats computed at run time that the shapes do not
    settle, to ``dims * repeats`` read at run time."""
    from tvm import te, tirx

    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
    else:
        x = node.input(0)
        reps = lw.runtime_dims(lw.get(node.input(1)), x.rank or 0, "repeat")
        dims = [simplify(lw.dim(d) * r) for d, r in zip(x.shape, reps)]

    def compute(x: Any) -> Any:
        return te.compute(dims, lambda *i: x[tuple(tirx.floormod(j, d) for j, d in zip(i, x.shape))], name="tile")

    return [lw.emit(compute, lw.get(node.input(0)), name="tile")]


@lowers("Slice")
def _slice(lw: Lowerer, node: Node) -> list[Any]:
    """Slice with starts/ends/axes/steps read at run time: the declared output shape gives the sizes, or,
    where it does not settle them, they are computed at run time too."""
    from tvm import te

    x = node.input(0)
    if node.attr("starts") is not None:  # opset 1-9: attributes
        return _slice_attrs(lw, node)
    rank = x.rank or 0
    n = (node.input(1).shape or [0])[0]
    if not isinstance(n, int):
        raise CodegenError(f"node {node.label()}: Slice needs a static number of starts")
    has_axes, has_steps = node.input(3) is not None, node.input(4) is not None
    fixed = _static_slice_origin(node)
    if fixed is not None and known_shape(node.outputs[0], lw.bound):  # constant starts/axes/steps: immediates
        dims = output_dims(lw, node)
        return [lw.emit(lambda t: te.compute(dims, lambda *i: t[tuple(s + j * st for j, (s, st) in zip(i, fixed))],
                                             name="slice"), lw.get(x), name="slice")]
    ins = [lw.get(node.input(i)) for i in range(5) if node.input(i) is not None]

    def geometry(t: Any, starts: Any, ends: Any, *rest: Any) -> list[tuple[Any, Any, Any]]:
        rest_l = list(rest)
        return _slice_geometry(t, starts, ends, rest_l.pop(0) if has_axes else None,
                               rest_l.pop(0) if has_steps else None, n, rank)

    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
    else:  # the sizes depend on values read at run time: computed first
        def sizes(*ts: Any) -> Any:
            lengths = [length for _, _, length in geometry(*ts)]
            return te.compute((rank,), lambda k: pick(k, lengths), name="slice_dims")

        dims = lw.computed_dims(sizes, *ins, count=rank, name="slice")

    def compute(*ts: Any) -> Any:
        org = geometry(*ts)
        t = ts[0]
        return te.compute(dims, lambda *i: t[tuple(s + j * st for j, (s, st, _) in zip(i, org))], name="slice")

    return [lw.emit(compute, *ins, name="slice")]


def _slice_geometry(t: Any, starts: Any, ends: Any, axes: Any, steps: Any, n: int,
                    rank: int) -> list[tuple[Any, Any, Any]]:
    """(start, step, length) per axis of ``t`` for Slice inputs read at run time, clamped as ONNX says."""
    from tvm import tirx

    zero, one = tirx.const(0, "int64"), tirx.const(1, "int64")
    out = []
    for k in range(rank):
        d = tirx.Cast("int64", t.shape[k])
        start, step, length = zero, one, d
        for j in range(n):
            a = tirx.const(j, "int64") if axes is None else wrap_index(axes[j], rank)
            st = one if steps is None else steps[j].astype("int64")
            s = wrap_index(starts[j], d)
            e = wrap_index(ends[j], d)
            forward = st > 0
            s = tirx.Select(forward, tirx.max(tirx.min(s, d), zero), tirx.max(tirx.min(s, d - 1), zero))
            e = tirx.Select(forward, tirx.max(tirx.min(e, d), zero), tirx.max(tirx.min(e, d - 1), -one))
            span = tirx.Select(forward, e - s, s - e)
            size = tirx.max(tirx.floordiv(span + tirx.abs(st) - 1, tirx.max(tirx.abs(st), one)), zero)
            start = tirx.Select(a == k, s, start)
            step = tirx.Select(a == k, st, step)
            length = tirx.Select(a == k, size, length)
        out.append((start, step, length))
    return out


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

    def amounts(t: Any, *rest: Any) -> tuple[list[Any], list[Any], Any]:
        """(pads before, pads after, the constant) per dim."""
        rest_l = list(rest)
        pads = rest_l.pop(0) if has_pads else None
        cval = scalar(rest_l.pop(0)) if has_value else tirx.const(value_attr, t.dtype)
        axes_t = rest_l.pop(0) if has_axes else None
        sides: list[list[Any]] = [[tirx.const(0, "int64")] * rank, [tirx.const(0, "int64")] * rank]
        for side in (0, 1):
            for j in range(n_axes):
                at = side * n_axes + j
                p = pads[at].astype("int64") if pads is not None else tirx.const(int(pads_attr[at]), "int64")
                if axes_t is None:
                    sides[side][axes[j]] = p
                else:  # axes read at run time: each entry pads the dim it names
                    a = wrap_index(axes_t[j], rank)
                    sides[side] = [tirx.Select(a == k, p, b) for k, b in enumerate(sides[side])]
        return sides[0], sides[1], cval

    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
    else:  # pads read at run time decide the output shape: computed first
        def sizes(t: Any, *rest: Any) -> Any:
            before, after, _ = amounts(t, *rest)
            total = [tirx.Cast("int64", d) + b + a for d, b, a in zip(t.shape, before, after)]
            return te.compute((rank,), lambda k: pick(k, total), name="pad_dims")

        dims = lw.computed_dims(sizes, *ins, count=rank, name="pad")

    def compute(t: Any, *rest: Any) -> Any:
        befores, _, cval = amounts(t, *rest)

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

    def to_space(t: Any) -> Any:  # dims from the input's, which may be symbolic
        n, c_in, h_in, w_in = t.shape
        c_out = c_in // (b * b)
        dims = (n, c_out, h_in * b, w_in * b)

        def body(n: Any, c: Any, h: Any, w: Any) -> Any:
            bh, bw = h % b, w % b
            src_c = c * b * b + bh * b + bw if crd else (bh * b + bw) * c_out + c
            return t[n, src_c, h // b, w // b]

        return te.compute(dims, body, name="depth_to_space")

    def to_depth(t: Any) -> Any:
        n, c_in, h_in, w_in = t.shape
        dims = (n, c_in * b * b, h_in // b, w_in // b)

        def body(n: Any, c: Any, h: Any, w: Any) -> Any:
            if crd:
                src_c, blk = c // (b * b), c % (b * b)
            else:
                src_c, blk = c % c_in, c // c_in
            return t[n, src_c, h * b + blk // b, w * b + blk % b]

        return te.compute(dims, body, name="space_to_depth")

    fn = to_space if node.op_type == "DepthToSpace" else to_depth
    return [lw.emit(fn, lw.get(node.input(0)), name=node.op_type.lower())]


@lowers("CenterCropPad", reads=_shape_reads)
def _center_crop_pad(lw: Lowerer, node: Node) -> list[Any]:
    """Crop (centred, extra to the end) or zero-pad (centred) each axis to the declared output size, or to
    the sizes read at run time (the shape input, along ``axes``)."""
    from tvm import te, tirx

    si = static_shape(node.input(0))
    if si is None:
        raise CodegenError(f"node {node.label()}: CenterCropPad needs a static input shape to compile")
    so: list[Any] | None = static_shape(node.outputs[0])
    if so is None:
        rank = len(si)
        axes = [normalize_axis(a, rank) for a in node.attr("axes") or range(rank)]
        sizes = lw.runtime_dims(lw.get(node.input(1)), len(axes), "crop")
        so = [sizes[axes.index(k)] if k in axes else d for k, d in enumerate(si)]

    def half(v: Any) -> Any:
        return v // 2 if isinstance(v, int) else tirx.floordiv(v, 2)

    shift = [half(d - o) if isinstance(o, int) and d >= o else
             (-half(o - d) if isinstance(o, int) else tirx.Select(o <= d, half(d - o), -half(o - d)))
             for d, o in zip(si, so)]

    def compute(t: Any) -> Any:
        def body(*i: Any) -> Any:
            src = [j + s for j, s in zip(i, shift)]
            ok = [tirx.all(s >= 0, s < d) for s, d, o in zip(src, si, so) if not isinstance(o, int) or o > d]
            safe = [tirx.max(tirx.min(s, d - 1), 0) for s, d in zip(src, si)]
            return tirx.Select(tirx.all(*ok), t[tuple(safe)], tirx.const(0, t.dtype)) if ok else t[tuple(safe)]

        return te.compute(so, body, name="center_crop_pad")

    return [lw.emit(compute, lw.get(node.input(0)), name="center_crop_pad")]
