"""Serialization: ONNX protos <-> kiln IR, with no file handling and no inference.

:func:`from_onnx` turns a ``ModelProto`` into a ``Graph`` (initializers and ``Constant`` nodes
become constants, outer-scope reads in subgraphs are linked, nodes are put in topological order),
and :func:`to_onnx` writes a ``Graph`` back as a ``ModelProto`` that ``onnx.checker`` accepts and
onnxruntime runs. Tensors, value infos, dims, nodes and kiln's local functions convert here too.
Loading a model from a file, and inferring its shapes, is :mod:`kiln.ir.onnx_io`'s job: the
evaluator and shape inference use this module without importing the loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from kiln.errors import ExternalDataError, GraphError, ModelLoadError
from kiln.ir import schemas
from kiln.ir.core import (
    KILN_DOMAIN, Attr, AttrType, Graph, Node, Shape, Tensor, Value, is_unknown_dim, normalize_domain,
)
from kiln.ir.dtypes import DType, onnx_type_name
from kiln.ir.types import TypeValue

#: The newest IR version kiln writes; the pinned onnxruntime accepts it.
MAX_IR_VERSION = 10
#: The oldest IR version kiln writes (IR 4 stopped requiring initializers to be inputs).
MIN_IR_VERSION = 7
#: Version of the ``kiln`` op domain written into exported models.
KILN_OPSET_VERSION = 1
#: Local functions picked by a node's ``overload`` need IR 10.
FUNCTION_OVERLOAD_IR_VERSION = 10

# dim_param spellings that mean "unknown", not a named symbol
_ANONYMOUS_DIMS = {"", "?", "-1"}


def dim_from_proto(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """An ONNX dim as kiln reads it: an int, a symbol name, or None for unknown.

    ``-1``, an unnamed dim, ``?`` and onnx's generated ``unk__N`` names are all unknown.
    """
    if d.HasField("dim_value") and d.dim_value >= 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param not in _ANONYMOUS_DIMS and not d.dim_param.startswith("unk__"):
        return d.dim_param
    return None


def opset_of(model: ModelProto) -> dict[str, int]:
    """The model's opset imports, with ``ai.onnx`` spelled ``""``."""
    return {normalize_domain(o.domain): o.version for o in model.opset_import}


def from_onnx(model: ModelProto, *, base_dir: Path | None = None, where: str = "<model>") -> Graph:
    """A kiln ``Graph`` from ``model`` (no shape inference). External data is read lazily from
    ``base_dir``; ``where`` names the model in error messages."""
    return _Importer(base_dir, where).model(model)


