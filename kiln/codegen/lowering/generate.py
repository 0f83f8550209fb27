"""Lowerings of the ops that make a tensor from nothing but its shape and attributes:
ConstantOfShape, EyeLike, Range and the signal windows (Hann, Hamming, Blackman).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import full, int64_vector, known_shape, output_dims, scalar, settled, static_shape
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _unsettled_reads(node: Node) -> tuple[int, ...]:
    """The shape (or length) input is read only where the declared output shape does not settle it."""
    return () if settled(node.outputs[0]) else tuple(range(len(node.inputs)))


@lowers("ConstantOfShape", reads=_unsettled_reads)
def _constant_of_shape(lw: Lowerer, node: Node) -> list[Any]:
    """A filled tensor of the declared shape, or of a shape read at run time."""
    value = node.attr("value")
    arr = np.asarray(value.numpy() if hasattr(value, "numpy") else (value if value is not None else 0.0))
    dt = node.outputs[0].dtype.numpy.name
    v = arr.reshape(-1)[0].item() if arr.size else 0
    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
    else:
        n = (node.input(0).shape or [None])[0]
        if not isinstance(n, int):
            raise CodegenError(f"node {node.label()}: ConstantOfShape needs a shape of static length to compile")
        dims = lw.runtime_dims(lw.get(node.input(0)), n, "shape") if n else []
    return [lw.emit(lambda: full(dims, v, dt, "constant_of_shape"), name="constant_of_shape")]


@lowers("EyeLike", reads=())
def _eye_like(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    k = node.attr("k", 0)
    dt = node.outputs[0].dtype.numpy.name
    dims = output_dims(lw, node)
    return [lw.emit(lambda: te.compute(dims, lambda i, j: tirx.Select(j - i == k, tirx.const(1, dt), tirx.const(0, dt)),
                                        name="eye_like"), name="eye_like")]


@lowers("Range")
def _range(lw: Lowerer, node: Node) -> list[Any]:
    """start + i * delta for the declared length, or max(ceil((limit - start) / delta), 0) read at run time."""
    from tvm import te, tirx

    dt = node.outputs[0].dtype.numpy.name
    if known_shape(node.outputs[0], lw.bound):
        dims = output_dims(lw, node)
    else:
        def count(start: Any, limit: Any, delta: Any) -> Any:
            a, b, d = scalar(start), scalar(limit), scalar(delta)
            if dt.startswith(("int", "uint")):  # ceil(q / d) = -floor(-q / d), exact in integers
                q = tirx.Cast("int64", b) - tirx.Cast("int64", a)
                n = -tirx.floordiv(-q, tirx.Cast("int64", d))
            else:
                n = tirx.Cast("int64", tirx.ceil((tirx.Cast("float64", b) - tirx.Cast("float64", a)) / tirx.Cast("float64", d)))
            return te.compute((1,), lambda _: tirx.max(n, tirx.const(0, "int64")), name="range_count")

        dims = lw.computed_dims(count, *[lw.get(node.input(i)) for i in range(3)], count=1, name="range")

    def compute(start: Any, limit: Any, delta: Any) -> Any:
        return te.compute(dims, lambda i: scalar(start) + tirx.Cast(dt, i) * scalar(delta), name="range")

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="range")]


@lowers("HannWindow", "HammingWindow", "BlackmanWindow", reads=_unsettled_reads)
def _window(lw: Lowerer, node: Node) -> list[Any]:
    """The signal windows, periodic or symmetric, of the declared length or of a length read at run time."""
    from tvm import te, tirx

    so = static_shape(node.outputs[0])
    if so is not None:
        length: Any = so[0]
    else:
        (length,) = lw.computed_dims(lambda t: int64_vector(t, 1), lw.get(node.input(0)), count=1, name="window")
    periodic = bool(node.attr("periodic", 1))
    n = length if periodic else length - 1
    dt = node.outputs[0].dtype.numpy.name
    op = node.op_type

    def body(i: Any) -> Any:
        # a symmetric window of length 1 divides 0 by 0: NaN, as in onnxruntime and onnx's reference
        if isinstance(n, int):
            step = tirx.const(2 * math.pi / n if n else math.nan, "float64")
        else:
            step = tirx.const(2 * math.pi, "float64") / tirx.Cast("float64", n)
        x = tirx.Cast("float64", i) * step
        if op == "HannWindow":
            v = tirx.const(0.5, "float64") - tirx.const(0.5, "float64") * tirx.cos(x)
        elif op == "HammingWindow":
            a = 25.0 / 46.0
            v = tirx.const(a, "float64") - tirx.const(1 - a, "float64") * tirx.cos(x)
        else:
            v = tirx.const(0.42, "float64") - tirx.const(0.5, "float64") * tirx.cos(x) + \
                tirx.const(0.08, "float64") * tirx.cos(x * tirx.const(2.0, "float64"))
        return tirx.Cast(dt, v)

    return [lw.emit(lambda: te.compute((length,), body, name="window"), name=op.lower())]
