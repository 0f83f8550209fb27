"""Dtype and shape inference for kiln graphs.

First onnx's own inference runs, in strict mode with data propagation (so a
``Shape → Gather → Concat → Reshape`` chain yields a static shape). If strict
mode rejects the model, the lenient mode runs instead. Then kiln fills the gaps
onnx leaves with its own rules:

- ``If``: the outputs take the branches' types, with the dims the branches agree on;
- a node whose inputs are all (small) constants is evaluated to get its type;
- Loop and Scan body inputs are typed from the node's inputs;
- kiln-domain ops use the ``infer`` function they were registered with;
- output dtypes follow the op schema's type constraints (and Cast's ``to``);
- shapes are refined by kiln's shape rules (``shape_rules``): symbolic dims
  carried through ops, and ranks onnx lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto

from kiln.errors import InputError
from kiln.ir import schemas, shape_rules
from kiln.ir.core import KILN_DOMAIN, Graph, Node, Shape, Value, is_unknown_dim, normalize_axis, shape_example
from kiln.ir.dtypes import DType
from kiln.ir.interpreter import evaluate_node
from kiln.ir.serde import dim_from_proto, to_onnx
from kiln.ir.validate import ModelValidationError, type_problem

_EVAL_LIMIT = 1 << 16  # elements: evaluate all-constant nodes only when inputs are small

_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"})


class _Unknowns:
    """Hands out fresh unknown-dim names (``?N``) not used anywhere in the graph."""

    def __init__(self, graph: Graph):
        top = -1
        for g in graph.walk_graphs():
            for v in g.values():
                for d in v.shape or ():
                    m = re.fullmatch(r"\?(\d+)", d) if isinstance(d, str) else None
                    if m:
                        top = max(top, int(m.group(1)))
        self._next = top + 1

    def fresh(self) -> str:
        name = f"?{self._next}"
        self._next += 1
        return name


def infer_shapes(graph: Graph, *, model: ModelProto | None = None, check_types: bool = False) -> None:
    """Fill in every value's dtype and shape that can be inferred, in place.

    ``model`` is the graph's ONNX form when the caller already has it (import
    does); otherwise the graph is exported without its weights for onnx. With
    ``check_types`` (import), a type error in the model raises ``ModelValidationError``.
    """
    proto = model if model is not None else to_onnx(graph, weights=False)
    inferred = _onnx_infer(proto, check_types)
    unknowns = _Unknowns(graph)
    if inferred is not None:
        types = _collect_types(inferred.graph)
        for g in graph.walk_graphs():
            for n in g.nodes:
                for o in n.outputs:
                    if o.name and o.name in types:
                        _merge(o, *types[o.name], unknowns)
            for v in g.outputs:
                if v.name in types and v.producer is None and not v.is_constant:
                    _merge(v, *types[v.name], unknowns)
    for g in graph.walk_graphs():
        _kiln_rules(g, unknowns)
        refine(g, unknowns)


def reinfer_if_untyped(graph: Graph) -> None:
    """Infer again where some output lacks a dtype or shape, or has a dim inference left unknown
    (``?N``): after a rewrite (a folded constant, above all), it may be settled now."""
    if any(o.name and (o.dtype is None or o.shape is None or any(is_unknown_dim(d) for d in o.shape))
           for n in graph.walk_nodes() for o in n.outputs):
        infer_shapes(graph)


@dataclass(frozen=True)
class SequenceShape:
    """The pin of a sequence input: each element's dims, so also its length, which kiln fixes when
    compiling (``--input-shape NAME=3*2x4``, or ``NAME=2x4,2x1`` for elements of other shapes)."""

    elements: tuple[tuple[int | str, ...], ...]

    @property
    def length(self) -> int:
        return len(self.elements)

    @property
    def dims(self) -> tuple[int | str, ...]:
        """The dims the elements share (the first element's, with a symbol where they differ)."""
        if not self.elements:
            return ()
        first = self.elements[0]
        if any(len(e) != len(first) for e in self.elements):
            raise InputError(f"the elements of a sequence must have one rank; {self} mixes ranks")
        return tuple(d if all(e[i] == d for e in self.elements) else f"seq_dim{i}" for i, d in enumerate(first))

    def __str__(self) -> str:
        texts = ["x".join(map(str, e)) for e in self.elements]
        return f"{len(texts)}*{texts[0]}" if texts and len(set(texts)) == 1 else ",".join(texts) or "0*"


def set_input_shapes(graph: Graph, shapes: dict[str, tuple[int | str, ...] | SequenceShape]) -> None:
    """Pin graph inputs to shapes (ints, or names for symbolic dims) and re-infer every shape.

    A sequence input is pinned with a :class:`SequenceShape`: its length, which kiln fixes when
    compiling, and its elements' dims (every element has them).

    Each given shape must keep the input's rank, and its ints must agree with the
    input's static dims. A name turns a dim into that symbol: an unknown or
    differently named dim, or a static one, which *frees* it. Freeing a static
    leading dim (a batch fixed at export) also frees ``Reshape`` targets that
    hard-code it (see :func:`free_reshape_batch`). Symbolic dims elsewhere in the
    graph are recomputed, so once the inputs are static, shape subgraphs become
    foldable.
    """
    by_name = {v.name: v for v in graph.inputs}
    freed: dict[str, int] = {}  # symbol -> the static size it replaced, for leading dims
    for name, shape in shapes.items():
        v = by_name.get(name)
        if v is None:
            raise InputError(f"no graph input named '{name}'; inputs: {', '.join(by_name)}")
        if v.sequence != isinstance(shape, SequenceShape):
            example = shape_example(v.shape)
            raise InputError(f"input '{name}' is a sequence of tensors: pin it as {name}=N*{example} (N tensors of "
                             f"that shape)" if v.sequence else f"input '{name}' is a tensor, not a sequence; "
                             f"pin it as {name}={example}")
        if isinstance(shape, SequenceShape):
            if v.shape is not None and any(len(e) != len(v.shape) for e in shape.elements):
                raise InputError(f"input '{name}' is {v.type_str()}; {shape} does not fit its elements' rank")
            v.seq_shapes = tuple(tuple(d if isinstance(d, str) else int(d) for d in e) for e in shape.elements)
            shape = shape.dims if shape.elements else v.shape or ()
        if v.shape is not None and (len(v.shape) != len(shape) or any(
                isinstance(d, int) and isinstance(s, int) and d != s for d, s in zip(v.shape, shape))):
            raise InputError(f"input '{name}' is {v.type_str()}; {'x'.join(map(str, shape))} does not fit it")
        if v.shape and shape and isinstance(v.shape[0], int) and isinstance(shape[0], str):
            freed[shape[0]] = v.shape[0]
        v.shape = tuple(d if isinstance(d, str) else int(d) for d in shape)
    _reinfer(graph)
    while freed and free_reshape_batch(graph, freed):
        _reinfer(graph)


def name_unknown_dims(graph: Graph) -> dict[str, list[tuple[int, str]]]:
    """Give every unknown input dim (unnamed, ``-1``, ``?``) a symbol, so the graph compiles for any size.

    Input ``x``'s dim 0 becomes ``x_0`` (made unique against the graph's other symbols), and
    shapes are re-inferred from the new symbols. Returns the dims named, per input:
    ``{"x": [(0, "x_0")]}``. Inputs of unknown rank and sequences are left alone.
    """
    taken = {d for g in graph.walk_graphs() for v in g.values() for d in (v.shape or ()) if isinstance(d, str)}
    named: dict[str, list[tuple[int, str]]] = {}
    shapes: dict[str, tuple[int | str, ...]] = {}
    for v in graph.inputs:
        if v.sequence or v.shape is None or not any(is_unknown_dim(d) for d in v.shape):
            continue
        stem = re.sub(r"\W", "_", v.name) or "input"
        dims = list(v.shape)
        for i, d in enumerate(dims):
            if not is_unknown_dim(d):
                continue
            name, k = f"{stem}_{i}", 1
            while name in taken:
                name, k = f"{stem}_{i}_{k}", k + 1
            taken.add(name)
            dims[i] = name
            named.setdefault(v.name, []).append((i, name))
        shapes[v.name] = tuple(dims)
    if shapes:
        set_input_shapes(graph, shapes)
    return named


def _equal_dims(n: Node) -> list[tuple[object, object]]:
    """Pairs of dims that ``n`` runs only with equal: a contraction's inner dims, a conv's channels
    against its weight's, a normalization's channels against its scale's."""
    x = n.input(0)
    if x is None or not x.shape:
        return []
    a = x.shape
    if n.op_type in ("MatMul", "Gemm", "MatMulInteger"):
        b = n.input(1).shape if n.input(1) is not None else None
        if not b:
            return []
        if n.op_type == "Gemm":
            if len(a) != 2 or len(b) != 2:
                return []
            return [(a[0 if n.attr("transA", 0) else 1], b[1 if n.attr("transB", 0) else 0])]
        return [(a[-1], b[0] if len(b) == 1 else b[-2])]
    weight = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}.get(n.op_type)
    if weight is not None:
        w = n.input(weight).shape if n.input(weight) is not None else None
        group = n.attr("group", 1)
        if len(a) >= 3 and w and len(w) == len(a) and isinstance(w[1], int) and isinstance(group, int) and group > 0:
            return [(a[1], w[1] * group)]
        return []
    if n.op_type in ("BatchNormalization", "InstanceNormalization"):
        scale = n.input(1).shape if n.input(1) is not None else None
        return [(a[1], scale[0])] if len(a) >= 2 and scale and len(scale) == 1 else []
    if n.op_type in ("LayerNormalization", "LayerNorm"):  # the normalised dims against the scale's (not 1s)
        scale = n.input(1).shape if n.input(1) is not None else None
        axis = n.attr("axis", -1)
        axis = axis + len(a) if isinstance(axis, int) and axis < 0 else axis
        if not scale or not isinstance(axis, int) or not 0 <= axis < len(a) or len(scale) > len(a) - axis:
            return []
        return [(x, d) for x, d in zip(a[len(a) - len(scale):], scale) if d != 1]
    return []


