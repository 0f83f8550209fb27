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
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= newest:
            raise ModelValidationError(f"{where}: the model imports ai.onnx opset {o.version}; this kiln knows opsets "
                                       f"1 to {newest}")
        if o.version < 1:
            raise ModelValidationError(f"{where}: the model imports opset {o.version} of domain '{o.domain}'; "
                                       f"versions start at 1")
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    for node in _walk(model.graph):
        if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue  # kiln's own ops are checked by their kiln schemas; others are refused earlier
        label = f"'{node.name}' ({node.op_type})" if node.name else f"<unnamed> ({node.op_type})"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            # If/Loop/Scan: the checker would need the outer scope (their bodies' nodes are checked
            # one by one); the attribute names are checked here
            domain = "" if node.domain == "ai.onnx" else node.domain
            schema = schemas.onnx_schema(domain, node.op_type, opsets.get(domain, 0))
            unknown = [a.name for a in node.attribute if schema is not None and a.name not in schema.attributes]
            if unknown:
                raise ModelValidationError(f"{where}: node {label}: unrecognized attribute '{unknown[0]}' for "
                                           f"{node.op_type}")
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except UnicodeDecodeError:
            raise ModelValidationError(f"{where}: node {label}: holds text that is not valid UTF-8 (a name or a "
                                       f"string attribute); the file is corrupt") from None
        except onnx.checker.ValidationError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ModelValidationError(f"{where}: node {label}: {lines[0] if lines else 'invalid'}") from None


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)
            for g in a.graphs:
                yield from _walk(g)


def type_problem(inference_error: str) -> str | None:
    """The type error in one of onnx's inference errors, as one line; None for other errors."""
    lines = [ln.strip() for ln in inference_error.splitlines() if ln.strip()]
    for ln in lines:
        if "instead is null" in ln or "should not be null" in ln:
            continue  # a type not known yet (nodes out of order, a value nothing declares): not a conflict
        if any(k in ln for k in ("TypeInferenceError", "Type Error", "inconsistent type", "unsupported type",
                                  "bound to different types")) or "type mismatch" in ln.lower():
            detail = ln.split("] ", 1)[-1] if "] " in ln else ln
            return f"the model's types do not fit its ops: {' '.join(detail.split())[:300]}"
    return None


def validate_graph(graph: Graph, where: str) -> None:
    """kiln's per-op constraints on every node (subgraphs too); the first problem as one line."""
    for node in graph.walk_nodes():
        # a node inside an If branch may never run (shape inference types the branch not taken too),
        # so only top-level nodes have their output shapes checked
        shapes = [_output_shapes] if node.graph is graph else []
        checks = shapes if node.domain != "" else [_required_inputs, _input_types, _flags,
                                                    *CONSTRAINTS.get(node.op_type, ()), *shapes]
        for check in checks:
            for problem in check(node):
                raise ModelValidationError(f"{where}: node {node.label()}: {problem}")


#: kiln's kernels index a tensor with 32-bit offsets where TVM does, so no tensor a model computes may
#: hold more elements than this (8 GB of float32).
MAX_ELEMENTS = (1 << 31) - 1


def _output_shapes(node: Node) -> Iterator[str]:
    """What shape inference found must be a tensor at all: no negative dim, not beyond any memory."""
    for o in node.outputs:
        if not o.name or o.shape is None:
            continue
        static = [d for d in o.shape if isinstance(d, int)]
        if any(d < 0 for d in static):
            yield f"its output '{o.name}' would have the shape {list(o.shape)}: a dim is negative"
            return
        count = math.prod(static)
        if count > MAX_ELEMENTS:
            yield f"its output '{o.name}' would have the shape {list(o.shape)} ({count} elements); kiln compiles " \
                  f"tensors of up to {MAX_ELEMENTS} elements"
            return


# =========================================================================== constraints


