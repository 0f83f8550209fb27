"""int8 conv kernels for x86 with VNNI: uint8 activations x int8 weights, int32 accumulation.

The layouts fit the ``vpdpbusd`` instruction, which adds to each of 16 int32 lanes the dot
product of 4 uint8 values (broadcast to every lane) with that lane's 4 int8 weights:

- activations: uint8 ``[N, C/16, H, W, 16]`` (kiln's blocked layout), the 16 lanes read as
  4 groups of 4 input channels;
- weights: int8 ``[K/16, C/16, R, S, 4, 16, 4]`` (input-channel group, output lane, 4 input
  channels), packed at compile time by the layout pass (``kiln.ir.kiln_ops.pack_qconv_weight``); each 16 x 4 block is the 64 bytes the
  instruction reads;
- output: ``[N, K/16, OH, OW, 16]``, int32 accumulators or uint8 after the fused requantize
  epilogue ``clip(nearbyint((acc + bias[k]) * scale[k]) + zero_point, low, 255)``, where a
  fused ReLU is ``low = zero_point``.

TVM's own VNNI intrinsic does not compile with this LLVM (it passes the operands with the
wrong vector types) and declares its accumulator global, so kiln registers its own, on a
register-resident accumulator. The schedule follows kiln's fp32 conv schedule: materialised
padding (padded with the input's zero point), ``(n, ko_o, oh)`` parallel, a 7 x 2 tile of
accumulator vectors that is unrolled, and the epilogue in the write-back. Measured facts
behind it are in the int8 section of ``docs/cpu-schedules.md``.
"""

from __future__ import annotations

import functools
from typing import Any

from kiln.codegen._tvm import target_has

VNNI_INTRIN = "kiln_dot_16x4_u8s8s32_vnni"
LANES = 16  # int32 accumulator lanes of a zmm register
GROUP = 4  # uint8 x int8 products summed into each lane per instruction
#: int32 accumulator vectors the VNNI conv's register tile keeps: 7 x 2 measured best (8 x 2 let LLVM
#: scalarise the requantize epilogue)
MAX_INT8_ACCUMULATORS = 14


@functools.lru_cache(maxsize=None)
def _dot_16x4_desc() -> Any:
    """What the 16 x 4 int8 dot intrinsics compute: 16 int32 lanes, each adding 4 uint8 x int8 products."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES])
            for i, k in T.grid(LANES, GROUP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@functools.lru_cache(maxsize=None)
def register_vnni_intrinsic() -> str:
    """Register kiln's 16x4 u8 x s8 -> s32 VNNI tensor intrinsic once; its name."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    desc = _dot_16x4_desc()

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES])
            # LLVM declares vpdpbusd.512 on (<16 x i32>, <64 x i8>, <64 x i8>)
            a4 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a64 = T.reinterpret(T.broadcast(a4, LANES), dtype="int8x64")
            C[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), a64, B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    try:
        TensorIntrin.get(VNNI_INTRIN)
    except Exception:  # noqa: BLE001 - not registered yet (TVM raises for an unknown name)
        TensorIntrin.register(VNNI_INTRIN, desc, impl)
    return VNNI_INTRIN


PAIRS_INTRIN = "kiln_dot_16x2x2_u8s8s32_avx2"
#: rows the AVX2 pairs kernel keeps in registers at once (2 rows x 2 halves accumulators beside the
#: widened weights); the first that divides a static row count, else 1
PAIRS_ROW_TILES = (2,)
HALVES = 2  # the pairs kernel keeps two int32 partial sums per output lane (input channels 0-1 and 2-3 of a group)


