"""Lowerings of the pools: MaxPool (with indices too), AveragePool, LpPool, the global pools, MaxUnpool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import get_topi, prod, spatial_pads, static_shape
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _pool_geometry(node: Node) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """A pool's kernel, strides, dilations, pads (auto_pad resolved) and ceil_mode."""
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = list(node.attr("strides", ()) or [1] * n)
    dil = list(node.attr("dilations", ()) or [1] * n)
    return kernel, strides, dil, spatial_pads(node, kernel, strides, dil), bool(node.attr("ceil_mode", 0))


_LAYOUTS = {1: "NCW", 2: "NCHW", 3: "NCDHW"}  # the data layout of a 1-D, 2-D and 3-D pool


def _topi_pool(n: int) -> Any:
    """topi's ``n``-D pool (``n`` in 1..3)."""
    nn = get_topi().nn
    return {1: nn.pool1d, 2: nn.pool2d, 3: nn.pool3d}[n]


@lowers("MaxPool", "AveragePool")
def _pool(lw: Lowerer, node: Node) -> list[Any]:
    if len([o for o in node.outputs if o.name]) > 1:
        return _max_pool_with_indices(lw, node)
    kernel, strides, dil, pads, ceil = _pool_geometry(node)
    x = node.input(0)
    n = len(kernel)
    if n == 3 and kernel[2] == strides[2] == dil[2] == 1 and pads[2] == pads[5] == 0 and x.shape \
            and isinstance(x.shape[-1], int):
        # blocked NCHW[b]c data (the layout pass): a 2-D pool with a window of 1 over the lanes
        kernel, strides, dil, pads = kernel[:2], strides[:2], dil[:2], [pads[0], pads[1], pads[3], pads[4]]
        n, layout = 2, f"NCHW{x.shape[-1]}c"
    else:
        layout = _LAYOUTS.get(n, "")
    if n not in _LAYOUTS:
        raise CodegenError(f"node {node.label()}: {n}-D pooling does not compile yet")
    pool = _topi_pool(n)
    kind = "max" if node.op_type == "MaxPool" else "avg"
    include_pad = bool(node.attr("count_include_pad", 0))
    return [lw.emit(lambda t: pool(t, kernel, strides, dil, pads, kind, ceil, layout, include_pad),
                    lw.get(x), name=f"{kind}_pool{n}d")]


def _max_pool_with_indices(lw: Lowerer, node: Node) -> list[Any]:
    """MaxPool's values and flat NC... indices (row-major, or column-major with storage_order=1)."""
    from tvm import te, tirx

    kernel, strides, dil, pads, _ = _pool_geometry(node)
    so = static_shape(node.outputs[0])
    si = static_shape(node.input(0))
    if so is None or si is None:
        raise CodegenError(f"node {node.label()}: MaxPool indices need static shapes to compile")
    n = len(kernel)
    col_major = bool(node.attr("storage_order", 0))

    def compute(t: Any) -> Any:
        dt = t.dtype

        def combine(a: Any, b: Any) -> Any:
            take_b = tirx.Or(b[1] > a[1], tirx.And(b[1] == a[1], b[0] < a[0]))
            return tirx.Select(take_b, b[0], a[0]), tirx.Select(take_b, b[1], a[1])

        red = te.comm_reducer(combine, lambda t0, t1: (tirx.const(1 << 62, t0), tirx.min_value(t1)), name="argmax")
        rk = [te.reduce_axis((0, kernel[j]), f"k{j}") for j in range(n)]

        def body(b: Any, c: Any, *o: Any) -> Any:
            pos = [o[j] * strides[j] - pads[j] + rk[j] * dil[j] for j in range(n)]
            ok = tirx.all(*[tirx.all(p >= 0, p < si[2 + j]) for j, p in enumerate(pos)])
            safe = [tirx.max(tirx.min(p, si[2 + j] - 1), 0) for j, p in enumerate(pos)]
            if col_major:  # storage_order=1: the spatial dims in column-major order
                flat: Any = safe[n - 1]
                for j in range(n - 2, -1, -1):
                    flat = flat * si[2 + j] + safe[j]
                flat = flat.astype("int64") if hasattr(flat, "astype") else flat
                idx = (b.astype("int64") * si[1] + c) * int(np.prod(si[2:])) + flat
            else:
                idx = b.astype("int64") * si[1] + c
                for j in range(n):
                    idx = idx * si[2 + j] + safe[j]
            val = tirx.Select(ok, t[(b, c, *safe)], tirx.min_value(dt))
            return red((tirx.Cast("int64", idx), val), axis=rk)

        pair = te.compute(so, body, name="max_pool_argmax")
        return [pair[1], pair[0]]

    out = lw.emit(compute, lw.get(node.input(0)), name="max_pool_with_indices")
    return lw.unpack(out, node)


