"""Validation at import: a model is checked before any pass runs, and refused in one line.

Two layers:

1. :func:`check_proto`: onnx's own node checker (``onnx.checker.check_node``) on every node
   of the proto: attribute types, required attributes, input and output counts against the
   op schema at the model's opsets.
2. :func:`validate_graph`: kiln's per-op constraints on the imported graph, with its shapes:
   what a schema cannot say (kernel sizes, strides and dilations > 0, pads >= 0 and of the
   right length, axes in range, a group that divides the channels, shapes that broadcast,
   required inputs that are present, finite epsilons). Each constraint is registered for
   its ops with :func:`constraint` and yields the problems it finds, as readable strings.

Both raise :class:`ModelValidationError` naming the node, the attribute and what was
expected. A model onnxruntime refuses is refused here too, unless kiln can run it and says
why in its docs.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import onnx
import onnx.checker
import onnx.defs
from onnx import ModelProto

from kiln.errors import ModelLoadError
from kiln.ir import schemas
from kiln.ir.core import Graph, Node, Value, normalize_axis

Check = Callable[[Node], Iterator[str]]
CONSTRAINTS: dict[str, list[Check]] = {}


class ModelValidationError(ModelLoadError):
    """The model breaks a rule of its ops: a bad attribute, shapes that do not fit, a missing input."""


def constraint(*ops: str) -> Callable[[Check], Check]:
    """Register the decorated check (node -> problems, as strings) for default-domain ``ops``."""

    def register(fn: Check) -> Check:
        for op in ops:
            CONSTRAINTS.setdefault(op, []).append(fn)
        return fn

    return register


def check_proto(model: ModelProto, where: str) -> None:
    """onnx's checker on every node of ``model`` (subgraphs too): attribute types, required
    attributes, input and output counts against the op schema at the model's opsets.

    Nodes only: onnx's whole-model check also demands things kiln and onnxruntime do without
    (declared output shapes, nodes already in topological order, external data beside an
    in-memory proto), and kiln reports those itself, more precisely.
    """
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    for node in _walk(model.graph):
        if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue  # kiln's own ops are checked by their kiln schemas; others are refused earlier
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue  # If/Loop/Scan: the checker would need the outer scope; their bodies' nodes are checked
        try:
            onnx.checker.check_node(node, ctx)
        except onnx.checker.ValidationError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            label = f"'{node.name}' ({node.op_type})" if node.name else f"<unnamed> ({node.op_type})"
            raise ModelValidationError(f"{where}: node {label}: {lines[0] if lines else 'invalid'}") from None


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)
            for g in a.graphs:
                yield from _walk(g)


def validate_graph(graph: Graph, where: str) -> None:
    """kiln's per-op constraints on every node (subgraphs too); the first problem as one line."""
    for node in graph.walk_nodes():
        if node.domain != "":
            continue
        for check in (_required_inputs, *CONSTRAINTS.get(node.op_type, ())):
            for problem in check(node):
                raise ModelValidationError(f"{where}: node {node.label()}: {problem}")


# =========================================================================== constraints


def _required_inputs(node: Node) -> Iterator[str]:
    """Inputs the schema requires must be given (an empty name marks an optional input absent)."""
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    schema = schemas.onnx_schema("", node.op_type, opset)
    if schema is None:
        return
    for i, formal in enumerate(schema.inputs):
        if formal.option == onnx.defs.OpSchema.FormalParameterOption.Single and i < len(schema.inputs) \
                and (i >= len(node.inputs) or node.inputs[i] is None):
            yield f"input {i} ('{formal.name}') is required but absent"


def _spatial(node: Node) -> int | None:
    x = node.input(0)
    return None if x is None or x.rank is None or x.rank < 3 else x.rank - 2


def _positive(node: Node, name: str) -> Iterator[str]:
    values = node.attr(name)
    if values is not None and any(int(v) <= 0 for v in values):
        yield f"attribute '{name}' is {list(values)}; every entry must be > 0"


