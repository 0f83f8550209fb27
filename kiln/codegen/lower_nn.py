"""Lowerings of ONNX's neural-network ops beyond conv/pool/matmul: LogSoftmax and Hardmax, the
losses (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss), the normalisations (Instance, Group,
LRN, MeanVariance, RMS, Lp), LpPool and Einsum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def conv_transpose(lw: Lowerer, node: Node) -> list[Any]:
    """N-d ConvTranspose with groups, dilations, output_padding, auto_pad and output_shape, as one
    reduction over input channels and kernel taps (the output shape is the declared one)."""
    from tvm import te, tirx

    from kiln.codegen.lower_shapes import static_shape

    x, w, b = node.input(0), node.input(1), node.input(2)
    si, sw, so = static_shape(x), static_shape(w), static_shape(node.outputs[0])
    if si is None or sw is None or so is None:
        raise CodegenError(f"node {node.label()}: ConvTranspose needs static shapes to compile")
    n = len(si) - 2
    kernel = sw[2:]
    strides = list(node.attr("strides", ()) or [1] * n)
    dil = list(node.attr("dilations", ()) or [1] * n)
    out_pad = list(node.attr("output_padding", ()) or [0] * n)
    group = node.attr("group", 1)
    auto = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if node.attr("output_shape") is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        begins = []
        for k in range(n):
            total = strides[k] * (si[2 + k] - 1) + out_pad[k] + (kernel[k] - 1) * dil[k] + 1 - so[2 + k]
            begins.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    elif auto == "VALID":
        begins = [0] * n
    else:
        begins = list(node.attr("pads", ()) or [0] * (2 * n))[:n]
    cg, mg = si[1] // group, sw[1]
    has_b = b is not None

    def compute(t: Any, k: Any, *bias: Any) -> Any:
        rc = te.reduce_axis((0, cg), "rc")
        rk = [te.reduce_axis((0, kernel[j]), f"rk{j}") for j in range(n)]

        def body(nb: Any, m: Any, *y: Any) -> Any:
            g = m // mg
            c = g * cg + rc
            ok: list[Any] = []
            src = []
            for j in range(n):
                num = y[j] + begins[j] - rk[j] * dil[j]
                q = tirx.floordiv(num, strides[j])
                ok += [tirx.floormod(num, strides[j]) == 0, q >= 0, q < si[2 + j]]
                src.append(tirx.max(tirx.min(q, si[2 + j] - 1), 0))
            val = t[(nb, c, *src)] * k[(c, m % mg, *rk)]
            return te.sum(tirx.Select(tirx.all(*ok), val, tirx.const(0, t.dtype)), axis=[rc, *rk])

        y = te.compute(so, body, name="conv_transpose")
        if bias:
            return te.compute(so, lambda nb, m, *r: y[(nb, m, *r)] + bias[0][m], name="conv_transpose_bias")
        return y

    args = [lw.get(x), lw.get(w)] + ([lw.get(b)] if has_b else [])
    return [lw.emit(compute, *args, name="conv_transpose")]


def batch_norm(lw: Lowerer, node: Node) -> list[Any]:
    """Inference BatchNormalization with its scale, bias, mean and variance as tensors."""
    from tvm import topi

    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any, b: Any, mean: Any, var: Any) -> Any:
        r = len(t.shape)
        inv = topi.divide(_per_channel(s, r), topi.sqrt(topi.add(_per_channel(var, r), eps)))
        return topi.add(topi.multiply(topi.subtract(t, _per_channel(mean, r)), inv), _per_channel(b, r))

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(5)], name="batchnorm")]


@lowers("HannWindow", "HammingWindow", "BlackmanWindow", reads=())
def _window(lw: Lowerer, node: Node) -> list[Any]:
    """The signal windows, periodic or symmetric, of the declared length."""
    import math

    from tvm import te, tirx

    from kiln.codegen.lower_shapes import static_shape

    so = static_shape(node.outputs[0])
    if so is None:
        raise CodegenError(f"node {node.label()}: the window length must be known to compile")
    length = so[0]
    n = length if node.attr("periodic", 1) else length - 1
    dt = node.outputs[0].dtype.numpy.name
    op = node.op_type

    def body(i: Any) -> Any:
        x = tirx.Cast("float64", i) * tirx.const(2 * math.pi / max(n, 1), "float64")
        if op == "HannWindow":
            v = tirx.const(0.5, "float64") - tirx.const(0.5, "float64") * tirx.cos(x)
        elif op == "HammingWindow":
            a = 25.0 / 46.0
            v = tirx.const(a, "float64") - tirx.const(1 - a, "float64") * tirx.cos(x)
        else:
            v = tirx.const(0.42, "float64") - tirx.const(0.5, "float64") * tirx.cos(x) + \
                tirx.const(0.08, "float64") * tirx.cos(x * tirx.const(2.0, "float64"))
        return tirx.Cast(dt, v)

    return [lw.emit(lambda: te.compute((length,), body, name="window"), name=op.lower())]


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


@lowers("DynamicQuantizeLinear")
def _dynamic_quantize(lw: Lowerer, node: Node) -> list[Any]:
    """uint8 quantization with the scale and zero point computed from the data's range (incl. 0)."""
    from tvm import relax, te, tirx

    def compute(t: Any) -> Any:
        f = "float32"
        axes = [te.reduce_axis((0, d), f"r{k}") for k, d in enumerate(t.shape)]
        axes2 = [te.reduce_axis((0, d), f"s{k}") for k, d in enumerate(t.shape)]
        mx = te.compute((), lambda: te.max(t[tuple(axes)], axis=axes), name="max")
        mn = te.compute((), lambda: te.min(t[tuple(axes2)], axis=axes2), name="min")
        zero = tirx.const(0, f)

        def scale_fn() -> Any:
            return (tirx.max(mx[()], zero) - tirx.min(mn[()], zero)) / tirx.const(255, f)

        scale = te.compute((), scale_fn, name="scale")

        def zp_fn() -> Any:
            z = tirx.nearbyint((zero - tirx.min(mn[()], zero)) / scale[()])
            return tirx.Cast("uint8", tirx.max(tirx.min(z, tirx.const(255, f)), zero))

        zp = te.compute((), zp_fn, name="zero_point")

        def q(*i: Any) -> Any:
            v = tirx.nearbyint(t[i] / scale[()]) + tirx.Cast(f, zp[()])
            return tirx.Cast("uint8", tirx.max(tirx.min(v, tirx.const(255, f)), zero))

        return [te.compute(t.shape, q, name="quantized"), scale, zp]

    out = lw.emit(compute, lw.get(node.input(0)), name="dynamic_quantize_linear")
    return [lw.bb.emit(relax.TupleGetItem(out, i)) for i, o in enumerate(node.outputs) if o.name]