@lowers("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(lw: Lowerer, node: Node) -> list[Any]:
    """The mean, max or Lp norm over every spatial dim (N, C, ...), for any rank (topi's global_pool is 2-D only)."""
    from tvm import topi

    op = node.op_type
    p = float(node.attr("p", 2))

    def compute(t: Any) -> Any:
        axes = list(range(2, len(t.shape)))
        if not axes:
            return topi.identity(t)
        if op == "GlobalMaxPool":
            return topi.max(t, axes, True)
        if op == "GlobalAveragePool":
            return topi.divide(topi.sum(t, axes, True), topi.cast(prod(t.shape[2:]), t.dtype))
        return topi.power(topi.sum(topi.power(topi.abs(t), p), axes, True), 1.0 / p)

    return [lw.emit(compute, lw.get(node.input(0)), name=op.lower())]


@lowers("LpPool")
def _lp_pool(lw: Lowerer, node: Node) -> list[Any]:
    """(sum over the window of |x|^p)^(1/p), through an average pool that counts the padding."""
    from tvm import topi

    x = node.input(0)
    kernel, strides, dil, pads, ceil = _pool_geometry(node)
    p = float(node.attr("p", 2))
    size = 1
    for k in kernel:
        size *= k
    n = len(kernel)
    if n not in _LAYOUTS:
        raise CodegenError(f"node {node.label()}: {n}-D LpPool does not compile")
    pool, layout = _topi_pool(n), _LAYOUTS[n]

    def compute(t: Any) -> Any:
        powed = topi.power(topi.abs(t), p)
        s = topi.multiply(pool(powed, kernel, strides, dil, pads, "avg", ceil, layout, True), float(size))
        return topi.power(s, 1.0 / p)

    return [lw.emit(compute, lw.get(x), name="lp_pool")]


def _unpool_reads(node: Node) -> tuple[int, ...]:
    return (0, 1) if static_shape(node.outputs[0]) is not None or node.input(2) is None else (0, 1, 2)


@lowers("MaxUnpool", reads=_unpool_reads)
def _max_unpool(lw: Lowerer, node: Node) -> list[Any]:
    """Scatter each pooled value to its flat index in a zero tensor of the declared output shape.

    As in onnxruntime, the indices count in the output tensor as a whole (with ``output_shape``, in
    that shape), and where two indices are equal the later element wins: MaxPool's indices repeat
    where its windows overlap. topi's scatter runs the updates in order.
    """
    from tvm import topi

    so: Any = static_shape(node.outputs[0])
    if so is None:
        if node.input(2) is None:
            raise CodegenError(f"node {node.label()}: MaxUnpool needs a static input shape to compile")
        so = lw.runtime_dims(lw.get(node.input(2)), node.input(0).rank or 0, "unpooled")  # output_shape at run time
    total = prod(so)

    def compute(x: Any, idx: Any) -> Any:
        n = int(np.prod([int(d) for d in x.shape]))
        zeros = topi.full((total,), x.dtype, 0)
        flat = topi.scatter_elements(zeros, topi.reshape(idx, (n,)), topi.reshape(x, (n,)), 0, "update")
        return topi.reshape(flat, so)

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="max_unpool")]
