"""Quantization: models already quantized in QDQ form compile to int8 kernels.

onnxruntime's quantizer (``quantize_static``, QDQ format) writes an int8 conv as float math
between QuantizeLinear/DequantizeLinear pairs::

    Q(Conv(DQ(x_q), DQ(w_q), DQ(b_q)), y_scale, y_zp)

``qdq-conv`` reads that back as the one ``QLinearConv`` it stands for, so the conv runs on
integers: the layout pass then blocks it onto the VNNI kernel (``kiln::QBlockedConv``), and
elsewhere it lowers to a plain int32 conv with a requantize. The rewrite is exact when the
bias is quantized with ``x_scale * w_scale`` and zero point 0, which is how the quantizer
writes it; the check refuses anything else with its reason.

The pass runs first in every level, before constant folding would turn ``DQ(w_q)`` into a
float weight.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import DType, Graph, Node, Value
from kiln.passes.pattern import Const, MatchResult, Optional, copy_attrs
from kiln.passes.rules import MatchContext, RewriteRule, example_graph


def _qdq_conv_pattern(op, xq):
    x = op.DequantizeLinear(xq, Const("xs"), Const("xzp"), _name="dq_x", _shared=True)  # may feed two convs
    w = op.DequantizeLinear(Const("wq"), Const("ws"), Optional(Const("wzp")), _name="dq_w")
    b = op.DequantizeLinear(Const("bq"), Const("bs"), Optional(Const("bzp")), _name="dq_b")
    return op.QuantizeLinear(op.Conv(x, w, Optional(b), _name="conv"), Const("ys"), Const("yzp"), _name="q")


def _scalar(v: Value) -> bool:
    return v.numpy().size == 1


def _qdq_conv_check(ctx: MatchContext, xq: Value, xs: Value, xzp: Value, wq: Value, ws: Value, ys: Value, yzp: Value,
                    dq_x: Node, dq_w: Node, conv: Node, q: Node, wzp: Value | None = None, bq: Value | None = None,
                    bs: Value | None = None, bzp: Value | None = None, dq_b: Node | None = None) -> MatchResult:
    if xq.dtype not in (DType.UINT8, DType.INT8) or wq.dtype not in (DType.UINT8, DType.INT8):
        return MatchResult.fail(f"activations {xq.dtype}, weights {wq.dtype}: not 8-bit integers")
    if yzp.dtype != xq.dtype:
        return MatchResult.fail(f"the conv's input is {xq.dtype} and its output {yzp.dtype}")
    if not (_scalar(xs) and _scalar(xzp) and _scalar(ys) and _scalar(yzp)):
        return MatchResult.fail("activation scales and zero points must be per tensor")
    k = wq.shape[0] if wq.shape else 0
    if not _scalar(ws) and (ws.numpy().size != k or dq_w.attr("axis", 1) != 0):
        return MatchResult.fail("the weight scale is neither per tensor nor per output channel (axis 0)")
    if any(n.attr(a) not in (None, 1) for n in (dq_x, dq_w, q) for a in ("saturate",)):
        return MatchResult.fail("float8 saturation attributes are not int8 quantization")
    if bq is not None:
        if bq.dtype != DType.INT32 or (bzp is not None and np.any(bzp.numpy() != 0)):
            return MatchResult.fail("the bias is not int32 with zero point 0")
        want = (xs.numpy().astype(np.float32).reshape(()) * ws.numpy().astype(np.float32).reshape(-1))
        if not np.allclose(bs.numpy().astype(np.float32).reshape(-1) * np.ones_like(want), want, rtol=1e-6, atol=0):
            return MatchResult.fail("the bias scale is not x_scale * w_scale")
    return MatchResult.ok()


def _qdq_conv_rewrite(op, xq, xs, xzp, wq, ws, ys, yzp, dq_x, dq_w, conv, q, wzp=None, bq=None, bs=None, bzp=None,
                      dq_b=None):
    if wzp is None:
        wzp = op.constant(np.zeros(1 if _scalar(ws) else ws.numpy().size, wq.dtype.numpy).reshape(ws.numpy().shape),
                          f"{wq.name}_zero_point")
    inputs = [xq, xs, xzp, wq, ws, wzp, ys, yzp] + ([bq] if bq is not None else [])
    return op.QLinearConv(*inputs, **copy_attrs(conv))


def _qdq_conv_example() -> Graph:
    rng = np.random.default_rng(0)

    def build(op, x):  # per-channel weights, a bias, stride 2 and padding, as quantize_static writes them
        xs, xzp = op.constant(np.float32(0.03)), op.constant(np.uint8(128))
        ws = (rng.random(24) * 0.004 + 0.001).astype(np.float32)
        w = op.DequantizeLinear(op.constant(rng.integers(-127, 128, (24, 20, 3, 3)).astype(np.int8)),
                                op.constant(ws), op.constant(np.zeros(24, np.int8)), axis=0)
        b = op.DequantizeLinear(op.constant(rng.integers(-3000, 3000, 24).astype(np.int32)),
                                op.constant(np.float32(0.03) * ws), op.constant(np.zeros(24, np.int32)), axis=0)
        c = op.Conv(op.DequantizeLinear(op.QuantizeLinear(x, xs, xzp), xs, xzp), w, b, pads=[1, 1, 1, 1],
                    strides=[2, 2])
        ys, yzp = op.constant(np.float32(0.05)), op.constant(np.uint8(100))
        return op.DequantizeLinear(op.QuantizeLinear(c, ys, yzp), ys, yzp)

    return example_graph("qdq_conv", {"x": (DType.FLOAT32, (1, 20, 9, 9))}, build, opset=17)


# The example dequantizes the output: the tolerance is one output step (0.05), for products
# that the float and integer forms round to different sides of a half.
QDQ_CONV = RewriteRule(
    "qdq-conv", _qdq_conv_pattern, _qdq_conv_rewrite, check=_qdq_conv_check, example=_qdq_conv_example, rtol=0,
    atol=0.0501, description="Q(Conv(DQ(x), DQ(w), DQ(b))) from a QDQ model is the QLinearConv it stands for: "
                             "the conv runs on integers.")

RULES = [QDQ_CONV]
