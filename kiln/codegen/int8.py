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

VNNI_INTRIN = "kiln_dot_16x4_u8s8s32_vnni"
LANES = 16  # int32 accumulator lanes of a zmm register
GROUP = 4  # uint8 x int8 products summed into each lane per instruction
#: int32 accumulator vectors the VNNI conv's register tile keeps: 7 x 2 measured best (8 x 2 let LLVM
#: scalarise the requantize epilogue)
MAX_INT8_ACCUMULATORS = 14


@functools.lru_cache(maxsize=None)
def register_vnni_intrinsic() -> str:
    """Register kiln's 16x4 u8 x s8 -> s32 VNNI tensor intrinsic once; its name."""
    from tvm.s_tir import TensorIntrin
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


def has_vnni() -> bool:
    """Whether the current TVM target (``with target:``) has AVX-512 VNNI."""
    from tvm.target import Target, codegen

    target = Target.current(allow_none=True)
    return target is not None and bool(codegen.target_has_features("avx512vnni", target))


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
    pad = sch.get_sblock("pad")
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*loops[:3]))
    sch.vectorize(loops[-1])
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
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, w_o)
    sch.set_scope(conv, 0, "local")
    sch.unroll(k_i)
    sch.unroll(w_i)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(sch.get_loops(conv)[-2], intrin)
    tile = sch.get_loops(epilogue)  # includes the loops above the tile: take those below w_o
    depth = next(i for i, loop in enumerate(tile) if sch.get(loop).same_as(sch.get(w_o))) + 1
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


def schedule_dense_int8(sch: Any) -> None:
    """``j_o parallel, m, k/4, j_i, 16 x 4`` around the VNNI instruction: up to 4 output blocks
    accumulate side by side (independent ``vpdpbusd`` chains), the epilogue in the write-back."""
    intrin = register_vnni_intrinsic()
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
