"""The lowering table: which (domain, op type) kiln can lower, and the graph queries that read it.

A family module registers each of its lowerings with :func:`lowers`, and the inputs that can
make a model fail only at run time with :func:`run_time_failure`. The package's ``__init__``
imports every family module, which is what fills the tables; this module imports none of them,
and no TVM, so ``kiln inspect`` can ask :func:`uncompilable` without loading the compiler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from kiln.errors import KilnError
from kiln.ir import Graph, Node, Value

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


class CodegenError(KilnError):
    """The graph cannot be lowered: ops kiln cannot compile, unknown dims without bounds, ..."""


#: A lowering: given the lowerer and the node, one lowered (Relax) value per named output.
Lowering = Callable[["Lowerer", Node], list[Any]]
LOWERINGS: dict[tuple[str, str], Lowering] = {}
#: For ops whose lowering reads only some inputs (the rest must be constants, or only shape the
#: output, which kiln's shape inference already knows): the indices it reads, or a function of the
#: node giving them (Reshape reads its target only when the declared shape does not settle it).
DATA_INPUTS: dict[tuple[str, str], Any] = {}


def lowers(*ops: str, domain: str = "", reads: Any = None) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the lowering of ``ops`` in ``domain``.

    ``reads`` names the input indices the lowering reads (the default: all of them), or is a
    function of the node that gives them; the producers of the other inputs are not compiled
    unless something else needs them.
    """

    def register(fn: Lowering) -> Lowering:
        LOWERINGS.update({(domain, op): fn for op in ops})
        if reads is not None:
            DATA_INPUTS.update({(domain, op): reads for op in ops})
        return fn

    return register


#: For ops whose inputs can be wrong in a way the model itself only meets at run time (onnxruntime fails
#: there too): a check that says why. An If branch that fails such a check at the pinned shapes compiles to a
#: run-time error instead of code (silero-vad's 8 kHz branch given 512 samples).
FailureCheck = Callable[[Node], "str | None"]
RUN_TIME_FAILURES: dict[tuple[str, str], FailureCheck] = {}


def run_time_failure(*ops: str, domain: str = "") -> Callable[[FailureCheck], FailureCheck]:
    """Register the decorated check (node -> why it would fail at run time, or None) for ``ops``."""

    def register(fn: FailureCheck) -> FailureCheck:
        RUN_TIME_FAILURES.update({(domain, op): fn for op in ops})
        return fn

    return register


#: A weight transform: a constant input as its kernel wants it laid out (a numpy function, run once at compile time).
Prepack = Callable[[Any], Any]
#: For ops whose kernels want constant inputs in another layout: input index -> its transform. The lowerer
#: applies it at compile time and the artifact keeps the weight in that layout, so no kernel redoes it per run.
PREPACKS: dict[tuple[str, str], dict[int, Prepack]] = {}


def prepacks(*ops: str, domain: str = "", **transforms: Prepack) -> Callable[[Lowering], Lowering]:
    """Register, for the decorated lowering of ``ops``, transforms of constant inputs (``input_2=fn``)."""

    def register(fn: Lowering) -> Lowering:
        table = {int(k.removeprefix("input_")): t for k, t in transforms.items()}
        PREPACKS.update({(domain, op): table for op in ops})
        return fn

    return register


def packed_inputs(node: Node) -> dict[int, Prepack]:
    """``node``'s constant inputs that its lowering reads prepacked: input index -> transform."""
    table = PREPACKS.get((node.domain, node.op_type), {})
    return {i: t for i, t in table.items() if node.input(i) is not None and node.input(i).is_constant}


def read_values(node: Node) -> Iterator[Value]:
    """The values lowering ``node`` reads: the inputs its lowering uses (a prepacked constant is read in its packed
    form instead, see :meth:`Lowerer.packed`), and what its subgraphs read from outside."""
    reads = DATA_INPUTS.get((node.domain, node.op_type))
    if callable(reads):
        reads = reads(node)
    packed = packed_inputs(node)
    for i, inp in enumerate(node.inputs):
        if inp is not None and (reads is None or i in reads) and i not in packed:
            yield inp
    for sub in node.subgraphs():
        yield from outer_reads(sub)


def outer_reads(graph: Graph) -> list[Value]:
    """The values of enclosing graphs that ``graph``'s needed nodes (and outputs) read."""
    own = {id(v) for v in graph.values()}
    out = [v for n in needed_nodes(graph) for v in read_values(n) if id(v) not in own]
    return out + [v for v in graph.outputs if id(v) not in own]


def needed_nodes(graph: Graph) -> list[Node]:
    """The nodes of ``graph`` whose values its outputs depend on, through the inputs each lowering reads, in order.

    A Reshape whose target is computed from ``Shape`` ops does not need that computation: its
    output shape is known symbolically, so the shape subgraph is not compiled at all. A node
    with subgraphs (If) needs what they read from outside.
    """
    live: set[int] = set()
    stack = [v for v in graph.outputs]
    while stack:
        v = stack.pop()
        n = v.producer
        if n is None or n.graph is not graph or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(read_values(n))
    return [n for n in graph.nodes if id(n) in live]


def branch_failure(graph: Graph) -> str | None:
    """Why running ``graph`` (an If branch) would fail at run time at its shapes, or None."""
    for n in needed_nodes(graph):
        check = RUN_TIME_FAILURES.get((n.domain, n.op_type))
        reason = check(n) if check is not None else None
        if reason:
            return reason
    return None


def compiled_graphs(graph: Graph) -> list[Graph]:
    """``graph`` and the subgraphs that get compiled: those of needed nodes, less branches that fail at run time."""
    out = [graph]
    for n in needed_nodes(graph):
        for sub in n.subgraphs():
            if branch_failure(sub) is None:
                out += compiled_graphs(sub)
    return out


def uncompilable(graph: Graph) -> dict[tuple[str, str], list[str]]:
    """``{(domain, op_type): [node names]}``: the ops the compiled graph needs but kiln cannot lower (subgraphs too)."""
    out: dict[tuple[str, str], list[str]] = {}
    for n in needed_nodes(graph):
        if (n.domain, n.op_type) not in LOWERINGS:
            out.setdefault((n.domain, n.op_type), []).append(n.name)
            continue
        for sub in n.subgraphs():
            if branch_failure(sub) is None:  # a branch that fails at run time is not compiled
                for key, names in uncompilable(sub).items():
                    out.setdefault(key, []).extend(names)
    return out
