"""Constant folding: nodes whose inputs are all constants become constants.

Folding runs each node through kiln's reference evaluator, so any op kiln can
evaluate folds. ``Shape`` and ``Size`` of a value whose shape is static fold
directly, so shape subgraphs (``Shape → Gather → Concat → Reshape``) collapse
when the dims are known. Weights held as ``ConstantOfShape`` fills fold here
too. Random ops and nodes with subgraphs are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import EvaluationError
from kiln.ir import DType, Graph, Node, evaluate_node, is_static, reinfer_if_untyped
from kiln.passes.cleanup import IMPURE_OPS
from kiln.passes.manager import Pass, PassResult, register_pass


def _static_shape_value(node: Node) -> np.ndarray | None:
    """The folded value of ``Shape``/``Size`` when the input's shape is static."""
    x = node.input(0)
    if node.domain != "" or x is None or not is_static(x.shape):
        return None
    dims = np.array(x.shape, dtype=np.int64)
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), dtype=np.int64)
    if node.op_type == "Shape":
        start, end = node.attr("start", 0), node.attr("end", None)
        return dims[start:end]
    return None


@register_pass
@dataclass
class FoldConstants(Pass):
    """Replaces every node whose inputs are all constants by its (new) constant outputs."""

    name = "fold-constants"
    max_elements: int = 1 << 26  # never materialise a constant larger than this

    def run(self, graph: Graph) -> PassResult:
        folded = 0
        for g in list(graph.walk_graphs()):
            for node in g.nodes:
                if node.graph is not g or node.op_type in IMPURE_OPS or any(True for _ in node.subgraphs()):
                    continue
                results = self._fold(node)
                if results is None:
                    continue
                outs = [o for o in node.outputs if o.name]
                new = [g.add_constant(arr, f"{o.name}_folded") for o, arr in zip(outs, results)]
                for o, c in zip(outs, new):
                    o.replace_all_uses_with(c)
                g.remove_node(node)
                for o, c in zip(outs, new):  # the constant takes over the folded value's name
                    name = o.name
                    o.name = g.fresh_name(f"{name}_unfolded")
                    g.rename_value(c, name)
                folded += 1
        if folded:  # a folded shape or size may settle the shapes after it
            reinfer_if_untyped(graph)
        return PassResult.of(graph, folded)

    def _fold(self, node: Node) -> list[np.ndarray] | None:
        if node.op_type in ("Shape", "Size"):
            value = _static_shape_value(node)
            return None if value is None else [value]
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or not all(v.is_constant for v in inputs):
            return None
        for o in node.outputs:
            if o.shape is not None and is_static(o.shape) and int(np.prod(o.shape)) > self.max_elements:
                return None
        try:
            results = evaluate_node(node, {})
        except EvaluationError:
            return None  # the evaluator cannot run it: the node stays, and runs at inference time
        for arr in results:
            try:
                DType.from_numpy(np.asarray(arr).dtype)
            except KeyError:
                return None  # a type kiln does not hold as a constant
        return [np.asarray(r) for r in results]