@functools.lru_cache(maxsize=None)
def register_pairs_intrinsic() -> str:
    """Register kiln's exact int8 dot for AVX2 once; its name.

    Without VNNI, ``vpmaddwd`` multiplies int16 pairs and adds each pair into an int32 lane, exactly
    (``vpmaddubsw`` on uint8 x int8 saturates at int16). The weights stay in the VNNI layout, 16
    output lanes x 4 input channels: 16 bytes (4 lanes) sign-extend to 16 int16, and the 4 uint8
    inputs, zero-extended and repeated 4 times, multiply them: one ``vpmaddwd`` gives 4 lanes x 2
    halves (channels 0-1, 2-3). The accumulator keeps the halves apart, summed once in the epilogue.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES, HALVES), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES, 0:HALVES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES, 0:HALVES])
            for i, h, k in T.grid(LANES, HALVES, 2):
                with T.sblock("update"):
                    vi, vh, vk = T.axis.remap("SSR", [i, h, k])
                    C[vi, vh] = C[vi, vh] + T.cast(A[vh * 2 + vk], "int32") * T.cast(B[vi, vh * 2 + vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES, HALVES), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES, 0:HALVES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES, 0:HALVES])
            a4 = T.reinterpret(T.cast(A.vload([0], "uint8x4"), "int16x4"), dtype="int64")
            a16 = T.reinterpret(T.broadcast(a4, 4), dtype="int16x16")
            C.vstore([0, 0], C.vload([0, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                T.cast(B.vload([0, 0], "int8x16"), "int16x16"), dtype="int32x8"))
            C.vstore([4, 0], C.vload([4, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                T.cast(B.vload([4, 0], "int8x16"), "int16x16"), dtype="int32x8"))
            C.vstore([8, 0], C.vload([8, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                T.cast(B.vload([8, 0], "int8x16"), "int16x16"), dtype="int32x8"))
            C.vstore([12, 0], C.vload([12, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                T.cast(B.vload([12, 0], "int8x16"), "int16x16"), dtype="int32x8"))

    try:
        TensorIntrin.get(PAIRS_INTRIN)
    except Exception:  # noqa: BLE001 - not registered yet (TVM raises for an unknown name)
        TensorIntrin.register(PAIRS_INTRIN, desc, impl)
    return PAIRS_INTRIN


MADDUBS_INTRIN = "kiln_dot_16x4_u8s7s32_avx2"


@functools.lru_cache(maxsize=None)
def register_maddubs_intrinsic() -> str:
    """Register kiln's AVX2 int8 dot for 7-bit weights once; its name.

    It has VNNI's description (16 int32 lanes, each adding 4 uint8 x int8 products), built from
    ``vpmaddubsw`` (pairs of uint8 x int8 products added into int16) and ``vpmaddwd`` by ones (pairs
    of int16 into int32). ``vpmaddubsw`` saturates at int16: it is exact only while
    ``2 * 255 * |w| <= 32767``, that is for weights in [-64, 63], which the lowering checks.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    desc = _dot_16x4_desc()

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (LANES, GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:GROUP], B[0:LANES, 0:GROUP])
            T.writes(C[0:LANES])
            a4 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a32 = T.reinterpret(T.broadcast(a4, 8), dtype="int8x32")
            ones = T.broadcast(T.int16(1), 16)
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a32, B.vload([0, 0], dtype="int8x32"),
                    dtype="int16x16"), ones, dtype="int32x8")
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a32, B.vload([8, 0], dtype="int8x32"),
                    dtype="int16x16"), ones, dtype="int32x8")

    try:
        TensorIntrin.get(MADDUBS_INTRIN)
    except Exception:  # noqa: BLE001 - not registered yet (TVM raises for an unknown name)
        TensorIntrin.register(MADDUBS_INTRIN, desc, impl)
    return MADDUBS_INTRIN


#: the int8 weights' range where ``vpmaddubsw`` cannot saturate: a pair of uint8 x int8 products sums to
#: at most ``2 * 255 * 64 = 32640`` in magnitude, inside int16 (7-bit weights, onnxruntime's reduce_range)
MADDUBS_WEIGHT_RANGE = (-64, 63)


def has_avx2() -> bool:
    """Whether the current TVM target has AVX2."""
    return target_has("avx2")


def has_vnni() -> bool:
    """Whether the current TVM target has AVX-512 VNNI."""
    return target_has("avx512vnni")


