"""kiln's graph IR and its ONNX bridge (the only part of kiln that imports onnx)."""

from __future__ import annotations

from kiln.ir.core import (
    DEFAULT_DOMAIN, KILN_DOMAIN, Attr, AttrType, Dim, Graph, Node, Shape, Tensor, Use, Value, const_ints, is_static,
    is_unknown_dim, normalize_axes, normalize_axis, shape_example,
)
from kiln.ir.dtypes import DType
from kiln.ir import kiln_ops  # noqa: F401 - registers the kiln-domain ops
from kiln.ir.interpreter import Evaluator, evaluate, evaluate_node
from kiln.ir.onnx_io import load, save_onnx
from kiln.ir.serde import from_onnx, to_onnx
from kiln.ir.shape_inference import (
    SequenceShape, infer_shapes, name_unknown_dims, reinfer_if_untyped, set_input_shapes, window_minimums,
)

__all__ = [
    "DEFAULT_DOMAIN", "KILN_DOMAIN", "Attr", "AttrType", "DType", "Dim", "Evaluator", "Graph", "Node", "SequenceShape", "Shape",
    "Tensor", "Use", "Value", "const_ints", "normalize_axes", "normalize_axis", "evaluate", "evaluate_node", "from_onnx", "infer_shapes", "is_static", "is_unknown_dim", "load",
    "name_unknown_dims", "reinfer_if_untyped", "save_onnx", "set_input_shapes", "shape_example", "to_onnx",
    "window_minimums",
]
