"""Lowerings of the matrix products: Gemm and ``kiln::FusedGemm`` (one ``dense`` reduction with a
fused epilogue, for kiln's dense schedule), MatMul, Einsum, and the integer ones (MatMulInteger,
QLinearMatMul).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import (activation_expr, batched_matmul, get_topi, prod, scheduled_batch_matmul,
                                      simplify)
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _gemm_compute(node: Node, act: str = "", params: tuple[float, ...] = ()) -> Callable[..., Any]:
    """Gemm as one ``dense`` reduction and one ``epilogue`` stage (alpha, C, activation)."""
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)

    def compute(a: Any, b: Any, *c: Any) -> Any:
        from tvm import te, tirx

        m = a.shape[1] if trans_a else a.shape[0]
        kdim = a.shape[0] if trans_a else a.shape[1]
        n = b.shape[0] if trans_b else b.shape[1]
        k = te.reduce_axis((0, kdim), name="k")
        dense = te.compute((m, n), lambda i, j: te.sum((a[k, i] if trans_a else a[i, k])
                                                       * (b[j, k] if trans_b else b[k, j]), axis=k), name="dense")
        bias = c[0] if c else None

        def epilogue(i: Any, j: Any) -> Any:
            v = dense[i, j]
            if alpha != 1.0:
                v = v * tirx.const(alpha, a.dtype)
            if bias is not None:
                # C broadcasts to [M, N] from (), [N], [1, N], [M, 1] or [M, N]
                full = [i, j][2 - len(bias.shape):]
                cv = bias[tuple(0 if int(d) == 1 else ix for d, ix in zip(bias.shape, full))]
                v = v + (cv * tirx.const(beta, a.dtype) if beta != 1.0 else cv)
            return activation_expr(v, act, params)

        return te.compute((m, n), epilogue, name="epilogue")

    return compute


def _gemm_attrs(node: Node) -> dict[str, Any]:
    """The dense schedule needs A row-major and B as [K, N] (the layout pass un-transposes constant Bs)."""
    return {"kiln.schedule": "dense"} if not node.attr("transA", 0) and not node.attr("transB", 0) else {}


@lowers("Gemm")
def _gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(_gemm_compute(node), *ins, name="gemm", attrs=_gemm_attrs(node))]


@lowers("FusedGemm", domain="kiln")
def _fused_gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    act = node.attr("activation", "") or ""
    params = tuple(node.attr("activation_params", ()) or ())
    name = f"fused_gemm_{act.lower() or 'linear'}"
    if node.input(0).rank > 2:  # rows: the scheduled dense kernel on [M, K], between reshapes (views)
        return [on_rows(lw, ins[0], lambda rows: lw.emit(_gemm_compute(node, act, params), rows, *ins[1:], name=name,
                                                          attrs=_gemm_attrs(node)))]
    return [lw.emit(_gemm_compute(node, act, params), *ins, name=name, attrs=_gemm_attrs(node))]


def on_rows(lw: Lowerer, x: Any, product: Callable[[Any], Any]) -> Any:
    """``product`` of ``x [..., K]`` flattened to rows ``[M, K]``, its ``[M, N]`` result shaped back to ``[..., N]``.
    TVM turns both reshapes into views (RewriteDataflowReshape)."""
    lead = list(x.ty.shape.values)[:-1]
    flat = lw.rows_of.get(x)
    if flat is None:
        flat = lw.emit(lambda t: get_topi().reshape(t, (simplify(prod(t.shape[:-1])), t.shape[-1])), x,
                       name="matmul_rows")
    rows = product(flat)
    out = lw.emit(lambda t: get_topi().reshape(t, (*lead, t.shape[-1])), rows, name="matmul_unrows")
    lw.rows_of[out] = rows
    return out


@lowers("MatMul")
def _matmul_nd(lw: Lowerer, node: Node) -> list[Any]:
    a, b = node.input(0), node.input(1)
    if not a.rank or not b.rank:
        raise CodegenError(f"node {node.label()}: MatMul of 0-d operands does not compile")
    floats = a.dtype == b.dtype and a.dtype is not None and a.dtype.is_float
    if a.rank >= 2 and b.rank == 2 and floats:
        # [..., K] @ [K, N]: the scheduled dense kernel on [M, K], between reshapes that
        # TVM turns into views (RewriteDataflowReshape)
        return [on_rows(lw, lw.get(a), lambda rows: lw.emit(_gemm_compute(node), rows, lw.get(b), name="matmul",
                                                             attrs={"kiln.schedule": "dense"}))]

    if a.rank >= 2 and b.rank >= 2 and floats:
        # [..., M, K] @ [..., K, N]: attention's products when they are not fused (Whisper's
        # encoder: 87% of its time ran as an unscheduled batch_matmul)
        return [lw.emit(scheduled_batch_matmul, lw.get(a), lw.get(b), name="matmul", attrs={"kiln.schedule": "dense"})]

    def compute(x: Any, y: Any) -> Any:
        # numpy's 1-D rules: a vector on the left is a row, on the right a column, then dropped
        topi = get_topi()
        x2 = topi.reshape(x, (1, x.shape[0])) if len(x.shape) == 1 else x
        y2 = topi.reshape(y, (y.shape[0], 1)) if len(y.shape) == 1 else y
        z = batched_matmul(x2, y2)
        dims = list(z.shape)
        if len(y.shape) == 1:
            dims.pop(-1)
        if len(x.shape) == 1:
            dims.pop(-1 if len(y.shape) == 1 else -2)
        return topi.reshape(z, dims) if len(dims) != len(z.shape) else z

    return [lw.emit(compute, lw.get(a), lw.get(b), name="matmul")]


@lowers("Einsum")
def _einsum(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    eq = node.attr("equation").replace(" ", "")
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(lambda *ts: topi.einsum(eq, *ts), *ins, name="einsum")]


# =========================================================================== integer matrix products


def _int_matmul(a: Any, b: Any, azp: Any | None, bzp: Any | None) -> Any:
    """(a - a_zero_point) @ (b - b_zero_point) in int32, numpy-batched (2-D b or equal batch dims)."""
    from tvm import te, tirx

    k = a.shape[-1]
    r = te.reduce_axis((0, k), "k")
    batch = a.shape[:-2] if len(a.shape) >= len(b.shape) else b.shape[:-2]
    shape = [*batch, a.shape[-2], b.shape[-1]]

    def zp(z: Any | None, i: Any) -> Any:
        """A zero point: per tensor, or per row of a / per column of b."""
        if z is None:
            return tirx.const(0, "int32")
        if len(z.shape) == 0 or int(np.prod([int(d) for d in z.shape])) == 1:
            return tirx.Cast("int32", z[tuple(0 for _ in z.shape)])
        return tirx.Cast("int32", z[i])

    def body(*i: Any) -> Any:
        *bt, m, n = i
        ai = (*bt[len(bt) - (len(a.shape) - 2):], m, r)
        bi = (*bt[len(bt) - (len(b.shape) - 2):], r, n)
        av = tirx.Cast("int32", a[ai]) - zp(azp, m)
        bv = tirx.Cast("int32", b[bi]) - zp(bzp, n)
        return te.sum(av * bv, axis=[r])

    return te.compute(shape, body, name="matmul_integer")


@lowers("MatMulInteger")
def _matmul_integer(lw: Lowerer, node: Node) -> list[Any]:
    names, ins = lw.present_inputs(node, ("a", "b", "azp", "bzp"))

    def compute(*ts: Any) -> Any:
        t = dict(zip(names, ts))
        return _int_matmul(t["a"], t["b"], t.get("azp"), t.get("bzp"))

    return [lw.emit(compute, *ins, name="matmul_integer")]


@lowers("QLinearMatMul")
def _qlinear_matmul(lw: Lowerer, node: Node) -> list[Any]:
    """Quantized matmul: int32 accumulation, rescaled by a_scale*b_scale/y_scale, rounded half to even."""
    from tvm import te, tirx

    out_dt = node.outputs[0].dtype.numpy
    info = np.iinfo(out_dt)
    ins = [lw.get(node.input(i)) for i in range(8)]

    def compute(a: Any, a_s: Any, a_zp: Any, b: Any, b_s: Any, b_zp: Any, y_s: Any, y_zp: Any) -> Any:
        acc = _int_matmul(a, b, a_zp, b_zp)

        def first(t: Any) -> Any:
            return t[tuple(0 for _ in t.shape)]

        def body(*i: Any) -> Any:
            f = "float32"
            scale = tirx.Cast(f, first(a_s)) * tirx.Cast(f, first(b_s)) / tirx.Cast(f, first(y_s))
            v = tirx.nearbyint(tirx.Cast(f, acc[i]) * scale) + tirx.Cast(f, first(y_zp))
            v = tirx.max(tirx.min(v, tirx.const(float(info.max), f)), tirx.const(float(info.min), f))
            return tirx.Cast(out_dt.name, v)

        return te.compute(acc.shape, body, name="qlinear_matmul")

    return [lw.emit(compute, *ins, name="qlinear_matmul")]


@lowers("BF16Dense", domain="kiln")
def _bf16_dense(lw: Lowerer, node: Node) -> list[Any]:
    """The bf16 dense layer of :mod:`kiln.codegen.bf16` on rows, scheduled onto ``vdpbf16ps``."""
    from kiln.codegen.bf16 import dense_bf16

    n = node.attr("n", 0)
    act, params = node.attr("activation", "") or "", tuple(node.attr("activation_params", ()) or ())
    has_c = node.input(2) is not None
    args = [lw.get(node.input(i)) for i in range(3 if has_c else 2)]

    def compute(a: Any, w: Any, *c: Any) -> Any:
        def epilogue(acc: Any, i: Any, j: Any) -> Any:
            v = acc[i, j] + c[0][j] if c else acc[i, j]
            return activation_expr(v, act, params)

        return dense_bf16(a, w, epilogue, n)

    def product(rows: Any) -> Any:
        return lw.emit(compute, rows, *args[1:], name=f"bf16_dense_{act.lower() or 'linear'}",
                       attrs={"kiln.schedule": "dense_bf16"})

    if node.input(0).rank > 2:
        return [on_rows(lw, args[0], product)]
    return [product(args[0])]