class _Importer:
    def __init__(self, base_dir: Path | None, where: str):
        self.base_dir = base_dir
        self.where = where
        self._unknown = 0

    # -- types
    def dims(self, tp: onnx.TypeProto) -> Shape | None:
        tt = tp.tensor_type
        if not tt.HasField("shape"):
            return None
        dims = (dim_from_proto(d) for d in tt.shape.dim)
        return tuple(self.fresh_unknown() if d is None else d for d in dims)

    def fresh_unknown(self) -> str:
        name = f"?{self._unknown}"
        self._unknown += 1
        return name

    def value_type(self, vi: ValueInfoProto, what: str) -> tuple[DType | None, Shape | None]:
        """The dtype and shape of a tensor (or, for a sequence of tensors, of its elements: see :meth:`is_sequence`)."""
        kind = vi.type.WhichOneof("value")
        if kind is None:
            return None, None  # untyped (allowed for subgraph outputs and value_info)
        tp = vi.type
        if self.is_sequence(vi):
            tp = vi.type.sequence_type.elem_type
        elif kind != "tensor_type":
            raise ModelLoadError(f"{self.where}: {what} '{vi.name}' has a {kind} type; kiln supports tensors "
                                 "and sequences of tensors only")
        code = tp.tensor_type.elem_type
        if code == 0:
            return None, self.dims(tp)
        try:
            dtype = DType.from_onnx(code)
        except KeyError:
            raise ModelLoadError(
                f"{self.where}: {what} '{vi.name}' has element type {onnx_type_name(code)}, which kiln does not support"
            ) from None
        return dtype, self.dims(tp)

    @staticmethod
    def is_sequence(vi: ValueInfoProto) -> bool:
        """A sequence of tensors (a graph input or output kiln represents as a ``Value`` with ``sequence`` set)."""
        return vi.type.WhichOneof("value") == "sequence_type" and \
            vi.type.sequence_type.elem_type.WhichOneof("value") == "tensor_type"

    # -- tensors
    def tensor(self, t: TensorProto, what: str) -> Tensor:
        try:
            dtype = DType.from_onnx(t.data_type)
        except KeyError:
            raise ModelLoadError(
                f"{self.where}: {what} '{t.name}' has element type {onnx_type_name(t.data_type)}, "
                "which kiln does not support"
            ) from None
        if t.data_location == TensorProto.EXTERNAL:
            return self.external_tensor(t, dtype, what)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - onnx raises ValueError/TypeError for bad payloads
            raise ModelLoadError(f"{self.where}: {what} '{t.name}' has a malformed payload: {e}") from None
        return Tensor(np.asarray(arr, dtype=dtype.numpy), name=t.name)

    def external_tensor(self, t: TensorProto, dtype: DType, what: str) -> Tensor:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if self.base_dir is None:
            raise ExternalDataError(
                f"{self.where}: {what} '{t.name}' keeps its data in external file '{location}'; "
                "load the model from its path so kiln can find that file"
            )
        path = (self.base_dir / location).resolve()
        if not location or self.base_dir.resolve() not in path.parents:
            raise ExternalDataError(
                f"{self.where}: {what} '{t.name}' names external data '{location}' outside the model's directory"
            )
        offset = int(info.get("offset", 0))
        shape = tuple(int(d) for d in t.dims)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        length = int(info.get("length", nbytes))
        if not path.is_file():
            raise ExternalDataError(
                f"{self.where}: external data file '{location}' for {what} '{t.name}' is missing "
                f"(looked in {self.base_dir})"
            )
        size = path.stat().st_size
        if length != nbytes or offset + nbytes > size:
            raise ExternalDataError(
                f"{self.where}: external data file '{location}' is too short for {what} '{t.name}' "
                f"(needs bytes {offset}..{offset + nbytes}, file has {size})"
            )

        def read() -> np.ndarray:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(nbytes)
            return np.frombuffer(raw, dtype=dtype.numpy.newbyteorder("<")).reshape(shape).copy()

        return Tensor(name=t.name, dtype=dtype, shape=shape, loader=read)

    # -- graphs
    def model(self, m: ModelProto) -> Graph:
        g = Graph(m.graph.name or "main", opset=opset_of(m))
        g.ir_version = m.ir_version
        g.producer = " ".join(x for x in (m.producer_name, m.producer_version) if x)
        g.doc = m.doc_string
        g.metadata = {p.key: p.value for p in m.metadata_props}
        self.graph(m.graph, g, scope={})
        return g

    def graph(self, gp: GraphProto, g: Graph, scope: dict[str, Value]) -> None:
        """Fill ``g`` from ``gp``; ``scope`` maps outer-scope names to values."""
        local: dict[str, Value] = {}
        init_names = {t.name for t in gp.initializer}
        if gp.sparse_initializer:
            raise ModelLoadError(f"{self.where}: graph '{gp.name}' has sparse initializers, which kiln does not support")
        # graph inputs (IR < 4 lists initializers among inputs: those are constants)
        for vi in gp.input:
            if vi.name in init_names:
                continue
            dtype, shape = self.value_type(vi, "graph input")
            local[vi.name] = g.add_input(vi.name, dtype, shape)  # type: ignore[arg-type]
            local[vi.name].sequence = self.is_sequence(vi)
        for t in gp.initializer:
            local[t.name] = g.add_constant(self.tensor(t, "initializer"), t.name)

        # pass 1: every node output gets a Value, so order in the file does not matter
        produced: dict[str, tuple[NodeProto, int]] = {}
        for n in gp.node:
            for i, o in enumerate(n.output):
                if not o:
                    continue
                if o in produced or o in local:
                    raise GraphError(f"{self.where}: value '{o}' is defined more than once (node '{n.name}')")
                produced[o] = (n, i)
        out_values: dict[str, Value] = {}
        for n in gp.node:
            if n.op_type == "Constant" and normalize_domain(n.domain) == "":
                local[n.output[0]] = g.add_constant(self.constant_node(n), n.output[0])
                continue
            for o in n.output:
                if o:
                    out_values[o] = Value(o)
        local.update(out_values)
        visible = {**scope, **local}

        # pass 2: nodes
        absent: list[Value] = []
        for n in gp.node:
            if n.op_type == "Constant" and normalize_domain(n.domain) == "":
                continue
            inputs: list[Value | None] = []
            for name in n.input:
                if not name:
                    inputs.append(None)
                    continue
                v = visible.get(name)
                if v is None:
                    label = f"'{n.name}' ({n.op_type})" if n.name else f"<unnamed> ({n.op_type})"
                    raise GraphError(f"{self.where}: node {label} reads '{name}', which nothing in the graph defines")
                inputs.append(v)
            outputs: list[Value] = []
            for o in n.output:
                if o:
                    outputs.append(out_values[o])
                else:
                    placeholder = Value("")
                    absent.append(placeholder)
                    outputs.append(placeholder)
            attrs = {a.name: self.attribute(a, n, g, visible) for a in n.attribute}
            node = Node(n.op_type, inputs, attrs, domain=n.domain, outputs=outputs, name=n.name)
            node.doc = n.doc_string
            g.append(node)
        for v in absent:
            v.name = ""  # an optional output the model does not ask for

        for vi in gp.output:
            v = visible.get(vi.name)
            if v is None:
                raise GraphError(f"{self.where}: graph output '{vi.name}' is never defined")
            g.outputs.append(v)
            if v.producer is not None or v.is_graph_input:
                dtype, shape = self.value_type(vi, "graph output")
                v.dtype = v.dtype or dtype
                v.shape = v.shape if v.shape is not None else shape
                v.sequence = v.sequence or self.is_sequence(vi)
        g.sort()

    def constant_node(self, n: NodeProto) -> Tensor:
        if len(n.attribute) != 1:
            raise ModelLoadError(f"{self.where}: Constant node '{n.name}' must have exactly one value attribute")
        a = n.attribute[0]
        name = n.output[0]
        if a.name == "value":
            t = self.tensor(a.t, "Constant")
            t.name = name
            return t
        if a.name == "sparse_value":
            raise ModelLoadError(f"{self.where}: Constant node '{n.name}' holds a sparse tensor, which kiln does not support")
        scalars = {
            "value_float": lambda: np.array(a.f, dtype=np.float32),
            "value_floats": lambda: np.array(list(a.floats), dtype=np.float32),
            "value_int": lambda: np.array(a.i, dtype=np.int64),
            "value_ints": lambda: np.array(list(a.ints), dtype=np.int64),
        }
        if a.name not in scalars:
            raise ModelLoadError(f"{self.where}: Constant node '{n.name}' has attribute '{a.name}', which kiln does not support")
        return Tensor(scalars[a.name](), name=name)

    def attribute(self, a: AttributeProto, n: NodeProto, g: Graph, scope: dict[str, Value]) -> Attr:
        t = a.type
        if t == AttributeProto.FLOAT:
            return Attr.float(a.f)
        if t == AttributeProto.INT:
            return Attr.int(a.i)
        if t == AttributeProto.STRING:
            return Attr.string(a.s.decode("utf-8", errors="replace"))
        if t == AttributeProto.TENSOR:
            return Attr.tensor(self.tensor(a.t, f"attribute '{a.name}' of node '{n.name}'"))
        if t == AttributeProto.GRAPH:
            return Attr.graph(self.subgraph(a.g, g, scope))
        if t == AttributeProto.FLOATS:
            return Attr.floats(a.floats)
        if t == AttributeProto.INTS:
            return Attr.ints(a.ints)
        if t == AttributeProto.STRINGS:
            return Attr.strings(s.decode("utf-8", errors="replace") for s in a.strings)
        if t == AttributeProto.TENSORS:
            return Attr(AttrType.TENSORS, tuple(self.tensor(x, f"attribute '{a.name}'") for x in a.tensors))
        if t == AttributeProto.GRAPHS:
            return Attr(AttrType.GRAPHS, tuple(self.subgraph(x, g, scope) for x in a.graphs))
        if t == AttributeProto.TYPE_PROTO:
            return Attr(AttrType.TYPE_PROTO, TypeValue(a.tp.SerializeToString(), helper.printable_type(a.tp)))
        kind = AttributeProto.AttributeType.Name(t)
        raise ModelLoadError(
            f"{self.where}: node '{n.name}' ({n.op_type}) attribute '{a.name}' has type {kind}, which kiln does not support"
        )

    def subgraph(self, gp: GraphProto, parent: Graph, scope: dict[str, Value]) -> Graph:
        sub = parent.subgraph(gp.name or "body")
        self.graph(gp, sub, scope)
        return sub