def pin_contracted_dims(graph: Graph) -> dict[str, int]:
    """Pin symbolic input dims that an op needs equal to a static dim.

    ``x: [B, S, K] @ w: [768, N]`` runs only with ``K = 768``; a conv's input channels must be its
    weight's (times its groups), a batch norm's its scale's. Such an input dim becomes the
    static size, so the runtime refuses any other size in one line instead of reading past the
    weight. Returns the pins made (symbol -> size), after re-inferring the graph's shapes.
    """
    pins: dict[str, int] = {}
    for n in graph.nodes:
        if n.domain != "":
            continue
        for k_a, k_b in _equal_dims(n):
            for sym, size in ((k_a, k_b), (k_b, k_a)):
                if isinstance(sym, str) and isinstance(size, int):
                    pins.setdefault(sym, size)
    inputs = {v.name: v.shape for v in graph.inputs if v.shape and any(d in pins for d in v.shape)}
    if inputs:
        set_input_shapes(graph, {name: tuple(pins.get(d, d) if isinstance(d, str) else d for d in shape)
                                 for name, shape in inputs.items()})
    return {k: v for k, v in pins.items() if any(k in (s or ()) for s in inputs.values())}


_WINDOWED = {("", "Conv"), ("", "ConvInteger"), ("", "MaxPool"), ("", "AveragePool"), ("", "LpPool"),
             (KILN_DOMAIN, "FusedConv")}
