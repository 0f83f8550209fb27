"""bfloat16 conv kernels for x86 with AVX-512 BF16: bf16 inputs and weights, float32 accumulation.

The layouts fit the ``vdpbf16ps`` instruction, which adds to each of 16 float32 lanes the dot
product of 2 bf16 values (broadcast to every lane) with that lane's 2 bf16 weights:

- activations stay float32 ``[N, C/16, H, W, 16]`` between kernels. Each conv rounds its input to
  bf16 (to nearest, ties to even, as ``vcvtneps2bf16`` does) in its padding stage, which it
  materialises anyway, so the 16 lanes read as 8 pairs of input channels;
- weights: bf16 ``[K/16, C/16, R, S, 8, 16, 2]`` (input-channel pair, output lane, 2 input
  channels), packed at compile time (``kiln.ir.kiln_ops.pack_bf16_conv_weight``); each 16 x 2
  block is the 64 bytes the instruction reads;
- output: float32 ``[N, K/16, OH, OW, 16]`` through the float conv's epilogue (bias, residual,
  activation).

bf16 values are kept as their uint16 bit patterns, in the IR and in TVM. TVM 0.27's LLVM backend
has no bfloat16 type: its legalisation turns bf16 loads into float32 ones, and an intrinsic that
takes ``<32 x bfloat>`` cannot be called from TIR. So kiln links a three-line LLVM function
(``kiln_dpbf16ps``, bit casts around the intrinsic, inlined) into each kernel with TVM's
``pragma_import_llvm``, and the tensor intrinsic calls it on ``<16 x i32>`` vectors.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from kiln.codegen._tvm import target_has

BF16_INTRIN = "kiln_dot_16x2_bf16bf16f32_avx512"
LANES = 16  # float32 accumulator lanes of a zmm register
PAIR = 2  # bf16 products summed into each lane per instruction
EXTERN = "kiln_dpbf16ps"

#: the LLVM IR linked into each bf16 kernel: vdpbf16ps on integer vectors, always inlined
LLVM_IR = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define linkonce_odr <16 x float> @{EXTERN}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) #0 {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
attributes #0 = {{ alwaysinline nounwind readnone }}
"""


def has_bf16() -> bool:
    """Whether the current TVM target has AVX-512 BF16."""
    return target_has("avx512bf16")


