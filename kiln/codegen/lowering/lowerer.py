"""Lowering: a kiln ``Graph`` becomes a Relax ``main`` built with ``relax.BlockBuilder``.

Each kiln node, fused kiln ops included, becomes one prim func through ``bb.emit_te`` with
topi computes, by the node's entry in :data:`~kiln.codegen.lowering.registry.LOWERINGS`.
Weights stay function parameters (the artifact keeps them in safetensors); constants of at
most a few elements are baked into the code. Symbolic dims become ``int64`` TIR variables, so
one compiled function runs at any size of them. Lowering checks the whole graph first and
refuses, in one error, every op it cannot lower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kiln.codegen.lowering.registry import (
    LOWERINGS, CodegenError, compiled_graphs, needed_nodes, outer_reads, packed_inputs, read_values, uncompilable,
)
from kiln.ir import Graph, Node, Shape, Tensor, Value

BAKE_LIMIT = 64  # constants with at most this many elements are compiled in
OPAQUE = 8  # TVM's kOpaque op pattern


@dataclass
class Lowered:
    """A lowered model: the Relax module and the order of ``main``'s parameters."""

    module: Any
    inputs: list[str]  # graph input names, in order
    weights: dict[str, np.ndarray]  # weight parameters, in order after the inputs
    kernels: dict[str, list[str]] = field(default_factory=dict)  # prim func name -> the nodes it was emitted for


