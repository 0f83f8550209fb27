"""kiln's graph IR: ``Graph``, ``Node`` and ``Value``, on the leaves in :mod:`kiln.ir.types`.

The IR is SSA. Every ``Value`` is defined exactly once: by a node output, as a
graph input, or as a constant (a ``Value`` holding a ``Tensor``). Each value
keeps its list of uses, ``(node, input index)`` pairs, and the mutation methods
(``Node.set_input``, ``Value.replace_all_uses_with``, ``Graph.remove_node``, ...)
keep producers and uses correct. ``Graph.verify()`` checks all of it.

Shapes are tuples of dims (see :mod:`kiln.ir.types`); a shape of ``None`` means the rank
itself is unknown. ``verify()`` and ``str()`` call the verifier and the printer, which need
only the leaves, so neither imports this module.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import numpy as np

from kiln.errors import GraphError
from kiln.ir.dtypes import DType
from kiln.ir.types import (  # noqa: F401 - re-exported: the IR's names, from one module
    DEFAULT_DOMAIN, KILN_DOMAIN, Attr, AttrType, Dim, Shape, Tensor, Use, is_static, is_unknown_dim, normalize_axes,
    normalize_axis, normalize_domain, shape_example,
)

# --------------------------------------------------------------------------- values and nodes


class Value:
    """An SSA value: a graph input, a constant, or a node output."""

    __slots__ = ("name", "dtype", "shape", "producer", "index", "const", "graph", "_uses", "sequence", "seq_shapes",
                 "__weakref__")

    def __init__(
        self,
        name: str,
        dtype: DType | None = None,
        shape: Shape | None = None,
        *,
        const: Tensor | None = None,
    ):
        self.name = name
        self.dtype = dtype if dtype is not None or const is None else const.dtype
        self.shape: Shape | None = tuple(shape) if shape is not None else (const.shape if const is not None else None)
        self.producer: Node | None = None
        self.index: int = 0
        self.const: Tensor | None = const
        self.graph: Graph | None = None
        self._uses: list[Use] = []
        # a sequence of tensors (a graph input or output of sequence type): dtype and shape are its elements'
        self.sequence = False
        # a sequence input's elements' shapes (so its length), once pinned (see set_input_shapes)
        self.seq_shapes: tuple[Shape, ...] | None = None

    # -- queries
    @property
    def uses(self) -> tuple[Use, ...]:
        """The ``(node, input index)`` pairs that read this value."""
        return tuple(self._uses)

    @property
    def users(self) -> list[Node]:
        """The distinct nodes that read this value, in use order."""
        seen: dict[int, Node] = {}
        for u in self._uses:
            seen.setdefault(id(u.node), u.node)
        return list(seen.values())

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and self.producer is None and self.const is None and self in self.graph.inputs

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.outputs)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def const_ints(self) -> list[int] | None:
        """A constant's elements as a flat list of Python ints; None if the value is not a constant."""
        return const_ints(self)

    def numpy(self) -> np.ndarray:
        """The constant payload; raises if the value is not a constant."""
        if self.const is None:
            raise GraphError(f"value '{self.name}' is not a constant")
        return self.const.numpy()

    def type_str(self) -> str:
        """``f32[1,3,224,224]``-style type text."""
        dt = self.dtype.short if self.dtype is not None else "?type"
        text = f"{dt}[*]" if self.shape is None else f"{dt}[{','.join(str(d) for d in self.shape)}]"
        if not self.sequence:
            return text
        return f"seq({text})" if self.seq_shapes is None else f"seq{len(self.seq_shapes)}({text})"

    # -- mutation
    def replace_all_uses_with(self, other: Value, *, graph_outputs: bool = True) -> None:
        """Make every reader of this value read ``other`` instead.

        With ``graph_outputs`` (the default) a graph output that is this value
        becomes ``other`` too, in the owning graph and in its subgraphs.
        """
        if other is self:
            return
        for use in list(self._uses):
            use.node.set_input(use.index, other)
        if graph_outputs and self.graph is not None:
            for g in self.graph.walk_graphs():
                g.outputs = [other if v is self else v for v in g.outputs]

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type_str()}"