# =========================================================================== export


def to_onnx(graph: Graph, *, weights: bool = True, kiln_functions: bool = True, value_info: bool = False) -> ModelProto:
    """Convert a kiln ``Graph`` to an ONNX ``ModelProto``.

    With ``weights=False``, constants larger than a few elements become typed
    graph inputs instead of initializers: enough for shape inference, without
    copying the weights. With ``kiln_functions`` (the default) every kiln op
    also gets a local function holding its decomposition into standard ops,
    picked by the node's ``overload``, so that any ONNX runtime can run it.
    Intermediate types are written as ``value_info`` only on request: a runtime
    then optimises the model just as it would the original.
    """
    opset = dict(graph.opset)
    kiln_nodes = [n for n in graph.walk_nodes() if n.domain == KILN_DOMAIN]
    if kiln_nodes:
        opset.setdefault(KILN_DOMAIN, KILN_OPSET_VERSION)
    opset_ids = [helper.make_opsetid(d, v) for d, v in sorted(opset.items())]
    functions: dict[str, onnx.FunctionProto] = {}
    overloads: dict[int, str] = {}
    if kiln_functions:
        for n in kiln_nodes:
            spec = schemas.KILN_OPS.get(n.op_type)
            if spec is None or spec.decompose is None:
                continue  # no standard-op form: other runtimes cannot run it, kiln can
            fn = kiln_function(n, opset)
            functions.setdefault(fn.overload, fn)
            overloads[id(n)] = fn.overload
    gp = _graph_proto(graph, weights, overloads, value_info)
    model = helper.make_model(gp, opset_imports=opset_ids, producer_name="kiln", functions=list(functions.values()))
    model.ir_version = choose_ir_version(opset_ids, graph.ir_version)
    if functions:
        model.ir_version = max(model.ir_version, FUNCTION_OVERLOAD_IR_VERSION)
    model.doc_string = graph.doc
    for k, v in graph.metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model


