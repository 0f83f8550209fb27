"""Lowerings of the ops that make a tensor from nothing but its shape and attributes:
ConstantOfShape, EyeLike, Range and the signal windows (Hann, Hamming, Blackman).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import full, output_dims, scalar, static_shape
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


@lowers("ConstantOfShape", reads=())
def _constant_of_shape(lw: Lowerer, node: Node) -> list[Any]:
    value = node.attr("value")
    arr = np.asarray(value.numpy() if hasattr(value, "numpy") else (value if value is not None else 0.0))
    dt = node.outputs[0].dtype.numpy.name
    v = arr.reshape(-1)[0].item() if arr.size else 0
    dims = output_dims(lw, node)
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
    from tvm import te, tirx

    dims = output_dims(lw, node)
    dt = node.outputs[0].dtype.numpy.name

    def compute(start: Any, limit: Any, delta: Any) -> Any:
        return te.compute(dims, lambda i: scalar(start) + tirx.Cast(dt, i) * scalar(delta), name="range")

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="range")]


@lowers("HannWindow", "HammingWindow", "BlackmanWindow", reads=())
def _window(lw: Lowerer, node: Node) -> list[Any]:
    """The signal windows, periodic or symmetric, of the declared length."""
    from tvm import te, tirx

    so = static_shape(node.outputs[0])
    if so is None:
        raise CodegenError(f"node {node.label()}: the window length must be known to compile")
    length = so[0]
    n = length if node.attr("periodic", 1) else length - 1
    dt = node.outputs[0].dtype.numpy.name
    op = node.op_type

    def body(i: Any) -> Any:
        x = tirx.Cast("float64", i) * tirx.const(2 * math.pi / max(n, 1), "float64")
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