@constraint("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
            "MaxUnpool", "DeformConv")
def _window(node: Node) -> Iterator[str]:
    for name in ("kernel_shape", "strides", "dilations"):
        yield from _positive(node, name)
    n = _spatial(node)
    pads = node.attr("pads")
    if pads is not None:
        if any(int(p) < 0 for p in pads):
            yield f"attribute 'pads' is {list(pads)}; pads must be >= 0"
        if n is not None and len(pads) != 2 * n:
            yield f"attribute 'pads' has {len(pads)} entries; a {n}-D window needs {2 * n}"
    for name in ("kernel_shape", "strides", "dilations"):
        values = node.attr(name)
        if values is not None and n is not None and len(values) != n:
            yield f"attribute '{name}' has {len(values)} entries; a {n}-D window needs {n}"
    kernel = node.attr("kernel_shape")
    if node.op_type in ("MaxPool", "AveragePool", "LpPool") and kernel is not None and pads is not None \
            and len(pads) == 2 * len(kernel):
        for i, k in enumerate(kernel):
            if pads[i] >= k or pads[i + len(kernel)] >= k:
                yield f"attribute 'pads' is {list(pads)}; a pad must be smaller than the kernel {list(kernel)}"
                break


@constraint("Conv", "ConvInteger", "QLinearConv")
def _conv_groups(node: Node) -> Iterator[str]:
    group = node.attr("group", 1)
    if group < 1:
        yield f"attribute 'group' is {group}; it must be >= 1"
        return
    w_index = 3 if node.op_type == "QLinearConv" else 1
    x, w = node.input(0), node.input(w_index)
    c = x.shape[1] if x is not None and x.shape and len(x.shape) > 1 else None
    if w is None or w.shape is None or len(w.shape) < 2:
        return
    m, per_group = w.shape[0], w.shape[1]
    if isinstance(m, int) and m % group:
        yield f"the weight has {m} output channels, which group={group} does not divide"
    if isinstance(c, int) and isinstance(per_group, int) and c != per_group * group:
        yield f"the input has {c} channels; the weight takes {per_group} per group x group {group} = {per_group * group}"
    if x is not None and x.rank is not None and len(w.shape) != x.rank:
        yield f"the weight is {len(w.shape)}-D and the input {x.rank}-D; they must match"


@constraint("ConvTranspose")
def _convt_groups(node: Node) -> Iterator[str]:
    group = node.attr("group", 1)
    if group < 1:
        yield f"attribute 'group' is {group}; it must be >= 1"
        return
    x, w = node.input(0), node.input(1)
    c = x.shape[1] if x is not None and x.shape and len(x.shape) > 1 else None
    if w is not None and w.shape and isinstance(w.shape[0], int) and isinstance(c, int) and w.shape[0] != c:
        yield f"the input has {c} channels; the weight's first dim is {w.shape[0]}"
    if isinstance(c, int) and c % group:
        yield f"the input has {c} channels, which group={group} does not divide"


def _axis_in_range(node: Node, name: str, rank: int | None, *, extra: int = 0, default: int | None = None) -> Iterator[str]:
    axis = node.attr(name, default)
    if axis is None or rank is None:
        return
    lo, hi = -(rank + extra), rank + extra - 1
    if not lo <= int(axis) <= hi:
        yield f"attribute '{name}' is {axis}; for rank {rank} it must be in [{lo}, {hi}]"


def _rank(v: Value | None) -> int | None:
    return None if v is None else v.rank


@constraint("Concat", "Softmax", "LogSoftmax", "Hardmax", "Gather", "GatherElements", "ScatterElements", "Split",
            "ArgMax", "ArgMin", "LayerNormalization", "CumSum", "TopK", "OneHot", "Compress", "LpNormalization")
def _axis(node: Node) -> Iterator[str]:
    extra = 1 if node.op_type == "OneHot" else 0
    yield from _axis_in_range(node, "axis", _rank(node.input(0)), extra=extra)