def choose_ir_version(opset_ids: list[onnx.OperatorSetIdProto], original: int | None = None) -> int:
    """The IR version to write: what the opsets need, at least MIN_IR_VERSION, at most MAX_IR_VERSION."""
    needed = helper.find_min_ir_version_for(
        [o for o in opset_ids if o.domain in ("", "ai.onnx", "ai.onnx.ml")], ignore_unknown=True
    )
    ir = max(needed, MIN_IR_VERSION, min(original or 0, MAX_IR_VERSION))
    return ir


def _dims_proto(shape: Shape | None) -> list[int | str | None] | None:
    if shape is None:
        return None
    return [None if is_unknown_dim(d) else d for d in shape]


def value_info(v: Value) -> ValueInfoProto:
    """An ONNX ``ValueInfoProto`` for a kiln value (unknown dims are left blank)."""
    code = v.dtype.onnx_code if v.dtype is not None else TensorProto.UNDEFINED
    if v.sequence:
        return helper.make_tensor_sequence_value_info(v.name, code, _dims_proto(v.shape))
    return helper.make_tensor_value_info(v.name, code, _dims_proto(v.shape))


def tensor_proto(t: Tensor, name: str) -> TensorProto:
    """An ONNX ``TensorProto`` holding ``t``'s payload."""
    arr = t.numpy()
    if t.dtype is DType.BFLOAT16:
        tp = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape, arr.view(np.uint16).tobytes(), raw=True)
        return tp
    # not np.ascontiguousarray: it turns a 0-d array into a 1-d one
    return numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(order="C"), name)


_SMALL_CONST = 64


def kiln_function(node: Node, opset: dict[str, int]) -> onnx.FunctionProto:
    """The local function that defines one kiln node's op in standard ONNX ops.

    Nodes with the same op, attributes and input types (dtypes and shapes: a decomposition
    may depend on them) share one function, named by a short hash in its ``overload``.
    """
    import hashlib

    from kiln.ir.kiln_ops import decomposition_graph

    body = decomposition_graph(node, opset)
    key = repr((node.op_type, sorted((k, repr(a.value)) for k, a in node.attrs.items()),
                [None if v is None else (v.dtype, v.shape) for v in node.inputs], opset.get("", 0)))
    overload = hashlib.sha256(key.encode()).hexdigest()[:12]
    nodes = [
        helper.make_node("Constant", [], [v.name], value=tensor_proto(v.const, v.name))  # type: ignore[arg-type]
        for v in body.constants.values()
    ] + [node_proto(n, True) for n in body.nodes]
    fn = helper.make_function(
        KILN_DOMAIN, node.op_type, [f"in{i}" for i in range(len(node.inputs))],  # absent ones go unused
        [v.name for v in body.outputs], nodes,
        opset_imports=[helper.make_opsetid("", opset.get("", 17))], attributes=sorted(node.attrs),
    )
    fn.overload = overload
    return fn