def conv_int8(x: Any, w: Any, bias: Any, scale: Any | None, *, strides: tuple[int, int] = (1, 1),
              pads: tuple[int, int, int, int] = (0, 0, 0, 0), x_zero_point: int = 0, y_zero_point: int = 0,
              relu: bool = False, residual: tuple[Any | None, dict[str, Any]] | None = None) -> Any:
    """The TE compute of a blocked int8 conv (group 1).

    ``x``: uint8 ``[N, C/16, H, W, 16]``; ``w``: packed int8; ``bias``: int32 ``[K]`` with the
    input zero point's term folded in (``bias - x_zp * sum(w)``); ``scale``: float32 ``[K]``
    (``x_scale * w_scale / y_scale``), or None for int32 output ``acc + bias``. ``residual`` is
    ``(z or None, attrs)``: the write-back step after the requantize (a uint8 residual add and/or
    an activation, requantized to ``out_scale``; see ``kiln::QBlockedConv``).
    """
    from tvm import te, tirx

    n, ci, h, wd, lanes = x.shape
    ko, _, kh, kw, groups, bo, group = w.shape
    top, left, bottom, right = pads
    oh = (h + top + bottom - kh) // strides[0] + 1
    ow = (wd + left + right - kw) // strides[1] + 1
    pad_value = tirx.const(x_zero_point, "uint8")
    xp = te.compute((n, ci, h + top + bottom, wd + left + right, lanes), lambda i, c, y, v, j: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, v >= left, v < wd + left), x[i, c, y - top, v - left, j], pad_value),
        name="pad")
    rc = te.reduce_axis((0, ci), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rg = te.reduce_axis((0, groups), name="rg")
    rl = te.reduce_axis((0, group), name="rl")
    conv = te.compute((n, ko, oh, ow, bo), lambda i, k, y, v, j: te.sum(
        xp[i, rc, y * strides[0] + ry, v * strides[1] + rx, rg * group + rl].astype("int32")
        * w[k, rc, ry, rx, rg, j, rl].astype("int32"), axis=[rc, ry, rx, rg, rl]), name="conv")

    def epilogue(i: Any, k: Any, y_: Any, v_: Any, j: Any) -> Any:
        acc = conv[i, k, y_, v_, j] + bias[k * bo + j]
        if scale is None:
            return acc
        q = tirx.nearbyint(acc.astype("float32") * scale[k * bo + j]).astype("int32") + y_zero_point
        low = y_zero_point if relu else 0
        y = tirx.max(tirx.min(q, 255), low)
        if residual is None:
            return y.astype("uint8")
        z, a = residual

        def f32(v: float) -> Any:
            return tirx.const(v, "float32")

        v = (y - y_zero_point).astype("float32") * f32(a["y_scale"])
        if z is not None:
            v = v + (z[i, k, y_, v_, j].astype("int32") - a["z_zero_point"]).astype("float32") * f32(a["z_scale"])
        if a["out_relu"]:
            v = tirx.max(v, f32(0.0))
        if a.get("activation"):
            from kiln.codegen.lowering.te import activation_expr  # lazily: lowering's families import int8

            v = activation_expr(v, a["activation"], tuple(a.get("activation_params", ())))
        out = tirx.nearbyint(v / f32(a["out_scale"])) + f32(float(a["out_zero_point"]))
        return tirx.max(tirx.min(out, f32(255.0)), f32(0.0)).astype("uint8")

    return te.compute(conv.shape, epilogue, name="epilogue")


def conv_int8_tiles(ow: int) -> tuple[int, int]:
    """(ow_tile, k_tile): 7 x 2 where 7 divides the width (every ResNet width), else the
    widest divisor of the width up to 14 with as many output blocks as fit in 14 registers."""
    if ow % 7 == 0:
        return 7, 2
    o = max(d for d in range(1, MAX_INT8_ACCUMULATORS + 1) if ow % d == 0)
    return o, max(1, min(4, MAX_INT8_ACCUMULATORS // o))


def schedule_conv_nchwc_int8(sch: Any) -> None:
    """``(n·ko_o·oh) parallel, ow_o, rc, ry, rx, rg, ko_i, ow_i`` around the VNNI instruction."""
    intrin = register_vnni_intrinsic()
    conv = sch.get_sblock("conv")
    parallel_pad_stage(sch)
    n, k, h, w, j, rc, ry, rx, rg, rl = sch.get_loops(conv)
    ow = int(sch.get(w).extent)
    ko = int(sch.get(k).extent)
    ow_tile, k_tile = conv_int8_tiles(ow)
    while ko % k_tile:
        k_tile -= 1
    k_o, k_i = sch.split(k, [None, k_tile])
    w_o, w_i = sch.split(w, [None, ow_tile])
    sch.reorder(n, k_o, h, w_o, rc, ry, rx, rg, k_i, w_i, j, rl)
    sch.parallel(sch.fuse(n, k_o, h))
    tensorized_conv_tile(sch, conv, w_o, [k_i, w_i], rc, intrin)


def parallel_pad_stage(sch: Any) -> None:
    """A conv's materialised padding stage: its ``(n, c, y)`` rows in parallel, its lanes vectorised."""
    loops = sch.get_loops(sch.get_sblock("pad"))
    sch.parallel(sch.fuse(*loops[:3]))
    sch.vectorize(loops[-1])


def tensorized_conv_tile(sch: Any, conv: Any, tile_loop: Any, unrolled: list[Any], first_reduce: Any,
                         intrin: str) -> None:
    """A blocked conv's register tile on a tensor intrinsic (VNNI's, bf16's): the accumulators local
    under ``tile_loop``, the ``unrolled`` tile loops unrolled, the lane loop (second innermost) on
    ``intrin``, and the ``epilogue`` written back from the tile, unrolled and vectorised."""
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, tile_loop)
    sch.set_scope(conv, 0, "local")
    for loop in unrolled:
        sch.unroll(loop)
    init = sch.decompose_reduction(conv, first_reduce)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(sch.get_loops(conv)[-2], intrin)
    tile = sch.get_loops(epilogue)  # includes the loops above the tile: take those below it
    depth = next(i for i, loop in enumerate(tile) if sch.get(loop).same_as(sch.get(tile_loop))) + 1
    *outer, lane = tile[depth:]
    for loop in outer:
        sch.unroll(loop)
    sch.vectorize(lane)


def dense_int8(x: Any, w: Any, c: Any, s: Any, b: Any | None, n: int) -> Any:
    """The TE compute of ``kiln::QDense``: ``x`` uint8 ``[M, K]``, ``w`` packed int8
    ``[N'/16, K/4, 16, 4]``; int32 accumulators in blocks of 16 outputs, then float32
    ``(acc + c) * s + b`` sliced to ``n`` outputs."""
    from tvm import te

    m = x.shape[0]
    no, ko, lanes, group = w.shape
    rk = te.reduce_axis((0, ko), name="rk")
    rl = te.reduce_axis((0, group), name="rl")
    acc = te.compute((m, no, lanes), lambda i, j, l: te.sum(
        x[i, rk * group + rl].astype("int32") * w[j, rk, l, rl].astype("int32"), axis=[rk, rl]), name="dense")

    def scaled(i: Any, j: Any, l: Any) -> Any:
        y = (acc[i, j, l] + c[j * lanes + l]).astype("float32") * s[j * lanes + l]
        return y + b[j * lanes + l] if b is not None else y

    epilogue = te.compute((m, no, lanes), scaled, name="epilogue")
    return te.compute((m, n), lambda i, j: epilogue[i, j // lanes, j % lanes], name="unblock")


def dynamic_quantize(t: Any) -> tuple[Any, Any, Any]:
    """ONNX's DynamicQuantizeLinear as TE stages: ``max`` and ``min`` over ``t`` (with 0), ``scale``
    (1 for an all-zero tensor, as onnxruntime), ``zero_point`` and the uint8 ``quantized`` tensor."""
    from tvm import te, tirx

    f = "float32"
    width = t.shape[-1] if len(t.shape) == 2 else None
    lanes = next((v for v in (16, 8) if isinstance(width, tirx.IntImm) and int(width) % v == 0), 0)
    if lanes:  # rows [M, K]: per row and lane first (``partial_max``, ``partial_min``: parallel, vectorised)
        m = t.shape[0]
        ko = te.reduce_axis((0, int(width) // lanes), "ko")
        ko2 = te.reduce_axis((0, int(width) // lanes), "ko2")
        pmax = te.compute((m, lanes), lambda i, v: te.max(t[i, ko * lanes + v], axis=ko), name="partial_max")
        pmin = te.compute((m, lanes), lambda i, v: te.min(t[i, ko2 * lanes + v], axis=ko2), name="partial_min")
        t_max, t_min = pmax, pmin
    else:
        t_max = t_min = t
    axes = [te.reduce_axis((0, d), f"r{k}") for k, d in enumerate(t_max.shape)]
    axes2 = [te.reduce_axis((0, d), f"s{k}") for k, d in enumerate(t_min.shape)]
    mx = te.compute((), lambda: te.max(t_max[tuple(axes)], axis=axes), name="max")
    mn = te.compute((), lambda: te.min(t_min[tuple(axes2)], axis=axes2), name="min")
    scale = te.compute((), lambda: dq_scale(mx[()], mn[()]), name="scale")
    zp = te.compute((), lambda: tirx.Cast("uint8", dq_zero_point(mn[()], scale[()])), name="zero_point")
    q = te.compute(t.shape, lambda *i: tirx.Cast("uint8", dq_value(t[i], scale[()], tirx.Cast(f, zp[()]))),
                   name="quantized")
    return q, scale, zp


def dq_scale(hi: Any, lo: Any) -> Any:
    """DynamicQuantizeLinear's scale from a tensor's max and min: ``(max(hi, 0) - min(lo, 0)) / 255``, 1 where
    that is 0 (an all-zero tensor, as onnxruntime)."""
    from tvm import tirx

    zero = tirx.const(0, "float32")
    s = (tirx.max(hi, zero) - tirx.min(lo, zero)) / tirx.const(255, "float32")
    return tirx.Select(s == zero, tirx.const(1, "float32"), s)


def dq_zero_point(lo: Any, scale: Any) -> Any:
    """DynamicQuantizeLinear's zero point, ``round(-min(lo, 0) / scale)`` in [0, 255], as float32."""
    from tvm import tirx

    zero = tirx.const(0, "float32")
    return _clamp_u8(tirx.nearbyint((zero - tirx.min(lo, zero)) / scale))


def dq_value(x: Any, scale: Any, zp: Any) -> Any:
    """One value quantized as DynamicQuantizeLinear does, ``round(x / scale) + zp`` in [0, 255], as float32."""
    from tvm import tirx

    return _clamp_u8(tirx.nearbyint(x / scale) + zp)


def _clamp_u8(v: Any) -> Any:
    from tvm import tirx

    return tirx.max(tirx.min(v, tirx.const(255, "float32")), tirx.const(0, "float32"))


def dense_int8_dynamic(xq: Any, scale: Any, zp: Any, w: Any, wsum: Any, ws: Any, b: Any | None, n: int,
                       pairs: bool) -> Any:
    """The TE compute of ``kiln::DynQDense``'s product on rows: ``xq`` uint8 ``[M, K]`` with its
    ``scale`` and ``zp`` (from :func:`dynamic_quantize`) times ``w`` packed ``[N'/16, K/4, 16, 4]``,
    then ``float32(acc - zp * wsum) * (scale * ws) + b`` sliced to ``n`` outputs. ``pairs`` keeps two
    partial sums per lane for the AVX2 kernel (:func:`register_pairs_intrinsic`), else one (VNNI)."""
    from tvm import te

    m = xq.shape[0]
    no, ko, lanes, group = w.shape
    rk = te.reduce_axis((0, ko), name="rk")
    if pairs:
        rp = te.reduce_axis((0, 2), name="rp")
        acc = te.compute((m, no, lanes, HALVES), lambda i, j, l, h: te.sum(
            xq[i, rk * group + h * 2 + rp].astype("int32") * w[j, rk, l, h * 2 + rp].astype("int32"), axis=[rk, rp]),
            name="dense")
        rh = te.reduce_axis((0, HALVES), name="rh")
        halves = te.compute((m, no, lanes), lambda i, j, l: te.sum(acc[i, j, l, rh], axis=rh), name="halves")

        def total(i: Any, j: Any, l: Any) -> Any:
            return halves[i, j, l]
    else:
        rl = te.reduce_axis((0, group), name="rl")
        acc = te.compute((m, no, lanes), lambda i, j, l: te.sum(
            xq[i, rk * group + rl].astype("int32") * w[j, rk, l, rl].astype("int32"), axis=[rk, rl]), name="dense")

        def total(i: Any, j: Any, l: Any) -> Any:
            return acc[i, j, l]

    def scaled(i: Any, j: Any, l: Any) -> Any:
        c = j * lanes + l
        y = (total(i, j, l) - zp[()].astype("int32") * wsum[c]).astype("float32") * (scale[()] * ws[c])
        return y + b[c] if b is not None else y

    epilogue = te.compute((m, no, lanes), scaled, name="epilogue")
    return te.compute((m, n), lambda i, j: epilogue[i, j // lanes, j % lanes], name="unblock")


def schedule_dynamic_quantize(sch: Any) -> None:
    """:func:`dynamic_quantize` on rows ``[M, K]``: the quantization's rows in parallel, vectorised along K."""
    for name in ("partial_max", "partial_min"):
        try:
            block = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - a width that is no multiple of 8: one reduction
            continue
        i, v, ko = sch.get_loops(block)
        sch.reorder(i, ko, v)
        sch.parallel(i)
        init = sch.decompose_reduction(block, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(block)[-1])
    q = sch.get_sblock("quantized")
    i, k = sch.get_loops(q)
    kk = int(sch.get(k).extent)
    vec = next(v for v in (16, 8, 4, 1) if kk % v == 0)
    sch.parallel(i)
    if vec > 1:
        sch.vectorize(sch.split(k, [None, vec])[1])


def schedule_dense_int8_dynamic(sch: Any) -> None:
    """The dynamic kernel's product: around VNNI where the target has it (:func:`schedule_dense_int8`),
    else around the AVX2 pairs kernel, in the same loop order."""
    if has_vnni():
        schedule_dense_int8(sch)
        return
    if not has_avx2():
        raise RuntimeError("the target has neither AVX-512 VNNI nor AVX2")
    if len(sch.get_loops(sch.get_sblock("dense"))) == 5:  # one sum per lane: 7-bit weights
        schedule_dense_int8(sch, register_maddubs_intrinsic())
        return
    from tvm import tirx

    intrin = register_pairs_intrinsic()
    dense = sch.get_sblock("dense")
    i, j, lane, h, rk, rp = sch.get_loops(dense)
    rows = sch.get(i).extent
    row_tile = next((t for t in PAIRS_ROW_TILES if isinstance(rows, tirx.IntImm) and int(rows) % t == 0), 1)
    i_o, i_i = sch.split(i, [None, row_tile])
    j_o, j_i = sch.split(j, [None, 1])
    sch.reorder(j_o, i_o, rk, i_i, j_i, lane, h, rp)
    sch.parallel(j_o)
    halves = sch.get_sblock("halves")
    sch.reverse_compute_at(halves, i_o)
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, i_o)
    sch.set_scope(dense, 0, "local")
    sch.set_scope(halves, 0, "local")
    sch.unroll(i_i)
    init = sch.decompose_reduction(dense, rk)
    sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
    sch.tensorize(sch.get_loops(dense)[-3], intrin)
    *_, hl, hr = sch.get_loops(halves)
    sch.reorder(hr, hl)
    sch.vectorize(hl)
    sch.vectorize(sch.get_loops(epilogue)[-1])


def schedule_dense_int8(sch: Any, intrin: str | None = None) -> None:
    """``j_o parallel, m, k/4, j_i, 16 x 4`` around the VNNI instruction (or ``intrin``, with the same
    description): up to 4 output blocks accumulate side by side (independent chains), the epilogue in
    the write-back."""
    intrin = intrin or register_vnni_intrinsic()
    dense = sch.get_sblock("dense")
    i, j, lane, rk, rl = sch.get_loops(dense)
    no = int(sch.get(j).extent)
    tile = max(d for d in range(1, 5) if no % d == 0)
    j_o, j_i = sch.split(j, [None, tile])
    sch.reorder(j_o, i, rk, j_i, lane, rl)
    sch.parallel(j_o)
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, i)
    sch.set_scope(dense, 0, "local")
    sch.unroll(j_i)
    init = sch.decompose_reduction(dense, rk)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(sch.get_loops(dense)[-2], intrin)
    sch.vectorize(sch.get_loops(epilogue)[-1])
