"""Conv and Gemm fusions: fold BatchNormalization, bias, scale and padding into the
producing op, and fuse residual adds and activations into one ``kiln::FusedConv`` /
``kiln::FusedGemm`` epilogue.

Rules (priority in brackets where rules overlap at the same root):

- ``conv-bn``, ``convtranspose-bn``, ``gemm-bn``: BatchNormalization with constant
  statistics folds into the weights and bias of the op before it;
- ``bn-affine``: any other inference BatchNormalization becomes ``x * k + b``;
- ``conv-add-bias`` [10], ``conv-mul-scale``: a per-channel constant added to, or
  multiplying, a Conv's output folds into its bias (and weights);
- ``pad-conv``: a zero ``Pad`` of the spatial dims folds into the Conv's pads;
- ``pad-averagepool``, ``pad-maxpool``: a zero (counted) or -inf ``Pad`` folds into the pooling;
- ``matmul-add-gemm``: a 2-D MatMul by a constant matrix plus a bias becomes Gemm;
- ``matmul-rows-gemm``, ``matmul-rows`` (pass ``fuse-gemm``): a MatMul of ``[..., K]`` rows by a constant
  ``[K, N]``, plus a bias or with none after it, becomes ``kiln::FusedGemm`` over the rows;
- ``hardswish-clip``: Paddle's hard-swish ``x·clip(x+3, 0, 6)·c`` (c = 1/6, or a learnt scale folded
  in) becomes ``HardSwish(x)·6c`` (before opset 14, ``x·HardSigmoid(x)``, which the epilogue rules
  also recognise);
- ``conv-residual``, ``conv-residual-sum``: ``Conv(...) + z`` (an Add, or a two-input Sum) of
  the same shape becomes ``FusedConv(..., Z=z)``;
- ``conv-<act>``, ``fused-conv-<act>``, ``gemm-<act>``, ``fused-gemm-<act>``: an activation after a Conv,
  a FusedConv without one, a Gemm, or a FusedGemm without one becomes the op's epilogue (the Gemm
  ones again in ``fuse-gemm``, after the transformer fusion has made its GELUs);
- ``convtranspose-depthtospace`` [-5]: a ConvTranspose whose stride equals its kernel is a 1x1
  Conv and a DepthToSpace; ``depthtospace-add``/``-mul`` and ``depthtospace-<act>`` move
  per-channel affines and activations before the DepthToSpace, into the conv's epilogue.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kiln.ir import DType, Node, Value
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional, copy_attrs
from kiln.passes.rules import RewriteRule, example_graph, register_rule_set

RNG_SEED = 0


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _check_constant(**values: Value | None) -> None:
    for label, v in values.items():
        if v is not None and not v.is_constant:
            raise MatchFailure(f"the {label.replace('_', ' ')} %{v.name} is not a constant")


def _bn_factors(bn: Node, scale: Value, bias: Value, mean: Value, var: Value) -> tuple[np.ndarray, np.ndarray]:
    """BN as ``y = x * k + shift``, in float64."""
    eps = bn.attr("epsilon", 1e-5)
    k = scale.numpy().astype(np.float64) / np.sqrt(var.numpy().astype(np.float64) + eps)
    shift = bias.numpy().astype(np.float64) - mean.numpy().astype(np.float64) * k
    return k, shift


def _check_bn_inference(bn: Node) -> None:
    if bn.attr("training_mode", 0) or len([o for o in bn.outputs if o.name]) > 1:
        raise MatchFailure("BatchNormalization runs in training mode")


def _bn_stats_example(c: int) -> list[np.ndarray]:
    rng = _rng()
    return [_f32(rng.uniform(0.5, 1.5, c)), _f32(rng.uniform(-0.2, 0.2, c)), _f32(rng.uniform(-0.2, 0.2, c)),
            _f32(rng.uniform(0.5, 1.5, c))]


# --------------------------------------------------------------------------- BatchNormalization folds


def _conv_bn_pattern(op, x, scale, bias, mean, var, w=Const(), b=Const()):
    return op.BatchNormalization(op.Conv(x, w, Optional(b), _name="conv"), scale, bias, mean, var, _name="bn")


def _bn_check(ctx: MatchContext, scale: Value, bias: Value, mean: Value, var: Value, bn: Node) -> None:
    _check_constant(BN_scale=scale, BN_bias=bias, BN_mean=mean, BN_variance=var)
    _check_bn_inference(bn)


def _conv_bn_rewrite(op, x, w, b, scale, bias, mean, var, conv, bn):
    k, shift = _bn_factors(bn, scale, bias, mean, var)
    weight = w.numpy().astype(np.float64)
    new_w = weight * k.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_b = (b.numpy().astype(np.float64) * k if b is not None else 0.0) + shift
    dt = w.dtype.numpy
    return op.Conv(x, op.constant(new_w.astype(dt), f"{w.name}_bn"), op.constant(new_b.astype(dt), f"{w.name}_bn_b"),
                   **copy_attrs(conv))


def _conv_bn_example():
    rng = _rng()

    def build(op, x):
        y = op.Conv(x, op.constant(_f32(rng.standard_normal((8, 3, 3, 3)) * 0.3)), pads=[1, 1, 1, 1], strides=[2, 2])
        return op.BatchNormalization(y, *[op.constant(s) for s in _bn_stats_example(8)], epsilon=1e-3)

    return example_graph("conv_bn", {"x": (DType.FLOAT32, (1, 3, 9, 9))}, build)


CONV_BN = RewriteRule(
    "conv-bn", _conv_bn_pattern, _conv_bn_rewrite, check=_bn_check, example=_conv_bn_example,
    description="Conv followed by inference BatchNormalization becomes one Conv with scaled weights and a bias.",
)


def _convt_bn_pattern(op, x, scale, bias, mean, var, w=Const(), b=Const()):
    core = op.ConvTranspose(x, w, Optional(b), _name="convt")
    return op.BatchNormalization(core, scale, bias, mean, var, _name="bn")


def _convt_bn_rewrite(op, x, w, b, scale, bias, mean, var, convt, bn):
    k, shift = _bn_factors(bn, scale, bias, mean, var)
    weight = w.numpy().astype(np.float64)  # [C_in, C_out / group, k...]
    group = convt.attr("group", 1)
    c_in, c_out_g = weight.shape[:2]
    per_group = weight.reshape(group, c_in // group, c_out_g, *weight.shape[2:])
    per_group = per_group * k.reshape(group, 1, c_out_g, *([1] * (weight.ndim - 2)))
    new_b = (b.numpy().astype(np.float64) * k if b is not None else 0.0) + shift
    dt = w.dtype.numpy
    return op.ConvTranspose(x, op.constant(per_group.reshape(weight.shape).astype(dt), f"{w.name}_bn"),
                            op.constant(new_b.astype(dt), f"{w.name}_bn_b"), **copy_attrs(convt))


def _convt_bn_example():
    rng = _rng()

    def build(op, x):
        y = op.ConvTranspose(x, op.constant(_f32(rng.standard_normal((4, 3, 2, 2)))), strides=[2, 2], group=1)
        return op.BatchNormalization(y, *[op.constant(s) for s in _bn_stats_example(3)])

    return example_graph("convt_bn", {"x": (DType.FLOAT32, (1, 4, 5, 5))}, build)


CONVT_BN = RewriteRule(
    "convtranspose-bn", _convt_bn_pattern, _convt_bn_rewrite, check=_bn_check, example=_convt_bn_example,
    description="ConvTranspose followed by inference BatchNormalization folds into its weights and bias.",
)


def _gemm_bn_pattern(op, a, scale, bias, mean, var, b=Const(), c=Const()):
    return op.BatchNormalization(op.Gemm(a, b, Optional(c), _name="gemm"), scale, bias, mean, var, _name="bn")


def _gemm_bn_check(ctx, c, gemm, scale, bias, mean, var, bn) -> None:
    _bn_check(ctx, scale, bias, mean, var, bn)
    if c is not None and c.rank not in (0, 1):
        raise MatchFailure("the Gemm bias is not a scalar or a row vector")


def _gemm_bn_rewrite(op, a, b, c, scale, bias, mean, var, gemm, bn):
    k, shift = _bn_factors(bn, scale, bias, mean, var)
    alpha, beta = gemm.attr("alpha", 1.0), gemm.attr("beta", 1.0)
    w = b.numpy().astype(np.float64)
    w = w * k.reshape(-1, 1) if gemm.attr("transB", 0) else w * k.reshape(1, -1)
    new_c = (beta * np.broadcast_to(c.numpy().astype(np.float64), k.shape) * k if c is not None else 0.0) + shift
    dt = b.dtype.numpy
    return op.Gemm(a, op.constant((w * alpha).astype(dt), f"{b.name}_bn"), op.constant(new_c.astype(dt), f"{b.name}_bn_c"),
                   **copy_attrs(gemm, "alpha", "beta"))


def _gemm_bn_example():
    rng = _rng()

    def build(op, a):
        y = op.Gemm(a, op.constant(_f32(rng.standard_normal((6, 5)))), op.constant(_f32(rng.standard_normal(6))),
                    transB=1, alpha=0.5, beta=2.0)
        return op.BatchNormalization(y, *[op.constant(s) for s in _bn_stats_example(6)])

    return example_graph("gemm_bn", {"a": (DType.FLOAT32, (3, 5))}, build)


GEMM_BN = RewriteRule(
    "gemm-bn", _gemm_bn_pattern, _gemm_bn_rewrite, check=_gemm_bn_check, example=_gemm_bn_example,
    description="Gemm followed by inference BatchNormalization folds into B and C.",
)


def _bn_affine_pattern(op, x, scale, bias, mean, var):
    return op.BatchNormalization(x, scale, bias, mean, var, _name="bn")


def _bn_affine_check(ctx, x, scale, bias, mean, var, bn) -> None:
    _bn_check(ctx, scale, bias, mean, var, bn)
    if x.rank is None or x.rank < 2:
        raise MatchFailure("the input's rank is unknown or below 2")


def _bn_affine_rewrite(op, x, scale, bias, mean, var, bn):
    k, shift = _bn_factors(bn, scale, bias, mean, var)
    shape = (-1,) + (1,) * (x.rank - 2)
    dt = x.dtype.numpy
    return op.Add(op.Mul(x, op.constant(k.reshape(shape).astype(dt), "bn_scale")),
                  op.constant(shift.reshape(shape).astype(dt), "bn_shift"))


def _bn_affine_example():
    def build(op, x):
        return op.BatchNormalization(op.Relu(x), *[op.constant(s) for s in _bn_stats_example(4)])

    return example_graph("bn_affine", {"x": (DType.FLOAT32, (2, 4, 3, 3))}, build)


BN_AFFINE = RewriteRule(
    "bn-affine", _bn_affine_pattern, _bn_affine_rewrite, check=_bn_affine_check, example=_bn_affine_example,
    priority=-10,
    description="A BatchNormalization that follows no foldable op becomes a per-channel multiply and add.",
)


# --------------------------------------------------------------------------- bias, scale and pad folds


def per_channel(c: np.ndarray, channels: int, out_rank: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector if, broadcast against [N, C, ...], it varies only along C."""
    if c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1) if c.size else c, (channels,)).astype(np.float64)


