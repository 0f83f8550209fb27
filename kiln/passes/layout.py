"""Layout: convolutions in a blocked layout, NCHW[b]c, with weights pre-packed at compile time.

A CPU conv kernel keeps ``b`` output channels in one vector register (b = 16 float32 lanes
for AVX-512, 8 for AVX2), so activations are stored ``[N, C/b, H, W, b]`` and weights
``[O/b, I/b, kh, kw, b, b]``. This pass rewrites each eligible ``Conv``/``kiln::FusedConv``
into ``kiln::BlockedConv`` between ``kiln::ToBlocked`` and ``kiln::FromBlocked``, then moves
the transforms out of the way, so that only the boundaries of the blocked region pay one:

- ``conv-blocked``, ``fused-conv-blocked``: the conv becomes BlockedConv, with its weight
  packed (a constant computed here, at compile time);
- ``blocked-<op>``: an elementwise op reading ``FromBlocked(t)`` (unary, or binary with a
  scalar constant or another ``FromBlocked`` of the same shape) runs on ``t`` instead;
- ``blocked-concat``: a channel Concat of blocked tensors concatenates their blocks;
- ``blocked-maxpool``, ``blocked-averagepool``: 2-D pooling of blocked data is 3-D pooling
  with a window of 1 over the lanes; ``blocked-global*pool``: a reduction over H and W;
- ``unblock-reblock``: ``ToBlocked(FromBlocked(t))`` with the same block is ``t``;
- ``gemm-weight-kn``, ``fused-gemm-weight-kn``: a Gemm by a constant ``B^T`` stores B as
  ``[K, N]``, the layout of the dense kernel (vectors along N);
- ``matmul-pad-n``, ``gemm-pad-n``, ``fused-gemm-pad-n``: a product by a constant ``[K, N]``
  computes N rounded up to whole vectors (zero columns), then slices;
- ``matmul-pad-rows``, ``fused-gemm-pad-rows``: one whose static row count has no divisor of 4
  (ViT's 197 tokens) computes zero rows up to one, then slices: the dense kernel keeps its
  4-row register tile.

Eligible convs are 2-D and float32 with a static channel count: group 1 (the input channels
form blocks of ``b``, or one block when fewer, as in an RGB stem), depthwise, or grouped with
whole blocks of input and output channels in each group (ResNeXt- and RegNet-style convs whose
group widths are multiples of ``b``). Dilations carry over in each case.

Channel counts that ``b`` does not divide are padded to whole blocks. ToBlocked fills the
extra lanes with zeros; later they hold whatever the ops compute from them, and the
invariant is only that they stay **finite**: a BlockedConv multiplies them by zero weights,
and FromBlocked drops them. So on padded tensors only ops that keep finite values finite
move into the blocked region (not Exp, Sqrt, Div), and Concat moves only unpadded tensors.
"""

from __future__ import annotations

import functools
from typing import Any
from dataclasses import dataclass

import numpy as np

from kiln.ir import DType, Graph, Node, Value, normalize_axis
from kiln.passes.fuse_conv import ACTIVATION_PATTERNS, example_activation, per_channel
from kiln.passes.manager import Pass, PassResult, register_pass
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional, Var, copy_attrs
from kiln.passes.quantize import check_int8_conv_attrs
from kiln.passes.rules import RewriteRule, RewriteStats, apply_rules, example_graph, register_rule

DEFAULT_BLOCK = 16
MAX_SWEEPS = 200  # rounds of apply_rules in one run of the pass (each does up to 20 sweeps)

#: Elementwise ops whose result does not depend on where an element sits: they run on blocked data.
UNARY_OPS = ("Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Exp", "Abs", "Neg", "Sqrt",
             "Erf", "Elu", "Selu", "Softplus")
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum")
#: Per-tensor (de)quantization: elementwise with a scalar scale and zero point (a QDQ model's
#: residual adds run between them).
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Those that may turn a finite value into inf or NaN: kept off tensors with padded lanes.
UNSAFE_ON_PADDING = frozenset({"Exp", "Sqrt", "Div"})


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- convs