def _required_inputs(node: Node) -> Iterator[str]:
    """Inputs the schema requires must be given (an empty name marks an optional input absent)."""
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    schema = schemas.onnx_schema("", node.op_type, opset)
    if schema is None:
        return
    option = onnx.defs.OpSchema.FormalParameterOption
    for i, formal in enumerate(schema.inputs):
        if formal.option == option.Single and (i >= len(node.inputs) or node.inputs[i] is None):
            yield f"input {i} ('{formal.name}') is required but absent"
        if formal.option == option.Variadic and any(v is None for v in node.inputs[i:]):
            yield f"input {node.inputs.index(None, i)} of the variadic '{formal.name}' is empty"


def _tensor_type(v: Value) -> str | None:
    """The ONNX type string of ``v`` (``tensor(float)``, or ``seq(tensor(float))`` for a sequence)."""
    if v.dtype is None:
        return None
    text = "tensor(" + {"FLOAT32": "float", "FLOAT64": "double"}.get(v.dtype.name, v.dtype.name.lower()) + ")"
    return f"seq({text})" if v.sequence else text


def _input_types(node: Node) -> Iterator[str]:
    """Each input's dtype is one its schema allows, and inputs sharing a type parameter share a dtype
    (onnx's inference checks this in the main graph, but not always inside If/Loop bodies)."""
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    schema = schemas.onnx_schema("", node.op_type, opset)
    if schema is None:
        return
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, str] = {}
    formals = list(schema.inputs)
    for i, v in enumerate(node.inputs):
        if v is None or not formals:
            continue
        formal = formals[min(i, len(formals) - 1)]
        if i >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            continue
        t = _tensor_type(v)
        param = formal.type_str
        if t is None:
            continue
        if param in allowed and t not in allowed[param] or param not in allowed and param.endswith(")") and t != param:
            yield f"input {i} ('{formal.name}') is {t}, which {node.op_type} does not take"
            return
        if param in allowed and formal.is_homogeneous:
            if bound.setdefault(param, t) != t:
                yield f"inputs bound to type {param} are {bound[param]} and {t}; they must be the same"
                return


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
    x = node.input(0)
    w = node.input(1) if node.op_type in ("Conv", "ConvInteger") else None
    if kernel is None and w is not None and w.shape is not None and len(w.shape) > 2 \
            and all(isinstance(d, int) for d in w.shape[2:]):
        kernel = list(w.shape[2:])
    if n is not None and kernel is not None and len(kernel) == n and x is not None and x.shape is not None \
            and node.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID") and node.op_type not in ("ConvTranspose", "MaxUnpool"):
        # (the transposed windows, ConvTranspose's and MaxUnpool's, widen their input: any size fits)
        dil = list(node.attr("dilations", ()) or [1] * n)
        pp = list(pads or [0] * (2 * n)) if node.attr("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * n)
        for i, d in enumerate(x.shape[2:]):
            if isinstance(d, int) and len(dil) == n and len(pp) == 2 * n \
                    and d + pp[i] + pp[i + n] - dil[i] * (kernel[i] - 1) - 1 < 0:
                yield f"the window {list(kernel)} (dilations {dil}) does not fit the padded input {list(x.shape)}"
                break
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
    kernel = node.attr("kernel_shape")
    if kernel is not None and any(isinstance(d, int) and d != k for d, k in zip(w.shape[2:], kernel)):
        yield f"attribute 'kernel_shape' is {list(kernel)}, but the weight's window is {list(w.shape[2:])}"
    for d, k in zip((x.shape or ())[2:] if x is not None else (), w.shape[2:]):
        pads = node.attr("pads")
        if isinstance(d, int) and isinstance(k, int) and not pads and node.attr("auto_pad", "NOTSET") == "NOTSET" \
                and k > d:
            yield f"the weight's window {list(w.shape[2:])} is larger than the input {list(x.shape)}"
            break


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
    # NaN and +Inf compute (onnxruntime gives NaN, and the bias, for them); a negative epsilon can make
    # var + epsilon negative or zero, where each engine's formula gives other NaNs and infinities
    if eps is not None and eps < 0:
        yield f"attribute 'epsilon' is {eps}; it must be >= 0"


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


#: String attributes that take one of a fixed set of values (what onnxruntime accepts).
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Pad", "mode"): ("constant", "reflect", "edge", "wrap"),
    ("Resize", "mode"): ("nearest", "linear", "cubic"),
    ("Upsample", "mode"): ("nearest", "linear", "bilinear"),
    ("Resize", "coordinate_transformation_mode"): ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                                                   "align_corners", "asymmetric", "tf_crop_and_resize",
                                                   "tf_half_pixel_for_nn"),
    ("Resize", "nearest_mode"): ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"),
    ("Resize", "keep_aspect_ratio_policy"): ("stretch", "not_larger", "not_smaller"),
    ("GridSample", "mode"): ("bilinear", "nearest", "bicubic", "linear", "cubic"),
    ("GridSample", "padding_mode"): ("zeros", "border", "reflection"),
    ("DepthToSpace", "mode"): ("DCR", "CRD"),
    ("ScatterElements", "reduction"): ("none", "add", "mul", "max", "min"),
    ("ScatterND", "reduction"): ("none", "add", "mul", "max", "min"),
    ("GatherElements", "reduction"): ("none",),
    ("RoiAlign", "mode"): ("avg", "max"),
    ("RoiAlign", "coordinate_transformation_mode"): ("half_pixel", "output_half_pixel"),
    ("Gelu", "approximate"): ("none", "tanh"),
    ("LSTM", "direction"): ("forward", "reverse", "bidirectional"),
    ("GRU", "direction"): ("forward", "reverse", "bidirectional"),
    ("RNN", "direction"): ("forward", "reverse", "bidirectional"),
    **{(op, "auto_pad"): ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
       for op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool")},
}


