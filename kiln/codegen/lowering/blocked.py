"""Lowerings for the blocked layout: ``kiln::ToBlocked``, ``kiln::FromBlocked``, ``kiln::BlockedConv``,
its bf16 form ``kiln::BF16BlockedConv``, and the int8 kernels ``kiln::QBlockedConv`` and ``kiln::QDense``.

``BlockedConv`` becomes one prim func: a zero-padding stage (inlined by the schedule), the
convolution with the input channel split into a block axis and a lane axis (no div/mod in
any index), and one epilogue stage (bias, residual, activation) that the schedule fuses into
the accumulator's write-back. The func carries ``kiln.schedule`` so that
:mod:`kiln.codegen.schedule` applies the register-tiled conv schedule to it. The int8 computes
and their VNNI schedules are in :mod:`kiln.codegen.int8`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.bf16 import conv_bf16
from kiln.codegen.int8 import MADDUBS_WEIGHT_RANGE, conv_int8, dense_int8, dense_int8_dynamic, dynamic_quantize
from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import activation_expr
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


@lowers("ToBlocked", domain="kiln")
def _to_blocked(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    b = node.attr("block", 16)
    known = node.input(0).shape[1] if node.input(0).shape and len(node.input(0).shape) > 1 else None
    if not isinstance(known, int):
        raise CodegenError(f"node {node.label()}: the blocked layout needs a static channel count")

    def compute(x: Any) -> Any:
        n, _, *spatial = x.shape  # the channel count from kiln's shapes: TVM may hold it as an unsimplified sum
        c = known

        def lane(i: Any, cb: Any, *rest: Any) -> Any:
            ch = cb * b + rest[-1]
            if c % b == 0:
                return x[(i, ch, *rest[:-1])]
            return tirx.if_then_else(ch < c, x[(i, tirx.min(ch, c - 1), *rest[:-1])], tirx.const(0, x.dtype))

        return te.compute((n, -(-c // b), *spatial, b), lane, name="to_blocked")

    return [lw.emit(compute, lw.get(node.input(0)), name="to_blocked")]


@lowers("FromBlocked", domain="kiln")
def _from_blocked(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    channels = node.attr("channels", 0)

    def compute(x: Any) -> Any:
        n, cb, *spatial, b = x.shape
        return te.compute((n, channels or cb * b, *spatial), lambda i, c, *rest: x[(i, c // b, *rest, c % b)],
                          name="from_blocked")

    return [lw.emit(compute, lw.get(node.input(0)), name="from_blocked")]


def conv_epilogue(conv: Any, idx: tuple[Any, ...], bias: Any | None, res: Any | None, act: str,
                  params: tuple[float, ...]) -> Any:
    """A blocked conv's write-back step at ``idx = (n, k, y, x, lane)``: bias, residual, activation."""
    i, k, y, v, j = idx
    val = conv[i, k, y, v, j]
    if bias is not None:
        val = val + bias[k * conv.shape[4] + j]
    if res is not None:
        val = val + res[i, k, y, v, j]
    return activation_expr(val, act, params)