def _check_per_channel(c: Value, channels: int, y: Value) -> np.ndarray:
    """``c`` as a per-channel vector for ``y`` (NCHW, ``channels`` channels); raises MatchFailure if it is not one."""
    per = per_channel(c.numpy(), channels, y.rank) if y.rank is not None else None
    if per is None:
        raise MatchFailure(f"the constant's shape {list(c.shape or ())} is not per-channel for {y.type_str()}")
    return per


def _conv_add_pattern(op, x, w=Const(), b=Const(), c=Const()):
    return op.Add(op.Conv(x, w, Optional(b), _name="conv"), c, _name="add")


def _conv_add_check(ctx, w, c, conv) -> None:
    y = conv.outputs[0]
    if w.shape is None or y.rank is None:
        raise MatchFailure("the conv's output rank is unknown")
    if c.dtype is not w.dtype:
        raise MatchFailure(f"the constant is {c.dtype}, the weight {w.dtype}")
    _check_per_channel(c, int(w.shape[0]), y)


def _conv_add_rewrite(op, x, w, b, c, conv):
    extra = per_channel(c.numpy(), int(w.shape[0]), conv.outputs[0].rank)
    new_b = (b.numpy().astype(np.float64) if b is not None else 0.0) + extra
    return op.Conv(x, w, op.constant(new_b.astype(w.dtype.numpy), f"{w.name}_bias"), **copy_attrs(conv))