class Lowerer:
    """Builds the Relax module for one graph."""

    def __init__(self, graph: Graph, lanes: int = 16, int8_pairs: bool = False) -> None:
        from tvm import relax

        self.graph = graph
        self.lanes = lanes  # float32 lanes of the target's vectors (16 with AVX-512, 8 with AVX2)
        self.int8_pairs = int8_pairs  # the target has no VNNI: int8 products keep two partial sums per lane
        self.bb = relax.BlockBuilder()
        self.env: dict[int, Any] = {}
        self.syms: dict[str, Any] = {}  # named input dims: TIR variables
        self.derived: dict[str, Any] = {}  # kiln's other symbolic dims: their TIR expressions
        self.fresh_dims = False  # runtime_dims made dims that the next emitted kernel is the first to use
        self.kernels: dict[str, list[str]] = {}  # prim func name -> the nodes it was emitted for (one func may serve several)
        self._node: Node | None = None  # the node being lowered
        # (node id, input index) -> the prepacked constant its lowering reads (see registry.PREPACKS)
        self._packed: dict[tuple[int, int], Value] = {}
        # a product's [..., N] result (its relax var) -> the [M, N] rows it was shaped from, so that the
        # next product over rows reads those (FuseOps would otherwise fuse the two reshapes into a copy)
        self.rows_of: dict[Any, Any] = {}

    def bind_dims(self, v: Value, r: Any) -> None:
        """Learn the TIR expression of each of ``v``'s symbolic dims from its lowered value ``r``.

        kiln names derived dims it cannot express (``?256``: a conv's output width); the
        lowered tensor knows them in terms of the input variables, so later reads of the
        same name (a Reshape target computed by a Shape subgraph) resolve to that expression.
        """
        shape = getattr(getattr(r, "ty", None), "shape", None)
        values = getattr(shape, "values", None)
        if v.shape is None or values is None or len(values) != len(v.shape):
            return
        for d, e in zip(v.shape, values):
            if isinstance(d, str) and d not in self.syms and d not in self.derived:
                self.derived[d] = e

    @property
    def bound(self) -> dict[str, Any]:
        """The symbolic dims with a TIR value: the graph inputs' variables and the dims learnt from lowered values."""
        return {**self.syms, **self.derived}

    # -- types and values
    def dim(self, d: int | str) -> Any:
        """A kiln dim as TIR: an int as itself, a symbol as its ``int64`` variable or learnt expression."""
        from tvm import tirx

        if isinstance(d, int):
            return d
        if d in self.derived:
            return self.derived[d]
        if d not in self.syms:
            self.syms[d] = tirx.Var(re.sub(r"\W", "_", d).strip("_") or "d", "int64")
        return self.syms[d]

    def tensor_type(self, v: Value, shape: Shape | None = None) -> Any:
        """The Relax tensor type of ``v`` (of ``shape``, when given); raises when its shape or dtype is unknown."""
        from tvm import relax

        shape = v.shape if shape is None else shape
        if shape is None or v.dtype is None:
            raise CodegenError(f"value '{v.name}' has an unknown shape or dtype; kiln cannot compile it")
        return relax.TensorType([self.dim(d) for d in shape], v.dtype.numpy.name)

    def get(self, v: Value | None) -> Any:
        """The lowered (Relax) value of ``v``; None for an absent optional input."""
        if v is None:
            return None
        if id(v) not in self.env:
            raise CodegenError(f"value '{v.name}' is read before it is computed")
        return self.env[id(v)]

    def packed(self, node: Node, index: int) -> Any:
        """The lowered prepacked form of ``node``'s constant input ``index``; None if it is not prepacked."""
        v = self._packed.get((id(node), index))
        return None if v is None else self.get(v)

    def _prepack(self, graphs: list[Graph]) -> list[Value]:
        """Apply each needed node's weight transforms once; the packed constants, one per (weight, transform)."""
        made: dict[tuple[int, Any], Value] = {}
        for g in graphs:
            for n in needed_nodes(g):
                for i, transform in packed_inputs(n).items():
                    src = n.input(i)
                    key = (id(src), transform)
                    if key not in made:
                        arr = np.ascontiguousarray(transform(src.numpy()))
                        made[key] = Value(f"{src.name}.packed{len(made)}", const=Tensor(arr))
                    self._packed[(id(n), i)] = made[key]
        return list(made.values())

    def _packed_in(self, graphs: list[Graph]) -> list[Value]:
        """The prepacked constants that the needed nodes of ``graphs`` read."""
        found = {id(v): v for g in graphs for n in needed_nodes(g) for i in packed_inputs(n)
                 for v in [self._packed[(id(n), i)]]}
        return list(found.values())

    def present_inputs(self, node: Node, names: Sequence[str]) -> tuple[list[str], list[Any]]:
        """The names (from ``names``, one per input slot) and lowered values of ``node``'s present inputs."""
        present = [i for i, v in enumerate(node.inputs[:len(names)]) if v is not None]
        return [names[i] for i in present], [self.get(node.input(i)) for i in present]

    def emit(self, fn: Callable[..., Any], *args: Any, name: str, attrs: dict[str, Any] | None = None) -> Any:
        """One prim func computing ``fn`` on ``args``; ``attrs`` (e.g. ``kiln.schedule``) go on the func.

        A func with a kiln schedule is marked opaque to TVM's FuseOps, so that it stays whole
        (its epilogue is already fused) and its schedule applies to the compute it was written for.
        """
        if attrs and "kiln.schedule" in attrs or self.fresh_dims:
            # a kernel sized by dims just read at run time stays opaque too: FuseOps would otherwise move the
            # fused kernel above the match_cast that defines its dims (its only input dependence is the tensors)
            attrs = {**(attrs or {}), "op_pattern": OPAQUE}
            self.fresh_dims = False
        kwargs = {"primfunc_attrs": attrs} if attrs else {}
        out = self.bb.emit_te(fn, *args, primfunc_name_hint=re.sub(r"\W", "_", name), **kwargs)
        if self._node is not None:  # call_tir(gv, ...): record which node the func gv came from
            func = self.bb.lookup_binding(out).args[0].name_hint
            self.kernels.setdefault(func, []).append(self._node.name)
        return out

    def runtime_dims(self, values: Any, count: int, hint: str = "n") -> list[Any]:
        """``count`` dims read at run time from ``values``, a lowered 1-D int64 tensor of that length.

        For outputs whose shape depends on the data (NonZero's count, Tile's repeats given as an
        input): the tensor becomes a Relax shape (``tensor_to_shape``) matched to fresh ``int64``
        TIR variables, which later kernels take as their output dims. Where the node's output dims
        are unknown names (``?3``), :meth:`bind_dims` learns them from the lowered output, so the ops
        after it read the same variables.
        """
        from tvm import relax, tirx

        shape = self.bb.emit(relax.op.tensor_to_shape(values))
        dims = [tirx.Var(f"{hint}{k}" if count > 1 else hint, "int64") for k in range(count)]
        self.bb.match_cast(shape, relax.ShapeType(dims))
        self.fresh_dims = True
        return dims

    def computed_dims(self, fn: Callable[..., Any], *args: Any, count: int, name: str) -> list[Any]:
        """``count`` dims computed at run time: ``fn`` maps the TE tensors of ``args`` to a (count,) int64
        tensor, which is emitted as a kernel and read as dims (:meth:`runtime_dims`)."""
        return self.runtime_dims(self.emit(fn, *args, name=f"{name}_dims"), count, name)

    def unpack_all(self, result: Any, n: int) -> list[Any]:
        """The ``n`` values of an emitted tuple ``result``."""
        from tvm import relax

        return [self.bb.emit(relax.TupleGetItem(result, i)) for i in range(n)]

    def unpack(self, result: Any, node: Node) -> list[Any]:
        """The values of ``node``'s named outputs from an emitted tuple ``result``, by output position."""
        from tvm import relax

        return [self.bb.emit(relax.TupleGetItem(result, i)) for i, o in enumerate(node.outputs) if o.name]

    # -- the whole graph
    def lower(self) -> Lowered:
        """Lower the whole graph into ``main`` (raises ``CodegenError`` naming every op kiln cannot lower)."""
        from tvm import relax

        missing = uncompilable(self.graph)
        if missing:
            parts = "; ".join(f"{d + '::' if d else ''}{op} (nodes: {', '.join(ns[:3])})" for (d, op), ns in sorted(missing.items()))
            raise CodegenError(f"kiln cannot compile these ops yet: {parts}")
        nodes = needed_nodes(self.graph)
        params = []
        for v in self.graph.inputs:
            if v.sequence:  # a pinned sequence input: one parameter per element (sequence.py's list)
                elements = [relax.Var(_ident(f"{v.name}_{i}"), self.tensor_type(v, shape))
                            for i, shape in enumerate(v.seq_shapes or ())]
                self.env[id(v)] = elements
                params += elements
                continue
            var = relax.Var(_ident(v.name), self.tensor_type(v))
            self.env[id(v)] = var
            params.append(var)
        weights: dict[str, np.ndarray] = {}
        graphs = compiled_graphs(self.graph)
        packed = self._prepack(graphs)
        read = {id(v) for g in graphs for n in needed_nodes(g) for v in read_values(n)}
        read |= {id(v) for g in graphs for v in g.outputs} | {id(v) for v in packed}
        for v in [c for g in graphs for c in g.constants.values()] + packed:
            if id(v) not in read:
                continue
            arr = v.numpy()
            if 0 < arr.size <= BAKE_LIMIT:  # an empty constant goes as a weight: TVM cannot serialize it baked in
                self.env[id(v)] = relax.const(np.ascontiguousarray(arr) if arr.ndim else arr, arr.dtype.name)
            else:
                var = relax.Var(_ident(v.name), self.tensor_type(v))
                self.env[id(v)] = var
                params.append(var)
                weights[v.name] = arr
        try:
            self._lower_main(nodes, params)
        except BaseException:
            self._drain_blocks()
            raise
        return Lowered(self.bb.finalize(), [v.name for v in self.graph.inputs], weights, self.kernels)

    def _drain_blocks(self) -> None:
        """End the binding blocks a failed lowering left open (TVM warns on stderr about a builder dropped with them)."""
        for _ in range(1 << 10):
            try:
                self.bb._end_block()
            except Exception:  # noqa: BLE001 - TVM raises once no block is open
                return

    def _lower_main(self, nodes: list[Node], params: list[Any]) -> None:
        with self.bb.function("main", params):
            if any(True for n in nodes for _ in n.subgraphs()):
                # relax.If stands outside dataflow blocks: with control flow, main is one plain binding block
                self.lower_nodes(nodes)
                out = self.bb.emit(self.pack(self.graph.outputs))
            else:
                with self.bb.dataflow():
                    self.lower_nodes(nodes)
                    out = self.bb.emit_output(self.pack(self.graph.outputs))
            self.bb.emit_func_output(out)

    def lower_nodes(self, nodes: list[Node]) -> None:
        """Emit each node's lowering in the current block and record its outputs."""
        for node in nodes:
            outer, self._node = self._node, node
            try:
                outs = LOWERINGS[(node.domain, node.op_type)](self, node)
            finally:
                self._node = outer
            for o, r in zip([o for o in node.outputs if o.name], outs):
                self.env[id(o)] = r
                self.bind_dims(o, r)

    def pack(self, values: list[Value]) -> Any:
        """One value as itself, several as a Relax tuple."""
        from tvm import relax

        results = [relax.Tuple(r) if isinstance(r, list) else r for r in (self.get(v) for v in values)]  # a sequence
        return results[0] if len(results) == 1 else relax.Tuple(results)

    def lower_branch(self, graph: Graph, name: str) -> Any:
        """``graph`` (an If branch) as a call to its own Relax function, which takes the outer values it reads.

        A function of its own, not bindings inside the If: TVM's memory planner (StaticPlanBlockMemory)
        mishandles allocations inside If branches (apache/tvm#17348) and the VM then crashes.
        """
        from tvm import relax

        gv, args = self.subgraph_function(graph, name, [], lambda: self.pack(graph.outputs))
        return relax.SeqExpr([], relax.Call(gv, args))

    def subgraph_function(self, graph: Graph, name: str, params: list[Any], finish: Callable[[], Any],
                          start: Callable[[], None] | None = None) -> tuple[Any, list[Any]]:
        """A Relax function of ``graph``'s needed nodes: its global and the outer values to call it with.

        The function takes ``params`` (the caller binds ``graph``'s own inputs to them, or to constants,
        in ``env`` first, or in ``start``, which emits at the top of the function), then one parameter
        per value of the enclosing graphs that ``graph`` reads; ``finish`` gives its result once the
        nodes are lowered (``pack`` of the outputs, or more).
        """
        from tvm import relax

        subs = compiled_graphs(graph)
        weights = [c for g in subs for c in g.constants.values()] + self._packed_in(subs)  # main's parameters
        own = {id(v) for v in graph.inputs}
        reads = list({id(v): v for v in outer_reads(graph) + weights
                      if id(v) not in own and isinstance(self.env.get(id(v)), relax.Var)}.values())
        outer = {id(v): self.env[id(v)] for v in reads}
        extra = [relax.Var(_ident(v.name), outer[id(v)].ty) for v in reads]
        self.env.update({id(v): p for v, p in zip(reads, extra)})

        def body() -> Any:
            if start is not None:
                start()
            self.lower_nodes(needed_nodes(graph))
            return finish()

        try:
            return self.add_function(name, params + extra, body), [outer[id(v)] for v in reads]
        finally:
            self.env.update(outer)

    def call_function(self, name: str, params: list[Any], args: list[Any], body: Callable[[], Any]) -> Any:
        """Build a Relax function from what ``body`` emits (returning its result); an expression calling it."""
        from tvm import relax

        return relax.SeqExpr([], relax.Call(self.add_function(name, params, body), args))

    def add_function(self, name: str, params: list[Any], body: Callable[[], Any]) -> Any:
        """A Relax function of ``params`` whose bindings are what ``body`` emits, returning its result; its global."""
        from tvm import relax

        self.bb._begin_binding_block()
        result = body()
        fn = relax.Function(params, self.bb.normalize(relax.SeqExpr([self.bb._end_block()], result)))
        return self.bb.add_func(fn, _ident(name))


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name) or "v"


def lower(graph: Graph, lanes: int = 16, int8_pairs: bool = False) -> Lowered:
    """Lower ``graph`` to a Relax module (raises ``CodegenError`` listing what it cannot lower).

    ``lanes`` is the float32 width of the target's vectors, for kernels that size register tiles;
    ``int8_pairs`` says the target lacks VNNI, so int8 products take the AVX2 form.
    """
    return Lowerer(graph, lanes, int8_pairs).lower()
