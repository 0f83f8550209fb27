"""Cleanup passes: dead-code elimination and common-subexpression elimination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable


from kiln.ir import AttrType, Graph, Node
from kiln.passes.manager import Pass, PassResult, register_pass

#: Ops with effects beyond their outputs, or that draw random numbers: never removed or merged.
IMPURE_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                        "Multinomial"})


@register_pass
@dataclass
class DeadCodeElimination(Pass):
    """Removes nodes whose outputs nobody reads, and constants nobody reads (in subgraphs too)."""

    name = "dce"

    def run(self, graph: Graph) -> PassResult:
        removed = 0
        for g in reversed(list(graph.walk_graphs())):
            for node in reversed(g.nodes):
                if any(o.uses or o.is_graph_output for o in node.outputs):
                    continue
                g.remove_node(node)
                removed += 1
            for v in list(g.constants.values()):
                if not v.uses and not v.is_graph_output:
                    g.remove_constant(v)
                    removed += 1
        return PassResult.of(graph, removed)


def _attr_key(node: Node) -> Hashable | None:
    items = []
    for k, a in sorted(node.attrs.items()):
        if a.type in (AttrType.GRAPH, AttrType.GRAPHS):
            return None
        if a.type is AttrType.TENSOR:
            arr = a.value.numpy()
            items.append((k, arr.dtype.str, arr.shape, arr.tobytes()))
        elif a.type is AttrType.TENSORS:
            items.append((k, tuple((t.numpy().dtype.str, t.shape, t.numpy().tobytes()) for t in a.value)))
        else:
            items.append((k, a.value))
    return tuple(items)


@register_pass
@dataclass
class CommonSubexpressionElimination(Pass):
    """Merges nodes that compute the same op on the same inputs with the same attributes.

    Identical small constants are merged first, so that two nodes reading equal
    constants become equal too.
    """

    name = "cse"
    max_constant_elements: int = 64

    def run(self, graph: Graph) -> PassResult:
        merged = 0
        for g in graph.walk_graphs():
            merged += self._merge_constants(g)
            seen: dict[Hashable, Node] = {}
            for node in g.nodes:
                if node.op_type in IMPURE_OPS:
                    continue
                attrs = _attr_key(node)
                if attrs is None:
                    continue
                key = (node.domain, node.op_type, tuple(id(v) if v is not None else None for v in node.inputs),
                       len(node.outputs), attrs)
                twin = seen.get(key)
                if twin is None:
                    seen[key] = node
                    continue
                for mine, theirs in zip(node.outputs, twin.outputs):
                    if mine.is_graph_output and theirs.is_graph_output:
                        break  # two distinct graph outputs: keep both names
                else:
                    for mine, theirs in zip(node.outputs, twin.outputs):
                        if mine.is_graph_output:
                            mine.replace_all_uses_with(theirs)
                            out_name = mine.name
                            mine.name = g.fresh_name(out_name + "_cse")
                            g.rename_value(theirs, out_name)
                        else:
                            mine.replace_all_uses_with(theirs)
                    g.remove_node(node)
                    merged += 1
        return PassResult.of(graph, merged)

    def _merge_constants(self, g: Graph) -> int:
        seen: dict[Hashable, object] = {}
        merged = 0
        for v in list(g.constants.values()):
            assert v.const is not None
            if v.const.size > self.max_constant_elements or v.is_graph_output:
                continue
            arr = v.const.numpy()
            key = (arr.dtype.str, arr.shape, arr.tobytes(order="C"))
            twin = seen.get(key)
            if twin is None:
                seen[key] = v
                continue
            v.replace_all_uses_with(twin)  # type: ignore[arg-type]
            g.remove_constant(v)
            merged += 1
        return merged