def _conv_add_example():
    rng = _rng()

    def build(op, x):
        y = op.Conv(x, op.constant(_f32(rng.standard_normal((4, 3, 1, 1)))), op.constant(_f32(rng.standard_normal(4))))
        return op.Add(op.constant(_f32(rng.standard_normal((4, 1, 1)))), y)

    return example_graph("conv_add", {"x": (DType.FLOAT32, (1, 3, 4, 4))}, build)


CONV_ADD_BIAS = RewriteRule(
    "conv-add-bias", _conv_add_pattern, _conv_add_rewrite, check=_conv_add_check, example=_conv_add_example,
    priority=10, description="A per-channel constant added to a Conv's output joins its bias.",
)


def _conv_mul_pattern(op, x, w=Const(), b=Const(), c=Const()):
    return op.Mul(op.Conv(x, w, Optional(b), _name="conv"), c)


def _conv_mul_rewrite(op, x, w, b, c, conv):
    k = per_channel(c.numpy(), int(w.shape[0]), conv.outputs[0].rank)
    weight = w.numpy().astype(np.float64)
    dt = w.dtype.numpy
    new_w = op.constant((weight * k.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(dt), f"{w.name}_scaled")
    new_b = op.constant((b.numpy().astype(np.float64) * k).astype(dt), f"{w.name}_scaled_b") if b is not None else None
    return op.Conv(x, new_w, new_b, **copy_attrs(conv)) if new_b is not None else op.Conv(x, new_w, **copy_attrs(conv))


def _conv_mul_example():
    rng = _rng()

    def build(op, x):
        y = op.Conv(x, op.constant(_f32(rng.standard_normal((4, 3, 3, 3)))), op.constant(_f32(rng.standard_normal(4))))
        return op.Mul(y, op.constant(_f32(rng.uniform(0.5, 2, (1, 4, 1, 1)))))

    return example_graph("conv_mul", {"x": (DType.FLOAT32, (1, 3, 6, 6))}, build)


CONV_MUL_SCALE = RewriteRule(
    "conv-mul-scale", _conv_mul_pattern, _conv_mul_rewrite, check=_conv_add_check, example=_conv_mul_example,
    description="A per-channel constant multiplying a Conv's output scales its weights and bias.",
)


def _padded(op, x, pads, value):
    """``Pad(x, pads, value?)``, the node that folds into the op reading it."""
    return op.Pad(x, pads, Optional(value), _name="pad", _allow_extra_inputs=True)


def _pad_conv_pattern(op, x, w, value, b, pads=Const()):
    return op.Conv(_padded(op, x, pads, value), w, Optional(b), _name="conv")


def _check_pad_folds(pads: Value, pad: Node, consumer: Node) -> None:
    """A Pad folds into ``consumer``'s own pads, its fill value aside; else MatchFailure."""
    if pad.attr("mode", "constant") != "constant":
        raise MatchFailure(f"Pad mode is {pad.attr('mode')!r}, not constant")
    if len(pad.inputs) > 3 and pad.input(3) is not None:
        raise MatchFailure("Pad has an axes input")
    if consumer.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise MatchFailure(f"the {consumer.op_type} uses auto_pad")
    p = pads.numpy()
    rank = p.size // 2
    if np.any(p < 0) or np.any(p[:2] != 0) or np.any(p[rank:rank + 2] != 0):
        raise MatchFailure(f"Pad pads the batch or channel dims, or crops: {p.tolist()}")


def _merged_pads(pads: Value, consumer: Node) -> list[int]:
    """``consumer``'s pads plus the spatial pads of the Pad before it."""
    p = pads.numpy().astype(np.int64)
    rank = p.size // 2
    n = rank - 2
    old = list(consumer.attr("pads", ()) or [0] * (2 * n))
    return [int(old[i] + p[2 + i]) for i in range(n)] + [int(old[n + i] + p[rank + 2 + i]) for i in range(n)]


def _pad_conv_check(ctx, pads, value, pad, conv) -> None:
    if value is not None and (not value.is_constant or np.any(value.numpy() != 0)):
        raise MatchFailure("Pad fills with a value other than zero")
    _check_pad_folds(pads, pad, conv)


def _pad_conv_rewrite(op, x, pads, w, b, conv):
    attrs = copy_attrs(conv, pads=_merged_pads(pads, conv))
    return op.Conv(x, w, b, **attrs) if b is not None else op.Conv(x, w, **attrs)


def _pad_conv_example():
    rng = _rng()

    def build(op, x):
        padded = op.Pad(x, op.constant(np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)))
        return op.Conv(padded, op.constant(_f32(rng.standard_normal((4, 3, 3, 3)))), pads=[0, 1, 0, 1])

    return example_graph("pad_conv", {"x": (DType.FLOAT32, (1, 3, 6, 6))}, build)


