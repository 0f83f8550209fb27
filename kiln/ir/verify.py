"""``Graph.verify()``: the IR's invariants, checked.

It checks ownership (every node and value knows its graph), SSA (one
definition per value, unique names), topological order (including outer-scope
reads from subgraphs), the use-def links in both directions, that every value
has a known dtype, and that each node fits its op schema (input and output
counts, required and known attributes, attribute types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.errors import VerifyError
from kiln.ir import schemas
from kiln.ir.types import Use

if TYPE_CHECKING:
    from kiln.ir.core import Graph, Value

_MAX_REPORTED = 5


def graph_problems(graph: Graph) -> list[str]:
    """Every broken invariant in ``graph`` and its subgraphs, one line each."""
    problems: list[str] = []
    _check(graph, visible=set(), seen_names=set(), problems=problems)
    return problems


def verify_graph(graph: Graph) -> None:
    """Raise ``VerifyError`` if ``graph`` breaks any invariant."""
    problems = graph_problems(graph)
    if problems:
        more = f" (and {len(problems) - _MAX_REPORTED} more)" if len(problems) > _MAX_REPORTED else ""
        shown = "; ".join(problems[:_MAX_REPORTED])
        raise VerifyError(f"graph '{graph.name}' fails verification: {shown}{more}")


def _define(v: Value, graph: Graph, where: str, visible: set[int], seen_names: set[str], problems: list[str]) -> None:
    if v.graph is not graph:
        problems.append(f"{where} '{v.name}' does not belong to graph '{graph.name}'")
    if v.name:  # an empty name marks an optional output nobody asked for
        if v.name in seen_names:
            problems.append(f"value name '{v.name}' is defined more than once")
        seen_names.add(v.name)
        if v.dtype is None:
            problems.append(f"value '{v.name}' has no known dtype")
    if id(v) in visible:
        problems.append(f"value '{v.name}' is defined twice")
    visible.add(id(v))
    for use in v._uses:
        if use.index >= len(use.node._inputs) or use.node._inputs[use.index] is not v:
            problems.append(f"value '{v.name}' lists a stale use by {use.node.label()} input {use.index}")
        elif use.node.graph is None:
            problems.append(f"value '{v.name}' is used by {use.node.label()}, which is in no graph")


def _check(graph: Graph, visible: set[int], seen_names: set[str], problems: list[str]) -> None:
    visible = set(visible)
    for v in graph.inputs:
        if v.producer is not None or v.const is not None:
            problems.append(f"graph input '{v.name}' has a producer or a payload")
        _define(v, graph, "input", visible, seen_names, problems)
    for name, v in graph.constants.items():
        if v.const is None:
            problems.append(f"constant '{name}' has no payload")
        elif v.const.dtype is not v.dtype or tuple(v.const.shape) != tuple(v.shape or ()):
            problems.append(f"constant '{name}' is typed {v.type_str()} but holds {v.const!r}")
        if name != v.name:
            problems.append(f"constant registered as '{name}' is named '{v.name}'")
        _define(v, graph, "constant", visible, seen_names, problems)

    node_names: set[str] = set()
    for node in graph._nodes:
        where = node.label()
        if node.graph is not graph:
            problems.append(f"node {where} does not belong to graph '{graph.name}'")
        if node.name in node_names:
            problems.append(f"node name '{node.name}' is used twice")
        node_names.add(node.name)
        for i, v in enumerate(node._inputs):
            if v is None:
                continue
            if id(v) not in visible:
                problems.append(f"node {where} reads '{v.name}' before it is defined (or it is undefined)")
            if Use(node, i) not in v._uses:
                problems.append(f"node {where} input {i} '{v.name}' is missing from that value's uses")
        for sub in node.subgraphs():
            if sub.parent_node is not node:
                problems.append(f"subgraph '{sub.name}' of {where} does not point back to its node")
            _check(sub, visible, seen_names, problems)
        for j, o in enumerate(node.outputs):
            if o.producer is not node or o.index != j:
                problems.append(f"output {j} '{o.name}' of {where} names another producer")
            _define(o, graph, "output", visible, seen_names, problems)
        problems.extend(f"node {where}: {p}" for p in schemas.check_node(node, graph.model_opset))

    for v in graph.outputs:
        if id(v) not in visible:
            problems.append(f"graph output '{v.name}' of '{graph.name}' is never defined")