def conv_blocks(node: Node, x: Value, w: Value, block: int) -> tuple[int, int]:
    """(input block, output block) for a conv the pass can block; raises MatchFailure when it cannot."""
    if x.dtype != DType.FLOAT32:
        raise MatchFailure(f"the input is {x.dtype}, not float32")
    if x.shape is None or len(x.shape) != 4 or w.shape is None or len(w.shape) != 4:
        raise MatchFailure("only 2-D convs are blocked")
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise MatchFailure("the conv uses auto_pad")
    c_in, c_out, group = x.shape[1], w.shape[0], node.attr("group", 1)
    if not isinstance(c_in, int):
        raise MatchFailure("the input channel count is not static")
    if group == 1:
        return (c_in if c_in < block else block), block
    if _is_depthwise(node, x, w):
        return block, block
    if c_in % group == 0 and c_out % group == 0 and (c_in // group) % block == 0 and (c_out // group) % block == 0:
        return block, block  # each group is whole blocks of input and output channels
    if merged_groups(node, x, w, block):
        return block, block  # narrow groups, merged into groups of one block (see merged_groups)
    raise MatchFailure(f"grouped conv (group {group}) whose groups are not whole blocks of {block} channels, nor "
                       f"a divisor of {block} that {MAX_GROUP_MERGE} or fewer fill")


#: narrow groups merged into one block at most: a block of r groups multiplies r - 1 zero blocks
#: for each one it needs, so r times the MACs
MAX_GROUP_MERGE = 4


def merged_groups(node: Node, x: Value, w: Value, block: int) -> int:
    """How many groups of a grouped conv one block of lanes takes (0: the conv is not such a one).

    A group narrower than a block (RegNet's and ResNeXt's width 8 or 4 on AVX-512) would leave the
    blocked kernel; instead ``r = block / width`` neighbouring groups become one group of a whole
    block, with a block-diagonal weight (zeros between the merged groups: exact, at r times the
    MACs). The channels pad to whole blocks as any conv's do, the last group with zero groups."""
    c_in, c_out, group = x.shape[1], w.shape[0], node.attr("group", 1)
    if group == 1 or not isinstance(c_in, int) or c_in % group or c_out % group:
        return 0
    width = c_in // group
    if width != c_out // group or width >= block or block % width or block // width > MAX_GROUP_MERGE:
        return 0
    return block // width


def merge_group_weight(w: np.ndarray, group: int, r: int) -> np.ndarray:
    """``[O, width, kh, kw]`` in ``group`` groups -> ``[O, r·width, kh, kw]`` in groups of ``r`` (block-diagonal)."""
    o, width, kh, kw = w.shape
    out = np.zeros((o, r * width, kh, kw), w.dtype)
    per = o // group  # output channels per original group
    for g in range(group):
        at = (g % r) * width
        out[g * per:(g + 1) * per, at:at + width] = w[g * per:(g + 1) * per]
    return out


def _is_depthwise(node: Node, x: Value, w: Value) -> bool:
    """Whether a conv is depthwise: one input and one output channel per group."""
    group = node.attr("group", 1)
    return group != 1 and x.shape is not None and w.shape is not None and group == x.shape[1] == w.shape[0]


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def pack_weight(w: np.ndarray, bi: int, bo: int, depthwise: bool) -> np.ndarray:
    """``[O, I, kh, kw]`` -> ``[O'/bo, I'/bi', kh, kw, bi', bo]``, zero-padded to whole blocks."""
    o, i, kh, kw = w.shape
    bi = 1 if depthwise else bi
    full = np.zeros((_padded(o, bo), _padded(i, bi), kh, kw), w.dtype)
    full[:o, :i] = w
    blocks = full.reshape(full.shape[0] // bo, bo, full.shape[1] // bi, bi, kh, kw)
    return np.ascontiguousarray(blocks.transpose(0, 2, 4, 5, 3, 1))


def _conv_rule(core: str, block: int) -> RewriteRule:
    if core == "conv":
        def pattern(op, x, w=Const(), b=Const()):
            return op.Conv(x, w, Optional(b), _name="conv")
    else:
        def pattern(op, x, w=Const(), b=Const(), z=Var()):
            return op.kiln.FusedConv(x, w, Optional(b), Optional(z), _name="conv")

    def check(ctx: MatchContext, x: Value, w: Value, conv: Node) -> None:
        conv_blocks(conv, x, w, block)

    def rewrite(op, x, w, conv, b=None, z=None):
        bi, bo = conv_blocks(conv, x, w, block)
        depthwise = _is_depthwise(conv, x, w)
        c_out = w.shape[0]
        attrs = copy_attrs(conv, "auto_pad")
        attrs.setdefault("kernel_shape", list(w.shape[2:]))
        weight = w.numpy()
        if depthwise:
            attrs["group"] = _padded(c_out, bo)
        elif (r := merged_groups(conv, x, w, block)):
            weight = merge_group_weight(weight, attrs["group"], r)
            attrs["group"] = _padded(c_out, bo) // bo
        xb = op.kiln.ToBlocked(x, block=bi)
        zb = op.kiln.ToBlocked(z, block=bo) if z is not None else None
        packed = op.constant(pack_weight(weight, bi, bo, depthwise), f"{w.name}_packed")
        bias = None
        if b is not None:
            full = np.zeros(_padded(c_out, bo), b.dtype.numpy)
            full[:c_out] = b.numpy()
            bias = b if len(full) == c_out else op.constant(full, f"{b.name}_padded")
        y = op.kiln.BlockedConv(xb, packed, bias, zb, **attrs)
        return op.kiln.FromBlocked(y, channels=c_out if c_out % bo else 0)

    def example() -> Graph:
        rng = _rng()

        def build(op, x, *rest):  # 20 -> 24 channels: both padded to whole blocks of 16
            w = op.constant(rng.standard_normal((24, 20, 3, 3)).astype(np.float32) * 0.2)
            b = op.constant(rng.standard_normal(24).astype(np.float32))
            if core == "conv":
                return op.Conv(x, w, b, pads=[1, 1, 1, 1], strides=[2, 2])
            return op.kiln.FusedConv(x, w, b, rest[0], pads=[1, 1, 1, 1], kernel_shape=[3, 3], activation="Sigmoid")

        inputs = {"x": (DType.FLOAT32, (1, 20, 6, 6))}
        if core == "fused-conv":
            inputs["z"] = (DType.FLOAT32, (1, 24, 6, 6))
        return example_graph(f"{core}_blocked", inputs, build)

    return RewriteRule(f"{core}-blocked", pattern, rewrite, check=check, example=example, rtol=1e-4, atol=1e-5,
                       description=f"A {core.replace('-', ' ')} in NCHW becomes kiln::BlockedConv in NCHW{block}c "
                                   "with its weight packed at compile time.")


# --------------------------------------------------------------------------- int8 convs

INT8_BLOCK = 16  # int32 lanes of the VNNI instruction's accumulator


def _qconv_pattern(op, x, xs=Const(), xzp=Const(), w=Const(), ws=Const(), wzp=Const(), ys=Const(), yzp=Const(),
                   b=Const()):
    return op.QLinearConv(x, xs, xzp, w, ws, wzp, ys, yzp, Optional(b), _name="conv")


def _qconv_check(ctx: MatchContext, x: Value, xs: Value, xzp: Value, w: Value, ws: Value, wzp: Value, ys: Value,
                 yzp: Value, conv: Node, b: Value | None = None) -> None:
    if x.dtype != DType.UINT8 or w.dtype != DType.INT8:
        raise MatchFailure(f"activations {x.dtype} and weights {w.dtype}; the int8 kernel takes uint8 x int8")
    if yzp.dtype != DType.UINT8:
        raise MatchFailure(f"the output is {yzp.dtype}, not uint8")
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) or w.shape is None:
        raise MatchFailure("only 2-D convs with a static channel count are blocked")
    check_int8_conv_attrs(conv)
    if np.any(wzp.numpy() != 0):
        raise MatchFailure("the weights' zero point is not 0 (kiln's int8 kernel takes symmetric weights)")
    if xs.numpy().size != 1 or ys.numpy().size != 1 or xzp.numpy().size != 1 or yzp.numpy().size != 1:
        raise MatchFailure("activation scales and zero points must be per tensor")
    if ws.numpy().size not in (1, w.shape[0]):
        raise MatchFailure("the weight scale is neither per tensor nor per output channel")
    folded = _qconv_bias(w.numpy(), b.numpy() if b is not None else None, int(xzp.numpy().reshape(())))
    if np.abs(folded).max(initial=0) >= 2**31:
        raise MatchFailure("the bias with the zero point folded in does not fit int32")


def _qconv_bias(w: np.ndarray, b: np.ndarray | None, x_zero_point: int) -> np.ndarray:
    """int64 ``b - x_zp * sum(w[k])``: the kernel sums X W over input padded with the zero point."""
    folded = -x_zero_point * w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1)
    return folded + (b.astype(np.int64) if b is not None else 0)


def _qconv_rewrite(op, x, xs, xzp, w, ws, wzp, ys, yzp, conv, b=None):
    from kiln.ir.kiln_ops import pack_qconv_weight

    wv = w.numpy()
    k = wv.shape[0]
    kp = _padded(k, INT8_BLOCK)
    x_zp = int(xzp.numpy().reshape(()))
    bias = np.zeros(kp, np.int32)
    bias[:k] = _qconv_bias(wv, b.numpy() if b is not None else None, x_zp)
    scale = np.zeros(kp, np.float32)  # padded lanes: 0, so they hold the zero point (finite)
    scale[:k] = (np.float32(xs.numpy().reshape(())) * ws.numpy().astype(np.float32).reshape(-1)
                 / np.float32(ys.numpy().reshape(()))) * np.ones(k, np.float32)
    attrs = {"kernel_shape": list(wv.shape[2:]), "x_zero_point": x_zp,
             "y_zero_point": int(yzp.numpy().reshape(()))}
    for name in ("pads", "strides"):
        if conv.attr(name):
            attrs[name] = list(conv.attr(name))
    y = op.kiln.QBlockedConv(op.kiln.ToBlocked(x, block=INT8_BLOCK), op.constant(pack_qconv_weight(wv), f"{w.name}_packed"),
                             op.constant(bias, f"{w.name}_bias"), op.constant(scale, f"{w.name}_scale"), **attrs)
    return op.kiln.FromBlocked(y, channels=k if k % INT8_BLOCK else 0)