@constraint(*sorted({op for op, _ in ENUMS}))
def _enums(node: Node) -> Iterator[str]:
    for (op, name), allowed in ENUMS.items():
        value = node.attr(name) if op == node.op_type else None
        if value is not None and value not in allowed:
            yield f"attribute '{name}' is {value!r}; it must be one of {', '.join(allowed)}"


@constraint("LSTM", "GRU", "RNN")
def _recurrence(node: Node) -> Iterator[str]:
    hidden = node.attr("hidden_size")
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type]
    if hidden is None:
        yield "attribute 'hidden_size' is required"
        return
    if hidden < 1:
        yield f"attribute 'hidden_size' is {hidden}; it must be >= 1"
        return
    dirs = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    x, w, r = node.input(0), node.input(1), node.input(2)
    if x is not None and x.shape and 0 in x.shape:
        yield f"the input is {list(x.shape)}; kiln compiles recurrences over non-empty sequences and batches"
        return
    want_w = (dirs, gates * hidden, x.shape[-1] if x is not None and x.shape else None)
    for name, v, want in (("W", w, want_w), ("R", r, (dirs, gates * hidden, hidden))):
        if v is None or v.shape is None:
            continue
        if len(v.shape) != 3 or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(v.shape, want)):
            yield f"input {name} is {list(v.shape)}; hidden_size {hidden} and the input need {list(want)}"
            return


@constraint("Gemm")
def _gemm_dims(node: Node) -> Iterator[str]:
    a, b = node.input(0), node.input(1)
    if a is None or b is None or a.shape is None or b.shape is None or len(a.shape) != 2 or len(b.shape) != 2:
        return
    k_a = a.shape[0] if node.attr("transA", 0) else a.shape[1]
    k_b = b.shape[1] if node.attr("transB", 0) else b.shape[0]
    if isinstance(k_a, int) and isinstance(k_b, int) and k_a != k_b:
        yield f"A is {list(a.shape)} and B {list(b.shape)} (transA={node.attr('transA', 0)}, " \
              f"transB={node.attr('transB', 0)}): their inner dims {k_a} and {k_b} differ"


@constraint("MatMul", "MatMulInteger")
def _matmul_dims(node: Node) -> Iterator[str]:
    a, b = node.input(0), node.input(1)
    if a is None or b is None or not a.shape or not b.shape:
        return
    k_a, k_b = a.shape[-1], (b.shape[0] if len(b.shape) == 1 else b.shape[-2])
    if isinstance(k_a, int) and isinstance(k_b, int) and k_a != k_b:
        yield f"the inputs are {list(a.shape)} and {list(b.shape)}: their inner dims {k_a} and {k_b} differ"


