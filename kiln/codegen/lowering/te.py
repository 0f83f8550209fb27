"""TE and TIR helpers that more than one op family uses.

Scalar expressions (``exp_expr``, ``activation_expr``, indices wrapped into range), dim
arithmetic (``prod``, ``simplify``, ``broadcast_dims``, ``is_one``), small computes
(``full``, ``per_channel``, ``batched_matmul``), conv and pool padding (``spatial_pads``), and
what the declared shapes tell a lowering (``static_shape``, ``known_shape``, ``output_dims``).

An ONNX op may take its axes, sizes or repeats as a run-time input. kiln compiles for the shapes
that shape inference settled, so where the output shape determines such a value (Expand's
shape, Tile's repeats) the lowering reads it from :func:`output_dims`.

TVM is imported inside each function: ``import tvm`` takes seconds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from kiln.codegen.lowering.registry import CodegenError
from kiln.errors import RUNTIME_CHECK
from kiln.ir import Node, Value, is_static

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def get_topi() -> Any:
    """``tvm.topi``, imported on first use."""
    from tvm import topi

    return topi


# =========================================================================== scalar expressions


def exp_expr(v: Any) -> Any:
    """``exp(v)`` for float32 from vector-friendly arithmetic (Cephes' expf: a degree-6
    polynomial on the reduced argument, scaled by 2^n through the exponent bits).

    LLVM turns ``exp`` into one libm call per lane, which made SiLU epilogues 4x slower than
    the conv they follow; this vectorises. Measured against numpy over [-100, 100]: at most
    1 ulp apart where the result is a normal float; 0 below -87.3, +inf above 88.7.
    """
    from tvm import tirx

    dt = "float32"

    def c(x: float) -> Any:
        return tirx.const(x, dt)

    x = tirx.min(tirx.max(v, c(-87.33654)), c(88.72283))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    r = x - n * c(0.693359375) + n * c(2.12194440e-4)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(k)
    y = p * r * r + r + c(1)

    def pow2(k: Any) -> Any:  # 2^k for |k| <= 64, through the exponent bits
        return tirx.reinterpret(dt, tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))

    ni = n.astype("int32")
    half = tirx.shift_right(ni, tirx.const(1, "int32"))  # 2^n as two factors: each stays a normal float
    big = tirx.Select(v > c(88.72283), c(float("inf")), y * pow2(half) * pow2(ni - half))
    return tirx.Select(v < c(-87.33654), c(0), big)


@contextmanager
def statements() -> Iterator[None]:
    """A TIR IRBuilder frame for several statements in a row that leaves nothing in the code.

    ``T.seq_scope()`` does the same with a dummy ``pragma_scope`` attribute, which LLVM's codegen
    then warns about to the user ("Unknown pragma"); a loop of one iteration simplifies away.
    """
    from tvm.script.ir_builder import tirx as T

    with T.serial(0, 1):
        yield


#: erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (a rational fit of degrees 13 and 8; erf is 1 to float32
#: precision beyond 4): P's coefficients, highest power first, then Q's
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_expr(v: Any) -> Any:
    """``erf(v)`` from vector-friendly arithmetic for float32 (other dtypes: TIR's erf).

    LLVM makes TIR's erf one libm call per lane: a BERT's GELU took 9% of its run. Measured
    against math.erf over [-6, 6]: at most 4.2e-7 apart (7 ulp). NaN stays NaN.
    """
    from tvm import tirx

    if _expr_dtype(v) != "float32":
        return tirx.erf(v)

    def c(x: float) -> Any:
        return tirx.const(x, "float32")

    x = tirx.min(tirx.max(v, c(-4.0)), c(4.0))
    x2 = x * x
    p = c(_ERF_P[0])
    for k in _ERF_P[1:]:
        p = p * x2 + c(k)
    q = c(_ERF_Q[0])
    for k in _ERF_Q[1:]:
        q = q * x2 + c(k)
    return tirx.Select(tirx.isnan(v), v, x * p / q)


def tanh_expr(v: Any) -> Any:
    """``tanh(v)`` from vector-friendly arithmetic for float32 (other dtypes: TIR's tanh).

    TIR's tanh becomes one libm exp per lane. Here: ``1 - 2 / (exp(2|v|) + 1)`` with kiln's vector
    exp, with the sign of ``v``, and below |v| = 1/4 (where that formula cancels) the odd Taylor
    polynomial to v^9. NaN stays NaN.
    """
    from tvm import tirx

    if _expr_dtype(v) != "float32":
        return tirx.tanh(v)

    def c(x: float) -> Any:
        return tirx.const(x, "float32")

    a = tirx.abs(v)
    big = c(1) - c(2) / (exp_expr(a * c(2)) + c(1))
    v2 = v * v
    small = v * (c(1) + v2 * (c(-1 / 3) + v2 * (c(2 / 15) + v2 * (c(-17 / 315) + v2 * c(62 / 2835)))))
    return tirx.Select(tirx.isnan(v), v, tirx.Select(a < c(0.25), small, tirx.Select(v < c(0), -big, big)))


def _sigmoid_expr(v: Any) -> Any:
    from tvm import tirx

    if _expr_dtype(v) != "float32":
        return tirx.sigmoid(v)
    one = tirx.const(1, "float32")
    return one / (one + exp_expr(-v))


def _expr_dtype(v: Any) -> str:
    return str(v.ty) if hasattr(v, "ty") else v.dtype  # TIR exprs have .ty; TE tensor reads have .dtype


def keep_nan_max(v: Any, bound: Any) -> Any:
    """``max(v, bound)`` as onnxruntime's kernels take it (``std::max``: ``v < bound ? bound : v``).

    A NaN ``v`` stays NaN and a NaN bound is no bound; TIR's max gives the bound for a NaN ``v``.
    Relu, Clip and HardSigmoid (alone or as a conv's epilogue) clamp with this and :func:`keep_nan_min`.
    """
    from tvm import tirx

    return tirx.Select(v < bound, bound, v)


def keep_nan_min(v: Any, bound: Any) -> Any:
    """``min(v, bound)`` as onnxruntime's kernels take it (``bound < v ? bound : v``); see :func:`keep_nan_max`."""
    from tvm import tirx

    return tirx.Select(bound < v, bound, v)


def activation_expr(v: Any, name: str, params: tuple[float, ...]) -> Any:
    """A kiln epilogue activation (see kiln.ir.kiln_ops) on one TIR scalar ``v``; a NaN stays NaN, as in the
    standalone ops."""
    from tvm import tirx

    dt = _expr_dtype(v)

    def c(x: float) -> Any:
        return tirx.const(x, dt)

    if name == "":
        return v
    if name == "Relu":
        return keep_nan_max(v, c(0))
    if name == "Clip":
        return keep_nan_min(keep_nan_max(v, c(params[0])), c(params[1]))
    if name == "LeakyRelu":
        return tirx.Select(v >= c(0), v, v * c(params[0]))
    if name == "Sigmoid":
        return _sigmoid_expr(v)
    if name == "Tanh":
        return tanh_expr(v)
    if name == "HardSigmoid":
        return keep_nan_max(keep_nan_min(v * c(params[0]) + c(params[1]), c(1)), c(0))
    if name == "HardSwish":
        return v * tirx.max(tirx.min(v / c(6) + c(0.5), c(1)), c(0))
    if name == "SiLU":
        return v * _sigmoid_expr(v)
    if name == "Gelu":
        if params and params[0]:
            k = float(np.sqrt(2 / np.pi))
            return c(0.5) * v * (c(1) + tanh_expr(c(k) * (v + c(0.044715) * v * v * v)))
        return c(0.5) * v * (c(1) + erf_expr(v * c(float(1 / np.sqrt(2)))))
    raise CodegenError(f"activation '{name}' has no lowering")


def apply_activation(x: Any, name: str, params: tuple[float, ...]) -> Any:
    """A kiln epilogue activation on a TE tensor (the tensor itself for no activation)."""
    from tvm import te

    if name == "":
        return x
    return te.compute(x.shape, lambda *i: activation_expr(x(*i), name, params), name=(name or "id").lower())


def scalar(t: Any, *i: Any) -> Any:
    """Element ``i`` of a 1-D tensor, or the value of a 0-d (or one-element) tensor."""
    if i:
        return t[i]
    return t[tuple(0 for _ in t.shape)]


def wrap_index(i: Any, n: Any) -> Any:
    """A possibly negative run-time index (or axis) into a dim of size ``n``, made non-negative, as int64."""
    from tvm import tirx

    i = i.astype("int64") if str(_expr_dtype(i)) != "int64" else i
    return tirx.Select(i < 0, i + n, i)


def checked_indices(idx: Any, bound: Callable[[tuple[Any, ...]], Any], what: str) -> Any:
    """``idx`` as in-range int64 indices (negative ones wrapped), checked at run time.

    ``bound(i)`` is the size of the dim that the index at position ``i`` addresses. An index
    outside ``[-n, n - 1]`` stops the run with ``what`` (the runtime reports it as a bad input,
    as onnxruntime refuses such a run) instead of reading or writing outside the tensor. The
    check is its own small serial kernel, so that the failing run ends cleanly.
    """
    from tvm import te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    def body(ins: Any, outs: Any) -> Any:
        with IRBuilder() as ib:
            src, dst = T.buffer_proxy(ins[0]), T.buffer_proxy(outs[0])
            loops = [T.serial(0, d) for d in idx.shape]
            frames = [loop.__enter__() for loop in loops]
            i = tuple(frames)
            v = src[i] if i else src[()]
            v = v.astype("int64") if str(_expr_dtype(v)) != "int64" else v
            n = tirx.Cast("int64", bound(i)) if str(_expr_dtype(bound(i))) != "int64" else bound(i)
            with T.Assert(tirx.all(v >= -n, v < n), RUNTIME_CHECK + what):
                dst[i if i else ()] = tirx.Select(v < 0, v + n, v)
            for loop in reversed(loops):
                loop.__exit__(None, None, None)
        return ib.get()

    return te.extern([idx.shape], [idx], body, dtype=["int64"], name="checked_indices")


def pick(k: Any, values: Sequence[Any]) -> Any:
    """``values[k]`` for a run-time index ``k`` into a static list of ints or dim expressions, as int64."""
    from tvm import tirx

    def c(v: Any) -> Any:
        return tirx.const(v, "int64") if isinstance(v, int) else tirx.Cast("int64", v)

    out: Any = c(values[-1])
    for j in range(len(values) - 2, -1, -1):
        out = tirx.Select(k == j, c(values[j]), out)
    return out


# =========================================================================== dims


def is_one(d: Any) -> bool:
    """Whether a dim (an int or a TIR expression) is the constant 1."""
    v = getattr(d, "value", d)  # a TIR IntImm holds its int in .value
    return isinstance(v, int) and v == 1


def prod(dims: Any) -> Any:
    """The product of ``dims`` (ints or TIR expressions); 1 for none."""
    out = 1
    for d in dims:
        out = out * d
    return out


def simplify(e: Any) -> Any:
    """A symbolic dim expression in its simplest form (ints pass through)."""
    from tvm.sym import Analyzer  # tvm.arith in older TVM

    return e if isinstance(e, int) else Analyzer().simplify(e)


def broadcast_dims(a: list[Any], b: list[Any]) -> list[Any]:
    """numpy broadcasting of two dim lists (a size-1 dim gives way to the other)."""
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    return [y if is_one(x) else x for x, y in zip(a, b)]


# =========================================================================== small computes


def full(dims: list[Any], value: Any, dt: str, name: str) -> Any:
    """A tensor of ``dims`` filled with ``value``."""
    from tvm import te, tirx

    return te.compute(dims, lambda *i: tirx.const(value, dt), name=name)


def per_channel(v: Any, rank: int = 4) -> Any:
    """A per-channel vector as [1, C, 1, ...] for broadcasting over NC... of ``rank`` dims."""
    return get_topi().reshape(v, (1, v.shape[0], *([1] * (rank - 2))))


def batched_matmul(a: Any, b: Any, trans_b: bool = False) -> Any:
    """N-D MatMul (numpy broadcasting over the batch dims) as reshapes around batch_matmul."""
    topi = get_topi()
    if len(a.shape) == 2 and len(b.shape) == 2:
        return topi.nn.matmul(a, b, transpose_b=trans_b)
    if len(b.shape) == 2:
        m = topi.nn.matmul(topi.reshape(a, (prod(a.shape[:-1]), a.shape[-1])), b, transpose_b=trans_b)
        return topi.reshape(m, (*a.shape[:-1], m.shape[-1]))
    return _broadcast_batch_matmul(a, b, trans_b)


#: a static last axis that vectorised loops run is padded to a multiple of this (every target's
#: float32 vector divides it): a tail predicate in a vectorised loop scalarises it
VECTOR_ALIGN = 16


def pad_last_axis(t: Any, fill: float, name: str) -> Any:
    """``t`` with a static last axis padded with ``fill`` to a multiple of :data:`VECTOR_ALIGN`
    (``t`` itself if it is symbolic or already a multiple)."""
    from tvm import te, tirx

    n = getattr(t.shape[-1], "value", None)
    if not isinstance(n, int) or n % VECTOR_ALIGN == 0:
        return t
    padded = -(-n // VECTOR_ALIGN) * VECTOR_ALIGN
    return te.compute((*t.shape[:-1], padded), lambda *i: tirx.if_then_else(
        i[-1] < n, t[(*i[:-1], tirx.min(i[-1], n - 1))], tirx.const(fill, t.dtype)), name=name)


def scheduled_batch_matmul(a: Any, b: Any, epilogue: Callable[[Any, tuple], Any] | None = None) -> Any:
    """``a @ b`` for rank >= 3 (batch dims broadcast) as the ``dense`` reduction and an ``epilogue``
    stage that the ``dense`` schedule takes, with the batch dims run in parallel beside N's panels.

    A static N that the vectors do not divide (Whisper's 1500 keys) is padded with zero columns
    in a ``b_pad`` stage, so the register tile's FMAs carry no tail predicate (which scalarised
    them: Q·Kt took 7x as long as the P·V of the same size); the epilogue drops the pad.
    ``epilogue(value, index)``, if given, is applied as the tile is written back.
    """
    from tvm import te

    n = b.shape[-1]
    dense = _broadcast_batch_matmul(a, pad_last_axis(b, 0.0, "b_pad"), False, name="dense")
    return te.compute((*dense.shape[:-1], n), lambda *i: dense(*i) if epilogue is None else epilogue(dense(*i), i),
                      name="epilogue")


def _broadcast_batch_matmul(a: Any, b: Any, trans_b: bool, name: str = "batch_matmul") -> Any:
    """``a @ b`` (or ``a @ b^T``) for rank >= 3, broadcasting the batch dims in place.

    A direct compute rather than topi's batch_matmul, which asserts that the contracted dims
    are identical after simplifying each separately, and so refuses equal symbolic dims that
    reached it along different paths (rapidocr rec with a symbolic width).
    """
    from tvm import te

    rank = max(len(a.shape), len(b.shape))
    a_batch = [1] * (rank - len(a.shape)) + list(a.shape[:-2])
    b_batch = [1] * (rank - len(b.shape)) + list(b.shape[:-2])
    batch = broadcast_dims(a_batch, b_batch)
    n_out = b.shape[-2] if trans_b else b.shape[-1]
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    a_off, b_off = rank - len(a.shape), rank - len(b.shape)

    def pick(idx: tuple, dims: list, off: int) -> list:
        return [0 if is_one(d) else idx[off + i] for i, d in enumerate(dims[off:])]

    def body(*idx: Any) -> Any:
        i, j = idx[-2], idx[-1]
        ai = pick(idx, a_batch, a_off) + [i, k]
        bi = pick(idx, b_batch, b_off) + ([j, k] if trans_b else [k, j])
        return te.sum(a[tuple(ai)] * b[tuple(bi)], axis=k)

    return te.compute((*batch, a.shape[-2], n_out), body, name=name)


# =========================================================================== conv and pool geometry


def spatial_pads(node: Node, kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """ONNX pads ``[begins..., ends...]`` of a conv or pool, resolving ``auto_pad`` from the input shape."""
    n = len(kernel)
    auto = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto == "VALID":
        return [0] * (2 * n)
    if auto == "NOTSET":
        return list(node.attr("pads", ()) or [0] * (2 * n))
    spatial = list((node.input(0).shape or [])[2:])
    if len(spatial) != n or not all(isinstance(d, int) for d in spatial):
        raise CodegenError(f"node {node.label()}: auto_pad {auto} needs static spatial input dims to compile")
    begins, ends = [], []
    for d, k, st, dl in zip(spatial, kernel, strides, dil):
        out = -(-d // st)
        total = max((out - 1) * st + (k - 1) * dl + 1 - d, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


# =========================================================================== what the declared shapes say


def static_shape(v: Value | None) -> list[int] | None:
    """The value's shape when every dim is a known int."""
    return list(v.shape) if v is not None and is_static(v.shape) else None  # type: ignore[arg-type]


def known_shape(v: Value, bound: Any = ()) -> bool:
    """Every dim of ``v`` is an int or a symbol with a TIR value (``bound``: ``Lowerer.bound``).

    A name no graph input defines and no lowered value has shown (an exporter's ``dim_param`` on an
    output whose size depends on the data) is not known: compiling it as a fresh variable would
    leave it undefined at run time.
    """
    return v.shape is not None and not any(d is None or (isinstance(d, str) and d not in bound) for d in v.shape)


def settled(v: Value | None) -> bool:
    """Whether ``v``'s declared shape is known before anything runs: ints, and symbols of the graph's inputs.

    Ops whose output shape a run-time input decides (Reshape's target, Tile's repeats) read that input
    only where this is false (their ``reads`` functions), so shape subgraphs that merely confirm a
    declared shape are not compiled."""
    if v is None or v.shape is None or v.graph is None:
        return False
    names = {d for i in v.graph.root.inputs for d in (i.shape or ()) if isinstance(d, str)}
    return all(isinstance(d, int) or d in names for d in v.shape)


def int64_vector(t: Any, n: int) -> Any:
    """A 1-D or 0-d integer tensor as a (n,) int64 tensor (what :meth:`Lowerer.runtime_dims` reads)."""
    from tvm import te, tirx

    return te.compute((n,), lambda i: tirx.Cast("int64", t[i] if len(t.shape) else t[()]), name="as_int64")


def output_dims(lw: Lowerer, node: Node) -> list[Any]:
    """The declared shape of the node's first output as TIR dims: named symbols as int64 variables,
    derived ones as the expressions the lowerer learnt; raises when a dim is unknown."""
    v = node.outputs[0]
    if not known_shape(v, lw.bound):
        raise CodegenError(f"node {node.label()}: the output shape is not known well enough to compile")
    return [lw.dim(d) for d in v.shape]