#: ops whose output has each input's spatial dims (inputs of the output's rank; a broadcast 1 aside)
_SAME_DIMS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu",
              "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
              "Identity", "Dropout", "Cast", "BatchNormalization", "InstanceNormalization", "LRN", "Add", "Sub",
              "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where"}


def _window(n: Node, spatial: int) -> tuple[list[int], list[int], list[int], list[int], str, int] | None:
    """(kernel, strides, dilations, pads, auto_pad, ceil_mode) of a conv or pool, or None if not static."""
    w = n.input(1).shape if n.op_type not in ("MaxPool", "AveragePool", "LpPool") and n.input(1) is not None else None
    kernel = list(n.attr("kernel_shape", ()) or (w[2:] if w else ()))
    if len(kernel) != spatial or not all(isinstance(k, int) for k in kernel):
        return None
    pads = list(n.attr("pads", ()) or [0] * (2 * spatial))
    if len(pads) != 2 * spatial:
        return None
    return (kernel, list(n.attr("strides", ()) or [1] * spatial), list(n.attr("dilations", ()) or [1] * spatial),
            pads, n.attr("auto_pad", "NOTSET"), n.attr("ceil_mode", 0))


def window_minimums(graph: Graph) -> dict[str, int]:
    """The least size of each symbolic dim that the convs' and pools' windows need.

    A window of ``dilation * (kernel - 1) + 1`` must fit its padded input, or the op has no
    output (onnxruntime refuses such a run). Each window's need is carried back to the model's
    inputs: through the convs and pools before it (the input size whose output is that large),
    and through ops that keep the spatial dims (activations, normalizations, elementwise
    arithmetic, channel concats). Where it reaches a symbolic dim, that symbol must be at least
    so large. (A need that meets any other op, a Resize or Reshape, is not carried further.)
    Returns the input dims' symbols only.
    """
    least: dict[str, int] = {}
    carried: dict[tuple[int, int], int] = {}  # (value, axis) -> the largest need already carried from it

    def need(v: Value | None, axis: int, size: int, depth: int = 0) -> None:
        if v is None or size <= 1 or depth > 256 or v.shape is None or axis >= len(v.shape):
            return
        if carried.get((id(v), axis), 0) >= size:
            return  # a need at least as large went this way already (residual graphs branch and rejoin)
        carried[(id(v), axis)] = size
        d = v.shape[axis]
        if isinstance(d, int):
            return  # a static dim: shape inference and validation see it
        if isinstance(d, str):
            least[d] = max(least.get(d, 1), size)
        p = v.producer
        if p is None:
            return
        rank = len(v.shape)
        if (p.domain, p.op_type) in _WINDOWED and axis >= 2 and p.input(0) is not None and p.input(0).shape \
                and len(p.input(0).shape) == rank:
            geometry = _window(p, rank - 2)
            if geometry is None:
                return
            kernel, strides, dil, pads, auto_pad, ceil = geometry
            i = axis - 2
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                need(p.input(0), axis, (size - 1) * strides[i] + 1, depth + 1)
                return
            span = dil[i] * (kernel[i] - 1) + 1 - (pads[i] + pads[i + rank - 2] if auto_pad == "NOTSET" else 0)
            back = (size - 2) * strides[i] + span + 1 if ceil else (size - 1) * strides[i] + span
            need(p.input(0), axis, back, depth + 1)
        elif p.domain == "" and (p.op_type in _SAME_DIMS or p.op_type == "Concat"
                                 and normalize_axis(p.attr("axis", 0), rank) != axis):
            for x in p.inputs:
                if x is not None and x.shape is not None and len(x.shape) == rank and x.shape[axis] != 1:
                    need(x, axis, size, depth + 1)

    for n in graph.nodes:
        x = n.input(0)
        if (n.domain, n.op_type) not in _WINDOWED or x is None or not x.shape or len(x.shape) < 3:
            continue
        geometry = _window(n, len(x.shape) - 2)
        if geometry is None or geometry[4] not in ("NOTSET", "VALID"):
            continue  # (a blocked layout's extra dim, a symbolic kernel, or SAME padding: any size fits)
        kernel, _, dil, pads, auto_pad, _ = geometry
        spatial = len(kernel)
        for i in range(spatial):
            pad = pads[i] + pads[i + spatial] if auto_pad == "NOTSET" else 0
            need(x, 2 + i, dil[i] * (kernel[i] - 1) + 1 - pad)
    inputs = {d for v in graph.inputs for d in (v.shape or ()) if isinstance(d, str)}
    return {d: n for d, n in least.items() if d in inputs}