@constraint("Flatten")
def _flatten_axis(node: Node) -> Iterator[str]:
    rank = _rank(node.input(0))
    axis = node.attr("axis", 1)
    if rank is not None and not -rank <= axis <= rank:
        yield f"attribute 'axis' is {axis}; for rank {rank} it must be in [{-rank}, {rank}]"


@constraint("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Squeeze")
def _axes(node: Node) -> Iterator[str]:
    rank = _rank(node.input(0))
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = node.input(1).const_ints()
    if axes is None or rank is None:
        return
    bad = [a for a in axes if not -rank <= a < rank]
    if bad:
        yield f"axes {list(axes)} are out of range for rank {rank}"
    elif len({normalize_axis(a, rank) for a in axes}) != len(axes):
        yield f"axes {list(axes)} repeat an axis"


@constraint("Unsqueeze")
def _unsqueeze_axes(node: Node) -> Iterator[str]:
    rank = _rank(node.input(0))
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = node.input(1).const_ints()
    if axes is None or rank is None:
        return
    out = rank + len(axes)
    if any(not -out <= a < out for a in axes):
        yield f"axes {list(axes)} are out of range for the output rank {out}"
    elif len({normalize_axis(a, out) for a in axes}) != len(axes):
        yield f"axes {list(axes)} repeat an axis"


@constraint("Transpose")
def _perm(node: Node) -> Iterator[str]:
    perm, rank = node.attr("perm"), _rank(node.input(0))
    if perm is not None and rank is not None and sorted(perm) != list(range(rank)):
        yield f"attribute 'perm' is {list(perm)}; it must be a permutation of 0..{rank - 1}"


_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "PRelu", "BitShift", "Mod",
              "BitwiseAnd", "BitwiseOr", "BitwiseXor")


@constraint(*_BROADCAST)
def _broadcastable(node: Node) -> Iterator[str]:
    shapes = [v.shape for v in node.inputs if v is not None]
    if any(s is None for s in shapes) or len(shapes) < 2:
        return
    rank = max(len(s) for s in shapes)  # type: ignore[arg-type]
    for i in range(1, rank + 1):
        dims = {s[-i] for s in shapes if len(s) >= i and isinstance(s[-i], int) and s[-i] != 1}  # type: ignore[index]
        if len(dims) > 1:
            text = " and ".join(f"[{','.join(str(d) for d in s)}]" for s in shapes)  # type: ignore[union-attr]
            yield f"the input shapes {text} do not broadcast"
            return


@constraint("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
            "RMSNormalization", "MeanVarianceNormalization")
def _epsilon(node: Node) -> Iterator[str]:
    eps = node.attr("epsilon")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        yield f"attribute 'epsilon' is {eps}; it must be a finite number >= 0"


@constraint("GroupNormalization")
def _num_groups(node: Node) -> Iterator[str]:
    groups = node.attr("num_groups")
    x = node.input(0)
    c = x.shape[1] if x is not None and x.shape and len(x.shape) > 1 else None
    if groups is not None and (groups < 1 or (isinstance(c, int) and c % groups)):
        yield f"attribute 'num_groups' is {groups}; it must be >= 1 and divide the {c} channels"


@constraint("DepthToSpace", "SpaceToDepth")
def _blocksize(node: Node) -> Iterator[str]:
    b = node.attr("blocksize")
    if b is not None and b < 1:
        yield f"attribute 'blocksize' is {b}; it must be >= 1"
    x = node.input(0)
    if b and b >= 1 and x is not None and x.shape is not None and len(x.shape) == 4:
        c = x.shape[1]
        if node.op_type == "DepthToSpace" and isinstance(c, int) and c % (b * b):
            yield f"the input has {c} channels, which blocksize {b}^2 does not divide"
        if node.op_type == "SpaceToDepth":
            for d in x.shape[2:]:
                if isinstance(d, int) and d % b:
                    yield f"the input's spatial dims {list(x.shape[2:])} are not multiples of blocksize {b}"
                    break
