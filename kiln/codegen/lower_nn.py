"""Lowerings of ONNX's neural-network ops beyond conv/pool/matmul: LogSoftmax and Hardmax, the
losses (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss), the normalisations (Instance, Group,
LRN, MeanVariance, RMS, Lp), LpPool and Einsum.
"""

from __future__ import annotations

from typing import Any

from kiln.codegen.lower import CodegenError, Lowerer, lowers
from kiln.ir import Node


def _coerced(fn: Any, t: Any, axis: int) -> Any:
    """Before opset 13, (Log)Softmax/Hardmax work on the input flattened to 2-D at ``axis``."""
    from tvm import topi

    rows, cols = 1, 1
    for d in t.shape[:axis]:
        rows = rows * d
    for d in t.shape[axis:]:
        cols = cols * d
    return topi.reshape(fn(topi.reshape(t, (rows, cols)), 1), t.shape)


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


@lowers("LogSoftmax", "Hardmax")
def _softmax_like(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    rank = x.rank or 0
    opset = lw.graph.model_opset.get("", 13)
    axis = node.attr("axis", -1 if opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    fn = _log_softmax if node.op_type == "LogSoftmax" else _hardmax
    if opset >= 13 or axis == rank - 1:
        return [lw.emit(lambda t: fn(t, axis), lw.get(x), name=node.op_type.lower())]
    return [lw.emit(lambda t: _coerced(fn, t, axis), lw.get(x), name=node.op_type.lower())]


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


# =========================================================================== normalisations


def _mean_over(t: Any, axes: list[int]) -> Any:
    from tvm import topi

    n = 1
    for a in axes:
        n = n * t.shape[a]
    return topi.divide(topi.sum(t, axes, keepdims=True), topi.cast(n, t.dtype) if not isinstance(n, int) else float(n))


def _normalize(t: Any, axes: list[int], eps: float) -> Any:
    from tvm import topi

    mean = _mean_over(t, axes)
    d = topi.subtract(t, mean)
    var = _mean_over(topi.multiply(d, d), axes)
    return topi.divide(d, topi.sqrt(topi.add(var, eps)))


def _per_channel(v: Any, rank: int) -> Any:
    from tvm import topi

    return topi.reshape(v, (1, v.shape[0], *([1] * (rank - 2))))


@lowers("InstanceNormalization")
def _instance_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any, b: Any) -> Any:
        r = len(t.shape)
        y = _normalize(t, list(range(2, r)), eps)
        return topi.add(topi.multiply(y, _per_channel(s, r)), _per_channel(b, r))

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="instance_norm")]


@lowers("GroupNormalization")
def _group_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    eps = node.attr("epsilon", 1e-5)
    groups = node.attr("num_groups")
    opset = lw.graph.model_opset.get("", 21)

    def compute(t: Any, s: Any, b: Any) -> Any:
        r = len(t.shape)
        n, c = t.shape[0], t.shape[1]
        rest = 1
        for d in t.shape[1:]:
            rest = rest * d
        g = topi.reshape(t, (n, groups, rest // groups))
        y = topi.reshape(_normalize(g, [2], eps), t.shape)
        if opset < 21:  # scale and bias per group
            s = topi.repeat(s, c // groups, 0)
            b = topi.repeat(b, c // groups, 0)
        return topi.add(topi.multiply(y, _per_channel(s, r)), _per_channel(b, r))

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="group_norm")]


@lowers("LRN")
def _lrn(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    size, alpha = node.attr("size"), node.attr("alpha", 1e-4)
    beta, bias = node.attr("beta", 0.75), node.attr("bias", 1.0)
    return [lw.emit(lambda t: topi.nn.lrn(t, size, 1, alpha, beta, bias), lw.get(node.input(0)), name="lrn")]


@lowers("MeanVarianceNormalization")
def _mvn(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    axes = [a + (x.rank or 0) if a < 0 else a for a in (node.attr("axes") or [0, 2, 3])]
    return [lw.emit(lambda t: _normalize(t, axes, 1e-9), lw.get(x), name="mean_variance_norm")]


@lowers("RMSNormalization")
def _rms_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    rank = x.rank or 0
    axis = node.attr("axis", -1)
    axis = axis + rank if axis < 0 else axis
    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any) -> Any:
        ms = _mean_over(topi.multiply(t, t), list(range(axis, rank)))
        return topi.multiply(topi.divide(t, topi.sqrt(topi.add(ms, eps))), s)

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name="rms_norm")]


@lowers("LpNormalization")
def _lp_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    axis = node.attr("axis", -1)
    axis = axis + (x.rank or 0) if axis < 0 else axis
    p = node.attr("p", 2)

    def compute(t: Any) -> Any:
        if p == 1:
            norm = topi.sum(topi.abs(t), axis, keepdims=True)
        else:
            norm = topi.sqrt(topi.sum(topi.multiply(t, t), axis, keepdims=True))
        return topi.divide(t, topi.where(topi.equal(norm, 0.0), topi.full_like(norm, 1.0), norm))  # 0 stays 0

    return [lw.emit(compute, lw.get(x), name="lp_norm")]


@lowers("LpPool")
def _lp_pool(lw: Lowerer, node: Node) -> list[Any]:
    """(sum over the window of |x|^p)^(1/p), through an average pool that counts the padding."""
    from tvm import topi

    from kiln.codegen.lower import pool_geometry

    x = node.input(0)
    kernel, strides, dil, pads, ceil = pool_geometry(node)
    p = float(node.attr("p", 2))
    size = 1
    for k in kernel:
        size *= k
    n = len(kernel)
    pool = {1: topi.nn.pool1d, 2: topi.nn.pool2d, 3: topi.nn.pool3d}.get(n)
    if pool is None:
        raise CodegenError(f"node {node.label()}: {n}-D LpPool does not compile")
    layout = {1: "NCW", 2: "NCHW", 3: "NCDHW"}[n]

    def compute(t: Any) -> Any:
        powed = topi.power(topi.abs(t), p)
        s = topi.multiply(pool(powed, kernel, strides, dil, pads, "avg", ceil, layout, True), float(size))
        return topi.power(s, 1.0 / p)

    return [lw.emit(compute, lw.get(x), name="lp_pool")]


@lowers("Einsum")
def _einsum(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    eq = node.attr("equation").replace(" ", "")
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(lambda *ts: topi.einsum(eq, *ts), *ins, name="einsum")]


@lowers("Dropout", reads=(0,))
def _dropout(lw: Lowerer, node: Node) -> list[Any]:
    """Inference Dropout: the input, and an all-true mask when one is asked for."""
    from tvm import te, tirx

    from kiln.codegen.lower_shapes import const_ints

    training = node.input(2)
    if training is not None and const_ints(training) != [0]:
        raise CodegenError(f"node {node.label()}: training-mode Dropout draws random masks; it does not compile")
    x = lw.get(node.input(0))
    if len(node.outputs) < 2 or not node.outputs[1].name:
        return [x]
    mask = lw.emit(lambda t: te.compute(t.shape, lambda *i: tirx.const(True), name="mask"), x, name="dropout_mask")
    return [x, mask]
