"""Control-flow passes: an ``If`` whose condition is a constant becomes its taken branch.

Exporters leave ``If`` nodes whose conditions come from static shapes (PyTorch's
``if x.dim() == 2`` in silero-vad's LSTM wrapper, for one). Once the shapes are
pinned, fold-constants turns those conditions into constants, and this pass moves
the taken branch's nodes into the parent graph, just where the ``If`` stood: reads
of outer values stay as they are, and the ``If``'s output names are kept. The
values after it get their shapes again, so the next round of folding sees the
branch's static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.ir import Graph, Node, Value, infer_shapes
from kiln.passes.manager import Pass, PassResult, register_pass


def constant_condition(node: Node) -> bool | None:
    """The value of an ``If``'s condition when it is a one-element constant, else None."""
    cond = node.input(0)
    if node.op_type != "If" or node.domain != "" or cond is None or not cond.is_constant:
        return None
    arr = np.asarray(cond.numpy())
    return bool(arr.reshape(-1)[0]) if arr.size == 1 else None


def inline_if(node: Node, taken: bool) -> list[Value]:
    """Replace ``node`` (an If) by its ``then`` (``taken``) or ``else`` branch; returns the values now in its place."""
    g = node.graph
    assert g is not None
    branch: Graph = node.attr("then_branch" if taken else "else_branch")
    inner = {id(v) for v in branch.values()}
    results = list(branch.outputs)
    g.absorb(branch, before=node)
    placed: list[Value] = []
    used: set[int] = set()
    for o, src in zip(node.outputs, results):
        if not o.name:
            continue
        b = src
        if id(b) not in inner or id(b) in used:
            # an outer value, or one already standing for another output: an Identity carries the name
            b = g.make_node("Identity", [src], before=node).outputs[0]
            b.dtype, b.shape = src.dtype, src.shape
        used.add(id(b))
        name = o.name
        o.replace_all_uses_with(b)
        o.name = g.fresh_name(f"{name}_if")
        g.rename_value(b, name)
        placed.append(b)
    g.remove_node(node)
    return placed


def forget_shapes_after(values: list[Value]) -> None:
    """Drop the shapes of every node output that depends on ``values`` (in subgraphs too), to infer them again."""
    seen = {id(v) for v in values}
    stack = list(values)
    while stack:
        v = stack.pop()
        for node in _readers(v):
            for o in node.outputs:
                if o.name and id(o) not in seen:
                    seen.add(id(o))
                    if not (o.is_graph_output and o.graph is not None and o.graph.parent_node is not None):
                        o.shape = None
                    stack.append(o)


def _readers(v: Value) -> list[Node]:
    """The nodes reading ``v``; a read from inside a subgraph counts for the nodes holding it, up to ``v``'s graph."""
    out = []
    for n in v.users:
        out.append(n)
        g = n.graph
        while g is not None and g is not v.graph and g.parent_node is not None:
            out.append(g.parent_node)
            g = g.parent_node.graph
    return out


@register_pass
@dataclass
class InlineConstantIf(Pass):
    """Replaces every ``If`` with a constant condition by the branch it takes (in subgraphs too)."""

    name = "inline-if"

    def run(self, graph: Graph) -> PassResult:
        placed: list[Value] = []
        inlined = 0
        progress = True
        while progress:  # an inlined branch may hold further Ifs with constant conditions
            progress = False
            for g in list(graph.walk_graphs()):
                for node in g.nodes:
                    taken = constant_condition(node) if node.graph is g else None
                    if taken is None:
                        continue
                    placed += inline_if(node, taken)
                    inlined += 1
                    progress = True
        if inlined:
            forget_shapes_after(placed)
            infer_shapes(graph)
        return PassResult.of(graph, inlined)
