"""Lowerings of ONNX's quantization ops: QuantizeLinear, DequantizeLinear (per tensor, per axis or
per block) and DynamicQuantizeLinear. The quantized convs and matmuls are in :mod:`.conv` and
:mod:`.matmul`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.codegen.lowering.registry import lowers
from kiln.codegen.lowering.te import is_one
from kiln.ir import Node, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _q_param(p: Any, i: tuple[Any, ...], axis: int, block: int) -> Any:
    """A scale or zero point for element ``i``: per tensor, per axis, or per block along ``axis``.

    One element is per tensor whatever its rank: opset 10's scale of shape [1] is a scalar (it is not
    indexed by the element's coordinate along ``axis``, which reads past its end)."""
    if all(is_one(d) for d in p.shape):
        return p[tuple(0 for _ in p.shape)]
    if not block:
        return p[i[axis]]
    return p[tuple(j // block if k == axis and block else j for k, j in enumerate(i))]


@lowers("QuantizeLinear", "DequantizeLinear")
def _quantize(lw: Lowerer, node: Node) -> list[Any]:
    """y = saturate(round_half_even(x / scale) + zero_point), and its inverse (x - zero_point) * scale."""
    from tvm import te, tirx

    axis = normalize_axis(node.attr("axis", 1), node.input(0).rank or 0)
    block = node.attr("block_size", 0)
    out_dt = node.outputs[0].dtype.numpy
    has_zp = node.input(2) is not None
    quant = node.op_type == "QuantizeLinear"
    ins = [lw.get(node.input(i)) for i in range(3) if node.input(i) is not None]

    def compute(t: Any, scale: Any, *zp: Any) -> Any:
        def body(*i: Any) -> Any:
            s = _q_param(scale, i, axis, block)
            z = _q_param(zp[0], i, axis, block) if has_zp else None
            if quant:
                f = str(s.dtype) if str(s.dtype) == "float64" else "float32"
                v = tirx.nearbyint(tirx.Cast(f, t[i]) / tirx.Cast(f, s))
                if z is not None:
                    v = v + tirx.Cast(f, z)
                info = np.iinfo(out_dt)
                lo = tirx.const(float(info.min), f)
                clamped = tirx.max(tirx.min(v, tirx.const(float(info.max), f)), lo)
                # NaN quantizes to the lowest value, as in onnxruntime (its float -> int conversion gives INT_MIN)
                return tirx.Cast(out_dt.name, tirx.Select(tirx.isnan(v), lo, clamped))
            v = tirx.Cast("int32", t[i]) - (tirx.Cast("int32", z) if z is not None else tirx.const(0, "int32"))
            return tirx.Cast(out_dt.name, tirx.Cast(str(s.dtype), v) * s)

        return te.compute(t.shape, body, name=node.op_type.lower())

    return [lw.emit(compute, *ins, name=node.op_type.lower())]


@lowers("DynamicQuantizeLinear")
def _dynamic_quantize(lw: Lowerer, node: Node) -> list[Any]:
    """uint8 quantization with the scale and zero point computed from the data's range (incl. 0)."""
    from kiln.codegen.int8 import dynamic_quantize

    def compute(t: Any) -> Any:
        return list(dynamic_quantize(t))

    out = lw.emit(compute, lw.get(node.input(0)), name="dynamic_quantize_linear")
    return lw.unpack(out, node)
