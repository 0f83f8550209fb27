"""Precision: float32 convs run in bfloat16 (``kiln compile --precision bf16``).

``conv-bf16`` rewrites a blocked float32 conv (``kiln::BlockedConv``, group 1, 16-lane blocks) into
``kiln::BF16BlockedConv``: its weight packed as bf16 pairs at compile time, its input rounded to
bf16 inside the kernel, its products summed in float32 (AVX-512 BF16's ``vdpbf16ps``). Activations
between kernels stay float32, and so does everything that is not such a conv: depthwise and grouped
convs, pooling, the epilogues. The pass runs after the layout pass, on its blocked convs, and only
when asked for: bf16 changes the numbers (8 bits of mantissa; see ``docs/compression.md``).
"""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Graph, Node, Value
from kiln.ir.kiln_ops import pack_bf16_conv_weight
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional, Var, copy_attrs
from kiln.passes.rules import RewriteRule, example_graph, register_rule_set

BF16_LANES = 16  # float32 accumulator lanes of vdpbf16ps
#: bf16 keeps 8 of float32's 24 significand bits: each input and weight is off by up to 2^-9 of
#: itself, so a sum of K products is off by about sqrt(K) * 2^-8 of a typical product
BF16_RTOL, BF16_ATOL = 2e-2, 5e-2


def _pattern(op, x, w=Const(), b=Const(), z=Var()):
    return op.kiln.BlockedConv(x, w, Optional(b), Optional(z), _name="conv")


def _check(ctx: MatchContext, x: Value, w: Value, conv: Node, b: Value | None = None, z: Value | None = None) -> None:
    if x.dtype != DType.FLOAT32 or w.dtype != DType.FLOAT32:
        raise MatchFailure(f"a {x.dtype} conv by {w.dtype} weights; bf16 takes float32 ones")
    if conv.attr("group", 1) != 1:
        raise MatchFailure(f"group {conv.attr('group', 1)}: the bf16 kernel takes group 1 (depthwise and grouped "
                           f"convs stay float32)")
    if w.shape is None or w.rank != 6 or w.shape[4] != BF16_LANES or w.shape[5] != BF16_LANES:
        raise MatchFailure(f"weight blocks {w.shape and w.shape[4:]}; the bf16 kernel takes 16 x 16 "
                           f"(a stem with fewer than 16 input channels stays float32)")
    if any(d != 1 for d in conv.attr("dilations", ()) or ()):
        raise MatchFailure("a dilated conv; the bf16 kernel takes dilation 1")
    y = conv.outputs[0]
    if y.shape is None or not isinstance(y.shape[3], int):
        raise MatchFailure("the output width is symbolic; the bf16 kernel's register tile needs it static")


def _rewrite(op, x, w, conv, b=None, z=None):
    packed = op.constant(pack_bf16_conv_weight(w.numpy()), f"{w.name}_bf16")
    return op.kiln.BF16BlockedConv(x, packed, b, z, **copy_attrs(conv))


def _example() -> Graph:
    from kiln.passes.layout import pack_weight

    rng = np.random.default_rng(7)

    def build(op, x, z):  # 32 -> 32 channels, 3x3, with a residual and ReLU in the epilogue
        w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
        packed = op.constant(pack_weight(w, 16, 16, False))
        bias = op.constant(rng.standard_normal(32).astype(np.float32))
        y = op.kiln.BlockedConv(op.kiln.ToBlocked(x, block=16), packed, bias, op.kiln.ToBlocked(z, block=16),
                                pads=[1, 1, 1, 1], kernel_shape=[3, 3], activation="Relu")
        return op.kiln.FromBlocked(y)

    return example_graph("conv_bf16", {"x": (DType.FLOAT32, (1, 32, 7, 7)), "z": (DType.FLOAT32, (1, 32, 7, 7))},
                         build)


CONV_BF16 = RewriteRule("conv-bf16", _pattern, _rewrite, check=_check, example=_example, rtol=BF16_RTOL,
                        atol=BF16_ATOL,
                        description="A blocked float32 conv becomes kiln::BF16BlockedConv: bf16 weights packed in "
                                    "pairs, its input rounded to bf16, float32 sums (vdpbf16ps).")

RULES = [CONV_BF16]
register_rule_set("bf16", RULES)