PAD_CONV = RewriteRule(
    "pad-conv", _pad_conv_pattern, _pad_conv_rewrite, check=_pad_conv_check, example=_pad_conv_example,
    description="A zero Pad of the spatial dims folds into the Conv's pads.",
)


def _pad_pool_rule(pool: str) -> RewriteRule:
    """Pad folded into AveragePool (zero padding, counted) or MaxPool (padding with -inf)."""

    def pattern(op, x, value, pads=Const()):
        return getattr(op, pool)(_padded(op, x, pads, value), _name="pool")

    def check(ctx, pads, value, pad, pool) -> None:
        fill = 0.0 if value is None else _scalar_or_none(value)
        if fill is None:
            raise MatchFailure("the Pad value is not a scalar constant")
        if pool.op_type == "MaxPool":
            if fill != -np.inf:
                raise MatchFailure(f"MaxPool pads with -inf; this Pad fills {fill}")
            if len([o for o in pool.outputs if o.name]) > 1:
                raise MatchFailure("MaxPool also returns indices")
        else:
            if fill != 0:
                raise MatchFailure(f"the Pad fills {fill}, not 0")
            if any(pool.attr("pads", ()) or ()) and not pool.attr("count_include_pad", 0):
                raise MatchFailure("AveragePool has pads of its own that it does not count")
        _check_pad_folds(pads, pad, pool)

    def rewrite(op, x, pads, pool):
        extra = {"count_include_pad": 1} if pool.op_type == "AveragePool" else {}
        return getattr(op, pool.op_type)(x, **copy_attrs(pool, pads=_merged_pads(pads, pool), **extra))

    def example():
        fill = -np.inf if pool == "MaxPool" else 0.0

        def build(op, x):
            pads = op.constant(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64))
            padded = op.Pad(x, pads, op.constant(np.float32(fill)))
            return getattr(op, pool)(padded, kernel_shape=[3, 3], strides=[2, 2])

        return example_graph(f"pad_{pool.lower()}", {"x": (DType.FLOAT32, (1, 2, 7, 7))}, build)

    return RewriteRule(f"pad-{pool.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"A Pad before {pool} folds into its pads.")


def _scalar_or_none(v: Value) -> float | None:
    if not v.is_constant or v.numpy().size != 1:
        return None
    return float(v.numpy().reshape(()))


PAD_AVGPOOL = _pad_pool_rule("AveragePool")
PAD_MAXPOOL = _pad_pool_rule("MaxPool")


def _matmul_add_pattern(op, a, b=Const(), c=Const()):
    return op.Add(op.MatMul(a, b, _name="mm"), c)


def _matmul_add_check(ctx, a, b, c) -> None:
    if a.rank != 2 or b.rank != 2:
        raise MatchFailure(f"Gemm needs 2-D operands; A is {a.type_str()}, B is {b.type_str()}")
    if c.rank is None or c.rank > 2:
        raise MatchFailure(f"the bias {c.type_str()} does not broadcast to a 2-D Gemm output")
    if c.rank == 2 and c.shape[0] != 1 and c.shape[0] != a.shape[0]:
        raise MatchFailure(f"the bias {c.type_str()} does not broadcast to the output rows")
    n = b.shape[1]
    if c.rank >= 1 and c.shape[-1] not in (1, n):
        raise MatchFailure(f"the bias {c.type_str()} does not broadcast to {n} columns")


def _matmul_add_rewrite(op, a, b, c):
    return op.Gemm(a, b, c)


def _matmul_add_example():
    rng = _rng()

    def build(op, a):
        return op.Add(op.MatMul(a, op.constant(_f32(rng.standard_normal((5, 3))))), op.constant(_f32(rng.standard_normal(3))))

    return example_graph("matmul_add", {"a": (DType.FLOAT32, (4, 5))}, build)


def _matmul_rows_check(ctx, a, b, c) -> None:
    if a.rank is None or a.rank < 3 or b.rank != 2 or a.dtype != DType.FLOAT32:
        raise MatchFailure(f"not a float32 [..., K] @ [K, N] of rank 3 or more; A is {a.type_str()}, B {b.type_str()}")
    n = b.shape[1]
    if c is None:
        return
    if c.rank is None or c.rank > 1 or (c.rank == 1 and c.shape[0] not in (1, n)):
        raise MatchFailure(f"the bias {c.type_str()} is not one value per output column")


MATMUL_ROWS_GEMM = RewriteRule(
    "matmul-rows-gemm", _matmul_add_pattern, lambda op, a, b, c: op.kiln.FusedGemm(a, b, c),
    check=_matmul_rows_check,
    example=lambda: example_graph("matmul_rows", {"a": (DType.FLOAT32, (2, 4, 5))}, lambda op, a: op.Add(
        op.MatMul(a, op.constant(_f32(_rng().standard_normal((5, 3))))), op.constant(_f32(_rng().standard_normal(3))))),
    description="A MatMul of [..., K] rows by a constant [K, N] plus a bias per column becomes kiln::FusedGemm over "
                "the rows, whose epilogue then takes an activation.",
)


def _matmul_rows_alone_check(ctx, a, b, mm) -> None:
    _matmul_rows_check(ctx, a, b, None)
    for user in mm.outputs[0].users:
        c = next((v for v in user.inputs if v is not None and v is not mm.outputs[0]), None)
        if user.op_type == "Add" and c is not None and c.is_constant:
            try:
                _matmul_rows_check(ctx, a, b, c)
            except MatchFailure:
                continue
            raise MatchFailure("a bias follows: matmul-rows-gemm takes the two together")


MATMUL_ROWS = RewriteRule(
    "matmul-rows", lambda op, a, b=Const(): op.MatMul(a, b, _name="mm"), lambda op, a, b, mm: op.kiln.FusedGemm(a, b),
    check=_matmul_rows_alone_check,
    example=lambda: example_graph("matmul_rows_alone", {"a": (DType.FLOAT32, (2, 4, 5))}, lambda op, a: op.MatMul(
        a, op.constant(_f32(_rng().standard_normal((5, 3)))))),
    description="A MatMul of [..., K] rows by a constant [K, N] with no bias after it becomes kiln::FusedGemm "
                "over the rows, whose epilogue then takes an activation.",
)


MATMUL_ADD_GEMM = RewriteRule(
    "matmul-add-gemm", _matmul_add_pattern, _matmul_add_rewrite, check=_matmul_add_check, example=_matmul_add_example,
    description="A 2-D MatMul by a constant matrix plus a broadcastable bias becomes Gemm.",
)


# --------------------------------------------------------------------------- residual add and activation epilogues


def _same_shape(a: Value, b: Value) -> bool:
    return a.shape is not None and b.shape is not None and tuple(a.shape) == tuple(b.shape) and a.dtype is b.dtype


def _check_no_auto_pad(conv: Node) -> None:
    if conv.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise MatchFailure("the Conv uses auto_pad")


def _residual_check(ctx, z, conv, add) -> None:
    _check_no_auto_pad(conv)
    y = conv.outputs[0]
    if not _same_shape(y, z) or not _same_shape(y, add.outputs[0]):
        raise MatchFailure(f"the residual {z.type_str()} does not have the conv output's type {y.type_str()}")


def _residual_rewrite(op, x, w, b, z, conv):
    return op.kiln.FusedConv(x, w, b, z, **copy_attrs(conv, "auto_pad"))


def _residual_rule(root: str) -> RewriteRule:
    """``root(Conv(...), z)`` for root Add, or a two-input Sum (as ResNet exports from Caffe2 use)."""

    def pattern(op, x, w, b, z):
        return getattr(op, root)(op.Conv(x, w, Optional(b), _name="conv"), z, _name="add")

    def example():
        rng = _rng()

        def build(op, x, z):
            y = op.Conv(x, op.constant(_f32(rng.standard_normal((4, 3, 3, 3)))),
                        op.constant(_f32(rng.standard_normal(4))), pads=[1, 1, 1, 1])
            return getattr(op, root)(z, y)

        inputs = {"x": (DType.FLOAT32, (1, 3, 5, 5)), "z": (DType.FLOAT32, (1, 4, 5, 5))}
        return example_graph(f"residual_{root.lower()}", inputs, build)

    name = "conv-residual" if root == "Add" else f"conv-residual-{root.lower()}"
    return RewriteRule(name, pattern, _residual_rewrite, check=_residual_check, example=example,
                       description=f"{root}(Conv(...), z) with z of the same shape becomes kiln::FusedConv with residual z.")


CONV_RESIDUAL = _residual_rule("Add")
CONV_RESIDUAL_SUM = _residual_rule("Sum")


# activation name -> (pattern over the core's output y, extractor of params from the bound nodes, which raises
# MatchFailure when the activation cannot be an epilogue). The activation's own parameters are read from its node
# (attributes, or Clip's constant bound inputs), so the pieces bind no variables.
def _act_table() -> dict[str, tuple[Callable[..., Any], Callable[..., tuple[float, ...]]]]:
    def simple(name: str):
        return lambda op, y: getattr(op, name)(y, _name="act"), lambda act, **_: ()

    def clip_params(act, **_) -> tuple[float, ...]:
        lo, hi = act.input(1), act.input(2)
        if lo is not None and hi is not None:
            if not (lo.is_constant and hi.is_constant and lo.numpy().size == 1 and hi.numpy().size == 1):
                raise MatchFailure("Clip bounds are not scalar constants")
            return (float(lo.numpy()), float(hi.numpy()))
        mn, mx = act.attr("min"), act.attr("max")
        if mn is None or mx is None:
            raise MatchFailure("Clip needs both bounds to become an epilogue")
        return (float(mn), float(mx))

    return {
        "Relu": simple("Relu"),
        "Sigmoid": simple("Sigmoid"),
        "Tanh": simple("Tanh"),
        "HardSwish": simple("HardSwish"),
        "LeakyRelu": (lambda op, y: op.LeakyRelu(y, _name="act"), lambda act, **_: (float(act.attr("alpha", 0.01)),)),
        "HardSigmoid": (lambda op, y: op.HardSigmoid(y, _name="act"),
                        lambda act, **_: (float(act.attr("alpha", 0.2)), float(act.attr("beta", 0.5)))),
        "Clip": (lambda op, y: op.Clip(y, _name="act", _allow_extra_inputs=True), clip_params),
        "SiLU": (lambda op, y: op.Mul(y, op.Sigmoid(y), _name="act"), lambda act, **_: ()),
        # HardSwish written as y * HardSigmoid(y) with alpha 1/6, beta 1/2 (what hardswish-clip makes before opset 14)
        "HardSwish-HardSigmoid": (lambda op, y: op.Mul(y, op.HardSigmoid(y, _name="hsig"), _name="act"),
                                  lambda act, hsig=None, **_: _hardswish_sigmoid_params(hsig)),
        "Gelu": (lambda op, y: op.Gelu(y, _name="act"),
                 lambda act, **_: (1.0,) if act.attr("approximate", "none") == "tanh" else ()),
        # GELU before opset 20, as the transformer fusion writes it
        "Gelu-kiln": (lambda op, y: op.kiln.Gelu(y, _name="act"),
                      lambda act, **_: (1.0,) if act.attr("approximate", "none") == "tanh" else ()),
    }


def _hardswish_sigmoid_params(hsig: Node | None) -> tuple[float, ...]:
    alpha, beta = (hsig.attr("alpha", 0.2), hsig.attr("beta", 0.5)) if hsig is not None else (None, None)
    if alpha is None or not np.isclose(alpha, 1 / 6, rtol=1e-5) or not np.isclose(beta, 0.5):
        raise MatchFailure(f"HardSigmoid has alpha={alpha}, beta={beta}; a HardSwish needs 1/6 and 0.5")
    return ()


ACTIVATION_PATTERNS = _act_table()


def _epilogue_rule(core: str, form: str) -> RewriteRule:
    """``form`` is a key of ACTIVATION_PATTERNS: an activation name, or ``Name-written-as``."""
    make_act, params_of = ACTIVATION_PATTERNS[form]
    act_name = form.split("-")[0]

    if core == "fused-conv":
        def pattern(op, x, w, b, z):
            return make_act(op, op.kiln.FusedConv(x, w, Optional(b), Optional(z), activation=lambda a: not a,
                                                  _name="core"))
    elif core == "fused-gemm":
        def pattern(op, x, w, b):
            return make_act(op, op.kiln.FusedGemm(x, w, Optional(b), activation=lambda a: not a, _name="core"))
    else:
        def pattern(op, x, w, b):
            return make_act(op, getattr(op, "Conv" if core == "conv" else "Gemm")(x, w, Optional(b), _name="core"))

    def check(ctx, act, core, **bound) -> None:
        _check_no_auto_pad(core)
        params_of(act, **bound)

    def rewrite(op, x, w, act, core, **bound):
        params = params_of(act, **bound)
        b, z = bound.get("b"), bound.get("z")
        attrs = copy_attrs(core, "auto_pad", "activation", "activation_params", activation=act_name,
                           activation_params=list(params))
        if core.op_type in ("Gemm", "FusedGemm"):
            return op.kiln.FusedGemm(x, w, b, **attrs)
        return op.kiln.FusedConv(x, w, b, z, **attrs)

    def example():
        rng = _rng()

        def build(op, x, *rest):
            if core == "gemm":
                y = op.Gemm(x, op.constant(_f32(rng.standard_normal((6, 5)))), op.constant(_f32(rng.standard_normal(6))),
                            transB=1)
            elif core == "fused-gemm":  # rows of a 3-D input, as the matmul-rows-gemm rule makes
                y = op.kiln.FusedGemm(x, op.constant(_f32(rng.standard_normal((5, 6)))),
                                      op.constant(_f32(rng.standard_normal(6))))
            else:
                w = op.constant(_f32(rng.standard_normal((4, 3, 3, 3)) * 0.5))
                b = op.constant(_f32(rng.standard_normal(4)))
                if core == "conv":
                    y = op.Conv(x, w, b, pads=[1, 1, 1, 1])
                else:
                    y = op.kiln.FusedConv(x, w, b, rest[0], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
            return example_activation(op, y, form)

        if core == "gemm":
            inputs = {"x": (DType.FLOAT32, (3, 5))}
        elif core == "fused-gemm":
            inputs = {"x": (DType.FLOAT32, (2, 3, 5))}
        else:
            inputs = {"x": (DType.FLOAT32, (1, 3, 5, 5))}
            if core == "fused-conv":
                inputs["z"] = (DType.FLOAT32, (1, 4, 5, 5))
        return example_graph(f"{core}_{form.lower()}", inputs, build, opset=20 if act_name == "Gelu" else 17)

    return RewriteRule(
        f"{core}-{form.lower()}", pattern, rewrite, check=check, example=example,
        description=f"{form.replace('-', ' written as ')} after {core.replace('-', ' ')} becomes its fused epilogue.",
    )


def example_activation(op, y: Value, form: str) -> Value:
    """For rule examples: the activation ``form`` (a key of ACTIVATION_PATTERNS) applied to ``y``."""
    if form == "Clip":
        return op.Clip(y, op.constant(np.float32(0.0)), op.constant(np.float32(6.0)))
    if form == "LeakyRelu":
        return op.LeakyRelu(y, alpha=0.1)
    if form == "HardSigmoid":
        return op.HardSigmoid(y, alpha=0.2, beta=0.5)
    if form == "SiLU":
        return op.Mul(op.Sigmoid(y), y)
    if form == "HardSwish-HardSigmoid":
        return op.Mul(op.HardSigmoid(y, alpha=1 / 6, beta=0.5), y)
    if form == "Gelu-kiln":
        return op.kiln.Gelu(y)
    return getattr(op, form)(y)


def _hardswish_clip_pattern(op, x, three=Const(), lo=Const(), hi=Const(), sixth=Const()):
    clipped = op.Clip(op.Add(x, three), lo, hi)
    return op.Mul(op.Mul(x, clipped), sixth)


def _hardswish_clip_check(ctx, x, three, lo, hi, sixth) -> None:
    want = {"three": (three, 3.0), "lo": (lo, 0.0), "hi": (hi, 6.0)}
    for label, (v, target) in want.items():
        got = _scalar_or_none(v)
        if got is None or not np.isclose(got, target, rtol=1e-5, atol=1e-7):
            raise MatchFailure(f"the constant '{label}' is {got}, not {target:.6g}")
    if _scalar_or_none(sixth) is None:
        raise MatchFailure(f"the final factor %{sixth.name} is not a scalar constant")
    if x.dtype is None or not x.dtype.is_float:
        raise MatchFailure(f"%{x.name} is not a float tensor")


def _hardswish_clip_rewrite(op, x, sixth):
    hs = op.HardSwish(x) if op.opset >= 14 else op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5))
    scale = _scalar_or_none(sixth) * 6  # a learnt scale after the hard-swish, folded in by O1
    if np.isclose(scale, 1.0, rtol=1e-6):
        return hs
    return op.Mul(hs, op.constant(np.asarray(scale, dtype=x.dtype.numpy), "hardswish_scale"))