def widen(bits: Any) -> Any:
    """The float32 value of bf16 bits (uint16): the bits are the float's upper half."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.shift_left(bits.astype("uint32"), tirx.const(16, "uint32")))


def narrow(x: Any) -> Any:
    """float32 ``x`` rounded to bf16 bits (uint16), to nearest with ties to even; NaN stays a quiet NaN."""
    from tvm import tirx

    u32 = "uint32"
    bits = tirx.reinterpret(u32, x)
    odd = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(16, u32)), tirx.const(1, u32))
    rounded = tirx.shift_right(bits + tirx.const(0x7FFF, u32) + odd, tirx.const(16, u32)).astype("uint16")
    return tirx.if_then_else(x != x, tirx.const(0x7FC0, "uint16"), rounded)


@functools.lru_cache(maxsize=None)
def register_bf16_intrinsic() -> str:
    """Register kiln's 16 x 2 bf16 dot (``vdpbf16ps``) tensor intrinsic once; its name."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (PAIR,), "uint16", offset_factor=1)
        B = T.match_buffer(b, (LANES, PAIR), "uint16", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], B[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            for i, k in T.grid(LANES, PAIR):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.reinterpret("float32", T.shift_left(T.Cast("uint32", A[vk]), T.uint32(16))) \
                        * T.reinterpret("float32", T.shift_left(T.Cast("uint32", B[vi, vk]), T.uint32(16)))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (PAIR,), "uint16", offset_factor=1)
        B = T.match_buffer(b, (LANES, PAIR), "uint16", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], B[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            a2 = T.reinterpret(A.vload([0], "uint16x2"), dtype="int32")
            C[T.ramp(T.int32(0), 1, LANES)] = T.call_pure_extern(
                "float32x16", EXTERN, C.vload([0], dtype="float32x16"), T.broadcast(a2, LANES),
                T.reinterpret(B.vload([0, 0], dtype="uint16x32"), dtype="int32x16"))

    try:
        TensorIntrin.get(BF16_INTRIN)
    except Exception:  # noqa: BLE001 - not registered yet (TVM raises for an unknown name)
        TensorIntrin.register(BF16_INTRIN, desc, impl)
    return BF16_INTRIN


def conv_bf16(x: Any, w: Any, epilogue: Callable[[Any, tuple[Any, ...]], Any], *, strides: tuple[int, int],
              pads: tuple[int, int, int, int]) -> Any:
    """The TE compute of a blocked bf16 conv (group 1): ``x`` float32 ``[N, C/16, H, W, 16]``,
    ``w`` bf16 bits ``[K/16, C/16, R, S, 8, 16, 2]``; ``epilogue(conv, (i, k, y, v, j))`` is the
    float conv's write-back step on the float32 sums."""
    from tvm import te, tirx

    n, ci, h, wd, lanes = x.shape
    ko, _, kh, kw, pairs, bo, pair = w.shape
    top, left, bottom, right = pads
    oh = (h + top + bottom - kh) // strides[0] + 1
    ow = (wd + left + right - kw) // strides[1] + 1
    xp = te.compute((n, ci, h + top + bottom, wd + left + right, lanes), lambda i, c, y, v, j: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, v >= left, v < wd + left), narrow(x[i, c, y - top, v - left, j]),
        tirx.const(0, "uint16")), name="pad")
    rc = te.reduce_axis((0, ci), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rp = te.reduce_axis((0, pairs), name="rp")
    rq = te.reduce_axis((0, pair), name="rq")
    conv = te.compute((n, ko, oh, ow, bo), lambda i, k, y, v, j: te.sum(
        widen(xp[i, rc, y * strides[0] + ry, v * strides[1] + rx, rp * pair + rq])
        * widen(w[k, rc, ry, rx, rp, j, rq]), axis=[rc, ry, rx, rp, rq]), name="conv")
    return te.compute(conv.shape, lambda *idx: epilogue(conv, idx), name="epilogue")


#: rows of a bf16 dense kernel's register tile: its input rows are padded to a multiple (zero rows),
#: so that a symbolic M gets whole tiles too (the instruction takes no predicate for a tail)
ROW_TILE = 4


def dense_bf16(a: Any, w: Any, epilogue: Callable[[Any, Any, Any], Any], n: int) -> Any:
    """The TE compute of a bf16 dense layer: ``a`` float32 ``[M, K]``, ``w`` bf16 bits
    ``[N'/16, K'/2, 16, 2]`` (K' = K rounded up to even, N' to 16); ``epilogue(acc, i, c)`` is the
    float32 write-back of output ``[i, c]`` for the first ``n`` columns. The sums run over M rounded
    up to :data:`ROW_TILE` rows."""
    from tvm import te, tirx

    m, k = a.shape
    no, kp, lanes, pair = w.shape
    width, ka = int(kp) * pair, int(k)
    rows = tirx.indexdiv(m + ROW_TILE - 1, ROW_TILE) * ROW_TILE

    def rounded(i: Any, c: Any) -> Any:
        inside = tirx.all(i < m, c < ka) if width != ka else i < m
        return tirx.if_then_else(inside, narrow(a[tirx.min(i, m - 1), tirx.min(c, ka - 1)]), tirx.const(0, "uint16"))

    a16 = te.compute((rows, width), rounded, name="pad")
    rk = te.reduce_axis((0, kp), name="rk")
    rq = te.reduce_axis((0, pair), name="rq")
    acc = te.compute((rows, no * lanes), lambda i, c: te.sum(
        widen(a16[i, rk * pair + rq]) * widen(w[c // lanes, rk, c % lanes, rq]), axis=[rk, rq]), name="dense")
    return te.compute((m, n), lambda i, c: epilogue(acc, i, c), name="epilogue")