class Node:
    """One operation: op type, domain, inputs, outputs and typed attributes.

    Missing optional inputs are ``None``. Subgraphs (If/Loop/Scan bodies) live
    in GRAPH attributes, and their ``parent_node`` points back here.
    """

    __slots__ = ("op_type", "domain", "name", "_inputs", "outputs", "attrs", "graph", "doc", "__weakref__")

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        attrs: dict[str, Any] | None = None,
        *,
        domain: str = DEFAULT_DOMAIN,
        outputs: Sequence[Value | str] | int = 1,
        name: str = "",
    ):
        self.op_type = op_type
        self.domain = normalize_domain(domain)
        self.name = name
        self.graph: Graph | None = None
        self.doc = ""
        self.attrs: dict[str, Attr] = {k: _attr(v) for k, v in (attrs or {}).items()}
        self._inputs: list[Value | None] = []
        for v in inputs:
            self._append_input(v)
        if isinstance(outputs, int):
            outputs = [""] * outputs
        self.outputs: list[Value] = []
        for i, o in enumerate(outputs):
            value = o if isinstance(o, Value) else Value(o)
            if value.producer is not None:
                raise GraphError(f"value '{value.name}' already has a producer ({value.producer.op_type})")
            value.producer, value.index = self, i
            self.outputs.append(value)
        for sub in self.subgraphs():
            sub.parent_node = self

    # -- inputs and use-def
    def _append_input(self, v: Value | None) -> None:
        idx = len(self._inputs)
        self._inputs.append(v)
        if v is not None:
            v._uses.append(Use(self, idx))

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    def input(self, i: int) -> Value | None:
        """Input ``i``, or None if it is absent or past the end."""
        return self._inputs[i] if i < len(self._inputs) else None

    def set_input(self, i: int, v: Value | None) -> None:
        """Replace input ``i``, keeping both values' use lists correct."""
        old = self._inputs[i]
        if old is v:
            return
        if old is not None:
            old._uses.remove(Use(self, i))
        self._inputs[i] = v
        if v is not None:
            v._uses.append(Use(self, i))

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        """Replace the whole input list."""
        self.detach_inputs()
        for v in values:
            self._append_input(v)

    def replace_input_with(self, old: Value, new: Value) -> None:
        """Replace every occurrence of ``old`` among the inputs with ``new``."""
        for i, v in enumerate(self._inputs):
            if v is old:
                self.set_input(i, new)

    def detach_inputs(self) -> None:
        """Drop all inputs, removing this node from their use lists."""
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.remove(Use(self, i))
        self._inputs = []

    # -- attributes and subgraphs
    def attr(self, name: str, default: Any = None) -> Any:
        """The plain value of attribute ``name``, or ``default``."""
        a = self.attrs.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any) -> None:
        """Set an attribute from a plain value or an ``Attr``."""
        a = _attr(value)
        self.attrs[name] = a
        for sub in a.graphs():
            sub.parent_node = self

    def subgraphs(self) -> Iterator[Graph]:
        """The subgraphs held in this node's attributes."""
        for a in self.attrs.values():
            yield from a.graphs()

    @property
    def qualified_op(self) -> str:
        """``op_type`` for the default domain, else ``domain::op_type``."""
        return self.op_type if self.domain == DEFAULT_DOMAIN else f"{self.domain}::{self.op_type}"

    def label(self) -> str:
        """How errors name this node: ``'name' (Op)``."""
        return f"'{self.name}' ({self.qualified_op})" if self.name else f"<unnamed> ({self.qualified_op})"

    def __repr__(self) -> str:
        outs = ", ".join(f"%{o.name}" for o in self.outputs)
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self._inputs)
        return f"<Node {outs} = {self.qualified_op}({ins})>"


# --------------------------------------------------------------------------- graphs


class _Names:
    """The names in use in one namespace of a model, shared by a graph and its subgraphs.

    Value names and node names are separate namespaces, as in ONNX.
    """

    __slots__ = ("used", "_counter")

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._counter = itertools.count()

    def fresh(self, base: str) -> str:
        base = base or "v"
        if base not in self.used:
            self.used.add(base)
            return base
        while True:
            name = f"{base}_{next(self._counter)}"
            if name not in self.used:
                self.used.add(name)
                return name


