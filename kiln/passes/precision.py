"""Precision: float32 convs and dense layers run in bfloat16 (``kiln compile --precision bf16``).

``gemm-bf16``, ``fused-gemm-bf16`` and ``matmul-bf16`` rewrite a product by a constant ``[K, N]``
weight into ``kiln::BF16Dense`` the same way (bias and activation in its write-back). ``conv-bf16`` rewrites a blocked float32 conv (``kiln::BlockedConv``, group 1, 16-lane blocks) into
``kiln::BF16BlockedConv``: its weight packed as bf16 pairs at compile time, its input rounded to
bf16 inside the kernel, its products summed in float32 (AVX-512 BF16's ``vdpbf16ps``). Activations
between kernels stay float32, and so does everything else: depthwise and grouped convs, products of
two activations (attention's), pooling, normalisations, the epilogues. The pass runs after the layout pass, on its blocked convs, and only
when asked for: bf16 changes the numbers (8 bits of mantissa; see ``docs/compression.md``).
"""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Graph, Node, Value
from kiln.ir.kiln_ops import pack_bf16_conv_weight, pack_bf16_dense_weight
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

def _dense_rule(core: str) -> RewriteRule:
    """``gemm-bf16``, ``fused-gemm-bf16``, ``matmul-bf16``: a product by a constant float32 ``[K, N]``
    (the layout pass stores a Gemm's B so) becomes kiln::BF16Dense, on rows for a rank > 2 input."""
    if core == "matmul":
        def pattern(op, a, b=Const()):
            return op.MatMul(a, b, _name="mm")
    elif core == "gemm":
        def pattern(op, a, b=Const(), c=Const()):
            return op.Gemm(a, b, Optional(c), _name="mm")
    else:
        def pattern(op, a, b=Const(), c=Const()):
            return op.kiln.FusedGemm(a, b, Optional(c), _name="mm")

    def check(ctx: MatchContext, a: Value, b: Value, mm: Node, c: Value | None = None) -> None:
        if a.dtype != DType.FLOAT32 or b.dtype != DType.FLOAT32 or b.rank != 2:
            raise MatchFailure("not a float32 product by a 2-D constant")
        if a.rank is None or a.rank < 2 or not isinstance(a.shape[-1], int):
            raise MatchFailure("A needs rank 2 or more and a static K")
        if mm.attr("transA", 0) or mm.attr("transB", 0):
            raise MatchFailure("a transposed operand; the bf16 kernel takes A [.., K] and B [K, N]")
        if mm.attr("alpha", 1.0) != 1.0 or (c is not None and mm.attr("beta", 1.0) != 1.0):
            raise MatchFailure("alpha or beta is not 1")
        if c is not None and (c.shape is None or (c.shape and c.shape[-1] not in (1, b.shape[1]))
                              or any(d != 1 for d in c.shape[:-1])):
            raise MatchFailure(f"C {c.shape} does not broadcast along N alone")

    def rewrite(op, a, b, mm, c=None):
        k, n = b.shape
        packed = op.constant(pack_bf16_dense_weight(b.numpy()), f"{b.name}_bf16")
        bias = None
        if c is not None:
            full = np.zeros(packed.shape[0] * BF16_LANES, np.float32)
            full[:n] = np.broadcast_to(c.numpy().reshape(-1), (n,))
            bias = op.constant(full, f"{c.name}_bf16_bias")
        attrs = {"n": n}
        if mm.attr("activation", ""):
            attrs["activation"] = mm.attr("activation")
            if mm.attr("activation_params", ()):
                attrs["activation_params"] = list(mm.attr("activation_params"))
        return op.kiln.BF16Dense(a, packed, bias, **attrs)

    def example() -> Graph:
        rng = np.random.default_rng(11)

        def build(op, x):  # rows of a [2, 5, 40] input by [40, 24] (N padded to 32 inside)
            w = op.constant(rng.standard_normal((40, 24)).astype(np.float32) * 0.2)
            if core == "matmul":
                return op.MatMul(x, w)
            c = op.constant(rng.standard_normal(24).astype(np.float32))
            if core == "gemm":
                return op.Gemm(op.Reshape(x, op.constant(np.array([10, 40], np.int64))), w, c)
            return op.kiln.FusedGemm(x, w, c, activation="Gelu", activation_params=[0.0])

        return example_graph(f"{core}_bf16", {"x": (DType.FLOAT32, (2, 5, 40))}, build)

    return RewriteRule(f"{core}-bf16", pattern, rewrite, check=check, example=example, rtol=BF16_RTOL,
                       atol=BF16_ATOL,
                       description=f"A {core.replace('-', ' ')} by a constant float32 [K, N] becomes kiln::BF16Dense: "
                                   "bf16 weights packed in pairs, its input rounded to bf16, float32 sums.")


DENSE_RULES = [_dense_rule(core) for core in ("fused-gemm", "gemm", "matmul")]
RULES = [CONV_BF16, *DENSE_RULES]
register_rule_set("bf16", RULES)