@lowers("BlockedConv", domain="kiln")
def _blocked_conv(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    x, w, b, z = (node.input(i) for i in range(4))
    strides = list(node.attr("strides", ()) or [1, 1])
    dil = list(node.attr("dilations", ()) or [1, 1])
    pads = list(node.attr("pads", ()) or [0, 0, 0, 0])
    act, params = node.attr("activation", "") or "", tuple(node.attr("activation_params", ()) or ())
    group = node.attr("group", 1)
    depthwise = group != 1 and w.shape is not None and w.shape[4] == 1  # packed with one input lane per group
    has_b, has_z = b is not None, z is not None

    def compute(xt: Any, wt: Any, *rest: Any) -> Any:
        bias = rest[0] if has_b else None
        res = rest[-1] if has_z else None
        n, ci, h, wd, bi = xt.shape
        ko, _, kh, kw, _, bo = wt.shape
        dt = xt.dtype
        top, left, bottom, right = pads
        oh = (h + top + bottom - dil[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (wd + left + right - dil[1] * (kw - 1) - 1) // strides[1] + 1
        xp = te.compute((n, ci, h + top + bottom, wd + left + right, bi), lambda i, c, y, v, lane: tirx.if_then_else(
            tirx.all(y >= top, y < h + top, v >= left, v < wd + left), xt[i, c, y - top, v - left, lane],
            tirx.const(0, dt)), name="pad")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")
        if depthwise:
            conv = te.compute((n, ko, oh, ow, bo), lambda i, k, y, v, j: te.sum(
                xp[i, k, y * strides[0] + ry * dil[0], v * strides[1] + rx * dil[1], j] * wt[k, 0, ry, rx, 0, j],
                axis=[ry, rx]), name="conv")
        else:  # group 1, or groups of whole blocks: output block k reads its group's input blocks
            per_group = int(wt.shape[1])  # input blocks per group
            out_per_group = int(ko) // group

            def first(k: Any) -> Any:
                return 0 if group == 1 else k // out_per_group * per_group

            rc = te.reduce_axis((0, per_group), name="rc")
            rl = te.reduce_axis((0, bi), name="rl")
            conv = te.compute((n, ko, oh, ow, bo), lambda i, k, y, v, j: te.sum(
                xp[i, first(k) + rc, y * strides[0] + ry * dil[0], v * strides[1] + rx * dil[1], rl] *
                wt[k, rc, ry, rx, rl, j], axis=[rc, ry, rx, rl]), name="conv")

        return te.compute(conv.shape, lambda *idx: conv_epilogue(conv, idx, bias, res, act, params), name="epilogue")

    args = [lw.get(x), lw.get(w)] + ([lw.get(b)] if has_b else []) + ([lw.get(z)] if has_z else [])
    kind = "depthwise_nchwc" if depthwise else "conv_nchwc"
    return [lw.emit(compute, *args, name=f"blocked_conv_{act.lower() or 'linear'}",
                    attrs={"kiln.schedule": kind, "kiln.pads": int(any(pads))})]


@lowers("BF16BlockedConv", domain="kiln")
def _bf16_blocked_conv(lw: Lowerer, node: Node) -> list[Any]:
    """The bf16 conv of :mod:`kiln.codegen.bf16`, scheduled onto ``vdpbf16ps`` where the target has it."""
    x, w, b, z = (node.input(i) for i in range(4))
    strides = tuple(node.attr("strides", ()) or (1, 1))
    pads = tuple(node.attr("pads", ()) or (0, 0, 0, 0))
    if tuple(node.attr("dilations", ()) or (1, 1)) != (1, 1):
        raise CodegenError(f"node {node.label()}: the bf16 conv takes no dilation")
    act, params = node.attr("activation", "") or "", tuple(node.attr("activation_params", ()) or ())
    has_b, has_z = b is not None, z is not None

    def compute(xt: Any, wt: Any, *rest: Any) -> Any:
        bias = rest[0] if has_b else None
        res = rest[-1] if has_z else None
        return conv_bf16(xt, wt, lambda conv, idx: conv_epilogue(conv, idx, bias, res, act, params),
                         strides=strides, pads=pads)

    args = [lw.get(x), lw.get(w)] + ([lw.get(b)] if has_b else []) + ([lw.get(z)] if has_z else [])
    return [lw.emit(compute, *args, name=f"bf16_conv_{act.lower() or 'linear'}",
                    attrs={"kiln.schedule": "conv_nchwc_bf16"})]


@lowers("QBlockedConv", domain="kiln")
def _qblocked_conv(lw: Lowerer, node: Node) -> list[Any]:
    """The int8 conv of :mod:`kiln.codegen.int8`, scheduled onto VNNI where the target has it."""
    pads = tuple(node.attr("pads", ()) or (0, 0, 0, 0))
    strides = tuple(node.attr("strides", ()) or (1, 1))
    xzp, yzp, relu = node.attr("x_zero_point", 0), node.attr("y_zero_point", 0), bool(node.attr("relu", 0))
    has_z = node.input(4) is not None
    post = {k: node.attr(k, d) for k, d in (("y_scale", 1.0), ("z_scale", 1.0), ("z_zero_point", 0),
                                             ("out_scale", 1.0), ("out_zero_point", 0), ("out_relu", 0))}
    post["activation"] = node.attr("activation", "") or ""
    post["activation_params"] = tuple(node.attr("activation_params", ()) or ())

    def compute(x: Any, w: Any, b: Any, s: Any, *z: Any) -> Any:
        return conv_int8(x, w, b, s, strides=strides, pads=pads, x_zero_point=xzp, y_zero_point=yzp, relu=relu,
                         residual=(z[0] if z else None, post) if z or post["activation"] else None)

    args = [lw.get(node.input(i)) for i in range(5 if has_z else 4)]
    return [lw.emit(compute, *args, name="qblocked_conv", attrs={"kiln.schedule": "conv_nchwc_int8"})]


@lowers("QDense", domain="kiln")
def _qdense(lw: Lowerer, node: Node) -> list[Any]:
    """The int8 dense layer of :mod:`kiln.codegen.int8`, scheduled onto VNNI where the target has it."""
    n = node.attr("n", 0)
    has_b = node.input(4) is not None

    def compute(x: Any, w: Any, c: Any, s: Any, *b: Any) -> Any:
        return dense_int8(x, w, c, s, b[0] if b else None, n)

    args = [lw.get(node.input(i)) for i in range(5 if has_b else 4)]
    return [lw.emit(compute, *args, name="qdense", attrs={"kiln.schedule": "dense_int8"})]


@lowers("DynQDense", domain="kiln")
def _dyn_qdense(lw: Lowerer, node: Node) -> list[Any]:
    """The dynamic int8 dense layer of :mod:`kiln.codegen.int8` on rows: the input quantized per tensor
    (one kernel), then multiplied on VNNI or on the AVX2 pairs kernel (another)."""
    from kiln.codegen.lowering.matmul import on_rows

    n = node.attr("n", 0)
    has_b = node.input(4) is not None
    w = node.input(1).numpy() if node.input(1).is_constant else None
    lo, hi = MADDUBS_WEIGHT_RANGE
    # without VNNI: vpmaddubsw where the weights cannot saturate it, else the exact int16 pairs kernel
    pairs = lw.int8_pairs and not (w is not None and w.size and lo <= int(w.min()) and int(w.max()) <= hi)
    args = [lw.get(node.input(i)) for i in range(5 if has_b else 4)]

    def product(rows: Any) -> Any:
        quantized = lw.emit(lambda t: list(dynamic_quantize(t)), rows, name="dynamic_quantize_rows",
                            attrs={"kiln.schedule": "dynamic_quantize"})
        xq, scale, zp = lw.unpack_all(quantized, 3)

        def compute(xq: Any, scale: Any, zp: Any, w: Any, wsum: Any, ws: Any, *b: Any) -> Any:
            return dense_int8_dynamic(xq, scale, zp, w, wsum, ws, b[0] if b else None, n, pairs)

        return lw.emit(compute, xq, scale, zp, *args[1:], name="dyn_qdense", attrs={"kiln.schedule": "dense_int8_dynamic"})

    if node.input(0).rank > 2:
        return [on_rows(lw, args[0], product)]
    return [product(args[0])]