@constraint("Gather", "GatherElements")
def _constant_indices(node: Node) -> Iterator[str]:
    data, idx = node.input(0), node.input(1)
    if data is None or idx is None or not idx.is_constant or data.shape is None:
        return
    axis = normalize_axis(node.attr("axis", 0), len(data.shape)) if data.shape else 0
    n = data.shape[axis] if axis < len(data.shape) else None
    values = idx.const_ints() or []
    if isinstance(n, int) and any(not -n <= i < n for i in values):
        yield f"constant indices {values[:6]} fall outside [{-n}, {n - 1}] of axis {axis}"


@constraint("Slice")
def _slice_axes(node: Node) -> Iterator[str]:
    rank = _rank(node.input(0))
    axes = node.input(3).const_ints() if node.input(3) is not None else node.attr("axes")
    if axes is not None and rank is not None and any(not -rank <= a < rank for a in axes):
        yield f"axes {list(axes)} are out of range for rank {rank}"
    steps = node.input(4).const_ints() if node.input(4) is not None else None
    if steps is not None and 0 in steps:
        yield f"steps {steps} hold a 0; every step must be non-zero"



@constraint("Resize", "Upsample")
def _resize_scales(node: Node) -> Iterator[str]:
    index = 1 if node.op_type == "Upsample" else 2
    scales = node.input(index)
    if scales is not None and scales.is_constant:
        values = [float(v) for v in scales.numpy().reshape(-1)]
        if any(not (math.isfinite(v) and v > 0) for v in values):
            yield f"the scales {values} must be finite and > 0"
            return
        x = node.input(0)
        dims = x.shape if x is not None and x.shape is not None and len(x.shape) == len(values) else None
        if dims is not None and all(isinstance(d, int) for d in dims):
            count = math.prod(math.floor(d * v) for d, v in zip(dims, values))
            if count > MAX_ELEMENTS:
                yield f"the scales {values} make {count:.3g} elements of the input's {list(dims)}; kiln compiles " \
                      f"tensors of up to {MAX_ELEMENTS} elements"
    sizes = node.input(3) if node.op_type == "Resize" else None
    if sizes is not None and sizes.is_constant and any(v < 0 for v in sizes.const_ints() or []):
        yield f"the sizes {sizes.const_ints()} must be >= 0"


@constraint("LayerNormalization")
def _layer_norm_params(node: Node) -> Iterator[str]:
    x = node.input(0)
    if x is None or x.shape is None:
        return
    axis = normalize_axis(node.attr("axis", -1), len(x.shape))
    normalized = tuple(x.shape[axis:])
    for name, v in (("Scale", node.input(1)), ("B", node.input(2))):
        if v is None or v.shape is None:
            continue
        if len(v.shape) > len(normalized) or any(
                isinstance(a, int) and isinstance(b, int) and a not in (1, b)
                for a, b in zip(reversed(v.shape), reversed(normalized))):
            yield f"{name} is {list(v.shape)}; it must broadcast to the normalized dims {list(normalized)}"
            return


@constraint("BatchNormalization")
def _batch_norm_params(node: Node) -> Iterator[str]:
    x = node.input(0)
    c = x.shape[1] if x is not None and x.shape and len(x.shape) > 1 else None
    for i, name in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")):
        v = node.input(i)
        if v is None or v.shape is None:
            continue
        if len(v.shape) != 1 or (isinstance(c, int) and isinstance(v.shape[0], int) and v.shape[0] != c):
            yield f"input {name} is {list(v.shape)}; it must be [{c if c is not None else 'C'}], one per channel"
            return