def _hardswish_clip_example(opset: int, scale: float = 1.0):
    def make():
        def build(op, x):
            c = lambda v: op.constant(np.float32(v))  # noqa: E731
            return op.Mul(op.Mul(x, op.Clip(op.Add(x, c(3.0)), c(0.0), c(6.0))), c(scale / 6))

        return example_graph(f"hardswish_clip_{opset}", {"x": (DType.FLOAT32, (2, 16))}, build, opset=opset)

    return make


HARDSWISH_CLIP = RewriteRule(
    "hardswish-clip", _hardswish_clip_pattern, _hardswish_clip_rewrite, check=_hardswish_clip_check,
    example=_hardswish_clip_example(12),
    description="x * clip(x + 3, 0, 6) * c, Paddle's hard-swish (c = 1/6, or times a learnt scale), becomes "
                "HardSwish(x) * 6c (x * HardSigmoid(x) before opset 14).",
)
HARDSWISH_CLIP_14 = RewriteRule(
    "hardswish-clip-opset14", _hardswish_clip_pattern, _hardswish_clip_rewrite, check=_hardswish_clip_check,
    example=_hardswish_clip_example(14, scale=0.476),
    description="The same rule, verified where HardSwish exists (opset 14+) and with a learnt scale after it.",
)


def _act_before_reshape_rule(form: str) -> RewriteRule:
    """``act(Reshape(Gemm(...)))`` becomes ``Reshape(act(Gemm(...)))``: an elementwise activation does not
    care about the shape, and next to the product it joins its epilogue (GPT-2 reshapes its MLP's Gemm
    back to [batch, sequence, width] before the GELU)."""
    make_act = ACTIVATION_PATTERNS[form][0]  # single-input activations only

    def pattern(op, y, s):
        return make_act(op, op.Reshape(y, s, _name="rs"))

    def check(ctx, y, rs, **_) -> None:
        core = y.producer
        if core is None or core.op_type not in ("Gemm", "FusedGemm") or core.attr("activation"):
            raise MatchFailure(f"%{y.name} is not the output of a Gemm without an activation")
        if len(y.users) != 1 or y.is_graph_output:
            raise MatchFailure(f"%{y.name} has other users than the Reshape")

    def rewrite(op, y, s, act, rs):
        make = getattr(op.kiln, act.op_type) if act.domain == "kiln" else getattr(op, act.op_type)
        return op.Reshape(make(y, **copy_attrs(act)), s, **copy_attrs(rs))  # the same activation, on the product

    def example():
        rng = _rng()

        def build(op, x):
            y = op.Gemm(x, op.constant(_f32(rng.standard_normal((5, 6)))), op.constant(_f32(rng.standard_normal(6))))
            return example_activation(op, op.Reshape(y, op.constant(np.array([1, 3, 6], np.int64))), form)

        return example_graph(f"reshape_{form.lower()}", {"x": (DType.FLOAT32, (3, 5))}, build,
                             opset=20 if form == "Gelu" else 17)

    return RewriteRule(f"{form.lower()}-before-reshape", pattern, rewrite, check=check, example=example,
                       description=f"{form.replace('-', ' written as ')} after a Gemm's Reshape moves before the Reshape, "
                                   "into the Gemm's epilogue.")