def _graph_proto(graph: Graph, weights: bool, overloads: dict[int, str] | None = None,
                 with_value_info: bool = False, hoist: list[ValueInfoProto] | None = None) -> GraphProto:
    """``graph`` as a GraphProto. Without ``weights``, big constants become typed inputs; a subgraph
    cannot take inputs of its own (an If branch has none), so its go to the top graph's (``hoist``)."""
    overloads = overloads or {}
    hoisted: list[ValueInfoProto] = [] if hoist is None else hoist
    nodes = [node_proto(n, weights, overloads, hoisted) for n in graph.nodes]
    inputs = [value_info(v) for v in graph.inputs]
    inits = []
    for v in graph.constants.values():
        assert v.const is not None
        if weights or v.const.size <= _SMALL_CONST:
            inits.append(tensor_proto(v.const, v.name))
        else:
            hoisted.append(value_info(v))
    if hoist is None:
        inputs += hoisted
    outputs = [value_info(v) for v in graph.outputs]
    out_names = {v.name for v in graph.outputs}
    infos = [
        value_info(o)
        for n in graph.nodes
        for o in n.outputs
        if with_value_info and o.name and o.dtype is not None and o.name not in out_names
    ]
    return helper.make_graph(nodes, graph.name, inputs, outputs, initializer=inits, value_info=infos)


def node_proto(n: Node, weights: bool, overloads: dict[int, str] | None = None,
                hoist: list[ValueInfoProto] | None = None) -> NodeProto:
    proto = helper.make_node(
        n.op_type,
        ["" if v is None else v.name for v in n.inputs],
        [o.name for o in n.outputs],
        name=n.name,
        domain=n.domain,
    )
    if overloads and id(n) in overloads:
        proto.overload = overloads[id(n)]
    if n.doc:
        proto.doc_string = n.doc
    for k, a in n.attrs.items():
        proto.attribute.append(_attr_proto(k, a, weights, overloads, hoist))
    return proto


def _attr_proto(name: str, a: Attr, weights: bool, overloads: dict[int, str] | None = None,
                hoist: list[ValueInfoProto] | None = None) -> AttributeProto:
    t = a.type
    if t is AttrType.TENSOR:
        return helper.make_attribute(name, tensor_proto(a.value, ""))
    if t is AttrType.TENSORS:
        return helper.make_attribute(name, [tensor_proto(x, "") for x in a.value], attr_type=AttributeProto.TENSORS)
    if t is AttrType.GRAPH:
        return helper.make_attribute(name, _graph_proto(a.value, weights, overloads, hoist=hoist))
    if t is AttrType.GRAPHS:
        return helper.make_attribute(name, [_graph_proto(g, weights, overloads, hoist=hoist) for g in a.value],
                                     attr_type=AttributeProto.GRAPHS)
    if t is AttrType.FLOATS:
        return helper.make_attribute(name, list(a.value), attr_type=AttributeProto.FLOATS)
    if t is AttrType.INTS:
        return helper.make_attribute(name, list(a.value), attr_type=AttributeProto.INTS)
    if t is AttrType.STRINGS:
        return helper.make_attribute(name, list(a.value), attr_type=AttributeProto.STRINGS)
    if t is AttrType.STRING:
        return helper.make_attribute(name, a.value, attr_type=AttributeProto.STRING)
    if t is AttrType.FLOAT:
        return helper.make_attribute(name, a.value, attr_type=AttributeProto.FLOAT)
    if t is AttrType.TYPE_PROTO:
        tp = onnx.TypeProto()
        tp.ParseFromString(a.value.proto)
        return helper.make_attribute(name, tp, attr_type=AttributeProto.TYPE_PROTO)
    return helper.make_attribute(name, a.value, attr_type=AttributeProto.INT)