def _qconv_example() -> Graph:
    rng = _rng()

    def build(op, x):  # 20 -> 24 channels (both padded), per-channel weight scales, stride 2
        q = op.QuantizeLinear(x, op.constant(np.float32(0.02)), op.constant(np.uint8(120)))
        # 7-bit weights: on x86 without VNNI, onnxruntime's u8 x s8 kernels (vpmaddubsw) saturate the
        # int16 sum of two products, measured 3.1 (62 output steps) off the exact result with full-range
        # weights on an AVX2-only AMD EPYC. Within [-64, 63] no pair can saturate, so the oracle is exact
        # on every x86 CPU (the range onnxruntime's own quantizer picks there, reduce_range).
        w = rng.integers(-64, 64, (24, 20, 3, 3)).astype(np.int8)
        y = op.QLinearConv(q, op.constant(np.float32(0.02)), op.constant(np.uint8(120)), op.constant(w),
                           op.constant((rng.random(24) * 0.01 + 0.001).astype(np.float32)),
                           op.constant(np.zeros(24, np.int8)), op.constant(np.float32(0.05)),
                           op.constant(np.uint8(100)), op.constant(rng.integers(-3000, 3000, 24).astype(np.int32)),
                           pads=[1, 1, 1, 1], strides=[2, 2])
        return op.DequantizeLinear(y, op.constant(np.float32(0.05)), op.constant(np.uint8(100)))

    return example_graph("qlinearconv_blocked", {"x": (DType.FLOAT32, (1, 20, 9, 9))}, build, opset=21)


# Its example dequantizes the output: the tolerance is one output quantization step (0.05), for
# products that float32 rounds to the other side of a half.
QLINEARCONV_BLOCKED = RewriteRule(
    "qlinearconv-blocked", _qconv_pattern, _qconv_rewrite, check=_qconv_check, example=_qconv_example, rtol=0,
    atol=0.0501, description="A QLinearConv (uint8 x symmetric int8) becomes kiln::QBlockedConv in NCHW16c, "
                             "the layout of the VNNI int8 kernel, with its weight packed and the input zero "
                             "point folded into the bias.")


def example_qconv(op, xq: Value, rng: np.random.Generator, *, y_zero_point: int) -> Value:
    """For rule examples: a 3x3 int8 conv from 24 to 20 channels (both padded to 32) on blocked ``xq``
    (input zero point 120), with per-channel requantize scales."""
    from kiln.ir.kiln_ops import pack_qconv_weight

    w = pack_qconv_weight(rng.integers(-127, 128, (20, 24, 3, 3)).astype(np.int8))
    s = np.zeros(32, np.float32)
    s[:20] = rng.random(20).astype(np.float32) * 2e-3 + 1e-4
    return op.kiln.QBlockedConv(xq, op.constant(w), op.constant(rng.integers(-2000, 2000, 32).astype(np.int32)),
                                op.constant(s), pads=[1, 1, 1, 1], kernel_shape=[3, 3], x_zero_point=120,
                                y_zero_point=y_zero_point)


def _dequantized_qconv(op, x, w, b, s, sc, zc):
    """``DequantizeLinear(QBlockedConv(x, w, b, s), sc, zc)``: the int8 conv a write-back rule extends."""
    return op.DequantizeLinear(op.kiln.QBlockedConv(x, w, b, s, _name="conv"), sc, zc, _name="dq_c")


def _check_qconv_output(zc: Value, conv: Node) -> None:
    if int(zc.numpy().reshape(())) != conv.attr("y_zero_point", 0):
        raise MatchFailure("the conv's output is dequantized with another zero point than its own")


def _qresidual_rule(add: str, relu: bool, conv_first: bool) -> RewriteRule:
    """``Q(Relu?(DQ(QBlockedConv(...)) + DQ(z)))`` folds into the conv: the residual add of a QDQ model."""

    def pattern(op, x, w, b, s, z, sc=Const(), zc=Const(), sr=Const(), zr=Const(), sy=Const(), zy=Const()):
        c = _dequantized_qconv(op, x, w, b, s, sc, zc)
        r = op.DequantizeLinear(z, sr, zr, _name="dq_z", _shared=True)  # z also feeds the next conv
        total = getattr(op, add)(*((c, r) if conv_first else (r, c)))
        return op.QuantizeLinear(op.Relu(total) if relu else total, sy, zy, _name="q")

    def check(ctx: MatchContext, z: Value, sc: Value, zc: Value, sr: Value, zr: Value, sy: Value, zy: Value,
              conv: Node) -> None:
        if any(v.numpy().size != 1 for v in (sc, zc, sr, zr, sy, zy)):
            raise MatchFailure("scales and zero points must be per tensor")
        if any(v.dtype != DType.UINT8 for v in (zc, zr, zy)) or z.dtype != DType.UINT8:
            raise MatchFailure("the residual is not uint8")
        _check_qconv_output(zc, conv)
        if conv.attr("activation"):  # its write-back would apply the activation after the add, not before
            raise MatchFailure("the conv already ends in an activation")
        out = conv.outputs[0]
        if z.shape is None or out.shape is None or tuple(z.shape) != tuple(out.shape):
            raise MatchFailure(f"the residual {z.type_str()} does not have the conv's blocked shape")

    def rewrite(op, x, w, b, s, z, sc, zc, sr, zr, sy, zy, conv):
        def f(v: Value) -> float:
            return float(v.numpy().reshape(()))

        attrs = copy_attrs(conv)
        attrs.update(y_scale=f(sc), z_scale=f(sr), z_zero_point=int(f(zr)), out_scale=f(sy),
                     out_zero_point=int(f(zy)), out_relu=int(relu))
        return op.kiln.QBlockedConv(x, w, b, s, z, **attrs)

    def example() -> Graph:
        rng = _rng()

        def build(op, x, r):  # a 3x3 int8 conv (24 -> 20 channels, padded) plus a uint8 residual
            xq = op.kiln.ToBlocked(op.QuantizeLinear(x, op.constant(np.float32(0.02)), op.constant(np.uint8(120))),
                                   block=INT8_BLOCK)
            rq = op.kiln.ToBlocked(op.QuantizeLinear(r, op.constant(np.float32(0.04)), op.constant(np.uint8(30))),
                                   block=INT8_BLOCK)
            c = example_qconv(op, xq, rng, y_zero_point=90)
            dc = op.DequantizeLinear(c, op.constant(np.float32(0.05)), op.constant(np.uint8(90)))
            dr = op.DequantizeLinear(rq, op.constant(np.float32(0.04)), op.constant(np.uint8(30)))
            total = getattr(op, add)(*((dc, dr) if conv_first else (dr, dc)))
            y = op.QuantizeLinear(op.Relu(total) if relu else total, op.constant(np.float32(0.06)),
                                  op.constant(np.uint8(0 if relu else 100)))
            return op.DequantizeLinear(op.kiln.FromBlocked(y, channels=20), op.constant(np.float32(0.06)),
                                       op.constant(np.uint8(0 if relu else 100)))

        inputs = {"x": (DType.FLOAT32, (1, 24, 7, 7)), "r": (DType.FLOAT32, (1, 32, 7, 7))}
        return example_graph(f"qresidual_{add.lower()}", inputs, build, opset=21)

    order = "" if add == "Add" or conv_first else "-swapped"
    name = f"qblocked-conv-{add.lower()}{'-relu' if relu else ''}{order}"
    # one output step (0.06): onnxruntime runs the unfused QDQ add as its own QLinearAdd
    return RewriteRule(name, pattern, rewrite, check=check, example=example, rtol=0, atol=0.0601,
                       description=f"A QDQ residual {add}{' and ReLU' if relu else ''} after an int8 conv runs in "
                                   "the conv's write-back, in the same float32 steps.")