def _reinfer(graph: Graph) -> None:
    for g in graph.walk_graphs():  # forget derived shapes: they are recomputed from the inputs
        for n in g.nodes:
            for o in n.outputs:
                if o.name and not (o.is_graph_output and g is not graph):
                    o.shape = None
    infer_shapes(graph)


def free_reshape_batch(graph: Graph, freed: dict[str, int]) -> bool:
    """Rewrite ``Reshape`` targets that hard-code a freed leading dim to copy it instead.

    An exporter traced at batch 1 writes ``Reshape(x, [1, 2048])``. Once ``x``'s
    leading dim is the symbol ``N`` (it was 1), the target ``[1, ...]`` is made
    ``[0, ...]`` (copy the input's dim), provided the rest of the target holds the
    rest of the input: their sizes are equal, or the rest has the one ``-1``.
    Targets with ``allowzero`` set, or that do not fit this, are left alone.
    Returns whether anything changed.
    """
    changed = False
    for g in graph.walk_graphs():
        for n in g.nodes:
            if n.op_type != "Reshape" or n.domain or n.attr("allowzero", 0):
                continue
            x, target = n.input(0), n.input(1)
            if x is None or target is None or not target.is_constant or not x.shape:
                continue
            t = target.numpy()
            lead = x.shape[0]
            if t.ndim != 1 or len(t) == 0 or not isinstance(lead, str) or freed.get(lead) != int(t[0]):
                continue
            rest = x.shape[1:]
            fits = (-1 in t[1:].tolist()) or (all(isinstance(d, int) for d in rest)
                                              and int(np.prod(rest, dtype=np.int64)) == int(np.prod(t[1:])))
            if not fits:
                continue
            new = t.copy()
            new[0] = 0
            n.set_input(1, g.add_constant(new, name=f"{target.name}_batch"))
            changed = True
    return changed


