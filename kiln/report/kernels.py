"""Which graph nodes each compiled kernel computes, and how many FLOPs they take.

The lowerer records, for each prim func it emits, the nodes it was emitted for (one func can
serve several nodes of the same shapes). TVM's FuseOps then merges chains of injective funcs
into one kernel named ``fused_<a>_<b>_...`` after them; :func:`kernel_funcs` reads such a name
back into its funcs. FLOPs are counted for the ops that do multiply-accumulates (Conv, Gemm,
MatMul and kiln's fused and blocked forms of them, and attention's two products), as
2 x MACs, at the graph's static shapes or, where they are symbolic, at the shapes of a run;
other kernels' FLOPs are not counted (they are memory-bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, Iterable, Mapping

import numpy as np

from kiln.ir import Graph, Node, Value
from kiln.ir.summary import KILN_MAC_OPS, node_macs

FUSED_PREFIX = "fused_"


Shapes = Mapping[str, tuple[int, ...]]


def _static(shape: object) -> tuple[int, ...] | None:
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        return None
    return shape


def node_flops(node: Node, shapes: Shapes | None = None) -> int | None:
    """2 x the multiply-accumulates of ``node`` (see :func:`kiln.ir.summary.node_macs`); None when
    not counted or not known.

    ``shapes`` gives values' concrete shapes (from a run) where the graph's are symbolic.
    """
    macs = node_macs(node)
    if macs is None:
        return None
    bound: dict[str, int] = {}
    for v in (*node.inputs, *node.outputs):
        if v is None or v.shape is None:
            continue
        concrete = tuple(shapes[v.name]) if shapes and v.name in shapes else _static(v.shape)
        if concrete is not None and len(concrete) == len(v.shape):
            bound.update((d, a) for d, a in zip(v.shape, concrete) if isinstance(d, str))
    if any(s not in bound for syms in macs.terms for s in syms):
        return None
    return 2 * sum(c * int(np.prod([bound[s] for s in syms], dtype=np.int64)) for syms, c in macs.terms.items())


def unknown_shapes(graph: Graph) -> list[str]:
    """The values whose symbolic shapes keep FLOPs from being counted: inputs and outputs of MAC nodes."""
    out: dict[str, None] = {}
    for n in graph.walk_nodes():
        if node_flops(n) is None and (node_macs(n) is not None or n.op_type in KILN_MAC_OPS and n.domain == "kiln"):
            out.update((v.name, None) for v in (*n.inputs, *n.outputs) if v is not None and v.name
                       and not v.is_constant and _static(v.shape) is None)
    return list(out)


def kernel_funcs(kernel: str, funcs: Collection[str]) -> list[str]:
    """The prim funcs kernel ``kernel`` is made of: ``[kernel]`` if it is one, else those its fused name joins.

    An empty list when the name is neither (a VM builtin, or a name TVM shortened).
    """
    if kernel in funcs:
        return [kernel]
    if not kernel.startswith(FUSED_PREFIX):
        return []
    parts = kernel[len(FUSED_PREFIX):].split("_")
    known = frozenset(funcs)

    @lru_cache(maxsize=None)
    def split(i: int) -> tuple[str, ...] | None:  # the parts from i on, as func names (the longest first)
        if i == len(parts):
            return ()
        for j in range(len(parts), i, -1):
            name = "_".join(parts[i:j])
            if name in known:
                rest = split(j)
                if rest is not None:
                    return (name, *rest)
        return None

    found = split(0)
    return list(dict.fromkeys(found)) if found else []


@dataclass
class KernelMap:
    """The nodes each prim func was emitted for, and the queries on kernel names that use it."""

    funcs: dict[str, list[str]]  # prim func name -> node names

    def nodes_of(self, kernel: str) -> list[str]:
        """The nodes a kernel computes (its funcs' nodes, in order, without repeats)."""
        return list(dict.fromkeys(n for f in kernel_funcs(kernel, self.funcs) for n in self.funcs[f]))

    def kernels_of(self, node: str, kernels: Iterable[str]) -> list[str]:
        """Which of ``kernels`` (an artifact's kernel names) compute ``node``."""
        return [k for k in kernels if node in self.nodes_of(k)]

    def funcs_of(self, node: str) -> list[str]:
        """The prim funcs emitted for ``node``."""
        return [f for f, nodes in self.funcs.items() if node in nodes]


def kernel_map(graph: Graph) -> KernelMap:
    """Lower ``graph`` (as the build does; nothing is compiled) and read which node each prim func came from."""
    from kiln.codegen.lowering import lower

    return KernelMap(dict(lower(graph).kernels))