EPILOGUE_RULES = [_epilogue_rule(core, act) for core in ("conv", "fused-conv", "gemm") for act in ACTIVATION_PATTERNS]
FUSED_GEMM_EPILOGUE_RULES = [_epilogue_rule("fused-gemm", act) for act in ACTIVATION_PATTERNS]

# --------------------------------------------------------------------------- ConvTranspose as Conv + DepthToSpace


def _convt_d2s_pattern(op, x, w=Const(), b=Const()):
    return op.ConvTranspose(x, w, Optional(b), _name="convt")


def _convt_d2s_check(ctx, x: Value, w: Value, convt: Node) -> None:
    if w.shape is None or len(w.shape) != 4 or x.rank != 4:
        raise MatchFailure("only 2-D ConvTranspose becomes a Conv")
    k = list(convt.attr("kernel_shape", ()) or w.shape[2:])
    strides = list(convt.attr("strides", ()) or [1, 1])
    if k[0] != k[1] or strides != k or k[0] < 2:
        raise MatchFailure(f"kernel {k} and strides {strides} are not one equal square (non-overlapping windows)")
    if convt.attr("group", 1) != 1:
        raise MatchFailure("the ConvTranspose is grouped")
    if any(convt.attr("pads", ()) or ()) or any(convt.attr("output_padding", ()) or ()) \
            or convt.attr("output_shape") is not None or convt.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise MatchFailure("the ConvTranspose pads, crops or sets its output shape")
    if any(d != 1 for d in convt.attr("dilations", ()) or ()):
        raise MatchFailure("the ConvTranspose is dilated")