QRESIDUAL_RULES = [_qresidual_rule(add, relu, first) for add in ("Add", "Sum") for relu in (True, False)
                   for first in ((True,) if add == "Add" else (True, False))]


def _qactivation_rule(form: str) -> RewriteRule:
    """``Q(act(DQ(QBlockedConv(...))))`` folds into the conv: an activation between two int8 convs."""
    make_act, params_of = ACTIVATION_PATTERNS[form]
    act_name = form.split("-")[0]

    def pattern(op, x, w, b, s, sc=Const(), zc=Const(), sy=Const(), zy=Const()):
        return op.QuantizeLinear(make_act(op, _dequantized_qconv(op, x, w, b, s, sc, zc)), sy, zy, _name="q")

    def check(ctx: MatchContext, sc: Value, zc: Value, sy: Value, zy: Value, conv: Node, act: Node,
              **bound: Any) -> None:
        if any(v.numpy().size != 1 for v in (sc, zc, sy, zy)):
            raise MatchFailure("scales and zero points must be per tensor")
        if zc.dtype != DType.UINT8 or zy.dtype != DType.UINT8:
            raise MatchFailure("the activation's input or output is not uint8")
        _check_qconv_output(zc, conv)
        if conv.input(4) is not None or conv.attr("activation") or conv.attr("out_relu", 0):
            raise MatchFailure("the conv already has a write-back step")
        params_of(act, **bound)

    def rewrite(op, x, w, b, s, sc, sy, zy, conv, act, **bound):
        attrs = copy_attrs(conv)
        attrs.update(y_scale=float(sc.numpy().reshape(())), out_scale=float(sy.numpy().reshape(())),
                     out_zero_point=int(zy.numpy().reshape(())), activation=act_name,
                     activation_params=list(params_of(act, **bound)))
        return op.kiln.QBlockedConv(x, w, b, s, **attrs)

    def example() -> Graph:
        rng = _rng()

        def build(op, x):  # a 3x3 int8 conv (24 -> 20 channels, padded), then the activation and a requantize
            xq = op.kiln.ToBlocked(op.QuantizeLinear(x, op.constant(np.float32(0.02)), op.constant(np.uint8(120))),
                                   block=INT8_BLOCK)
            c = example_qconv(op, xq, rng, y_zero_point=128)
            y = example_activation(op, op.DequantizeLinear(c, op.constant(np.float32(0.05)), op.constant(np.uint8(128))),
                                   form)
            q = op.QuantizeLinear(y, op.constant(np.float32(0.03)), op.constant(np.uint8(40)))
            return op.DequantizeLinear(op.kiln.FromBlocked(q, channels=20), op.constant(np.float32(0.03)),
                                       op.constant(np.uint8(40)))

        return example_graph(f"qactivation_{form.lower()}", {"x": (DType.FLOAT32, (1, 24, 7, 7))}, build, opset=21)

    # one output step (0.03): float32 activations may round a value at a half step either way
    return RewriteRule(f"qblocked-conv-{form.lower()}", pattern, rewrite, check=check, example=example, rtol=0,
                       atol=0.0301, description=f"A QDQ {form.replace('-', ' written as ')} after an int8 conv runs "
                                                "in the conv's write-back, in the same float32 steps.")


def _per_output(v: np.ndarray, dtype: type, *, n: int, npad: int) -> np.ndarray:
    """A scale, bias or sum per output column (or one for all), zero-padded to ``npad`` outputs."""
    out = np.zeros(npad, dtype)
    out[:n] = np.broadcast_to(v.reshape(-1), (n,))
    return out


def _qdense_rule(bias: bool) -> RewriteRule:
    """``MatMulInteger(x, w) * s (+ b)`` (what ``qdq-gemm`` makes) becomes the VNNI ``kiln::QDense``."""

    def scaled(op, x, w, xzp, s):
        return op.Mul(op.Cast(op.MatMulInteger(x, w, xzp, _name="mm"), _name="cast"), s, _name="mul")

    if bias:
        def pattern(op, x, w=Const(), xzp=Const(), s=Const(), b=Const()):
            return op.Add(scaled(op, x, w, xzp, s), b)
    else:
        def pattern(op, x, w=Const(), xzp=Const(), s=Const()):
            return scaled(op, x, w, xzp, s)

    def check(ctx: MatchContext, x: Value, w: Value, xzp: Value, s: Value, mm: Node, cast: Node, mul: Node,
              b: Value | None = None) -> None:
        users = mul.outputs[0].users
        if not bias and len(users) == 1 and users[0].op_type == "Add" and any(v.is_constant for v in users[0].inputs):
            raise MatchFailure("a constant bias add follows: qdense-vnni-bias takes it")
        if x.dtype != DType.UINT8 or w.dtype != DType.INT8:
            raise MatchFailure(f"activations {x.dtype}, weights {w.dtype}: the kernel takes uint8 x int8")
        if x.shape is None or len(x.shape) != 2 or not isinstance(x.shape[1], int) or w.shape is None:
            raise MatchFailure("the input is not 2-D with a static width")
        k, n = w.shape
        if k % 4:
            raise MatchFailure(f"the reduction ({k}) is not a multiple of 4")
        if cast.attr("to") != 1 or len([v for v in mm.inputs if v is not None]) != 3 or xzp.numpy().size != 1:
            raise MatchFailure("not a float32 cast of MatMulInteger with one input zero point")
        if any(v is not None and v.numpy().size not in (1, n) for v in (s, b)):
            raise MatchFailure("the scale or bias is not per output column")
        if b is not None and b.numpy().ndim > 1:
            raise MatchFailure("the bias is not a vector")

    def rewrite(op, x, w, xzp, s, b=None):
        from kiln.ir.kiln_ops import pack_qdense_weight

        wv = w.numpy()
        k, n = wv.shape
        npad = _padded(n, INT8_BLOCK)

        padded = functools.partial(_per_output, n=n, npad=npad)

        zp = int(xzp.numpy().reshape(()))
        c = padded(-zp * wv.astype(np.int64).sum(axis=0), np.int32)
        inputs = [x, op.constant(pack_qdense_weight(np.ascontiguousarray(wv.T)), f"{w.name}_packed"),
                  op.constant(c, f"{w.name}_zero_point_term"), op.constant(padded(s.numpy(), np.float32), "dense_scale")]
        if b is not None:
            inputs.append(op.constant(padded(b.numpy(), np.float32), "dense_bias"))
        return op.kiln.QDense(*inputs, n=n)

    def example() -> Graph:
        rng = _rng()

        def build(op, x):  # 40 -> 20 outputs (padded to 32), per-column scales
            xq = op.QuantizeLinear(x, op.constant(np.float32(0.05)), op.constant(np.uint8(100)))
            acc = op.MatMulInteger(xq, op.constant(rng.integers(-127, 128, (40, 20)).astype(np.int8)),
                                   op.constant(np.uint8(100)))
            y = op.Mul(op.Cast(acc, to=1), op.constant((rng.random(20) * 1e-3).astype(np.float32)))
            return op.Add(y, op.constant(rng.standard_normal(20).astype(np.float32))) if bias else y

        return example_graph(f"qdense{'_bias' if bias else ''}", {"x": (DType.FLOAT32, (2, 40))}, build, opset=17)

    return RewriteRule(f"qdense-vnni{'-bias' if bias else ''}", pattern, rewrite, check=check, example=example,
                       priority=1 if bias else 0, rtol=1e-6, atol=1e-6,
                       description="A scaled MatMulInteger (an int8 Gemm of a QDQ model) becomes kiln::QDense, "
                                   "the VNNI dense kernel, with its weight packed and the zero point folded.")


