"""Lowerings of the convolutions: Conv and ``kiln::FusedConv`` (1-D, 2-D, 3-D, groups, dilations,
auto_pad), ConvTranspose, the integer convs (ConvInteger, QLinearConv) and CausalConvWithState.

The blocked (NCHW[b]c) convs the layout pass makes are in :mod:`.blocked`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import apply_activation, get_topi, int64_vector, per_channel, spatial_pads, static_shape
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _conv2d(x: Any, w: Any, node: Node) -> Any:
    """An N-d (1-D, 2-D or 3-D) NC... convolution with groups, dilations and auto_pad."""
    topi = get_topi()
    k = len(w.shape) - 2
    kernel = [int(d) for d in w.shape[2:]]
    strides = list(node.attr("strides", ()) or [1] * k)
    dil = list(node.attr("dilations", ()) or [1] * k)
    pads = spatial_pads(node, kernel, strides, dil)
    group = node.attr("group", 1)
    if k == 1:
        return topi.nn.conv1d(x, w, strides, pads, dil, group, "NCW", "OIW")
    if k == 3:
        return topi.nn.conv3d_ncdhw(x, w, strides, pads, dil, group)
    if k != 2:
        raise CodegenError(f"node {node.label()}: {k}-D convolutions do not compile yet")
    padding = (pads[0], pads[1], pads[2], pads[3])
    if group == 1:
        return topi.nn.conv2d_nchw(x, w, strides, padding, dil)
    return topi.nn.group_conv2d_nchw(x, w, strides, padding, dil, group)


@lowers("Conv")
def _conv(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b = (lw.get(node.input(i)) for i in range(3))

    def compute(x: Any, w: Any, *b: Any) -> Any:
        y = _conv2d(x, w, node)
        if b:
            y = get_topi().add(y, per_channel(b[0], len(y.shape)))
        return y

    return [lw.emit(compute, x, w, *([b] if b is not None else []), name="conv2d")]


@lowers("FusedConv", domain="kiln")
def _fused_conv(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b, z = (lw.get(node.input(i)) for i in range(4))
    act = node.attr("activation", "") or ""
    params = tuple(node.attr("activation_params", ()) or ())
    has_b, has_z = b is not None, z is not None

    def compute(x: Any, w: Any, *rest: Any) -> Any:
        topi = get_topi()
        y = _conv2d(x, w, node)
        rest_l = list(rest)
        if has_b:
            y = topi.add(y, per_channel(rest_l.pop(0), len(y.shape)))
        if has_z:
            y = topi.add(y, rest_l.pop(0))
        return apply_activation(y, act, params)

    extra = [v for v in (b, z) if v is not None]
    return [lw.emit(compute, x, w, *extra, name=f"fused_conv2d_{act.lower() or 'linear'}")]


# =========================================================================== transposed convolutions


@lowers("ConvTranspose")
def _conv_transpose(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b = node.input(0), node.input(1), node.input(2)
    if x.rank != 4 or node.attr("group", 1) != 1 or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "") \
            or node.attr("output_shape") is not None or any(d != 1 for d in node.attr("dilations", ()) or ()):
        return _conv_transpose_nd(lw, node)  # the general N-d form, written out in TE
    strides = list(node.attr("strides", ()) or [1, 1])
    pads = list(node.attr("pads", ()) or [0, 0, 0, 0])
    out_pad = list(node.attr("output_padding", ()) or [0, 0])
    has_b = b is not None

    def compute(t: Any, k: Any, *bias: Any) -> Any:
        y = get_topi().nn.conv2d_transpose_nchw(t, k, strides, pads, t.dtype, out_pad)
        return get_topi().add(y, per_channel(bias[0])) if has_b else y

    args = [lw.get(x), lw.get(w)] + ([lw.get(b)] if has_b else [])
    return [lw.emit(compute, *args, name="conv2d_transpose")]


def _conv_transpose_nd(lw: Lowerer, node: Node) -> list[Any]:
    """N-d ConvTranspose with groups, dilations, output_padding, auto_pad and output_shape, as one
    reduction over input channels and kernel taps (the output shape is the declared one)."""
    from tvm import te, tirx

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


# =========================================================================== integer convolutions


def _integer_conv(x: Any, w: Any, xzp: Any | None, wzp: Any | None, node: Node) -> Any:
    """conv(x - x_zero_point, w - w_zero_point) accumulated in int32 (zero points per tensor or per channel)."""
    from tvm import topi

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
        ws_per_channel = len(t["ws"].shape) == 1 and int(t["ws"].shape[0]) > 1

        def body(n: Any, k: Any, *rest: Any) -> Any:
            a = acc[(n, k, *rest)]
            if "b" in t:
                a = a + t["b"][k]
            ws = t["ws"][k] if ws_per_channel else t["ws"][()] if not t["ws"].shape else t["ws"][0]
            xs = t["xs"][()] if not t["xs"].shape else t["xs"][0]
            ys = t["ys"][()] if not t["ys"].shape else t["ys"][0]
            yzp = t["yzp"][()] if not t["yzp"].shape else t["yzp"][0]
            scale = xs * ws / ys
            q = tirx.nearbyint(a.astype("float32") * scale).astype("int32") + yzp.astype("int32")
            return tirx.max(tirx.min(q, hi), lo).astype(out_dtype)

        return te.compute(acc.shape, body, name="qlinear_conv")

    return [lw.emit(compute, *ins, name="qlinear_conv")]


# =========================================================================== causal convolution with state


@lowers("CausalConvWithState")
def _causal_conv(lw: Lowerer, node: Node) -> list[Any]:
    """Depthwise causal 1-D conv over [past_state | input] (zeros without a state), optional SiLU;
    the second output is the last k-1 steps as the next state."""
    from tvm import te, tirx

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
    return lw.unpack(out, node)


@lowers("Col2Im")
def _col2im(lw: Lowerer, node: Node) -> list[Any]:
    """Col2Im: sums each column's block back into the image (ConvTranspose's scatter, as a gather).

    ``image_shape`` and ``block_shape`` may be read at run time: the image's dims are then read
    from ``image_shape`` before the kernel (or taken from the declared output shape), and the
    block's extents likewise.
    """
    from tvm import te, tirx

    from kiln.ir import const_ints

    x, out = node.input(0), node.outputs[0]
    image_c, block_c = const_ints(node.input(1)), const_ints(node.input(2))
    k = node.input(1).shape[0] if node.input(1).shape and isinstance(node.input(1).shape[0], int) else None
    if k is None:
        raise CodegenError(f"node {node.label()}: Col2Im needs image_shape of static length to compile")
    declared = out.shape if out.shape is not None and len(out.shape) == k + 2 else None
    if declared is not None and all(isinstance(d, int) for d in declared[2:]):
        spatial: list[Any] = [int(d) for d in declared[2:]]
    elif image_c is not None:
        spatial = [int(d) for d in image_c]
    else:  # read at run time: the image's dims are the values of image_shape
        spatial = lw.computed_dims(lambda t: int64_vector(t, k), lw.get(node.input(1)), count=k, name="col2im")
    strides = list(node.attr("strides", ()) or [1] * k)
    dil = list(node.attr("dilations", ()) or [1] * k)
    pads = list(node.attr("pads", ()) or [0] * (2 * k))
    # a block read at run time: read in the kernel where the declared channel count is static, else read
    # before it as dims, since the channel count (an output dim) follows from it
    static_channels = declared is not None and isinstance(declared[1], int)
    block_rt = None if block_c is not None or static_channels else lw.computed_dims(
        lambda t: int64_vector(t, k), lw.get(node.input(2)), count=k, name="col2im_block")
    args = [lw.get(x)] + ([lw.get(node.input(2))] if block_c is None and block_rt is None else [])

    def compute(t: Any, *bs: Any) -> Any:
        i64 = "int64"
        if block_c is not None:
            block = [tirx.const(int(b), i64) for b in block_c]
        else:
            block = [tirx.Cast(i64, b) for b in block_rt] if block_rt is not None else \
                [tirx.Cast(i64, bs[0][d]) for d in range(k)]
        size = block[0]
        for b in block[1:]:
            size = size * b
        channels = tirx.floordiv(tirx.Cast(i64, t.shape[1]), size)
        if static_channels:
            channels = tirx.const(declared[1], i64)
        counts = [tirx.floordiv(spatial[d] + pads[d] + pads[d + k] - dil[d] * (block[d] - 1) - 1, strides[d]) + 1
                  for d in range(k)]
        ks = [te.reduce_axis((0, block[d]), f"k{d}") for d in range(k)]

        def body(n: Any, c: Any, *pos: Any) -> Any:
            ok, col, row = tirx.const(True, "bool"), tirx.const(0, i64), c
            for d in range(k):
                off = tirx.Cast(i64, pos[d]) + pads[d] - ks[d].var * dil[d]
                b = tirx.floordiv(off, strides[d])
                ok = tirx.all(ok, off >= 0, tirx.floormod(off, strides[d]) == 0, b < counts[d])
                col = col * counts[d] + b
                row = row * block[d] + ks[d].var
            v = t[n, tirx.Select(ok, row, tirx.const(0, i64)), tirx.Select(ok, col, tirx.const(0, i64))]
            return te.sum(tirx.Select(ok, v, tirx.const(0, t.dtype)), axis=ks)

        return te.compute([t.shape[0], channels, *spatial], body, name="col2im")

    return [lw.emit(compute, *args, name="col2im")]