def _convt_d2s_rewrite(op, x, w, convt, b=None):
    weight = w.numpy()  # [C, O, s, s]
    c, o, s, _ = weight.shape
    # DepthToSpace (DCR) reads channel (i*s + j)*O + o into pixel (h*s + i, w*s + j) of channel o
    conv_w = weight.transpose(2, 3, 1, 0).reshape(s * s * o, c, 1, 1)
    conv_b = None if b is None else op.constant(np.tile(b.numpy(), s * s), f"{b.name}_d2s")
    y = op.Conv(x, op.constant(np.ascontiguousarray(conv_w), f"{w.name}_d2s"), conv_b, kernel_shape=[1, 1])
    return op.DepthToSpace(y, blocksize=s)


def _convt_d2s_example():
    rng = _rng()

    def build(op, x):
        w = op.constant(_f32(rng.standard_normal((6, 4, 2, 2))))
        return op.ConvTranspose(x, w, op.constant(_f32(rng.standard_normal(4))), kernel_shape=[2, 2], strides=[2, 2])

    return example_graph("convt_d2s", {"x": (DType.FLOAT32, (1, 6, 3, 5))}, build)


CONVT_DEPTH_TO_SPACE = RewriteRule(
    "convtranspose-depthtospace", _convt_d2s_pattern, _convt_d2s_rewrite, check=_convt_d2s_check,
    example=_convt_d2s_example, priority=-5,
    description="A ConvTranspose whose stride equals its kernel (no overlap) is a 1x1 Conv to s*s*O channels "
                "followed by DepthToSpace, so the fast conv kernels and epilogues serve it.",
)