@lowers("CausalConvWithState")
def _causal_conv(lw: Lowerer, node: Node) -> list[Any]:
    """Depthwise causal 1-D conv over [past_state | input] (zeros without a state), optional SiLU;
    the second output is the last k-1 steps as the next state."""
    from tvm import relax, te, tirx

    act = node.attr("activation", "none") or "none"
    names, ins = lw.present_inputs(node, ("x", "w", "b", "state"))
    n_out = len(node.outputs)

    def compute(*ts: Any) -> Any:
        t = dict(zip(names, ts))
        x, w = t["x"], t["w"]
        bsz, ch, length = x.shape
        k = int(w.shape[2])
        dt = x.dtype

        def padded_at(b: Any, c: Any, i: Any) -> Any:
            before = t["state"][b, c, tirx.min(i, max(k - 2, 0))] if "state" in t else tirx.const(0, dt)
            return tirx.Select(i < k - 1, before, x[b, c, tirx.max(i - (k - 1), 0)]) if k > 1 else x[b, c, i]

        r = te.reduce_axis((0, k), "r")
        conv = te.compute((bsz, ch, length), lambda b, c, i: te.sum(padded_at(b, c, i + r) * w[c, 0, r], axis=[r]),
                          name="causal_conv")

        def epilogue(b: Any, c: Any, i: Any) -> Any:
            v = conv[b, c, i] + (t["b"][c] if "b" in t else tirx.const(0, dt))
            return v * tirx.sigmoid(v) if act in ("silu", "swish") else v

        y = te.compute((bsz, ch, length), epilogue, name="causal_conv_out")
        state = te.compute((bsz, ch, k - 1), lambda b, c, i: padded_at(b, c, i + length), name="present_state")
        return [y, state] if n_out > 1 else y

    out = lw.emit(compute, *ins, name="causal_conv_with_state")
    if n_out == 1:
        return [out]
    return [lw.bb.emit(relax.TupleGetItem(out, i)) for i, o in enumerate(node.outputs) if o.name]


def max_pool_with_indices(lw: Lowerer, node: Node) -> list[Any]:
    """MaxPool's values and flat NC... indices (row-major, or column-major with storage_order=1)."""
    from tvm import relax, te, tirx

    from kiln.codegen.lower import pool_geometry
    from kiln.codegen.lower_shapes import static_shape

    kernel, strides, dil, pads, _ = pool_geometry(node)
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
    return [lw.bb.emit(relax.TupleGetItem(out, i)) for i, o in enumerate(node.outputs) if o.name]


