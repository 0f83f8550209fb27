"""Lowerings of ONNX's elementwise ops: unary math, activations, comparisons, logic, bits, casts,
and the identities (Identity, inference Dropout).

Each op is one prim func. Binary ops broadcast numpy-style through :func:`broadcast`, which
indexes each operand with 0 along its size-1 dims. Semantics follow ONNX where topi's differ:
integer Div truncates, Mod follows the divisor's sign unless ``fmod=1``, Round is half to even,
integer Pow is computed in float64, a Cast to bool is ``x != 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import apply_activation, erf_expr, get_topi, is_one, keep_nan_max, keep_nan_min, tanh_expr
from kiln.ir import Node, const_ints

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _const(v: float | int, dt: str) -> Any:
    from tvm import tirx

    return tirx.const(v, dt)


def broadcast(fn: Callable[..., Any], *ts: Any, name: str = "ew") -> Any:
    """``fn`` applied to scalars of ``ts`` with numpy broadcasting, as one ``te.compute``."""
    from tvm import te

    rank = max(len(t.shape) for t in ts)
    shape: list[Any] = []
    for k in range(rank):
        dims = [t.shape[len(t.shape) - rank + k] for t in ts if len(t.shape) - rank + k >= 0]
        big = [d for d in dims if not is_one(d)]
        shape.append(big[0] if big else 1)

    def at(t: Any, idx: tuple[Any, ...]) -> Any:
        off = rank - len(t.shape)
        return t[tuple(0 if is_one(d) and not is_one(shape[off + j]) else idx[off + j]
                       for j, d in enumerate(t.shape))] if t.shape else t[()]

    return te.compute(shape, lambda *i: fn(*(at(t, i) for t in ts)), name=name)


def _emit_ew(lw: Lowerer, node: Node, fn: Callable[..., Any]) -> list[Any]:
    """Emit ``fn`` over the node's (present) inputs, broadcast, as one prim func."""
    ins = [lw.get(v) for v in node.inputs if v is not None]
    name = node.op_type.lower()
    return [lw.emit(lambda *ts: broadcast(fn, *ts, name=name), *ins, name=name)]


# =========================================================================== unary math


def _map(x: Any, expr: Callable[[Any], Any], name: str) -> Any:
    """``expr`` on every element of the TE tensor ``x``."""
    from tvm import te

    return te.compute(x.shape, lambda *i: expr(x(*i)), name=name)


_UNARY: dict[str, Callable[[Any], Any]] = {
    "Relu": lambda x: apply_activation(x, "Relu", ()), "Sigmoid": lambda x: get_topi().sigmoid(x), "Tanh": lambda x: _map(x, tanh_expr, "tanh"),
    "Exp": lambda x: get_topi().exp(x), "Log": lambda x: get_topi().log(x), "Sqrt": lambda x: get_topi().sqrt(x),
    "Abs": lambda x: get_topi().abs(x), "Neg": lambda x: get_topi().negative(x), "Erf": lambda x: _map(x, erf_expr, "erf"),
    "Floor": lambda x: get_topi().floor(x), "Ceil": lambda x: get_topi().ceil(x), "Sin": lambda x: get_topi().sin(x),
    "Cos": lambda x: get_topi().cos(x), "Reciprocal": lambda x: get_topi().divide(1.0, x),
}


@lowers(*_UNARY)
def _unary(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.emit(_UNARY[node.op_type], lw.get(node.input(0)), name=node.op_type.lower())]


def _tir(name: str) -> Callable[[Any], Any]:
    def f(x: Any) -> Any:
        from tvm import tirx

        return getattr(tirx, name)(x)

    return f


_TIR_UNARY = {"Tan": "tan", "Sinh": "sinh", "Cosh": "cosh", "Asin": "asin", "Acos": "acos", "Atan": "atan",
              "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh", "Round": "nearbyint", "IsNaN": "isnan"}


@lowers(*_TIR_UNARY)
def _tir_unary(lw: Lowerer, node: Node) -> list[Any]:
    return _emit_ew(lw, node, _tir(_TIR_UNARY[node.op_type]))