def _d2s_channel_rule(op_type: str) -> RewriteRule:
    """Per-channel Add/Mul after DepthToSpace moves before it (tiled to the s*s channel groups)."""

    def pattern(op, x, c=Const()):
        return getattr(op, op_type)(op.DepthToSpace(x, _name="d2s"), c)

    def check(ctx, x: Value, c: Value, d2s: Node) -> None:
        if d2s.attr("mode", "DCR") != "DCR":
            raise MatchFailure("DepthToSpace in CRD mode")
        y = d2s.outputs[0]
        if y.shape is None or not isinstance(y.shape[1], int) or c.dtype is not x.dtype:
            raise MatchFailure("the channel count or dtype is unknown or differs")
        _check_per_channel(c, y.shape[1], y)

    def rewrite(op, x, c, d2s):
        s = d2s.attr("blocksize")
        per = per_channel(c.numpy(), d2s.outputs[0].shape[1], 4)
        tiled = np.tile(per, s * s).astype(c.dtype.numpy).reshape(-1, 1, 1)
        return op.DepthToSpace(getattr(op, op_type)(x, op.constant(tiled, f"{c.name}_d2s")), **copy_attrs(d2s))

    def example():
        rng = _rng()

        def build(op, x):
            y = op.DepthToSpace(x, blocksize=2)
            return getattr(op, op_type)(y, op.constant(_f32(rng.standard_normal((3, 1, 1)))))

        return example_graph(f"d2s_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 12, 2, 3))}, build)

    return RewriteRule(f"depthtospace-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"A per-channel {op_type} after DepthToSpace happens before it, where a conv "
                                   "epilogue can absorb it.")


def _d2s_unary_rule(op_type: str) -> RewriteRule:
    def pattern(op, x):
        return getattr(op, op_type)(op.DepthToSpace(x, _name="d2s"), _name="act")

    def rewrite(op, x, d2s, act):
        return op.DepthToSpace(getattr(op, op_type)(x, **copy_attrs(act)), **copy_attrs(d2s))

    def example():
        return example_graph(f"d2s_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 12, 2, 3))},
                             lambda op, x: getattr(op, op_type)(op.DepthToSpace(x, blocksize=2)))

    return RewriteRule(f"depthtospace-{op_type.lower()}", pattern, rewrite, example=example,
                       description=f"{op_type} after DepthToSpace happens before it (it only moves elements).")


D2S_RULES = [CONVT_DEPTH_TO_SPACE, _d2s_channel_rule("Add"), _d2s_channel_rule("Mul"),
             *(_d2s_unary_rule(o) for o in ("Relu", "Sigmoid", "HardSwish", "LeakyRelu", "HardSigmoid"))]


#: The rules that fold constants into convs and gemms (BatchNorm, bias adds, scales, pads) and
#: leave standard ops: what ``--quantize int8`` runs before it observes ranges.
FOLD_RULES = [CONV_BN, CONVT_BN, GEMM_BN, BN_AFFINE, CONV_ADD_BIAS, CONV_MUL_SCALE, PAD_CONV, PAD_AVGPOOL, PAD_MAXPOOL,
              HARDSWISH_CLIP, HARDSWISH_CLIP_14, MATMUL_ADD_GEMM]

RULES = [*FOLD_RULES, CONV_RESIDUAL, CONV_RESIDUAL_SUM, *EPILOGUE_RULES, *D2S_RULES]

register_rule_set("fuse-conv", RULES)
#: after fuse-transformer has made its GELUs: products by constant weights take their bias and
#: activation into one epilogue
register_rule_set("fuse-gemm", [MATMUL_ADD_GEMM, MATMUL_ROWS_GEMM, MATMUL_ROWS, *(r for r in EPILOGUE_RULES if r.name.startswith("gemm-")),
                                *FUSED_GEMM_EPILOGUE_RULES,
                                *(_act_before_reshape_rule(f) for f in ("Relu", "Gelu", "Gelu-kiln", "Sigmoid", "Tanh"))])
register_rule_set("fold-into-conv", FOLD_RULES)