def _onnx_infer(proto: ModelProto, check_types: bool = False) -> ModelProto | None:
    """onnx's inference: strict (with types checked when asked), else lenient; None if both fail.

    With ``check_types``, a type error from the strict run (an op's inputs bound to different
    types, a type its schema does not allow) is the model's fault, and onnxruntime refuses such
    models too: it raises ``ModelValidationError``. Other strict failures fall back to the
    lenient run.
    """
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=check_types, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001 - InferenceError, ValidationError, RuntimeError...
        type_error = type_problem(str(e)) if check_types else None
        if type_error:
            raise ModelValidationError(type_error) from None
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001
        return None


def _collect_types(gp: onnx.GraphProto) -> dict[str, tuple[DType | None, Shape | None]]:
    out: dict[str, tuple[DType | None, Shape | None]] = {}

    def visit(g: onnx.GraphProto) -> None:
        for vi in list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is None:
                continue
            try:
                dtype = DType.from_onnx(tt.elem_type) if tt.elem_type else None
            except KeyError:
                dtype = None
            shape = tuple(dim_from_proto(d) for d in tt.shape.dim) if tt.HasField("shape") else None
            out[vi.name] = (dtype, shape)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                for sg in a.graphs:
                    visit(sg)

    visit(gp)
    return out


def _merge(v: Value, dtype: DType | None, shape: tuple | None, unknowns: _Unknowns) -> None:
    """Combine what is known of ``v`` with an inferred type; known facts win over unknowns."""
    if v.dtype is None:
        v.dtype = dtype
    if shape is None:
        return
    if v.shape is None or len(v.shape) != len(shape):
        v.shape = tuple(unknowns.fresh() if d is None else d for d in shape)
        return
    merged: list[int | str] = []
    for old, new in zip(v.shape, shape):
        if isinstance(old, int):
            merged.append(old)
        elif isinstance(new, int):
            merged.append(new)
        elif new is not None and is_unknown_dim(old):
            merged.append(new)
        else:
            merged.append(old)
    v.shape = tuple(merged)


def _known(v: Value | None) -> bool:
    return v is not None and v.dtype is not None and v.shape is not None


def _kiln_rules(g: Graph, unknowns: _Unknowns) -> None:
    for node in g.nodes:
        outs = [o for o in node.outputs if o.name]
        if node.domain == KILN_DOMAIN:
            # always: onnx sees a kiln op only as its decomposition, and may leave dims unknown
            # (a packed weight's dims pass through Shape and Reshape) that kiln's rule knows
            op = schemas.KILN_OPS.get(node.op_type)
            if op is not None and op.infer is not None:
                for o, (dt, sh) in zip(node.outputs, op.infer(node)):
                    _merge(o, dt, sh, unknowns)
        if node.op_type == "STFT" and node.domain == "" and node.attr("onesided") is None:
            # onnx's inference (1.23) takes onesided's default as 0 where the spec, its reference and
            # onnxruntime take 1: kiln's rule replaces its bin count
            shape = shape_rules.RULES[("", "STFT")](node)[0]
            if shape is not None and node.outputs[0].shape is not None and len(node.outputs[0].shape) == 4:
                node.outputs[0].shape = tuple(d if d is not None else old
                                              for d, old in zip(shape, node.outputs[0].shape))
        if node.op_type == "Loop" and node.domain == "":
            _type_loop_body(node, unknowns)
        if node.op_type == "Scan" and node.domain == "":
            _type_scan_body(node, unknowns)
        if all(_known(o) for o in outs):
            continue
        if node.op_type == "If" and node.domain == "":
            _infer_if(node, unknowns)
        if all(_known(o) for o in outs):
            continue
        if _all_small_constants(node):
            _infer_by_evaluation(node, unknowns)
        if node.domain in ("", "ai.onnx.ml") and any(o.dtype is None for o in outs):
            _infer_dtype_from_schema(node)