QDENSE_RULES = [_qdense_rule(True), _qdense_rule(False)]


def _dyn_qdense_rule(bias: bool) -> RewriteRule:
    """onnxruntime's dynamic int8 matmul, ``DynamicQuantizeLinear`` then ``MatMulInteger`` scaled by the
    product of the two scales (what ``quantize_dynamic`` writes, and what kiln's ``quantize-dynamic``
    pass writes), becomes ``kiln::DynQDense``: one kernel that quantizes its input and multiplies."""

    def scaled(op, x, w, wzp, ws):
        xq, xs, xzp = op.DynamicQuantizeLinear(x, _outputs=3, _shared=True, _name="dql")
        acc = op.MatMulInteger(xq, w, xzp, Optional(wzp), _name="mm")
        return op.Mul(op.Cast(acc, _name="cast"), op.Mul(xs, ws, _name="smul"), _name="mul")

    if bias:
        def pattern(op, x, w=Const(), wzp=Const(), ws=Const(), b=Const()):
            return op.Add(scaled(op, x, w, wzp, ws), b)
    else:
        def pattern(op, x, w=Const(), wzp=Const(), ws=Const()):
            return scaled(op, x, w, wzp, ws)

    def check(ctx: MatchContext, x: Value, w: Value, ws: Value, cast: Node, mul: Node, wzp: Value | None = None,
              b: Value | None = None) -> None:
        users = mul.outputs[0].users
        if not bias and len(users) == 1 and users[0].op_type == "Add" and any(v.is_constant for v in users[0].inputs):
            raise MatchFailure("a constant bias add follows: dyn-qdense-bias takes it")
        if x.dtype != DType.FLOAT32 or w.dtype != DType.INT8:
            raise MatchFailure(f"input {x.dtype}, weights {w.dtype}: the kernel takes float32 x int8")
        if w.shape is None or len(w.shape) != 2 or x.shape is None or len(x.shape) < 2:
            raise MatchFailure("the weights are not 2-D, or the input not at least 2-D")
        k, n = w.shape
        if k % 4:
            raise MatchFailure(f"the reduction ({k}) is not a multiple of 4")
        if wzp is not None and np.any(wzp.numpy()):
            raise MatchFailure("the weights' zero point is not 0 (the kernel takes symmetric int8 weights)")
        if cast.attr("to") != 1:
            raise MatchFailure("the int32 sums are not cast to float32")
        if ws.numpy().size not in (1, n) or (b is not None and (b.numpy().size not in (1, n) or b.numpy().ndim > 1)):
            raise MatchFailure("the weight scale or the bias is not per output column")

    def rewrite(op, x, w, ws, wzp=None, b=None):
        from kiln.ir.kiln_ops import pack_qdense_weight

        wv = w.numpy()
        k, n = wv.shape
        npad = _padded(n, INT8_BLOCK)

        padded = functools.partial(_per_output, n=n, npad=npad)

        inputs = [x, op.constant(pack_qdense_weight(np.ascontiguousarray(wv.T)), f"{w.name}_packed"),
                  op.constant(padded(wv.astype(np.int64).sum(axis=0), np.int32), f"{w.name}_sum"),
                  op.constant(padded(ws.numpy(), np.float32), f"{w.name}_scale")]
        if b is not None:
            inputs.append(op.constant(padded(b.numpy(), np.float32), "dense_bias"))
        return op.kiln.DynQDense(*inputs, n=n)

    def example() -> Graph:
        rng = _rng()

        def build(op, x):  # 40 -> 20 outputs (padded to 32), per-column weight scales, shared input quantization
            xq, xs, xzp = op.DynamicQuantizeLinear(x, _outputs=3)
            outs = []
            for j in range(2):
                acc = op.MatMulInteger(xq, op.constant(rng.integers(-127, 128, (40, 20)).astype(np.int8)), xzp,
                                       op.constant(np.zeros(20, np.int8)))
                y = op.Mul(op.Cast(acc, to=1), op.Mul(xs, op.constant((rng.random(20) * 1e-2).astype(np.float32))))
                outs.append(op.Add(y, op.constant(rng.standard_normal(20).astype(np.float32))) if bias else y)
            return op.Add(*outs)

        return example_graph(f"dyn_qdense{'_bias' if bias else ''}", {"x": (DType.FLOAT32, (2, 3, 40))}, build,
                             opset=17)

    return RewriteRule(f"dyn-qdense{'-bias' if bias else ''}", pattern, rewrite, check=check, example=example,
                       priority=1 if bias else 0, rtol=1e-6, atol=1e-5,
                       description="A dynamically quantized matmul (DynamicQuantizeLinear, MatMulInteger and its "
                                   "scales) becomes kiln::DynQDense, which quantizes its input and multiplies "
                                   "in one kernel.")


DYN_QDENSE_RULES = [_dyn_qdense_rule(True), _dyn_qdense_rule(False)]

QACTIVATION_RULES = [_qactivation_rule(form) for form in ("SiLU", "HardSwish", "HardSwish-HardSigmoid", "Sigmoid",
                                                           "HardSigmoid", "LeakyRelu", "Clip", "Tanh")]


# --------------------------------------------------------------------------- moving transforms


def _unblocking(v: Value) -> Node | None:
    """The ``FromBlocked`` node producing ``v``, or None."""
    p = v.producer
    return p if p is not None and p.domain == "kiln" and p.op_type == "FromBlocked" else None


def _is_padded(fb: Node) -> bool:
    t = fb.input(0)
    channels = fb.attr("channels", 0)
    return bool(channels) and t is not None and t.shape is not None and channels != t.shape[1] * t.shape[-1]


def _per_channel(c: Value, x: Value) -> np.ndarray | None:
    """A constant that varies only along NCHW ``x``'s channels, as its length-C vector in x's dtype."""
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) or c.dtype != x.dtype:
        return None
    per = per_channel(c.numpy(), x.shape[1], 4)
    return None if per is None else per.astype(x.dtype.numpy)


def _check_movable(x: Value, op_type: str) -> None:
    fb = _unblocking(x)
    if fb is None:
        raise MatchFailure(f"%{x.name} is not unblocked by kiln::FromBlocked")
    if op_type in UNSAFE_ON_PADDING and _is_padded(fb):
        raise MatchFailure(f"{op_type} could make the padded lanes of %{x.name} non-finite")