@constraint("If")
def _branch_types(node: Node) -> Iterator[str]:
    """Each output's dtype is what both branches give (a declared dtype the branches contradict
    would be read as the wrong type)."""
    branches = [(side, node.attr(f"{side}_branch")) for side in ("then", "else")]
    for i, out in enumerate(node.outputs):
        for side, g in branches:
            if g is None or i >= len(g.outputs):
                continue
            given = g.outputs[i].dtype
            if out.dtype is not None and given is not None and given != out.dtype and \
                    not out.sequence and not g.outputs[i].sequence:
                yield f"its output '{out.name}' is {out.dtype.name.lower()}, but its {side} branch gives " \
                      f"{given.name.lower()}"
                return


@constraint("Pad")
def _pads_count(node: Node) -> Iterator[str]:
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    pads = node.attr("pads") if opset < 11 else node.input(1).const_ints() if node.input(1) is not None and \
        node.input(1).is_constant else None
    axes = node.input(3).const_ints() if node.input(3) is not None and node.input(3).is_constant else None
    rank = _rank(node.input(0))
    want = 2 * (len(axes) if axes is not None else rank) if axes is not None or rank is not None else None
    if pads is not None and want is not None and len(pads) != want:
        yield f"pads has {len(pads)} values; {'its axes' if axes is not None else f'an input of rank {rank}'} need {want}"


@constraint("Pad")
def _reflect_pads(node: Node) -> Iterator[str]:
    if node.attr("mode", "constant") != "reflect":
        return
    x = node.input(0)
    pads = node.input(1).const_ints() if node.input(1) is not None else node.attr("pads")
    if x is None or x.shape is None or pads is None or len(pads) != 2 * len(x.shape):
        return
    n = len(x.shape)
    for i, d in enumerate(x.shape):
        if isinstance(d, int) and (pads[i] or pads[i + n]) and (d < 2 or max(pads[i], pads[i + n]) >= d):
            yield f"reflect padding {pads[i]},{pads[i + n]} on a dim of {d}: each pad must be smaller than the dim"
            return


@constraint("Gemm")
def _gemm_ranks(node: Node) -> Iterator[str]:
    for i, name in ((0, "A"), (1, "B")):
        v = node.input(i)
        if v is not None and v.rank is not None and v.rank != 2:
            yield f"input {name} has rank {v.rank}; Gemm takes 2-D A and B"
            return
    a, b, c = node.input(0), node.input(1), node.input(2)
    if a is None or b is None or c is None or not a.shape or not b.shape or c.shape is None or len(c.shape) > 2:
        return
    mn = (a.shape[1 if node.attr("transA", 0) else 0], b.shape[0 if node.attr("transB", 0) else 1])
    for d, want in zip(reversed(c.shape), reversed(mn)):
        if isinstance(d, int) and isinstance(want, int) and d not in (1, want):
            yield f"C has the shape {list(c.shape)}, which does not broadcast to the product's [{mn[0]}, {mn[1]}]"
            return


@constraint("Resize")
def _resize_lengths(node: Node) -> Iterator[str]:
    x = node.input(0)
    if x is None or x.rank is None:
        return
    for i, name in ((2, "scales"), (3, "sizes")):
        v = node.input(i)
        if v is not None and v.is_constant and v.const is not None and v.const.size not in (0, x.rank) \
                and not node.attr("axes"):
            yield f"{name} has {v.const.size} entries; the input has rank {x.rank}"
            return


@constraint("LSTM", "GRU", "RNN")
def _recurrence_opset(node: Node) -> Iterator[str]:
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    if opset < 7:
        yield f"{node.op_type} before opset 7 (with output_sequence) is not supported; convert the model to opset 7+"


@constraint("CumSum")
def _cumsum_axis(node: Node) -> Iterator[str]:
    axis = node.input(1)
    if axis is None:
        return
    if axis.shape is not None and len(axis.shape) > 1 or axis.is_constant and axis.const is not None and axis.const.size != 1:
        yield f"the axis input is {axis.type_str()}; it must be a scalar"
        return
    values, rank = axis.const_ints(), _rank(node.input(0))
    if values and rank is not None and not -rank <= values[0] < rank:
        yield f"axis {values[0]} is out of range for rank {rank}"