def refine(g: Graph, unknowns: _Unknowns) -> None:
    """Sharpen shapes with kiln's own rules (``shape_rules``), in topological order.

    An int beats a symbol; a named symbol stays; a dim carried over from an
    input (even an unknown one) replaces a fresh unknown; a rank onnx lost is
    filled in.
    """
    for node in g.nodes:
        derived = shape_rules.infer(node)
        if derived is None:
            continue
        for o, shape in zip(node.outputs, derived):
            if o.name and shape is not None:
                _refine_value(o, shape, unknowns)


def _refine_value(v: Value, derived: tuple, unknowns: _Unknowns) -> None:
    if v.shape is None:
        v.shape = tuple(unknowns.fresh() if d is None else d for d in derived)
        return
    if len(v.shape) != len(derived):
        if all(d is not None for d in derived):  # what the op computes beats a declaration of another rank
            v.shape = tuple(derived)
        return
    out: list[int | str] = []
    for old, new in zip(v.shape, derived):
        if isinstance(new, int) and isinstance(old, int) and new != old:
            out.append(new)  # a declared size the op does not make: onnxruntime, too, runs the op's shape
        elif isinstance(old, int) or new is None or (not is_unknown_dim(old) and not isinstance(new, int)):
            out.append(old)
        else:
            out.append(new)
    v.shape = tuple(out)


_SCHEMA_TYPES = {
    "tensor(float)": DType.FLOAT32, "tensor(double)": DType.FLOAT64, "tensor(float16)": DType.FLOAT16,
    "tensor(bfloat16)": DType.BFLOAT16, "tensor(bool)": DType.BOOL,
    **{f"tensor({d.name.lower()})": d for d in DType if d.is_integer},
}


def _infer_dtype_from_schema(node: Node) -> None:
    """Output dtypes from the op schema's type constraints.

    An output whose constraint allows a single type gets it (Dropout's bool
    mask); one that shares its constraint with a typed input gets that input's;
    Cast's comes from its ``to`` attribute. (Shapes come from ``refine``.)
    """
    if node.op_type == "Cast" and node.domain == "" and node.outputs[0].dtype is None:
        node.outputs[0].dtype = DType.from_onnx(node.attr("to"))
    schema = schemas.onnx_schema(node.domain, node.op_type, node.graph.model_opset.get(node.domain, 0) if node.graph else 0)
    if schema is None:
        return
    allowed = {c.type_param_str: list(c.allowed_type_strs) for c in schema.type_constraints}
    by_param: dict[str, DType] = {}
    for formal, actual in zip(schema.inputs, node.inputs):
        if actual is not None and actual.dtype is not None:
            by_param.setdefault(formal.type_str, actual.dtype)
    for formal, out in zip(schema.outputs, node.outputs):
        if not out.name or out.dtype is not None:
            continue
        options = allowed.get(formal.type_str, [formal.type_str])
        if len(options) == 1 and options[0] in _SCHEMA_TYPES:
            out.dtype = _SCHEMA_TYPES[options[0]]
        elif formal.type_str in by_param:
            out.dtype = by_param[formal.type_str]


def _type_loop_body(node: Node, unknowns: _Unknowns) -> None:
    """A Loop body's inputs: the iteration number (i64 scalar), the condition (bool scalar), then
    the loop-carried values, typed like the Loop's own inputs 2.. (see :func:`_carry_shapes`)."""
    body = node.attr("body")
    if body is None or len(body.inputs) < 2:
        return
    fixed = [(DType.INT64, ()), (DType.BOOL, ())]
    for v, (dt, shape) in zip(body.inputs, fixed):
        v.dtype = v.dtype or dt
        v.shape = v.shape if v.shape is not None else shape
    nc = len(node.inputs) - 2
    _carry_shapes(body, body.inputs[2:2 + nc], node.inputs[2:], body.outputs[1:1 + nc], unknowns)
    for o, v, out in zip(node.outputs, body.inputs[2:2 + nc], body.outputs[1:1 + nc]):
        if o.name and v.shape is not None and v.shape == out.shape:
            _merge(o, v.dtype, v.shape, unknowns)
    m, cond_out = node.input(0), body.outputs[0] if body.outputs else None
    runs_m = (m is not None and m.is_constant and m.numpy().size == 1 and cond_out is not None
              and (cond_out is body.inputs[1] or (cond_out.producer is not None and cond_out.producer.op_type == "Identity"
                                                  and cond_out.producer.input(0) is body.inputs[1])))
    if runs_m and node.input(1) is not None and not (node.input(1).is_constant and bool(node.input(1).numpy().all())):
        runs_m = False  # a run-time first condition may skip the loop
    trips = max(int(m.numpy().reshape(())), 0) if runs_m else None
    for o, s in zip(node.outputs[nc:], body.outputs[1 + nc:]):
        if o.name and s.shape is not None and s.dtype is not None:
            rows = trips if trips is not None and trips < 1 << 31 else (o.shape[0] if o.shape else None)
            _merge(o, s.dtype, (rows if rows is not None else unknowns.fresh(), *s.shape), unknowns)


