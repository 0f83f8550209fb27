"""Lowerings of Softmax, LogSoftmax and Hardmax (before opset 13, on the input flattened to 2-D),
and of the losses built on them: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import lowers
from kiln.codegen.lowering.te import exp_expr, get_topi, pad_last_axis, prod
from kiln.ir import DType, Node, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _softmax_fn(t: Any, axis: int) -> Any:
    return get_topi().nn.softmax(t, axis)


def softmax_last_axis(t: Any) -> Any:
    """float32 softmax over the last axis in stages that the ``softmax`` schedule runs a row at a
    time: ``row_max``, ``exp`` (kiln's vectorisable exp of ``x - max``), ``row_sum``, ``softmax``.
    topi's exp is one libm call per element: Whisper's 6x1500x1500 scores took 140 ms.

    NaN goes through as topi's does: a NaN, or a row of -inf (``-inf - -inf``), gives NaN.
    """
    from tvm import te, tirx

    *lead, n = t.shape
    rm = te.reduce_axis((0, n), "rm")
    row_max = te.compute(lead, lambda *i: te.max(t[(*i, rm)], axis=rm), name="row_max")

    # a static row the vectors do not divide (Whisper's 1500 keys) is copied to a row padded with
    # -inf (exp 0) first: a tail predicate, or a clamped read, in the vectorised exp scalarised it
    src = pad_last_axis(t, float("-inf"), "row_pad")
    e = te.compute(src.shape, lambda *i: exp_expr(src[i] - row_max[i[:-1]]), name="exp")
    rs = te.reduce_axis((0, src.shape[-1]), "rs")  # the padded row (pads add exp(-inf) = 0)

    def term(*i: Any) -> Any:
        # a NaN (or -inf - -inf) makes the row's sum NaN, so every output of the row is NaN; checked
        # here, in the serial sum, rather than in exp, where a Select on isnan does not vectorise
        x = src[i] - row_max[i[:-1]]
        return tirx.Select(tirx.isnan(x), x, e[i])

    row_sum = te.compute(lead, lambda *i: te.sum(term(*i, rs), axis=rs), name="row_sum")
    return te.compute(t.shape, lambda *i: e[i] / row_sum[i[:-1]], name="softmax")


def emit_softmax(lw: Lowerer, x: Any) -> Any:
    """The kernel of :func:`softmax_last_axis` on ``x``, with its ``softmax`` schedule."""
    return lw.emit(softmax_last_axis, x, name="softmax", attrs={"kiln.schedule": "softmax"})


def _log_softmax(t: Any, axis: int) -> Any:
    from tvm import topi

    m = topi.max(t, axis, keepdims=True)
    d = topi.subtract(t, m)
    return topi.subtract(d, topi.log(topi.sum(topi.exp(d), axis, keepdims=True)))


def _hardmax(t: Any, axis: int) -> Any:
    """1 at the first maximum along ``axis``, 0 elsewhere."""
    from tvm import te, tirx, topi

    m = topi.max(t, axis, keepdims=True)
    r = te.reduce_axis((0, t.shape[axis]), "r")

    def first(*i: Any) -> Any:
        src = (*i[:axis], r, *i[axis + 1:])
        return te.min(tirx.Select(t[src] == m[i], r.var.astype("int64"), tirx.const(1 << 62, "int64")), axis=[r])

    first_idx = te.compute(m.shape, first, name="first_max")
    return te.compute(t.shape, lambda *i: tirx.Select(
        i[axis].astype("int64") == first_idx[(*i[:axis], 0, *i[axis + 1:])], tirx.const(1, t.dtype),
        tirx.const(0, t.dtype)), name="hardmax")


#: op -> (its compute along an axis, the prim func's name when it works on the input flattened to 2-D)
_ALONG_AXIS = {"Softmax": (_softmax_fn, "softmax_2d"), "LogSoftmax": (_log_softmax, "logsoftmax"),
               "Hardmax": (_hardmax, "hardmax")}


def _coerced(fn: Any, t: Any, axis: int) -> Any:
    """Before opset 13, (Log)Softmax/Hardmax work on the input flattened to 2-D at ``axis``:
    ``[prod(dims[:axis]), prod(dims[axis:])]``, each row normalised, the shape restored."""
    topi = get_topi()
    return topi.reshape(fn(topi.reshape(t, (prod(t.shape[:axis]), prod(t.shape[axis:]))), 1), t.shape)


@lowers(*_ALONG_AXIS)
def _softmax(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    rank = x.rank or 0
    opset = lw.graph.model_opset.get("", 13)
    axis = normalize_axis(node.attr("axis", -1 if opset >= 13 else 1), rank)
    fn, flat_name = _ALONG_AXIS[node.op_type]
    if node.op_type == "Softmax" and axis == rank - 1 and rank >= 2 and x.dtype is DType.FLOAT32:
        return [emit_softmax(lw, lw.get(x))]
    if opset >= 13 or axis == rank - 1:
        return [lw.emit(lambda t: fn(t, axis), lw.get(x), name=node.op_type.lower())]
    return [lw.emit(lambda t: _coerced(fn, t, axis), lw.get(x), name=flat_name)]


# =========================================================================== losses


def _nll(logp: Any, target: Any, weight: Any | None, reduction: str, ignore: int | None) -> Any:
    """ONNX NegativeLogLikelihoodLoss on TE tensors: logp (N, C, d...), target (N, d...)."""
    from tvm import te, tirx

    dt = logp.dtype
    zero = tirx.const(0, dt)

    def pick(*i: Any) -> tuple[Any, Any]:
        t = target[i].astype("int64")
        valid = tirx.const(True) if ignore is None else (t != tirx.const(ignore, "int64"))
        safe = tirx.Select(valid, t, tirx.const(0, "int64"))
        w = weight[safe] if weight is not None else tirx.const(1, dt)
        w = tirx.Select(valid, w, zero)
        return -logp[(i[0], safe, *i[1:])] * w, w

    loss = te.compute(target.shape, lambda *i: pick(*i)[0], name="nll")
    if reduction == "none":
        return loss
    wts = te.compute(target.shape, lambda *i: pick(*i)[1], name="nll_weight")
    axes = [te.reduce_axis((0, d), f"r{k}") for k, d in enumerate(target.shape)]
    total = te.compute((), lambda: te.sum(loss[tuple(axes)], axis=axes), name="nll_sum")
    if reduction == "sum":
        return total
    axes2 = [te.reduce_axis((0, d), f"s{k}") for k, d in enumerate(target.shape)]
    wsum = te.compute((), lambda: te.sum(wts[tuple(axes2)], axis=axes2), name="nll_wsum")
    return te.compute((), lambda: total[()] / wsum[()], name="nll_mean")


@lowers("NegativeLogLikelihoodLoss")
def _nll_loss(lw: Lowerer, node: Node) -> list[Any]:
    reduction = node.attr("reduction", "mean")
    ignore = node.attr("ignore_index")
    has_w = node.input(2) is not None
    ins = [lw.get(node.input(i)) for i in range(3) if node.input(i) is not None]
    return [lw.emit(lambda p, t, *w: _nll(p, t, w[0] if has_w else None, reduction, ignore), *ins, name="nll_loss")]


@lowers("SoftmaxCrossEntropyLoss")
def _sce_loss(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    reduction = node.attr("reduction", "mean")
    ignore = node.attr("ignore_index")
    has_w = node.input(2) is not None
    n_out = len([o for o in node.outputs if o.name])
    ins = [lw.get(node.input(i)) for i in range(3) if node.input(i) is not None]

    def compute(s: Any, t: Any, *w: Any) -> Any:
        logp = _log_softmax(s, 1)
        loss = _nll(logp, t, w[0] if has_w else None, reduction, ignore)
        return [loss, logp] if n_out > 1 else loss

    out = lw.emit(compute, *ins, name="softmax_cross_entropy")
    if n_out == 1:
        return [out]
    return [lw.bb.emit(relax.TupleGetItem(out, i)) for i in range(2)]
