"""kiln's own shape rules: output shapes from input shapes, with symbolic dims.

onnx's inference gives up on ranks behind dynamic shape tensors and gives every
derived dim it cannot name a fresh unknown, so ``Mul(2, y)`` is not known to
have ``y``'s shape. These rules compute shapes kiln can prove: a dim is an int,
a symbol carried over from an input, or ``None`` (unknown). Shape inference
uses them to refine what onnx found (see ``shape_inference.refine``).

Each rule takes the node and returns one shape (a tuple, or ``None`` for an
unknown rank) per output.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.core import Dim, Node, Value, const_ints, normalize_axes, normalize_axis

MaybeShape = tuple[Dim | None, ...] | None
Rule = Callable[[Node], list[MaybeShape]]

UNARY = (
    "Abs Acos Acosh Asin Asinh Atan Atanh Ceil Celu Cos Cosh Elu Erf Exp Floor Gelu HardSigmoid HardSwish Identity "
    "IsInf IsNaN LeakyRelu Log LogSoftmax LpNormalization Mish Neg Not Reciprocal Relu Round Selu Shrink Sigmoid "
    "Sign Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Clip Hardmax Cast CastLike Dropout "
    "LayerNormalization BatchNormalization InstanceNormalization LRN MeanVarianceNormalization QuantizeLinear "
    "DequantizeLinear"
).split()
BROADCAST = "Add Sub Mul Div Pow Mod PRelu Max Min Sum Mean Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Where BitShift".split()

RULES: dict[tuple[str, str], Rule] = {}


def rule(*ops: str, domain: str = "") -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[(domain, op)] = fn
        return fn

    return register


def _shape(v: Value | None) -> MaybeShape:
    # unknown dims (``?N``) are kept: the same name is the same (unknown) dim
    return None if v is None or v.shape is None else tuple(v.shape)


def broadcast(shapes: list[MaybeShape]) -> MaybeShape:
    """Numpy broadcasting over dims that may be ints, symbols or unknown (None)."""
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)  # type: ignore[arg-type]
    out: list[Dim | None] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]  # type: ignore[arg-type]
        non_one = [d for d in dims if d != 1]
        if not non_one:
            out.append(1)
        elif all(d == non_one[0] for d in non_one) and non_one[0] is not None:
            out.append(non_one[0])
        else:
            ints = {d for d in non_one if isinstance(d, int)}
            out.append(ints.pop() if len(ints) == 1 else None)
    return tuple(out)


@rule(*UNARY)
def _unary(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    return [s for _ in node.outputs]


@rule(*BROADCAST)
def _broadcast(node: Node) -> list[MaybeShape]:
    return [broadcast([_shape(v) for v in node.inputs if v is not None])]


@rule("Shape")
def _shape_of(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    start, end = node.attr("start", 0), node.attr("end", None)
    return [(len(range(len(s))[start:end]),)]


@rule("Size")
def _size(node: Node) -> list[MaybeShape]:
    return [()]


@rule("Transpose")
def _transpose(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    perm = node.attr("perm") or tuple(reversed(range(len(s))))
    return [tuple(s[p] for p in perm)] if len(perm) == len(s) else [None]


@rule("Pad")
def _pad(node: Node) -> list[MaybeShape]:
    """Each padded axis grows by its two pads (constant pads; opset 18's ``axes`` too)."""
    s = _shape(node.input(0))
    pads = list(node.attr("pads", ()) or ()) or const_ints(node.input(1))
    if s is None or pads is None:
        return [None]
    axes = const_ints(node.input(3)) if len(node.inputs) > 3 else None
    axes = [normalize_axis(a, len(s)) for a in axes] if axes is not None else list(range(len(s)))  # pads' order
    if len(pads) != 2 * len(axes):
        return [None]
    out: list[Dim | None] = list(s)
    for k, a in enumerate(axes):
        grow = pads[k] + pads[k + len(axes)]
        out[a] = out[a] + grow if isinstance(out[a], int) else (out[a] if grow == 0 else None)
    return [tuple(out)]


# ---------------------------------------------------------------- shape-tensor values
#
# Small integer tensors computed from ``Shape`` (``Shape → Gather → Concat → Reshape``) hold dims.
# ``shape_value`` follows such a chain and returns its contents as dims: ints, symbols, or None.

_SHAPE_VALUE_OPS = {"Shape", "Cast", "Identity", "Concat", "Slice", "Gather", "Unsqueeze", "Squeeze"}


def shape_value(v: Value | None, depth: int = 0) -> tuple[list[Dim | None], bool] | None:
    """The contents of a 0-d or 1-d integer tensor as dims, and whether it is a scalar; or None."""
    if v is None or depth > 32:
        return None
    if v.is_constant:
        arr = np.asarray(v.numpy())
        if arr.ndim > 1 or arr.dtype.kind not in "iu":
            return None
        return [int(x) for x in arr.reshape(-1).tolist()], arr.ndim == 0
    node = v.producer
    if node is None or node.domain != "" or node.op_type not in _SHAPE_VALUE_OPS:
        return None
    op = node.op_type
    if op == "Shape":
        s = _shape(node.input(0))
        if s is None:
            return None
        return list(s[node.attr("start", 0):node.attr("end", None)]), False
    if op in ("Cast", "Identity"):
        return shape_value(node.input(0), depth + 1)
    if op == "Concat":
        parts = [shape_value(i, depth + 1) for i in node.inputs if i is not None]
        if any(p is None or p[1] for p in parts):
            return None
        return [d for p in parts for d in p[0]], False  # type: ignore[index]
    src = shape_value(node.input(0), depth + 1)
    if src is None:
        return None
    dims, scalar = src
    if op == "Unsqueeze":
        return (dims, False) if scalar else None
    if op == "Squeeze":
        return (dims, True) if len(dims) == 1 and not scalar else None
    if op == "Gather":
        idx = const_ints(node.input(1))
        if idx is None or scalar:
            return None
        picked = [dims[i] if -len(dims) <= i < len(dims) else None for i in idx]
        return picked, np.asarray(node.input(1).numpy()).ndim == 0  # type: ignore[union-attr]
    if op == "Slice":
        starts, ends = const_ints(node.input(1)), const_ints(node.input(2))
        steps = const_ints(node.input(4)) if node.input(4) is not None else [1]
        if starts is None or ends is None or steps is None or len(starts) != 1 or scalar:
            return None
        return dims[slice(starts[0], ends[0], steps[0])], False
    return None


@rule("Reshape")
def _reshape(node: Node) -> list[MaybeShape]:
    x, target = _shape(node.input(0)), node.input(1)
    known = shape_value(target)
    if known is None or known[1]:
        t = _shape(target)
        if t is None or len(t) != 1 or not isinstance(t[0], int):
            return [None]
        return [(None,) * t[0]]  # the rank is the shape tensor's length
    values = known[0]
    allow_zero = node.attr("allowzero", 0)
    out: list[Dim | None] = []
    for i, d in enumerate(values):
        if d == 0 and not allow_zero:
            out.append(x[i] if x is not None and i < len(x) else None)
        elif d == -1:
            out.append(None)
        else:
            out.append(d)
    if -1 in values and x is not None and all(isinstance(d, int) for d in x) and all(
            isinstance(d, int) for i, d in enumerate(out) if values[i] != -1):
        known = int(np.prod([d for d in out if d is not None], dtype=np.int64))
        total = int(np.prod(x, dtype=np.int64))  # type: ignore[arg-type]
        if known and total % known == 0:
            out[values.index(-1)] = total // known
    return [tuple(out)]


@rule("Flatten")
def _flatten(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    axis = node.attr("axis", 1)
    axis = normalize_axis(axis, len(s))

    def prod(dims: tuple) -> Dim | None:
        if all(isinstance(d, int) for d in dims):
            return int(np.prod(dims, dtype=np.int64))
        return dims[0] if len(dims) == 1 else None

    return [(prod(s[:axis]), prod(s[axis:]))]


@rule("MatMul")
def _matmul(node: Node) -> list[MaybeShape]:
    a, b = _shape(node.input(0)), _shape(node.input(1))
    if a is None or b is None or not a or not b:
        return [None]
    if len(a) == 1 and len(b) == 1:
        return [()]
    if len(a) == 1:
        return [(*b[:-2], b[-1])]
    if len(b) == 1:
        return [a[:-1]]
    batch = broadcast([a[:-2], b[:-2]])
    return [None if batch is None else (*batch, a[-2], b[-1])]


@rule("Gemm")
def _gemm(node: Node) -> list[MaybeShape]:
    a, b = _shape(node.input(0)), _shape(node.input(1))
    if a is not None and b is not None and len(a) > 2 and len(b) == 2 and node.op_type == "FusedGemm":  # rows
        return [(*a[:-1], b[0] if node.attr("transB", 0) else b[1])]
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return [None]
    m = a[1] if node.attr("transA", 0) else a[0]
    n = b[0] if node.attr("transB", 0) else b[1]
    return [(m, n)]


def _reduce_axes(node: Node, rank: int) -> list[int] | None:
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.input(1) is not None:
        axes = const_ints(node.input(1))
        if axes is None:
            return None
    if not axes:
        return [] if node.attr("noop_with_empty_axes", 0) else list(range(rank))
    return normalize_axes(axes, rank)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
      "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    axes = _reduce_axes(node, len(s))
    if axes is None:
        return [tuple(None for _ in s)] if node.attr("keepdims", 1) else [None]
    if node.attr("keepdims", 1):
        return [tuple(1 if i in axes else d for i, d in enumerate(s))]
    return [tuple(d for i, d in enumerate(s) if i not in axes)]


@rule("Concat")
def _concat(node: Node) -> list[MaybeShape]:
    shapes = [_shape(v) for v in node.inputs if v is not None]
    if not shapes or any(s is None for s in shapes):
        known = next((s for s in shapes if s is not None), None)
        return [None if known is None else tuple(None for _ in known)]
    rank = len(shapes[0])  # type: ignore[arg-type]
    axis = node.attr("axis", 0)
    axis = normalize_axis(axis, rank)
    out: list[Dim | None] = []
    for i in range(rank):
        dims = [s[i] for s in shapes]  # type: ignore[index]
        if i == axis:
            out.append(sum(dims) if all(isinstance(d, int) for d in dims) else None)  # type: ignore[arg-type]
        else:
            out.append(next((d for d in dims if d is not None), None))
    return [tuple(out)]


@rule("Split")
def _split(node: Node) -> list[MaybeShape]:
    """Each part has the input's rank; its size along the axis comes from constant sizes (the input, or
    ``split`` before opset 13) or from an even split, and is unknown when the sizes come at run time."""
    s = _shape(node.input(0))
    n = len(node.outputs)
    if s is None:
        return [None] * n
    axis = normalize_axis(node.attr("axis", 0), len(s))
    given = len(node.inputs) > 1 and node.input(1) is not None
    sizes = const_ints(node.input(1)) if given else node.attr("split")
    d = s[axis]
    if sizes is None and not given and isinstance(d, int):
        chunk = -(-d // n) if node.attr("num_outputs") is not None else (d // n if d % n == 0 else None)
        sizes = None if chunk is None else [chunk] * (n - 1) + [d - chunk * (n - 1)]
    sizes = list(sizes) if sizes is not None and len(sizes) == n else [None] * n
    return [tuple(k if i == axis else dim for i, dim in enumerate(s)) for k in sizes]


def _axes(node: Node, rank: int) -> list[int] | None:
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_ints(node.input(1))
    if axes is None:
        return None
    return normalize_axes(axes, rank)


@rule("Unsqueeze")
def _unsqueeze(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    axes = _axes(node, len(s) + len(node.attr("axes") or const_ints(node.input(1)) or []))
    if axes is None:
        return [None]
    out = list(s)
    for a in axes:
        out.insert(a, 1)
    return [tuple(out)]


@rule("Squeeze")
def _squeeze(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    axes = _axes(node, len(s))
    if axes is None:
        if len(node.inputs) > 1 and node.input(1) is not None or node.attr("axes") is not None:
            return [None]
        if any(d is None or not isinstance(d, int) for d in s):
            return [None]
        return [tuple(d for d in s if d != 1)]
    return [tuple(d for i, d in enumerate(s) if i not in axes)]


@rule("Slice")
def _slice(node: Node) -> list[MaybeShape]:
    s = _shape(node.input(0))
    if s is None:
        return [None]
    starts, ends = const_ints(node.input(1)), const_ints(node.input(2))
    axes = const_ints(node.input(3)) if node.input(3) is not None else None
    steps = const_ints(node.input(4)) if node.input(4) is not None else None
    if node.attr("starts") is not None:  # opset < 10: attributes
        starts, ends, axes = list(node.attr("starts")), list(node.attr("ends")), node.attr("axes")
        axes = list(axes) if axes is not None else None
    if starts is None or ends is None or (node.input(3) is not None and axes is None) or (
            node.input(4) is not None and steps is None):
        return [tuple(None for _ in s)]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(s)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, len(s))
        d = s[axis]
        if isinstance(d, int):
            out[axis] = len(range(d)[slice(start, end, step)])
        elif step == 1 and start == 0 and end >= 2**62:
            out[axis] = d
        else:
            out[axis] = None
    return [tuple(out)]


@rule("Gather")
def _gather(node: Node) -> list[MaybeShape]:
    data, idx = _shape(node.input(0)), _shape(node.input(1))
    if data is None or idx is None:
        return [None]
    axis = node.attr("axis", 0)
    axis = normalize_axis(axis, len(data))
    return [(*data[:axis], *idx, *data[axis + 1:])]


def _spatial(node: Node, x: MaybeShape, kernel: list[int]) -> list[Dim | None]:
    assert x is not None
    n = len(x) - 2
    pads = list(node.attr("pads", ()) or [0] * (2 * n))
    strides = list(node.attr("strides", ()) or [1] * n)
    dil = list(node.attr("dilations", ()) or [1] * n)
    auto_pad = node.attr("auto_pad", "NOTSET")
    ceil = node.attr("ceil_mode", 0)
    out: list[Dim | None] = []
    for i in range(n):
        d = x[2 + i]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-d // strides[i]) if isinstance(d, int) else (d if strides[i] == 1 else None))
        elif isinstance(d, int):
            span = d + pads[i] + pads[i + n] - dil[i] * (kernel[i] - 1) - 1
            out.append((-(-span // strides[i]) if ceil else span // strides[i]) + 1)
        elif kernel[i] == 1 and strides[i] == 1 and pads[i] + pads[i + n] == 0:
            out.append(d)
        elif strides[i] == 1 and dil[i] * (kernel[i] - 1) == pads[i] + pads[i + n]:
            out.append(d)  # "same" padding written out explicitly
        else:
            out.append(None)
    return out


@rule("Conv")
@rule("FusedConv", domain="kiln")
def _conv(node: Node) -> list[MaybeShape]:
    x, w = _shape(node.input(0)), _shape(node.input(1))
    if x is None or w is None or len(x) < 3:
        return [None]
    kernel = list(node.attr("kernel_shape", ()) or w[2:])
    if any(not isinstance(k, int) for k in kernel):
        return [(x[0], w[0], *(None for _ in x[2:]))]
    return [(x[0], w[0], *_spatial(node, x, kernel))]


@rule("MaxPool", "AveragePool", "LpPool")
def _pool(node: Node) -> list[MaybeShape]:
    x = _shape(node.input(0))
    if x is None or len(x) < 3:
        return [None for _ in node.outputs]
    y = (x[0], x[1], *_spatial(node, x, list(node.attr("kernel_shape"))))
    return [y for _ in node.outputs]


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(node: Node) -> list[MaybeShape]:
    x = _shape(node.input(0))
    return [None if x is None else (x[0], x[1], *(1 for _ in x[2:]))]


@rule("FusedGemm", domain="kiln")
def _fused_gemm(node: Node) -> list[MaybeShape]:
    return _gemm(node)


@rule("LayerNorm", "Gelu", domain="kiln")
def _kiln_unary(node: Node) -> list[MaybeShape]:
    return [_shape(node.input(0))]


@rule("Attention", domain="kiln")
def _attention(node: Node) -> list[MaybeShape]:
    q, v = _shape(node.input(0)), _shape(node.input(2))
    return [None if q is None or v is None else (*q[:-1], v[-1])]


@rule("Resize", "Upsample")
def _resize(node: Node) -> list[MaybeShape]:
    """A dim resized by a constant scale of 1 keeps its dim (a symbolic batch stays ``N``); constant sizes
    (``stretch``) are the output dims. Other dims (onnx's inference sizes the static ones), and
    crop-and-resize, are left unknown."""
    s = _shape(node.input(0))
    if s is None or node.attr("coordinate_transformation_mode", "") == "tf_crop_and_resize":
        return [None]
    rank = len(s)
    axes = [normalize_axis(int(a), rank) for a in node.attr("axes") or range(rank)]  # in the scales' order
    n_in = len(node.inputs)
    scales_v = node.input(1) if n_in == 2 else node.input(2) if n_in > 2 else None  # Upsample, Resize-10: (X, scales)
    sizes_v = node.input(3) if n_in > 3 else None

    def values(v: Value | None) -> np.ndarray | None:
        if v is None or not v.is_constant:
            return None
        a = np.asarray(v.numpy()).reshape(-1)
        return a if a.size else None

    sizes, scales = values(sizes_v), values(scales_v)
    if scales is None and node.attr("scales") is not None:  # Upsample-7
        scales = np.asarray(node.attr("scales"), np.float32)
    out: list[Dim | None] = list(s)
    if sizes is not None and len(sizes) == len(axes) and node.attr("keep_aspect_ratio_policy", "stretch") == "stretch":
        for a, k in zip(axes, sizes.tolist()):
            out[a] = int(k)
        return [tuple(out)]
    if scales is None or len(scales) != len(axes) or sizes is not None:
        return [None]
    for a, f in zip(axes, scales.tolist()):
        out[a] = s[a] if f == 1.0 else None
    return [tuple(out)]


def infer(node: Node) -> list[MaybeShape] | None:
    """kiln's shape for each output of ``node``, or None if kiln has no rule for its op."""
    fn = RULES.get((node.domain, node.op_type))
    if fn is None:
        return None
    try:
        return fn(node)
    except (TypeError, ValueError, IndexError):
        return None  # malformed attributes: leave it to verify()



@rule("STFT")
def _stft(node: Node) -> list[MaybeShape]:
    """[batch, frames, bins, 2]; bins is frame_length // 2 + 1 unless ``onesided=0`` (the default is 1)."""
    x = _shape(node.input(0))
    step = const_ints(node.input(1)) if node.input(1) is not None else None
    frame = const_ints(node.input(3)) if node.input(3) is not None else None
    window = _shape(node.input(2))
    length = int(frame[0]) if frame else (window[0] if window and isinstance(window[0], int) else None)
    if x is None or len(x) != 3 or length is None:
        return [None]
    frames = (x[1] - length) // int(step[0]) + 1 if step and isinstance(x[1], int) else None
    bins = length // 2 + 1 if node.attr("onesided", 1) else length
    return [(x[0], frames, bins, 2)]