# The FromBlocked stays where it is for its other readers, so it is checked, not matched: a
# pattern would claim it as part of the match.
def _blocked_unary_rule(op_type: str) -> RewriteRule:
    def pattern(op, x, lo=Const(), hi=Const()):
        return getattr(op, op_type)(x, Optional(lo), Optional(hi), _name="act")

    def check(ctx: MatchContext, x: Value, lo: Value | None = None, hi: Value | None = None) -> None:
        if op_type in QUANT_OPS and any(v is not None and v.numpy().size != 1 for v in (lo, hi)):
            raise MatchFailure("the scale or zero point is per axis, not per tensor")
        _check_movable(x, op_type)

    def rewrite(op, x, act, lo=None, hi=None):
        fb = _unblocking(x)
        inputs = [fb.input(0)] + ([lo, hi] if lo is not None or hi is not None else [])
        return op.kiln.FromBlocked(getattr(op, op_type)(*inputs, **copy_attrs(act)), **copy_attrs(fb))

    def example() -> Graph:
        def build(op, x):
            y = op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4))
            if op_type == "Clip":
                return op.Clip(y, op.constant(np.array(-0.5, np.float32)), op.constant(np.array(0.5, np.float32)))
            if op_type in QUANT_OPS:  # x -> uint8 (blocked) -> float: both directions on blocked data
                scale, zp = op.constant(np.float32(0.05)), op.constant(np.uint8(120))
                q = op.kiln.FromBlocked(op.QuantizeLinear(op.kiln.ToBlocked(x, block=4), scale, zp))
                return op.DequantizeLinear(q, scale, zp) if op_type == "DequantizeLinear" \
                    else op.QuantizeLinear(y, scale, zp)
            return getattr(op, op_type)(y)

        return example_graph(f"blocked_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 8, 3, 3))}, build)

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"{op_type} runs on blocked data: the unblocking moves after it.")


def _blocked_binary_rule(op_type: str) -> RewriteRule:
    def pattern(op, x, other):
        return getattr(op, op_type)(x, other, _name="binary")

    def check(ctx: MatchContext, x: Value, other: Value) -> None:
        _check_movable(x, op_type)
        t, partner = _unblocking(x).input(0), _unblocking(other)
        if t.shape is None:  # made earlier in this sweep; the next sweep sees it typed
            raise MatchFailure(f"the blocked shape behind %{x.name} is not inferred yet")
        if partner is not None and partner.input(0).shape == t.shape and t.shape is not None \
                and partner.attrs == _unblocking(x).attrs:
            _check_movable(other, op_type)
            return
        if other.is_constant and (other.numpy().size == 1 or _per_channel(other, x) is not None):
            return
        raise MatchFailure(f"the other operand %{other.name} is neither a scalar or per-channel constant nor "
                           "unblocked from the same blocked shape")

    def rewrite(op, x, other, binary):
        fb, partner = _unblocking(x), _unblocking(other)
        t = fb.input(0)
        if partner is not None and partner.input(0).shape == t.shape:
            rhs = partner.input(0)
        elif other.numpy().size == 1:
            rhs = other
        else:  # per channel [C] -> blocked [C/b, 1, 1, b]; padded lanes get 1 (finite for any op here)
            per, b = _per_channel(other, x), t.shape[-1]
            full = np.ones(t.shape[1] * b, per.dtype)
            full[:len(per)] = per
            rhs = op.constant(np.ascontiguousarray(full.reshape(t.shape[1], b)[:, None, None, :]), f"{other.name}_blocked")
        return op.kiln.FromBlocked(getattr(op, op_type)(t, rhs), **copy_attrs(fb))

    def example() -> Graph:
        c = 8 if op_type in UNSAFE_ON_PADDING else 6  # 6 channels: blocks of 4, the second padded

        def build(op, x, y):
            xb = op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4), channels=c)
            yb = op.kiln.FromBlocked(op.kiln.ToBlocked(y, block=4), channels=c)
            per_channel = op.constant(np.linspace(0.5, 2, c, dtype=np.float32).reshape(c, 1, 1))
            return [getattr(op, op_type)(xb, yb), getattr(op, op_type)(xb, op.constant(np.array(1.5, np.float32))),
                    getattr(op, op_type)(xb, per_channel)]

        shape = (DType.FLOAT32, (1, c, 3, 3))
        return example_graph(f"blocked_{op_type.lower()}", {"x": shape, "y": shape}, build)

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"{op_type} of blocked data (with a scalar, or another blocked tensor of the same "
                                   "shape) runs blocked.")


def _concat_pattern(op, first):
    return op.Concat(first, _name="concat", _allow_extra_inputs=True)


def _concat_check(ctx: MatchContext, concat: Node) -> None:
    axis = concat.attr("axis", 0)
    rank = concat.outputs[0].rank
    if rank is None or normalize_axis(axis, rank) != 1:
        raise MatchFailure(f"Concat on axis {axis}, not the channels")
    blocks = set()
    for v in concat.inputs:
        fb = _unblocking(v) if v is not None else None
        if fb is None:
            raise MatchFailure(f"input %{v.name if v else '?'} is not unblocked by kiln::FromBlocked")
        if _is_padded(fb):
            raise MatchFailure(f"input %{v.name} has padded lanes")
        blocks.add(fb.input(0).shape[-1] if fb.input(0).shape else None)
    if len(blocks) != 1 or None in blocks:
        raise MatchFailure(f"inputs are blocked differently: {sorted(map(str, blocks))}")


def _concat_rewrite(op, first, concat):
    return op.kiln.FromBlocked(op.Concat(*[_unblocking(v).input(0) for v in concat.inputs], axis=1))


def _concat_example() -> Graph:
    def build(op, x, y):
        return op.Concat(op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4)),
                         op.kiln.FromBlocked(op.kiln.ToBlocked(y, block=4)), axis=1)

    return example_graph("blocked_concat", {"x": (DType.FLOAT32, (1, 8, 3, 3)), "y": (DType.FLOAT32, (1, 4, 3, 3))},
                         build)


BLOCKED_CONCAT = RewriteRule(
    "blocked-concat", _concat_pattern, _concat_rewrite, check=_concat_check, example=_concat_example,
    description="A channel Concat of blocked tensors (no padded lanes, one block size) concatenates their blocks.",
)


def _check_2d_pooling(x: Value) -> None:
    if x.rank != 4:
        raise MatchFailure("only 2-D pooling runs blocked")


