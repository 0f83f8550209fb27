"""Walking ONNX protos (before import, where kiln's Graph does not exist yet)."""

from __future__ import annotations

from typing import Iterator

from onnx import AttributeProto, GraphProto, NodeProto


def walk_nodes(g: GraphProto) -> Iterator[NodeProto]:
    """Every node of ``g`` and of its subgraphs, depth first."""
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from walk_nodes(a.g)
            for sg in a.graphs:
                yield from walk_nodes(sg)