def _integer_conv(x: Any, w: Any, xzp: Any | None, wzp: Any | None, node: Node) -> Any:
    """conv(x - x_zero_point, w - w_zero_point) accumulated in int32 (zero points per tensor or per channel)."""
    from tvm import topi

    from kiln.codegen.lower import _conv2d

    def shifted(v: Any, zp: Any | None) -> Any:
        v = topi.cast(v, "int32")
        if zp is None:
            return v
        z = topi.cast(zp, "int32")
        if len(zp.shape) == 1 and int(zp.shape[0]) > 1:  # per output channel (weights)
            z = topi.reshape(z, (int(zp.shape[0]), *([1] * (len(v.shape) - 1))))
        return topi.subtract(v, z)

    return _conv2d(shifted(x, xzp), shifted(w, wzp), node)


@lowers("ConvInteger")
def _conv_integer(lw: Lowerer, node: Node) -> list[Any]:
    """conv(x - x_zero_point, w - w_zero_point) accumulated in int32."""
    names, ins = lw.present_inputs(node, ("x", "w", "xzp", "wzp"))

    def compute(*ts: Any) -> Any:
        t = dict(zip(names, ts))
        return _integer_conv(t["x"], t["w"], t.get("xzp"), t.get("wzp"), node)

    return [lw.emit(compute, *ins, name="conv_integer")]


@lowers("QLinearConv")
def _qlinear_conv(lw: Lowerer, node: Node) -> list[Any]:
    """The int32 conv plus bias, requantized: ``round_half_even(acc * x_scale * w_scale / y_scale) + y_zp``.

    The generic form, for any target; on AVX-512 the layout pass turns uint8 x int8 convs
    into ``kiln::QBlockedConv`` (the VNNI kernel) first.
    """
    from tvm import te, tirx

    names, ins = lw.present_inputs(node, ("x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"))
    out_dtype = node.outputs[0].dtype.numpy.name
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)

    def compute(*ts: Any) -> Any:
        t = dict(zip(names, ts))
        acc = _integer_conv(t["x"], t["w"], t["xzp"], t["wzp"], node)
        per_channel = len(t["ws"].shape) == 1 and int(t["ws"].shape[0]) > 1

        def body(n: Any, k: Any, *rest: Any) -> Any:
            a = acc[(n, k, *rest)]
            if "b" in t:
                a = a + t["b"][k]
            ws = t["ws"][k] if per_channel else t["ws"][()] if not t["ws"].shape else t["ws"][0]
            xs = t["xs"][()] if not t["xs"].shape else t["xs"][0]
            ys = t["ys"][()] if not t["ys"].shape else t["ys"][0]
            yzp = t["yzp"][()] if not t["yzp"].shape else t["yzp"][0]
            scale = xs * ws / ys
            q = tirx.nearbyint(a.astype("float32") * scale).astype("int32") + yzp.astype("int32")
            return tirx.max(tirx.min(q, hi), lo).astype(out_dtype)

        return te.compute(acc.shape, body, name="qlinear_conv")

    return [lw.emit(compute, *ins, name="qlinear_conv")]


@lowers("MaxUnpool", reads=(0, 1))
def _max_unpool(lw: Lowerer, node: Node) -> list[Any]:
    """Scatter each pooled value to its flat index in a zero tensor of the declared output shape."""
    from tvm import te, tirx

    from kiln.codegen.lower_shapes import static_shape

    so = static_shape(node.outputs[0])
    if so is None:
        raise CodegenError(f"node {node.label()}: MaxUnpool needs a static output shape to compile")

    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = list(node.attr("strides", ()) or [1] * n)
    pads = list(node.attr("pads", ()) or [0] * (2 * n))

    def compute(x: Any, idx: Any) -> Any:
        spatial = [te.reduce_axis((0, d), f"r{k}") for k, d in enumerate(x.shape[2:])]
        # the indices count in the default unpooled shape, even when output_shape is larger
        default = [(int(d) - 1) * st + k - pads[j] - pads[n + j]
                   for j, (d, st, k) in enumerate(zip(x.shape[2:], strides, kernel))]

        def body(b: Any, c: Any, *o: Any) -> Any:
            flat: Any = b.astype("int64") * so[1] + c
            for k, j in enumerate(o):
                flat = flat * default[k] + j
            inside = tirx.all(*[j < d for j, d in zip(o, default)])
            src = (b, c, *spatial)
            hit = tirx.all(inside, idx[src] == flat)
            return te.sum(tirx.Select(hit, x[src], tirx.const(0, x.dtype)), axis=spatial)

        return te.compute(so, body, name="max_unpool")

    return [lw.emit(compute, lw.get(node.input(0)), lw.get(node.input(1)), name="max_unpool")]
