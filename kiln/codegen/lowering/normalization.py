"""Lowerings of the normalisations: BatchNormalization (folded to a multiply-add when its statistics
are constants), LayerNormalization and ``kiln::LayerNorm``, Instance, Group, LRN,
MeanVariance, RMS and Lp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import get_topi, per_channel, prod
from kiln.ir import Node, Value, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _const_array(v: Value | None) -> np.ndarray | None:
    return None if v is None or not v.is_constant else v.numpy()


@lowers("BatchNormalization")
def _batchnorm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    stats = [_const_array(node.input(i)) for i in range(1, 5)]
    if node.attr("training_mode", 0):
        raise CodegenError(f"node {node.label()}: training-mode BatchNormalization does not compile")
    if any(s is None for s in stats):
        return _batch_norm_tensors(lw, node)  # statistics computed at run time
    scale, bias, mean, var = (s.astype(np.float64) for s in stats)  # type: ignore[union-attr]
    k = scale / np.sqrt(var + node.attr("epsilon", 1e-5))
    shift = bias - mean * k
    x = node.input(0)
    shape = (1, -1) + (1,) * ((x.rank or 2) - 2)
    dt = x.dtype.numpy
    kc = relax.const(k.reshape(shape).astype(dt))
    sc = relax.const(shift.reshape(shape).astype(dt))
    return [lw.emit(lambda t, a, b: get_topi().add(get_topi().multiply(t, a), b), lw.get(x), kc, sc, name="batchnorm")]


def _batch_norm_tensors(lw: Lowerer, node: Node) -> list[Any]:
    """Inference BatchNormalization with its scale, bias, mean and variance as tensors."""
    from tvm import topi

    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any, b: Any, mean: Any, var: Any) -> Any:
        r = len(t.shape)
        inv = topi.divide(per_channel(s, r), topi.sqrt(topi.add(per_channel(var, r), eps)))
        return topi.add(topi.multiply(topi.subtract(t, per_channel(mean, r)), inv), per_channel(b, r))

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(5)], name="batchnorm")]


@lowers("LayerNorm", domain="kiln")
@lowers("LayerNormalization")
def _layer_norm(lw: Lowerer, node: Node) -> list[Any]:
    x, scale, bias = node.input(0), node.input(1), node.input(2)
    n_out = len(node.outputs)  # Y, then the optional Mean and InvStdDev
    axis = normalize_axis(node.attr("axis", -1), x.rank)
    eps = node.attr("epsilon", 1e-5)
    has_bias = bias is not None

    def compute(t: Any, g: Any, *b: Any) -> Any:
        topi = get_topi()
        axes = list(range(axis, len(t.shape)))
        count = prod(t.shape[axis:])
        mean = topi.divide(topi.sum(t, axes, keepdims=True), topi.cast(count, t.dtype))
        d = topi.subtract(t, mean)
        var = topi.divide(topi.sum(topi.multiply(d, d), axes, keepdims=True), topi.cast(count, t.dtype))
        inv = topi.divide(1.0, topi.sqrt(topi.add(var, eps)))
        y = topi.multiply(topi.multiply(d, inv), g)
        y = topi.add(y, b[0]) if b else y
        return [y, mean, inv][:n_out] if n_out > 1 else y

    args = [lw.get(x), lw.get(scale)] + ([lw.get(bias)] if has_bias else [])
    out = lw.emit(compute, *args, name="layer_norm")
    if n_out == 1:
        return [out]
    return lw.unpack(out, node)


def _mean_over(t: Any, axes: list[int]) -> Any:
    from tvm import topi

    n = prod(t.shape[a] for a in axes)
    return topi.divide(topi.sum(t, axes, keepdims=True), topi.cast(n, t.dtype) if not isinstance(n, int) else float(n))


def _normalize(t: Any, axes: list[int], eps: float) -> Any:
    from tvm import topi

    mean = _mean_over(t, axes)
    d = topi.subtract(t, mean)
    var = _mean_over(topi.multiply(d, d), axes)
    return topi.divide(d, topi.sqrt(topi.add(var, eps)))


@lowers("InstanceNormalization")
def _instance_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any, b: Any) -> Any:
        r = len(t.shape)
        y = _normalize(t, list(range(2, r)), eps)
        return topi.add(topi.multiply(y, per_channel(s, r)), per_channel(b, r))

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
        rest = prod(t.shape[1:])
        g = topi.reshape(t, (n, groups, rest // groups))
        y = topi.reshape(_normalize(g, [2], eps), t.shape)
        if opset < 21:  # scale and bias per group
            s = topi.repeat(s, c // groups, 0)
            b = topi.repeat(b, c // groups, 0)
        return topi.add(topi.multiply(y, per_channel(s, r)), per_channel(b, r))

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
    axes = [normalize_axis(a, x.rank or 0) for a in (node.attr("axes") or [0, 2, 3])]
    return [lw.emit(lambda t: _normalize(t, axes, 1e-9), lw.get(x), name="mean_variance_norm")]


@lowers("RMSNormalization")
def _rms_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    rank = x.rank or 0
    axis = normalize_axis(node.attr("axis", -1), rank)
    eps = node.attr("epsilon", 1e-5)

    def compute(t: Any, s: Any) -> Any:
        ms = _mean_over(topi.multiply(t, t), list(range(axis, rank)))
        return topi.multiply(topi.divide(t, topi.sqrt(topi.add(ms, eps))), s)

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name="rms_norm")]


@lowers("LpNormalization")
def _lp_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import topi

    x = node.input(0)
    axis = normalize_axis(node.attr("axis", -1), x.rank or 0)
    p = node.attr("p", 2)

    def compute(t: Any) -> Any:
        if p == 1:
            norm = topi.sum(topi.abs(t), axis, keepdims=True)
        else:
            norm = topi.sqrt(topi.sum(topi.multiply(t, t), axis, keepdims=True))
        return topi.divide(t, topi.where(topi.equal(norm, 0.0), topi.full_like(norm, 1.0), norm))  # 0 stays 0

    return [lw.emit(compute, lw.get(x), name="lp_norm")]