def _carry_shapes(body: Graph, inputs: list[Value], outer: list[Value | None], outputs: list[Value],
                  unknowns: _Unknowns) -> None:
    """Type the body inputs of loop-carried values from the node's inputs.

    A body input whose shape is not declared takes the outer value's shape on trial: kiln's rules
    then run over the body, and the trial stands only if every carried value comes out of the body
    with the shape it went in with (so, by induction, it keeps it in every iteration); otherwise the
    body's shapes are restored and the carried shapes stay unknown.
    """
    tried = False
    saved = {id(v): v.shape for g in body.walk_graphs() for v in g.values()}
    for v, o in zip(inputs, outer):
        if o is None:
            continue
        v.dtype = v.dtype or o.dtype
        if o.shape is not None and (v.shape is None or (len(v.shape) == len(o.shape) and any(
                is_unknown_dim(d) for d in v.shape if isinstance(d, str)))):
            if v.shape != o.shape:
                v.shape, tried = o.shape, True
    if not tried:
        return
    for g in body.walk_graphs():
        _kiln_rules(g, unknowns)
        refine(g, unknowns)
    if any(v.shape != out.shape for v, out in zip(inputs, outputs)):
        for g in body.walk_graphs():
            for v in g.values():
                if id(v) in saved:
                    v.shape = saved[id(v)]


def _type_scan_body(node: Node, unknowns: _Unknowns) -> None:
    """A Scan body's inputs (opset 9+): the N state values, typed like the Scan's first N inputs
    (see :func:`_carry_shapes`), then one slice of each scan input (its dtype; its shape without the scan axis)."""
    body = node.attr("body")
    m = node.attr("num_scan_inputs")
    opset = node.graph.model_opset.get("", 0) if node.graph else 0
    if body is None or m is None or opset < 9:
        return
    n = len(node.inputs) - m
    axes = list(node.attr("scan_input_axes", ()) or [0] * m)
    for i, (v, outer) in enumerate(zip(body.inputs[n:], node.inputs[n:])):
        if outer is None or v.dtype is not None and v.shape is not None:
            continue
        v.dtype = v.dtype or outer.dtype
        if v.shape is None and outer.shape is not None:
            axis = normalize_axis(axes[i], len(outer.shape))
            v.shape = tuple(d for k, d in enumerate(outer.shape) if k != axis)
    _carry_shapes(body, body.inputs[:n], node.inputs[:n], body.outputs[:n], unknowns)


def _infer_if(node: Node, unknowns: _Unknowns) -> None:
    branches = [node.attr("then_branch"), node.attr("else_branch")]
    if any(b is None for b in branches):
        return
    for i, o in enumerate(node.outputs):
        a, b = (br.outputs[i] if i < len(br.outputs) else None for br in branches)
        if a is None or b is None:
            continue
        dtype = a.dtype or b.dtype
        shape: tuple | None = None
        if a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape):
            shape = tuple(x if x == y else None for x, y in zip(a.shape, b.shape))
        _merge(o, dtype, shape, unknowns)


def _all_small_constants(node: Node) -> bool:
    if node.op_type in _RANDOM_OPS or any(True for _ in node.subgraphs()):
        return False
    ins = [v for v in node.inputs if v is not None]
    return bool(ins) and all(v.is_constant and v.const is not None and v.const.size <= _EVAL_LIMIT for v in ins)


def _infer_by_evaluation(node: Node, unknowns: _Unknowns) -> None:
    try:
        results = evaluate_node(node, {})
    except Exception:  # noqa: BLE001 - inference is best effort; verify() reports what stays unknown
        return
    for o, r in zip([o for o in node.outputs if o.name], results):
        arr = np.asarray(r)
        try:
            _merge(o, DType.from_numpy(arr.dtype), arr.shape, unknowns)
        except KeyError:
            continue