@constraint("Resize", "Upsample")
def _resize_param_ranks(node: Node) -> Iterator[str]:
    for i in range(1, len(node.inputs)):
        v = node.input(i)
        if v is not None and v.rank is not None and v.rank != 1:
            yield f"input {i} ({v.name}) has rank {v.rank}; roi, scales and sizes are 1-D"
            return


@constraint("Reshape")
def _reshape_count(node: Node) -> Iterator[str]:
    x, target = node.input(0), node.input(1)
    if x is None or x.shape is None or target is None or not all(isinstance(d, int) for d in x.shape):
        return
    dims = target.const_ints()
    if dims is None:
        return
    total = math.prod(x.shape)
    if dims.count(-1) > 1:
        yield f"the target shape {dims} has more than one -1"
        return
    allowzero = node.attr("allowzero", 0)
    resolved = [x.shape[i] if d == 0 and not allowzero and i < len(x.shape) else d for i, d in enumerate(dims)]
    known = math.prod(d for d in resolved if d != -1)
    if any(d < -1 for d in resolved) or (-1 in resolved and (known == 0 or total % known)) \
            or (-1 not in resolved and known != total):
        yield f"cannot reshape {list(x.shape)} ({total} elements) to {dims}"


#: Attributes that are flags: 0 or 1 (onnxruntime fails a run with anything else).
FLAGS = {"keepdims", "transA", "transB", "ceil_mode", "count_include_pad", "noop_with_empty_axes",
         "select_last_index", "exclusive", "reverse", "allowzero", "sorted", "largest", "center_point_box",
         "detect_negative", "detect_positive", "training_mode", "layout", "linear_before_reset", "input_forget",
         "storage_order", "fmod", "is_case_sensitive", "align_corners", "exclude_outside", "upper"}


def _flags(node: Node) -> Iterator[str]:
    for name in FLAGS:
        value = node.attr(name)
        if isinstance(value, int) and value not in (0, 1):
            yield f"attribute '{name}' is {value}; it is a flag, 0 or 1"
            return


@constraint("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli")
def _target_dtype(node: Node) -> Iterator[str]:
    name = "to" if node.op_type == "Cast" else "dtype"
    value = node.attr(name)
    if value is None:
        return
    from kiln.ir.dtypes import DType

    try:
        DType.from_onnx(value)
    except (KeyError, ValueError):
        yield f"attribute '{name}' is {value}, not an element type kiln supports"


@constraint("Split")
def _split_count(node: Node) -> Iterator[str]:
    opset = node.graph.model_opset.get("", 0) if node.graph is not None else 0
    if opset >= 18 and node.input(1) is None and node.attr("num_outputs") is None:
        yield "at opset 18+ Split needs its 'split' input or the 'num_outputs' attribute"
        return
    sizes = node.input(1).const_ints() if node.input(1) is not None and node.input(1).is_constant else node.attr("split")
    if sizes is not None and len(sizes) != len(node.outputs):
        yield f"the split sizes {list(sizes)} make {len(sizes)} parts; the node has {len(node.outputs)} outputs"


@constraint("Tile")
def _tile_repeats(node: Node) -> Iterator[str]:
    x, r = node.input(0), node.input(1)
    if x is None or r is None or x.rank is None or r.shape is None:
        return
    if len(r.shape) != 1 or (isinstance(r.shape[0], int) and r.shape[0] != x.rank):
        yield f"repeats is {r.type_str()}; it must be 1-D with one entry per input dim ({x.rank})"
        return
    values = r.const_ints()
    if values is not None and any(v < 0 for v in values):
        yield f"repeats {values} must be >= 0"



@constraint("Clip")
def _clip_bounds(node: Node) -> Iterator[str]:
    """From opset 11 the bounds are inputs, and the spec makes them scalars (onnxruntime also takes a
    one-element vector, so kiln does too)."""
    for i, name in ((1, "min"), (2, "max")):
        v = node.input(i)
        if v is None or v.shape is None:
            continue
        if len(v.shape) > 1 or (len(v.shape) == 1 and isinstance(v.shape[0], int) and v.shape[0] != 1):
            yield f"input {name} is {list(v.shape)}; Clip's bounds must be scalars"
            return
