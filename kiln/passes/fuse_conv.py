"""Conv fusions: fold BatchNormalization into the convolution that feeds it."""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Node, Value
from kiln.passes.pattern import Optional, Var, copy_attrs
from kiln.passes.rules import MatchContext, MatchResult, RewriteRule, example_graph


def _conv_bn_pattern(op, x, w, scale, bias, mean, var):
    conv = op.Conv(x, w, Optional(Var("b")), _name="conv")
    return op.BatchNormalization(conv, scale, bias, mean, var, _name="bn")


def _conv_bn_check(ctx: MatchContext, w: Value, b: Value | None, scale: Value, bias: Value, mean: Value,
                   var: Value, bn: Node) -> MatchResult:
    for label, v in (("conv weight", w), ("BN scale", scale), ("BN bias", bias), ("BN mean", mean),
                     ("BN variance", var), ("conv bias", b)):
        if v is not None and not v.is_constant:
            return MatchResult.fail(f"the {label} %{v.name} is not a constant")
    if bn.attr("training_mode", 0) or len([o for o in bn.outputs if o.name]) > 1:
        return MatchResult.fail("BatchNormalization runs in training mode")
    if w.dtype is None or not w.dtype.is_float:
        return MatchResult.fail(f"the conv weight is {w.dtype}, not a float type")
    return MatchResult.ok()


def _conv_bn_rewrite(op, x: Value, w: Value, b: Value | None, scale: Value, bias: Value, mean: Value, var: Value,
                     conv: Node, bn: Node) -> Value:
    eps = bn.attr("epsilon", 1e-5)
    weight = w.numpy().astype(np.float64)
    k = scale.numpy().astype(np.float64) / np.sqrt(var.numpy().astype(np.float64) + eps)
    old_bias = b.numpy().astype(np.float64) if b is not None else 0.0
    new_w = weight * k.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_b = (old_bias - mean.numpy().astype(np.float64)) * k + bias.numpy().astype(np.float64)
    dt = w.dtype.numpy  # type: ignore[union-attr]
    return op.Conv(x, op.constant(new_w.astype(dt), f"{w.name}_bn"), op.constant(new_b.astype(dt), f"{w.name}_bn_bias"),
                   **copy_attrs(conv))


def _conv_bn_example():
    rng = np.random.default_rng(0)
    c_in, c_out = 3, 8

    def build(op, x):
        w = op.constant(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32) * 0.3)
        y = op.Conv(x, w, pads=[1, 1, 1, 1], strides=[2, 2])
        stats = [rng.uniform(0.5, 1.5, c_out), rng.uniform(-0.2, 0.2, c_out), rng.uniform(-0.2, 0.2, c_out),
                 rng.uniform(0.5, 1.5, c_out)]
        return op.BatchNormalization(y, *[op.constant(s.astype(np.float32)) for s in stats], epsilon=1e-3)

    return example_graph("conv_bn", {"x": (DType.FLOAT32, (1, c_in, 9, 9))}, build)


CONV_BN = RewriteRule(
    name="conv-bn",
    description="Conv followed by inference BatchNormalization becomes one Conv with scaled weights and a bias.",
    pattern=_conv_bn_pattern, check=_conv_bn_check, rewrite=_conv_bn_rewrite, example=_conv_bn_example,
)

RULES = [CONV_BN]