class Graph:
    """A computation graph: nodes in topological order, inputs, outputs, constants, opsets.

    The top-level graph also carries model-level facts (``ir_version``,
    ``producer``, ``metadata``). A subgraph has ``parent_node`` set and shares
    its model's opset and name table.
    """

    __slots__ = (
        "name", "inputs", "outputs", "_nodes", "constants", "opset", "parent_node",
        "ir_version", "producer", "doc", "metadata", "_names", "_node_names", "__weakref__",
    )

    def __init__(
        self,
        name: str = "main",
        *,
        opset: dict[str, int] | None = None,
        parent_node: Node | None = None,
        names: tuple[_Names, _Names] | None = None,
    ):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self._nodes: list[Node] = []
        self.constants: dict[str, Value] = {}
        self.opset: dict[str, int] = {normalize_domain(k): v for k, v in (opset or {}).items()}
        self.parent_node = parent_node
        self.ir_version: int | None = None
        self.producer = ""
        self.doc = ""
        self.metadata: dict[str, str] = {}
        self._names, self._node_names = names or (_Names(), _Names())

    # -- structure
    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes in topological order (a snapshot; mutate through methods)."""
        return tuple(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(tuple(self._nodes))

    @property
    def parent_graph(self) -> Graph | None:
        return self.parent_node.graph if self.parent_node is not None else None

    @property
    def root(self) -> Graph:
        g = self
        while g.parent_graph is not None:
            g = g.parent_graph
        return g

    @property
    def model_opset(self) -> dict[str, int]:
        """The opset imports in force for this graph (its root's)."""
        return self.root.opset

    def walk_graphs(self) -> Iterator[Graph]:
        """This graph, then every subgraph below it, depth first."""
        yield self
        for n in self._nodes:
            for sub in n.subgraphs():
                yield from sub.walk_graphs()

    def walk_nodes(self) -> Iterator[Node]:
        """Every node in this graph and its subgraphs."""
        for g in self.walk_graphs():
            yield from g._nodes

    def values(self) -> Iterator[Value]:
        """Every value defined in this graph (not subgraphs): inputs, constants, node outputs."""
        yield from self.inputs
        yield from self.constants.values()
        for n in self._nodes:
            yield from n.outputs

    def subgraph(self, name: str) -> Graph:
        """A new empty subgraph sharing this model's name table (attach it with ``Node.set_attr``)."""
        return Graph(name, names=(self._names, self._node_names))

    # -- names
    def fresh_name(self, base: str) -> str:
        """A value name not yet used anywhere in this model."""
        return self._names.fresh(base)

    def rename_value(self, value: Value, name: str) -> None:
        """Give ``value`` (defined in this graph) a new name, keeping the constant table right."""
        if value.const is not None and self.constants.get(value.name) is value:
            del self.constants[value.name]
            self.constants[name] = value
            value.const.name = name
        self._names.used.add(name)
        value.name = name

    def _claim(self, value: Value, base: str) -> None:
        value.name = self._names.fresh(value.name or base)

    # -- building
    def add_input(self, name: str, dtype: DType, shape: Shape | None) -> Value:
        """Append a graph input."""
        v = Value(name, dtype, shape)
        self._claim(v, "input")
        v.graph = self
        self.inputs.append(v)
        return v

    def add_constant(self, data: np.ndarray | Tensor, name: str = "const") -> Value:
        """Add a constant value holding ``data``; the name is made unique."""
        tensor = data if isinstance(data, Tensor) else Tensor(np.asarray(data))
        v = Value(name, const=tensor)
        self._claim(v, "const")
        tensor.name = v.name
        v.graph = self
        self.constants[v.name] = v
        return v

    def remove_constant(self, value: Value) -> None:
        """Remove an unused constant."""
        if value._uses:
            raise GraphError(f"constant '{value.name}' still has {len(value._uses)} use(s)")
        self.constants.pop(value.name, None)
        value.graph = None

    def _adopt(self, node: Node) -> None:
        if node.graph is not None:
            raise GraphError(f"node {node.label()} already belongs to graph '{node.graph.name}'")
        node.graph = self
        node.name = self._node_names.fresh(node.name or node.op_type.lower())
        for o in node.outputs:
            self._claim(o, f"{node.name}_out")
            o.graph = self

    def append(self, node: Node) -> Node:
        """Add ``node`` at the end of the graph."""
        self._adopt(node)
        self._nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        """Add ``node`` just before ``anchor``."""
        idx = self._index(anchor)
        self._adopt(node)
        self._nodes.insert(idx, node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        """Add ``node`` just after ``anchor``."""
        idx = self._index(anchor)
        self._adopt(node)
        self._nodes.insert(idx + 1, node)
        return node

    def make_node(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        domain: str = DEFAULT_DOMAIN,
        num_outputs: int = 1,
        name: str = "",
        before: Node | None = None,
    ) -> Node:
        """Create a node and add it to the graph (at the end, or before ``before``)."""
        node = Node(op_type, inputs, attrs, domain=domain, outputs=num_outputs, name=name)
        return self.insert_before(before, node) if before is not None else self.append(node)

    def _index(self, node: Node) -> int:
        for i, n in enumerate(self._nodes):
            if n is node:
                return i
        raise GraphError(f"node {node.label()} is not in graph '{self.name}'")

    def remove_node(self, node: Node, *, force: bool = False) -> None:
        """Remove ``node``, detaching it from its inputs' use lists.

        Refuses while its outputs still have uses or are graph outputs, unless
        ``force`` is set (the caller then owns the dangling readers).
        """
        if not force:
            for o in node.outputs:
                if o._uses:
                    users = ", ".join(u.node.label() for u in o._uses[:3])
                    raise GraphError(f"cannot remove {node.label()}: output '{o.name}' is still used by {users}")
                if o.is_graph_output:
                    raise GraphError(f"cannot remove {node.label()}: output '{o.name}' is a graph output")
        self._nodes.pop(self._index(node))
        node.detach_inputs()
        node.graph = None

    def absorb(self, sub: Graph, before: Node) -> None:
        """Move every node and constant of ``sub`` (a subgraph in this model) in here, before ``before``.

        Names, inputs and uses stay as they are (the model shares one name table), so reads of
        outer values keep working; ``sub`` is left empty. The caller rewires ``sub``'s outputs.
        """
        if sub.inputs:
            raise GraphError(f"graph '{sub.name}' has inputs; only an input-less body (an If branch) can be absorbed")
        idx = self._index(before)
        for v in sub.constants.values():
            v.graph = self
            self.constants[v.name] = v
        for n in sub._nodes:
            n.graph = self
            for o in n.outputs:
                o.graph = self
        self._nodes[idx:idx] = sub._nodes
        sub._nodes, sub.constants = [], {}

    def set_nodes(self, nodes: Sequence[Node]) -> None:
        """Reorder the graph's nodes (same set, new order), e.g. after a topological sort."""
        if {id(n) for n in nodes} != {id(n) for n in self._nodes} or len(nodes) != len(self._nodes):
            raise GraphError("set_nodes must be given exactly the graph's nodes")
        self._nodes = list(nodes)

    def clone(self) -> Graph:
        """A structural copy of this top-level graph: new nodes and values with the same names,
        types and attributes, subgraphs copied too. Constants get new ``Tensor`` objects that share
        their payload (kiln never changes a payload in place); nothing is re-imported or re-inferred."""
        if self.parent_node is not None:
            raise GraphError(f"graph '{self.name}' is a subgraph; clone the model's top-level graph")
        new = Graph(self.name, opset=self.opset)
        new.ir_version, new.producer, new.doc, new.metadata = self.ir_version, self.producer, self.doc, dict(self.metadata)
        self._copy_into(new, {})
        new._names.used |= self._names.used
        new._node_names.used |= self._node_names.used
        return new

    def _copy_into(self, new: Graph, mapping: dict[int, Value]) -> None:
        """Copy this graph's inputs, constants, nodes and outputs into the empty ``new``; ``mapping``
        takes each old value's id to its copy (outer values first, for subgraphs' reads)."""
        for v in self.inputs:
            mapping[id(v)] = new.add_input(v.name, v.dtype, v.shape)  # type: ignore[arg-type]
            mapping[id(v)].sequence, mapping[id(v)].seq_shapes = v.sequence, v.seq_shapes
        for name, v in self.constants.items():
            assert v.const is not None
            mapping[id(v)] = new.add_constant(v.const.copy(), name)
        for node in self._nodes:
            attrs: dict[str, Attr] = {}
            for key, a in node.attrs.items():
                if a.type is AttrType.GRAPH:
                    attrs[key] = Attr.graph(_copy_subgraph(a.value, new, mapping))
                elif a.type is AttrType.GRAPHS:
                    attrs[key] = Attr(AttrType.GRAPHS, tuple(_copy_subgraph(g, new, mapping) for g in a.value))
                else:
                    attrs[key] = a
            outputs = [Value(o.name, o.dtype, o.shape) for o in node.outputs]
            copy = Node(node.op_type, [None if v is None else mapping[id(v)] for v in node.inputs], attrs,
                        domain=node.domain, outputs=outputs, name=node.name)
            copy.doc = node.doc
            new.append(copy)
            for o, c in zip(node.outputs, outputs):
                if not o.name:
                    c.name = ""  # an optional output nobody asked for stays unnamed
                c.sequence = o.sequence
                mapping[id(o)] = c
        new.outputs = [mapping[id(v)] for v in self.outputs]

    # -- analysis helpers
    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` of this graph's nodes, an edge per producer→consumer.

        Nodes are keyed by node name and carry the ``Node`` as the ``node``
        attribute. Uses from inside subgraphs count as uses by the owning node.
        """
        import networkx as nx

        dg = nx.DiGraph()
        for n in self._nodes:
            dg.add_node(n.name, node=n)
        for n in self._nodes:
            for v in _free_inputs(n):
                p = v.producer
                if p is not None and p.graph is self:
                    dg.add_edge(p.name, n.name, value=v.name)
        return dg

    def sort(self) -> None:
        """Put the nodes in topological order; raises ``GraphError`` on a cycle."""
        import networkx as nx

        dg = self.to_networkx()
        position = {n.name: i for i, n in enumerate(self._nodes)}
        try:
            order = list(nx.lexicographical_topological_sort(dg, key=lambda k: position[k]))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(dg)
            names = " -> ".join(e[0] for e in cycle) + f" -> {cycle[0][0]}"
            raise GraphError(f"graph '{self.name}' has a cycle: {names}") from None
        self._nodes = [dg.nodes[k]["node"] for k in order]

    def verify(self) -> None:
        """Check the IR's invariants; raises ``VerifyError`` naming the first problems."""
        from kiln.ir.verify import verify_graph

        verify_graph(self)

    def __str__(self) -> str:
        from kiln.ir.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self._nodes)} nodes, {len(self.inputs)} inputs, {len(self.outputs)} outputs>"


def _attr(v: Any) -> Attr:
    """An attribute from a plain value, a graph, or a list of graphs (``Attr.infer`` for the rest)."""
    if isinstance(v, Graph):
        return Attr.graph(v)
    if isinstance(v, list | tuple) and v and all(isinstance(x, Graph) for x in v):
        return Attr(AttrType.GRAPHS, tuple(v))
    return Attr.infer(v)


def _copy_subgraph(sub: Graph, parent: Graph, mapping: dict[int, Value]) -> Graph:
    copy = parent.subgraph(sub.name)
    copy.doc = sub.doc
    sub._copy_into(copy, mapping)
    return copy


def const_ints(v: Value | None) -> list[int] | None:
    """A constant value's elements as a flat list of Python ints; None if ``v`` is absent or not constant."""
    if v is None or not v.is_constant:
        return None
    return [int(x) for x in np.asarray(v.numpy()).reshape(-1).tolist()]


def _free_inputs(node: Node) -> Iterator[Value]:
    """The values ``node`` reads: its inputs, plus outer values its subgraphs read."""
    for v in node.inputs:
        if v is not None:
            yield v
    for sub in node.subgraphs():
        inner = {id(v) for g in sub.walk_graphs() for v in g.values()}
        for n in sub.walk_nodes():
            for v in n.inputs:
                if v is not None and id(v) not in inner:
                    yield v
        for g in sub.walk_graphs():
            for v in g.outputs:
                if id(v) not in inner:
                    yield v