@lowers("Sign")
def _sign(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    def f(x: Any) -> Any:
        dt = x.dtype
        if str(dt).startswith("uint"):
            return tirx.Select(x > _const(0, dt), _const(1, dt), _const(0, dt))
        return tirx.Select(x > _const(0, dt), _const(1, dt), tirx.Select(x < _const(0, dt), _const(-1, dt), x))

    return _emit_ew(lw, node, f)


@lowers("IsInf")
def _isinf(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)

    def f(x: Any) -> Any:
        inf = tirx.isinf(x)
        if pos and neg:
            return inf
        if pos:
            return tirx.all(inf, x > _const(0, x.dtype))
        if neg:
            return tirx.all(inf, x < _const(0, x.dtype))
        return tirx.const(False, "bool")

    return _emit_ew(lw, node, f)


@lowers("Not", "BitwiseNot")
def _not(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    return _emit_ew(lw, node, lambda x: tirx.Not(x) if str(x.dtype) == "bool" else tirx.bitwise_not(x))


@lowers("Identity")
def _alias(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.get(node.input(0))]


@lowers("Dropout", reads=(0,))
def _dropout(lw: Lowerer, node: Node) -> list[Any]:
    """Inference Dropout: the input, and an all-true mask when one is asked for."""
    from tvm import te, tirx

    training = node.input(2)
    if training is not None and const_ints(training) != [0]:
        raise CodegenError(f"node {node.label()}: training-mode Dropout draws random masks; it does not compile")
    x = lw.get(node.input(0))
    if len(node.outputs) < 2 or not node.outputs[1].name:
        return [x]
    # every element is kept; before opset 12 onnxruntime writes the mask as all false (its identity kernel
    # zeroes it), and users compare with it
    keep = lw.graph.model_opset.get("", 21) >= 12
    mask = lw.emit(lambda t: te.compute(t.shape, lambda *i: tirx.const(keep), name="mask"), x, name="dropout_mask")
    return [x, mask]


# =========================================================================== activations


@lowers("LeakyRelu", "HardSigmoid", "HardSwish", "Gelu")
def _param_activation(lw: Lowerer, node: Node) -> list[Any]:
    op = node.op_type
    params: tuple[float, ...] = ()
    if op == "LeakyRelu":
        params = (node.attr("alpha", 0.01),)
    elif op == "HardSigmoid":
        params = (node.attr("alpha", 0.2), node.attr("beta", 0.5))
    elif op == "Gelu":
        params = (1.0,) if node.attr("approximate", "none") == "tanh" else ()
    return [lw.emit(lambda x: apply_activation(x, op, params), lw.get(node.input(0)), name=op.lower())]


@lowers("Gelu", domain="kiln")
def _kiln_gelu(lw: Lowerer, node: Node) -> list[Any]:
    params = (1.0,) if node.attr("approximate", "none") == "tanh" else ()
    return [lw.emit(lambda x: apply_activation(x, "Gelu", params), lw.get(node.input(0)), name="gelu")]


def _exp_m1(x: Any, dt: str) -> Any:
    from tvm import tirx

    return tirx.exp(x) - _const(1, dt)


@lowers("Elu", "Selu", "Celu", "ThresholdedRelu", "Softplus", "Softsign", "Shrink", "Mish", "Swish")
def _activation(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    op = node.op_type

    def f(x: Any) -> Any:
        dt = x.dtype
        zero = _const(0, dt)
        if op == "Elu":
            return tirx.Select(x < zero, _const(node.attr("alpha", 1.0), dt) * _exp_m1(x, dt), x)
        if op == "Selu":
            alpha = _const(node.attr("alpha", 1.67326319217681884765625), dt)
            gamma = _const(node.attr("gamma", 1.05070102214813232421875), dt)
            return gamma * tirx.Select(x > zero, x, alpha * _exp_m1(x, dt))
        if op == "Celu":
            alpha = _const(node.attr("alpha", 1.0), dt)
            return tirx.max(zero, x) + tirx.min(zero, alpha * _exp_m1(x / alpha, dt))
        if op == "ThresholdedRelu":
            return tirx.Select(x > _const(node.attr("alpha", 1.0), dt), x, zero)
        if op == "Softplus":
            return tirx.log1p(tirx.exp(x))
        if op == "Softsign":
            return x / (_const(1, dt) + tirx.abs(x))
        if op == "Shrink":
            if _int(dt):  # as onnxruntime: compared and shifted in float (the attributes' type), then truncated
                xf = tirx.Cast("float32", x)
                bias, lambd = _const(node.attr("bias", 0.0), "float32"), _const(node.attr("lambd", 0.5), "float32")
                y = tirx.Select(xf < -lambd, xf + bias, tirx.Select(xf > lambd, xf - bias, _const(0, "float32")))
                return tirx.Cast(dt, y)
            bias, lambd = _const(node.attr("bias", 0.0), dt), _const(node.attr("lambd", 0.5), dt)
            return tirx.Select(x < -lambd, x + bias, tirx.Select(x > lambd, x - bias, zero))
        if op == "Mish":
            return x * tirx.tanh(tirx.log1p(tirx.exp(x)))
        # Swish
        return x * tirx.sigmoid(_const(node.attr("alpha", 1.0), dt) * x)

    return _emit_ew(lw, node, f)


@lowers("SwiGLU")
def _swiglu(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    alpha = node.attr("alpha", 1.0)
    return _emit_ew(lw, node, lambda a, b: a * tirx.sigmoid(_const(alpha, str(a.dtype)) * a) * b)


@lowers("Binarizer", domain="ai.onnx.ml")
def _binarizer(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    th = node.attr("threshold", 0.0)
    return _emit_ew(lw, node, lambda x: tirx.Select(x > _const(th, str(x.dtype)), _const(1, str(x.dtype)),
                                                    _const(0, str(x.dtype))))


@lowers("PRelu")
def _prelu(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    return _emit_ew(lw, node, lambda x, s: tirx.Select(x < _const(0, x.dtype), x * s, x))


@lowers("Clip")
def _clip(lw: Lowerer, node: Node) -> list[Any]:
    """Clip with bounds as attributes (opset < 11) or as optional inputs, for floats and ints.

    NaN follows onnxruntime, as users compare with it (the spec is silent, and onnx's reference
    gives NaN): a NaN bound is no bound, and a NaN input stays NaN. onnxruntime clips with
    ``max(x, lo)`` then ``min(., hi)`` as ``x < lo ? lo : x`` and ``hi < x ? hi : x``
    (:func:`keep_nan_max`, :func:`keep_nan_min`); TIR's max/min would return the bound for a NaN
    input and NaN for a NaN bound. An absent float bound is the dtype's lowest or highest value, as
    in onnxruntime (and opset 6's attribute defaults): -inf clips to -FLT_MAX.
    """

    x = lw.get(node.input(0))
    bounds = [(k, lw.get(node.input(i))) for k, i in (("lo", 1), ("hi", 2)) if node.input(i) is not None]
    attrs = {"lo": node.attr("min"), "hi": node.attr("max")}
    kinds = [k for k, _ in bounds]

    def compute(t: Any, *bs: Any) -> Any:
        def f(v: Any, *b: Any) -> Any:
            got = dict(zip(kinds, b))
            dt = np.dtype(str(v.dtype))
            info = np.finfo(dt) if dt.kind == "f" else None
            lo = got.get("lo", _const(attrs["lo"] if attrs["lo"] is not None else float(info.min), v.dtype)
                         if info is not None or attrs["lo"] is not None else None)
            hi = got.get("hi", _const(attrs["hi"] if attrs["hi"] is not None else float(info.max), v.dtype)
                         if info is not None or attrs["hi"] is not None else None)
            if lo is not None:
                v = keep_nan_max(v, lo)
            if hi is not None:
                v = keep_nan_min(v, hi)
            return v

        return broadcast(f, t, *bs, name="clip")

    return [lw.emit(compute, x, *[b for _, b in bounds], name="clip")]


# =========================================================================== binary and variadic


_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Max": "maximum",
           "Min": "minimum", "Equal": "equal", "Less": "less", "Greater": "greater", "LessOrEqual": "less_equal",
           "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or"}


@lowers(*_BINARY, "Sum")
def _topi_binary(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import tirx

    ins = [lw.get(v) for v in node.inputs if v is not None]
    fn_name = _BINARY.get(node.op_type, "add")
    if len(ins) == 1:
        return [ins[0]]
    kind = node.input(0).dtype.numpy.kind if node.input(0).dtype is not None else ""
    if node.op_type == "Equal" and kind == "b":
        # topi's equal on bools emits a float compare of i1 values, which LLVM rejects
        return _emit_ew(lw, node, lambda a, b: tirx.Cast("int8", a) == tirx.Cast("int8", b))
    if node.op_type in ("Max", "Min") and kind == "f":
        # onnxruntime's Max and Min propagate NaN (TIR's max and min would return the other operand)
        pick = tirx.max if node.op_type == "Max" else tirx.min

        def nan_max(*xs: Any) -> Any:
            out = xs[0]
            for x in xs[1:]:
                out = tirx.Select(tirx.isnan(out), out, tirx.Select(tirx.isnan(x), x, pick(out, x)))
            return out

        return _emit_ew(lw, node, nan_max)

    def compute(*xs: Any) -> Any:
        fn = getattr(get_topi(), fn_name)
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return [lw.emit(compute, *ins, name=node.op_type.lower())]


@lowers("Where")
def _where(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.emit(get_topi().where, *[lw.get(v) for v in node.inputs], name="where")]


def _int(dt: Any) -> bool:
    return str(dt).startswith(("int", "uint"))


def _div(a: Any, b: Any) -> Any:
    from tvm import tirx

    return tirx.truncdiv(a, b) if _int(a.dtype) else a / b


def _mod(fmod: int) -> Callable[[Any, Any], Any]:
    def f(a: Any, b: Any) -> Any:
        from tvm import tirx

        if _int(a.dtype):
            return tirx.truncmod(a, b) if fmod else tirx.floormod(a, b)
        r = tirx.truncmod(a, b)  # LLVM frem: C fmod, exact
        if fmod:
            return r
        zero = _const(0, a.dtype)  # numpy's mod: the result takes the divisor's sign
        signs_differ = tirx.Or(tirx.And(r < zero, b > zero), tirx.And(r > zero, b < zero))
        return tirx.Select(signs_differ, r + b, r)

    return f


def _pow(out_dt: str) -> Callable[[Any, Any], Any]:
    def f(a: Any, b: Any) -> Any:
        from tvm import tirx

        if _int(out_dt):  # exact for the integer results float64 can hold
            return tirx.Cast(out_dt, tirx.pow(tirx.Cast("float64", a), tirx.Cast("float64", b)))
        return tirx.pow(a, tirx.Cast(a.dtype, b) if str(b.dtype) != str(a.dtype) else b)

    return f


def _bitshift(left: bool) -> Callable[[Any, Any], Any]:
    def f(a: Any, b: Any) -> Any:
        from tvm import tirx

        bits = int(str(a.dtype).lstrip("uint") or 32)
        shifted = tirx.shift_left(a, b) if left else tirx.shift_right(a, b)
        # shifting by a negative count or the width or more (undefined in LLVM) fills with the sign
        fill = _const(0, a.dtype)
        if not left and str(a.dtype).startswith("int"):
            fill = tirx.Select(a < _const(0, a.dtype), _const(-1, a.dtype), fill)
        return tirx.Select(tirx.Or(b >= _const(bits, b.dtype), b < _const(0, b.dtype)), fill, shifted)

    return f


def _binary_fn(node: Node) -> Callable[[Any, Any], Any]:
    from tvm import tirx

    op = node.op_type
    if op == "Div":
        return _div
    if op == "Mod":
        return _mod(node.attr("fmod", 0))
    if op == "Pow":
        return _pow(node.outputs[0].dtype.numpy.name)
    if op == "BitShift":
        return _bitshift(node.attr("direction") == "LEFT")
    return {"Xor": lambda a, b: tirx.Or(tirx.And(a, tirx.Not(b)), tirx.And(tirx.Not(a), b)), "BitwiseAnd": tirx.bitwise_and, "BitwiseOr": tirx.bitwise_or,
            "BitwiseXor": tirx.bitwise_xor}[op]


@lowers("Div", "Mod", "Pow", "BitShift", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor")
def _binary(lw: Lowerer, node: Node) -> list[Any]:
    return _emit_ew(lw, node, _binary_fn(node))


@lowers("Mean")
def _mean(lw: Lowerer, node: Node) -> list[Any]:
    n = len([v for v in node.inputs if v is not None])
    dt = node.outputs[0].dtype.numpy.name

    def f(*xs: Any) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out / _const(n, dt)

    return _emit_ew(lw, node, f)


# =========================================================================== casts


def _cast_to(dt: str) -> Callable[[Any], Any]:
    def f(x: Any) -> Any:
        from tvm import tirx

        if dt == "bool" and str(x.dtype) != "bool":  # nonzero; NaN too (x != 0 is an ordered compare, false for NaN)
            return tirx.Select(x == _const(0, x.dtype), tirx.const(False), tirx.const(True))
        return tirx.Cast(dt, x)

    return f


@lowers("Cast")
def _cast(lw: Lowerer, node: Node) -> list[Any]:
    return _emit_ew(lw, node, _cast_to(node.outputs[0].dtype.numpy.name))


@lowers("CastLike", reads=(0,))
def _cast_like(lw: Lowerer, node: Node) -> list[Any]:
    dt = node.outputs[0].dtype.numpy.name
    name = "castlike"
    return [lw.emit(lambda t: broadcast(_cast_to(dt), t, name=name), lw.get(node.input(0)), name=name)]


@lowers("BitCast")
def _bitcast(lw: Lowerer, node: Node) -> list[Any]:
    """Reinterpret the bits of each element (same width only: other widths change the shape)."""
    from tvm import tirx

    src, dst = node.input(0).dtype.numpy, node.outputs[0].dtype.numpy
    if src.itemsize != dst.itemsize:
        raise CodegenError(f"node {node.label()}: BitCast between widths does not compile yet")

    def f(x: Any) -> Any:
        if src.kind == "b" or dst.kind == "b":  # bool is one byte, 0 or 1
            return tirx.Cast(dst.name, x) if dst.kind != "b" else x != _const(0, src.name)
        return tirx.reinterpret(dst.name, x)

    return _emit_ew(lw, node, f)