def _blocked_pool_rule(op_type: str) -> RewriteRule:
    """2-D pooling of blocked data is 3-D pooling with a window of 1 over the lanes."""

    def pattern(op, x):
        return getattr(op, op_type)(x, _name="pool")

    def check(ctx: MatchContext, x: Value, pool: Node) -> None:
        _check_2d_pooling(x)
        if pool.attr("auto_pad", "NOTSET") not in ("NOTSET", "") or len([o for o in pool.outputs if o.name]) > 1:
            raise MatchFailure("the pooling uses auto_pad or returns indices")
        _check_movable(x, op_type)

    def rewrite(op, x, pool):
        fb = _unblocking(x)
        k = list(pool.attr("kernel_shape"))
        strides = list(pool.attr("strides", ()) or [1, 1])
        dil = list(pool.attr("dilations", ()) or [1, 1])
        pads = list(pool.attr("pads", ()) or [0, 0, 0, 0])
        attrs = copy_attrs(pool, "auto_pad", kernel_shape=k + [1], strides=strides + [1],
                           pads=[pads[0], pads[1], 0, pads[2], pads[3], 0])
        if op_type == "MaxPool" or pool.attr("dilations") is not None:
            attrs["dilations"] = dil + [1]
        return op.kiln.FromBlocked(getattr(op, op_type)(fb.input(0), **attrs), **copy_attrs(fb))

    def example() -> Graph:
        def build(op, x):
            y = op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4))
            return getattr(op, op_type)(y, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1])

        return example_graph(f"blocked_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 8, 7, 6))}, build)

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"{op_type} of blocked data runs blocked: a 3-D window of 1 over the lanes.")


def _blocked_global_pool_rule(op_type: str, reduce: str) -> RewriteRule:
    def pattern(op, x):
        return getattr(op, op_type)(x)

    def check(ctx: MatchContext, x: Value) -> None:
        _check_2d_pooling(x)
        _check_movable(x, op_type)

    def rewrite(op, x):
        fb = _unblocking(x)
        if op.opset >= 18:
            y = getattr(op, reduce)(fb.input(0), op.constant(np.array([2, 3], np.int64)), keepdims=1)
        else:
            y = getattr(op, reduce)(fb.input(0), axes=[2, 3], keepdims=1)
        return op.kiln.FromBlocked(y, **copy_attrs(fb))

    def example() -> Graph:
        return example_graph(f"blocked_{op_type.lower()}", {"x": (DType.FLOAT32, (1, 8, 5, 3))},
                             lambda op, x: getattr(op, op_type)(op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4))))

    return RewriteRule(f"blocked-{op_type.lower()}", pattern, rewrite, check=check, example=example,
                       description=f"{op_type} of blocked data is a {reduce} over its spatial axes, blocked.")


def _gemm_kn_rule(core: str) -> RewriteRule:
    """A Gemm by a constant, transposed B reads B as ``[K, N]`` instead: rows of N are what a
    vector holds, so the dense kernel loads them whole."""

    def pattern(op, a, c, b=Const()):
        if core == "gemm":
            return op.Gemm(a, b, Optional(c), _name="gemm", transB=1)
        return op.kiln.FusedGemm(a, b, Optional(c), _name="gemm", transB=1)

    def rewrite(op, a, b, gemm, c=None):
        kn = op.constant(np.ascontiguousarray(b.numpy().T), f"{b.name}_kn")
        attrs = copy_attrs(gemm, transB=0)
        return (op.Gemm(a, kn, c, **attrs) if core == "gemm" else op.kiln.FusedGemm(a, kn, c, **attrs))

    def example() -> Graph:
        rng = _rng()

        def build(op, a):
            b = op.constant(rng.standard_normal((6, 5)).astype(np.float32))
            c = op.constant(rng.standard_normal(6).astype(np.float32))
            if core == "gemm":
                return op.Gemm(a, b, c, transB=1, alpha=0.5)
            return op.kiln.FusedGemm(a, b, c, transB=1, activation="Relu")

        return example_graph(f"{core}_kn", {"a": (DType.FLOAT32, (3, 5))}, build)

    return RewriteRule(f"{core}-weight-kn", pattern, rewrite, example=example,
                       description=f"{core} by a constant B^T stores B as [K, N], the dense kernel's layout.")


def _dense_pad_rule(core: str, block: int) -> RewriteRule:
    """A product by a constant ``[K, N]`` whose N the vector width does not divide computes N
    rounded up (zero columns) and slices the result: the kernel's lanes then need no guard,
    which would stop their vectorisation."""

    if core == "matmul":
        def pattern(op, a, b=Const()):
            return op.MatMul(a, b, _name="mm")
    else:
        def pattern(op, a, b=Const(), c=Const()):
            if core == "gemm":
                return op.Gemm(a, b, Optional(c), _name="mm", transB=lambda t: not t)
            return op.kiln.FusedGemm(a, b, Optional(c), _name="mm", transB=lambda t: not t)

    def check(ctx: MatchContext, a: Value, b: Value, mm: Node, c: Value | None = None) -> None:
        if b.rank != 2 or b.dtype != DType.FLOAT32 or mm.attr("transA", 0):
            raise MatchFailure("B is not a 2-D float32 [K, N] constant (or A is transposed)")
        n = b.shape[1]
        if n % block == 0 or n < block:
            raise MatchFailure(f"N = {n} needs no padding")
        if c is not None and c.shape and c.shape[-1] != 1 and c.shape[-1] != n:
            raise MatchFailure("C does not broadcast along N")

    def rewrite(op, a, b, mm, c=None):
        w = b.numpy()
        n = w.shape[1]
        padded = _padded(n, block)
        wp = np.zeros((w.shape[0], padded), w.dtype)
        wp[:, :n] = w
        bp = op.constant(wp, f"{b.name}_padded")
        if core == "matmul":
            y = op.MatMul(a, bp)
        else:
            cp = c
            if c is not None and c.shape and c.shape[-1] == n:
                cv = c.numpy()
                full = np.zeros(cv.shape[:-1] + (padded,), cv.dtype)
                full[..., :n] = cv
                cp = op.constant(full, f"{c.name}_padded")
            y = (op.Gemm(a, bp, cp, **copy_attrs(mm)) if core == "gemm"
                 else op.kiln.FusedGemm(a, bp, cp, **copy_attrs(mm)))
        def i64(v: int) -> Value:
            return op.constant(np.array([v], np.int64))

        if op.opset >= 10:
            return op.Slice(y, i64(0), i64(n), i64(-1))
        return op.Slice(y, starts=[0], ends=[n], axes=[a.rank - 1 if core == "matmul" else 1])

    def example() -> Graph:
        rng = _rng()

        def build(op, x):
            b = op.constant(rng.standard_normal((5, 21)).astype(np.float32))
            if core == "matmul":
                return op.MatMul(x, b)
            c = op.constant(rng.standard_normal(21).astype(np.float32))
            if core == "gemm":
                return op.Gemm(op.Reshape(x, op.constant(np.array([6, 5], np.int64))), b, c)
            return op.kiln.FusedGemm(op.Reshape(x, op.constant(np.array([6, 5], np.int64))), b, c, activation="Relu")

        return example_graph(f"{core}_pad_n", {"x": (DType.FLOAT32, (2, 3, 5))}, build)

    return RewriteRule(f"{core}-pad-n", pattern, rewrite, check=check, example=example,
                       description=f"{core} by a constant [K, N] computes N rounded up to whole vectors, then slices.")


def _unblock_reblock_pattern(op, t):
    return op.kiln.ToBlocked(op.kiln.FromBlocked(t), _name="reblock")


def _unblock_reblock_check(ctx: MatchContext, t: Value, reblock: Node) -> None:
    if t.shape is None or t.shape[-1] != reblock.attr("block", DEFAULT_BLOCK):
        raise MatchFailure(f"blocked as {t.shape[-1] if t.shape else '?'} lanes, reblocked as "
                           f"{reblock.attr('block', DEFAULT_BLOCK)}")


