"""The IR's text form, one line per node::

    graph main (opset 17)
      input %x: f32[N,3,224,224]
      const %w: f32[64,3,7,7]
      %y = Conv(%x, %w) {pads=[3,3,3,3], strides=[2,2]} : f32[N,64,112,112]
      return %y

Small constants print their values, large ones only their type. Subgraphs are
printed inline after the node that owns them, indented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kiln.ir.types import Attr, AttrType, Tensor

if TYPE_CHECKING:
    from kiln.ir.core import Graph, Node

_INLINE_ELEMENTS = 8


def format_graph(graph: Graph, indent: int = 0) -> str:
    """The whole graph as text."""
    lines: list[str] = []
    _graph_lines(graph, indent, lines)
    return "\n".join(lines)


def format_node(node: Node) -> str:
    """One node as its text line (no subgraphs)."""
    outs = ", ".join(f"%{o.name}" if o.name else "_" for o in node.outputs)
    ins = ", ".join("None" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = {k: a for k, a in sorted(node.attrs.items()) if a.type not in (AttrType.GRAPH, AttrType.GRAPHS)}
    attr_text = ""
    if attrs:
        attr_text = " {" + ", ".join(f"{k}={format_attr(a)}" for k, a in attrs.items()) + "}"
    types = ", ".join(o.type_str() for o in node.outputs if o.name)
    return f"{outs} = {node.qualified_op}({ins}){attr_text} : {types}"


def format_attr(a: Attr) -> str:
    """An attribute value as compact text."""
    if a.type in (AttrType.INTS, AttrType.FLOATS):
        return "[" + ",".join(_num(x) for x in a.value) + "]"
    if a.type is AttrType.STRINGS:
        return "[" + ",".join(repr(x) for x in a.value) + "]"
    if a.type is AttrType.STRING:
        return repr(a.value)
    if a.type is AttrType.FLOAT:
        return _num(a.value)
    if a.type is AttrType.TENSOR:
        return format_tensor(a.value)
    if a.type is AttrType.TENSORS:
        return "[" + ", ".join(format_tensor(t) for t in a.value) + "]"
    if a.type is AttrType.GRAPH:
        return f"<graph {a.value.name}>"
    if a.type is AttrType.GRAPHS:
        return "[" + ", ".join(f"<graph {g.name}>" for g in a.value) + "]"
    return str(a.value)


def format_tensor(t: Tensor) -> str:
    """A tensor's type, and its values when it is small and loaded."""
    ty = f"{t.dtype}[{','.join(str(d) for d in t.shape)}]"
    if t.size <= _INLINE_ELEMENTS and t.is_loaded:
        flat = np.asarray(t.numpy()).reshape(-1)
        return f"{ty} {{" + ",".join(_num(x) for x in flat.tolist()) + "}"
    return ty


def _num(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _graph_lines(graph: Graph, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    opset = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(graph.opset.items()))
    lines.append(f"{pad}graph {graph.name}" + (f" (opset {opset})" if opset else ""))
    for v in graph.inputs:
        lines.append(f"{pad}  input %{v.name}: {v.type_str()}")
    for v in graph.constants.values():
        assert v.const is not None
        lines.append(f"{pad}  const %{v.name}: {format_tensor(v.const)}")
    for node in graph.nodes:
        lines.append(f"{pad}  {format_node(node)}")
        for name, a in sorted(node.attrs.items()):
            for sub in a.graphs():
                lines.append(f"{pad}    {name}:")
                _graph_lines(sub, indent + 3, lines)
    lines.append(f"{pad}  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