def _unblock_reblock_example() -> Graph:
    def build(op, x):
        y = op.Relu(op.kiln.FromBlocked(op.kiln.ToBlocked(x, block=4)))  # keeps the outer pair
        return op.kiln.FromBlocked(op.kiln.ToBlocked(op.kiln.FromBlocked(op.kiln.ToBlocked(y, block=4)), block=4))

    return example_graph("unblock_reblock", {"x": (DType.FLOAT32, (1, 8, 3, 3))}, build)


UNBLOCK_REBLOCK = RewriteRule(
    "unblock-reblock", _unblock_reblock_pattern, lambda op, t, reblock: t, check=_unblock_reblock_check,
    example=_unblock_reblock_example, description="Blocking what was just unblocked, with the same block, is a no-op.",
)

MOVE_RULES = [UNBLOCK_REBLOCK, BLOCKED_CONCAT, _blocked_pool_rule("MaxPool"), _blocked_pool_rule("AveragePool"),
              _blocked_global_pool_rule("GlobalAveragePool", "ReduceMean"),
              _blocked_global_pool_rule("GlobalMaxPool", "ReduceMax"), *(_blocked_unary_rule(o) for o in (*UNARY_OPS, *QUANT_OPS)),
              *(_blocked_binary_rule(o) for o in BINARY_OPS)]


#: rows of the dense kernel's register tile; a product whose row count it does not divide (ViT's 197
#: tokens) got 1-row tiles, which re-read the weights for every row (57-100 GFLOP/s, not about 200)
DENSE_ROW_TILE = 4
#: row counts below this keep their rows (the weights stay in cache for a few rows)
MIN_PADDED_ROWS = 16


def _dense_rows_rule(core: str) -> RewriteRule:
    """A product by a constant ``[K, N]`` whose static row count has no divisor of
    :data:`DENSE_ROW_TILE` computes zero rows up to one (padding the row axis that grows the rows
    least) and slices them off the result: exact, and the dense kernel keeps its row tile."""

    if core == "matmul":
        def pattern(op, a, b=Const()):
            return op.MatMul(a, b, _name="mm")
    else:
        def pattern(op, a, b=Const(), c=Const()):
            return op.kiln.FusedGemm(a, b, Optional(c), _name="mm")

    def check(ctx: MatchContext, a: Value, b: Value, mm: Node, c: Value | None = None) -> None:
        if b.rank != 2 or b.dtype != DType.FLOAT32 or mm.attr("transA", 0) or mm.attr("transB", 0):
            raise MatchFailure("B is not a 2-D float32 [K, N] constant (or an operand is transposed)")
        if a.shape is None or a.rank < 2 or not all(isinstance(d, int) for d in a.shape):
            raise MatchFailure("A's shape is not static")
        m = int(np.prod(a.shape[:-1]))
        if m < MIN_PADDED_ROWS or m % DENSE_ROW_TILE == 0:
            raise MatchFailure(f"M = {m} needs no padding")
        if c is not None and c.shape and (c.rank > 2 or (c.rank == 2 and c.shape[0] != 1)):
            raise MatchFailure("C varies along the rows")

    def rewrite(op, a, b, mm, c=None):
        rank = a.rank
        m = int(np.prod(a.shape[:-1]))

        def grown(axis: int) -> int:  # the axis's smallest size that makes the rows a multiple of the tile
            other = m // a.shape[axis]
            return next(r for r in range(a.shape[axis] + 1, a.shape[axis] + DENSE_ROW_TILE + 1)
                        if (other * r) % DENSE_ROW_TILE == 0)

        # the row axis that grows the rows least ([197, 1, K] pads its 197, not its 1)
        axis = min(range(rank - 1), key=lambda ax: (m // a.shape[ax] * grown(ax), -ax))
        rows = a.shape[axis]
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + axis] = grown(axis) - rows

        def i64(v: int) -> Value:
            return op.constant(np.array([v], np.int64))

        ap = op.Pad(a, op.constant(pads)) if op.opset >= 11 else op.Pad(a, pads=pads.tolist())
        y = op.MatMul(ap, b) if core == "matmul" else op.kiln.FusedGemm(ap, b, c, **copy_attrs(mm))
        if op.opset >= 10:
            return op.Slice(y, i64(0), i64(rows), i64(axis))
        return op.Slice(y, starts=[0], ends=[rows], axes=[axis])

    def example() -> Graph:
        rng = _rng()

        def build(op, x):  # 19 tokens: no divisor of 4
            b = op.constant(rng.standard_normal((20, 32)).astype(np.float32))
            if core == "matmul":
                return op.MatMul(x, b)
            return op.kiln.FusedGemm(x, b, op.constant(rng.standard_normal(32).astype(np.float32)),
                                     activation="Relu")

        return example_graph(f"{core}_rows", {"x": (DType.FLOAT32, (1, 19, 20))}, build)

    return RewriteRule(f"{core}-pad-rows", pattern, rewrite, check=check, example=example,
                       description=f"A {core.replace('-', ' ')} by a constant [K, N] whose row count has no divisor "
                                   f"of {DENSE_ROW_TILE} computes zero rows up to one, then slices them off.")


GEMM_RULES = [_gemm_kn_rule("gemm"), _gemm_kn_rule("fused-gemm")]
ROW_RULES = [_dense_rows_rule("matmul"), _dense_rows_rule("fused-gemm")]


def layout_rules(block: int) -> list[RewriteRule]:
    """The layout rules for a block size (lanes per vector)."""
    int8 = [QLINEARCONV_BLOCKED, *QRESIDUAL_RULES, *QACTIVATION_RULES, *QDENSE_RULES] if block == INT8_BLOCK else []  # 16 int32 lanes: AVX-512
    return [_conv_rule("conv", block), _conv_rule("fused-conv", block), *int8, *DYN_QDENSE_RULES, *MOVE_RULES,
            *GEMM_RULES, *ROW_RULES,
            *(_dense_pad_rule(core, block) for core in ("matmul", "gemm", "fused-gemm"))]


@functools.lru_cache(maxsize=None)
def _rules_for(block: int) -> list[RewriteRule]:
    return layout_rules(block)


RULES = layout_rules(DEFAULT_BLOCK)
for _rule in RULES:
    register_rule(_rule)


@register_pass
@dataclass
class Layout(Pass):
    """Blocks convs as NCHW[block]c and moves the layout transforms to the region's edges."""

    name = "layout"
    block: int = DEFAULT_BLOCK

    def run(self, graph: Graph) -> PassResult:
        # Transforms move one op per sweep, and a rule may wait for the shapes of what the sweep
        # before made (inferred when apply_rules ends): run until nothing moves, not a fixed count
        # (DenseNet's concat chains take dozens of steps).
        rules = self._rules()
        stats = RewriteStats()
        for _ in range(MAX_SWEEPS):
            before = sum(stats.fired.values())
            apply_rules(graph, rules, stats=stats)
            if sum(stats.fired.values()) == before:
                break
        return PassResult.of(graph, sum(stats.fired.values()), stats.fired, stats.runs())

    def rule_names(self) -> list[str]:
        """The layout rules for this pass's block."""
        return [r.name for r in self._rules()]

    def _rules(self) -> list[RewriteRule]:
        return RULES if self.block == DEFAULT_BLOCK else _rules_for(self.block)
