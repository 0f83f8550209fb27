"""kiln's own ops (the ``kiln`` domain): fused kernels that codegen lowers to one kernel each.

Every op has three definitions that must agree, and the verified-rewrite test
checks that they do:

- ``impl``: numpy semantics, run by kiln's evaluator;
- ``infer``: output dtype and shape;
- ``decompose``: the same computation in standard ONNX ops, written into
  exported models as a local function so that any ONNX runtime can run it.

Ops
---
``kiln::FusedConv(X, W, B?, Z?)``
    ``Y = act(Conv(X, W, B) + Z)``. Conv attributes as ONNX ``Conv`` (explicit
    ``pads``; no ``auto_pad``). ``Z`` is an optional residual of ``Y``'s shape.
``kiln::FusedGemm(A, B, C?)``
    ``Y = act(Gemm(A, B, C))``, with Gemm's ``alpha``, ``beta``, ``transA``, ``transB``. An ``A`` of
    rank 3 or more is rows: ``[..., K] @ B -> [..., N]``, with C per column (alpha and beta 1, A
    not transposed).

Both take ``activation`` (a string, empty for none) and ``activation_params``
(floats). Activations and their parameters:

=============  ===================  ===========================================
activation     params               meaning
=============  ===================  ===========================================
``""``         --                   identity
``Relu``       --                   max(x, 0)
``Clip``       [min, max]           min(max(x, min), max)
``LeakyRelu``  [alpha]              x if x >= 0 else alpha * x
``Sigmoid``    --                   1 / (1 + exp(-x))
``HardSigmoid`` [alpha, beta]       max(0, min(1, alpha * x + beta))
``HardSwish``  --                   x * max(0, min(1, x / 6 + 1 / 2))
``SiLU``       --                   x * sigmoid(x)
``Tanh``       --                   tanh(x)
``Gelu``       [tanh?]              x/2 * (1 + erf(x / sqrt 2)); with 1: the tanh form
=============  ===================  ===========================================
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from onnx.reference.ops.op_conv import Conv as _RefConv

from kiln.ir.core import AttrType, DType, Graph, Node, Value, normalize_axis
from kiln.ir.schemas import KILN_OPS, coerce_attrs, register_kiln_op

# --------------------------------------------------------------------------- activations


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return np.vectorize(erf, otypes=[np.float64])(x.astype(np.float64))


def _gelu(x: np.ndarray, p: Sequence[float]) -> np.ndarray:
    x64 = x.astype(np.float64)
    if p and p[0]:
        inner = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
        return (0.5 * x64 * (1 + np.tanh(inner))).astype(x.dtype)
    return (0.5 * x64 * (1 + _erf(x64 / math.sqrt(2)))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[np.ndarray, Sequence[float]], np.ndarray]] = {
    "": lambda x, p: x,
    "Relu": lambda x, p: np.maximum(x, 0).astype(x.dtype),
    "Clip": lambda x, p: np.clip(x, p[0], p[1]).astype(x.dtype),
    "LeakyRelu": lambda x, p: np.where(x >= 0, x, x * p[0]).astype(x.dtype),
    "Sigmoid": lambda x, p: _sigmoid(x),
    "HardSigmoid": lambda x, p: np.clip(x * p[0] + p[1], 0, 1).astype(x.dtype),
    "HardSwish": lambda x, p: (x * np.clip(x / 6 + 0.5, 0, 1)).astype(x.dtype),
    "SiLU": lambda x, p: (x * _sigmoid(x)).astype(x.dtype),
    "Tanh": lambda x, p: np.tanh(x).astype(x.dtype),
    "Gelu": _gelu,
}

#: How many parameters each activation takes.
ACTIVATION_ARITY = {"Clip": 2, "LeakyRelu": 1, "HardSigmoid": 2, "Gelu": 1}


def apply_activation(x: np.ndarray, name: str, params: Sequence[float]) -> np.ndarray:
    """Run activation ``name`` on ``x`` (the evaluator's semantics)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; known: {', '.join(a or '(none)' for a in ACTIVATIONS)}")
    return ACTIVATIONS[name](x, tuple(params))


def decompose_activation(op: Any, x: Value, name: str, params: Sequence[float], opset: int) -> Value:
    """The activation as standard ONNX ops valid at ``opset`` (``op`` builds nodes)."""
    dt = x.dtype.numpy if x.dtype is not None else np.dtype(np.float32)

    def c(v: float) -> Value:
        return op.constant(np.array(v, dtype=dt))

    if name == "":
        return op.Identity(x)
    if name in ("Relu", "Sigmoid", "Tanh"):
        return getattr(op, name)(x)
    if name == "Clip":
        if opset >= 11:
            return op.Clip(x, c(params[0]), c(params[1]))
        return op.Clip(x, min=float(params[0]), max=float(params[1]))
    if name == "LeakyRelu":
        return op.LeakyRelu(x, alpha=float(params[0]))
    if name == "HardSigmoid":
        return op.HardSigmoid(x, alpha=float(params[0]), beta=float(params[1]))
    if name == "HardSwish":
        if opset >= 14:
            return op.HardSwish(x)
        return op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5))
    if name == "SiLU":
        return op.Mul(x, op.Sigmoid(x))
    if name == "Gelu":
        tanh_form = bool(params and params[0])
        if opset >= 20:
            return op.Gelu(x, approximate="tanh" if tanh_form else "none")
        if tanh_form:
            cube = op.Mul(op.Mul(x, x), x)
            inner = op.Mul(op.Add(x, op.Mul(cube, c(0.044715))), c(math.sqrt(2 / math.pi)))
            return op.Mul(op.Mul(x, c(0.5)), op.Add(op.Tanh(inner), c(1.0)))
        return op.Mul(op.Mul(x, c(0.5)), op.Add(op.Erf(op.Div(x, c(math.sqrt(2)))), c(1.0)))
    raise ValueError(f"unknown activation '{name}'")


def check_activation(name: str, params: Sequence[float]) -> str:
    """Empty if (name, params) is a valid epilogue, else the reason."""
    if name not in ACTIVATIONS:
        return f"unknown activation '{name}'"
    want = ACTIVATION_ARITY.get(name, 0)
    if len(params) != want and not (name == "Gelu" and len(params) == 0):
        return f"activation {name} takes {want} parameter(s), got {len(params)}"
    return ""


_EPILOGUE_ATTRS = {"activation": (AttrType.STRING, ""), "activation_params": (AttrType.FLOATS, ())}
_CONV_ATTRS = {
    "dilations": (AttrType.INTS, ()), "group": (AttrType.INT, 1), "kernel_shape": (AttrType.INTS, ()),
    "pads": (AttrType.INTS, ()), "strides": (AttrType.INTS, ()),
}
_GEMM_ATTRS = {
    "alpha": (AttrType.FLOAT, 1.0), "beta": (AttrType.FLOAT, 1.0), "transA": (AttrType.INT, 0),
    "transB": (AttrType.INT, 0),
}


# --------------------------------------------------------------------------- FusedConv


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: dict[str, Any]) -> np.ndarray:
    conv_attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if k in _CONV_ATTRS}
    conv_attrs = {k: (v if v != [] else None) for k, v in conv_attrs.items()}
    dtype = x.dtype
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    out = _RefConv.eval(x64, w64, b64, auto_pad="NOTSET", **conv_attrs)
    return np.asarray(out).astype(dtype)


def fused_conv(x, w, b=None, z=None, activation="", activation_params=(), **conv_attrs):
    """kiln::FusedConv: act(Conv(X, W, B) + Z)."""
    y = _conv(x, w, b, conv_attrs)
    if z is not None:
        y = (y.astype(np.float64) + z.astype(np.float64)).astype(x.dtype)
    return (apply_activation(y, activation, activation_params),)


def _conv_out_shape(node: Node) -> list[tuple]:
    x, w = node.input(0), node.input(1)
    if x is None or w is None or x.shape is None or w.shape is None:
        return [(x.dtype if x else None, None)]
    return [(x.dtype, _conv_out_shape_for(node, x.shape, w.shape))]


def _conv_out_shape_for(node: Node, x_shape: tuple, w_shape: tuple) -> tuple:
    """Conv's output dims for an NC... input and an OI... weight; spatial dims None when unknown."""
    spatial = len(x_shape) - 2
    k = list(node.attr("kernel_shape", ()) or w_shape[2:])
    pads = list(node.attr("pads", ()) or [0] * (2 * spatial))
    strides = list(node.attr("strides", ()) or [1] * spatial)
    dil = list(node.attr("dilations", ()) or [1] * spatial)
    dims: list[int | str | None] = [x_shape[0], w_shape[0]]
    for i in range(spatial):
        d = x_shape[2 + i]
        if isinstance(d, int):
            dims.append((d + pads[i] + pads[i + spatial] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1)
        else:
            dims.append(d if (k[i] == 1 and strides[i] == 1 and pads[i] + pads[i + spatial] == 0) else None)
    return tuple(dims)


def _decompose_conv(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    attrs, act, params = _split_epilogue(node)
    x, w, b, z = (list(inputs) + [None, None])[:4]
    y = op.Conv(x, w, b, **attrs) if b is not None else op.Conv(x, w, **attrs)
    if z is not None:
        y = op.Add(y, z)
    return [decompose_activation(op, y, act, params, opset)]


def _split_epilogue(node: Node) -> tuple[dict[str, Any], str, tuple[float, ...]]:
    attrs = {k: a.value for k, a in node.attrs.items()}
    act, params = attrs.pop("activation", ""), tuple(attrs.pop("activation_params", ()))
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if v not in ((), [])}
    return attrs, act, params


def _validate_epilogue(node: Node) -> list[str]:
    reason = check_activation(node.attr("activation", "") or "", node.attr("activation_params", ()) or ())
    return [reason] if reason else []


register_kiln_op("FusedConv", inputs=(2, 4), attrs={**_CONV_ATTRS, **_EPILOGUE_ATTRS}, infer=_conv_out_shape,
                 decompose=_decompose_conv, validate=_validate_epilogue)(fused_conv)


# --------------------------------------------------------------------------- FusedGemm


def fused_gemm(a, b, c=None, activation="", activation_params=(), alpha=1.0, beta=1.0, transA=0, transB=0):
    """kiln::FusedGemm: act(alpha * A' B' + beta * C)."""
    a64 = a.astype(np.float64).T if transA else a.astype(np.float64)
    b64 = b.astype(np.float64).T if transB else b.astype(np.float64)
    y = alpha * (a64 @ b64)
    if c is not None:
        y = y + beta * c.astype(np.float64)
    return (apply_activation(y.astype(a.dtype), activation, activation_params),)


def _gemm_out_shape(node: Node) -> list[tuple]:
    a, b = node.input(0), node.input(1)
    if a is None or b is None or a.shape is None or b.shape is None:
        return [(a.dtype if a else None, None)]
    n = b.shape[0] if node.attr("transB", 0) else b.shape[1]
    if len(a.shape) > 2:  # rows: [..., K] @ [K, N] -> [..., N]
        return [(a.dtype, (*a.shape[:-1], n))]
    m = a.shape[1] if node.attr("transA", 0) else a.shape[0]
    return [(a.dtype, (m, n))]


def _decompose_gemm(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    attrs, act, params = _split_epilogue(node)
    a, b, c = (list(inputs) + [None])[:3]
    if a is not None and a.rank is not None and a.rank > 2:  # rows (alpha, beta 1; A not transposed)
        y = op.MatMul(a, op.Transpose(b) if attrs.get("transB") else b)
        y = op.Add(y, c) if c is not None else y
    else:
        y = op.Gemm(a, b, c, **attrs) if c is not None else op.Gemm(a, b, **attrs)
    return [decompose_activation(op, y, act, params, opset)]


register_kiln_op("FusedGemm", inputs=(2, 3), attrs={**_GEMM_ATTRS, **_EPILOGUE_ATTRS}, infer=_gemm_out_shape,
                 decompose=_decompose_gemm, validate=_validate_epilogue)(fused_gemm)


# --------------------------------------------------------------------------- decompositions


def decomposition_graph(node: Node, opset: dict[str, int]) -> Graph:
    """A standalone graph whose inputs are ``node``'s inputs and whose body is its decomposition."""
    from kiln.ir.core import Node as _Node

    g = Graph(f"{node.op_type}_body", opset={"": opset.get("", 17)})
    ins: list[Value | None] = []
    for i, v in enumerate(node.inputs):
        ins.append(None if v is None else g.add_input(f"in{i}", v.dtype, v.shape))  # type: ignore[arg-type]

    class _Builder:
        def __getattr__(self, op_type: str) -> Callable[..., Value]:
            def build(*args: Value | None, _outputs: int = 1, **attrs: Any) -> Any:
                n = _Node(op_type, list(args), coerce_attrs("", op_type, attrs, g.opset.get("")), outputs=_outputs)
                g.append(n)
                return n.outputs[0] if _outputs == 1 else tuple(n.outputs)

            return build

        def constant(self, array: Any, name: str = "k") -> Value:
            return g.add_constant(np.asarray(array), name)

    spec = KILN_OPS[node.op_type]
    assert spec.decompose is not None, f"kiln::{node.op_type} has no decomposition"
    outs = spec.decompose(_Builder(), node, ins, opset.get("", 17))
    g.outputs.extend(outs)
    return g


# --------------------------------------------------------------------------- LayerNorm, Gelu, Attention
#
# ``kiln::LayerNorm(X, Scale, B?)``: ONNX LayerNormalization-17 semantics (normalise over
#     axes ``axis`` .. rank-1; ``Y = (X - mean) / sqrt(var + epsilon) * Scale + B``), for models
#     whose opset predates it. Rules emit the standard op at opset 17+.
# ``kiln::Gelu(X)``: ``approximate`` "none" (erf form) or "tanh"; ONNX Gelu-20 semantics for
#     older opsets. Rules emit the standard op at opset 20+.
# ``kiln::Attention(Q, Kt, V, Mask?)``: ``softmax(scale * Q @ Kt + Mask, axis=-1) @ V``, where
#     ``Kt`` is the key already transposed to ``[..., D, S]``. With ``nan_to_zero`` set, the
#     probabilities of a fully masked row (NaN) become 0, as PyTorch's exported SDPA does.


def layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5):
    """kiln::LayerNorm: normalise over axes axis..rank-1, then scale and shift."""
    axis = axis + x.ndim if axis < 0 else axis
    axes = tuple(range(axis, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + epsilon) * scale.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return (y.astype(x.dtype),)


def _same_as_input(node: Node) -> list[tuple]:
    x = node.input(0)
    return [(x.dtype if x else None, x.shape if x else None)]


def _decompose_layer_norm(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    x, scale, bias = (list(inputs) + [None])[:3]
    axis, eps = node.attr("axis", -1), node.attr("epsilon", 1e-5)
    if opset >= 17:
        return [op.LayerNormalization(x, scale, bias, axis=axis, epsilon=eps) if bias is not None
                else op.LayerNormalization(x, scale, axis=axis, epsilon=eps)]
    rank = x.rank
    axes = list(range(normalize_axis(axis, rank), rank))
    dt = x.dtype.numpy

    def mean(v: Value) -> Value:
        if opset >= 18:
            return op.ReduceMean(v, op.constant(np.array(axes, np.int64)), keepdims=1)
        return op.ReduceMean(v, axes=axes, keepdims=1)

    d = op.Sub(x, mean(x))
    var = mean(op.Mul(d, d))
    y = op.Mul(op.Div(d, op.Sqrt(op.Add(var, op.constant(np.array(eps, dt))))), scale)
    return [op.Add(y, bias) if bias is not None else y]


register_kiln_op("LayerNorm", inputs=(2, 3), attrs={"axis": (AttrType.INT, -1), "epsilon": (AttrType.FLOAT, 1e-5)},
                 infer=_same_as_input, decompose=_decompose_layer_norm)(layer_norm)


def gelu(x, approximate="none"):
    """kiln::Gelu: x * Phi(x), exactly (erf) or with the tanh approximation."""
    return (_gelu(x, (1.0,) if approximate == "tanh" else ()),)


def _decompose_gelu(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    tanh_form = node.attr("approximate", "none") == "tanh"
    return [decompose_activation(op, inputs[0], "Gelu", (1.0,) if tanh_form else (), opset)]


def _validate_gelu(node: Node) -> list[str]:
    a = node.attr("approximate", "none")
    return [] if a in ("none", "tanh") else [f"approximate must be 'none' or 'tanh', not {a!r}"]


register_kiln_op("Gelu", inputs=(1, 1), attrs={"approximate": (AttrType.STRING, "none")}, infer=_same_as_input,
                 decompose=_decompose_gelu, validate=_validate_gelu)(gelu)


def attention(q, kt, v, mask=None, scale=1.0, nan_to_zero=0):
    """kiln::Attention: softmax(scale * Q @ Kt + Mask) @ V over the last axis."""
    s = (q.astype(np.float64) @ kt.astype(np.float64)) * scale
    if mask is not None:
        s = s + mask.astype(np.float64)
    with np.errstate(invalid="ignore"):
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p = p / p.sum(axis=-1, keepdims=True)
    if nan_to_zero:
        p = np.where(np.isnan(p), 0.0, p)
    return ((p @ v.astype(np.float64)).astype(q.dtype),)


def _attention_shape(node: Node) -> list[tuple]:
    q, v = node.input(0), node.input(2)
    if q is None or v is None or q.shape is None or v.shape is None:
        return [(q.dtype if q else None, None)]
    return [(q.dtype, (*q.shape[:-1], v.shape[-1]))]


def _decompose_attention(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    q, kt, v, mask = (list(inputs) + [None])[:4]
    scores = op.MatMul(q, kt)
    scale = node.attr("scale", 1.0)
    if scale != 1.0:
        scores = op.Mul(scores, op.constant(np.array(scale, q.dtype.numpy)))
    if mask is not None:
        scores = op.Add(scores, mask)
    p = op.Softmax(scores, axis=-1)
    if node.attr("nan_to_zero", 0):
        p = op.Where(op.IsNaN(p), op.constant(np.array(0, q.dtype.numpy)), p)
    return [op.MatMul(p, v)]


register_kiln_op("Attention", inputs=(3, 4), attrs={"scale": (AttrType.FLOAT, 1.0), "nan_to_zero": (AttrType.INT, 0)},
                 infer=_attention_shape,
                 decompose=_decompose_attention)(attention)


# --------------------------------------------------------------------------- blocked layout (NCHW[b]c)
#
# ``kiln::ToBlocked(X)``: ``[N, C, H, W]`` -> ``[N, ceil(C/b), H, W, b]`` with ``block`` = b; the lanes
#     past C (when b does not divide C) are zeros.
# ``kiln::FromBlocked(X)``: the inverse, ``[N, C/b, H, W, b]`` -> ``[N, C, H, W]``, where ``channels``
#     is C (default: all lanes); lanes past C are dropped.
# ``kiln::BlockedConv(X, W, B?, Z?)``: ``FusedConv`` on blocked tensors. X is ``[N, C/bi, H, W, bi]``;
#     W is pre-packed ``[O/bo, (C/group)/bi', kh, kw, bi', bo]`` with bi' = bi for group 1 and for
#     groups of whole blocks, and 1 for depthwise (group = C = O); B is ``[O]``; Z and Y are
#     ``[N, O/bo, OH, OW, bo]``. Channel
#     counts here are the padded ones: the packed weight and bias are zero past the true counts.
# The layout pass (``kiln.passes.layout``) introduces them; codegen schedules BlockedConv with
# register tiling over ``bo`` lanes.


def to_blocked_array(x: np.ndarray, block: int) -> np.ndarray:
    n, c, *spatial = x.shape
    padded = -(-c // block) * block
    if padded != c:
        x = np.concatenate([x, np.zeros((n, padded - c, *spatial), x.dtype)], axis=1)
    y = x.reshape(n, padded // block, block, *spatial)
    return np.ascontiguousarray(np.moveaxis(y, 2, -1))


def from_blocked_array(x: np.ndarray, channels: int | None = None) -> np.ndarray:
    n, c1, *spatial, b = x.shape
    y = np.ascontiguousarray(np.moveaxis(x, -1, 2)).reshape(n, c1 * b, *spatial)
    return y if channels is None or channels == c1 * b else np.ascontiguousarray(y[:, :channels])


def unpack_conv_weight(w: np.ndarray) -> np.ndarray:
    """``[O/bo, I/bi, kh, kw, bi, bo]`` -> ``[O, I, kh, kw]``."""
    ko, ki, kh, kw, bi, bo = w.shape
    return np.ascontiguousarray(w.transpose(0, 5, 1, 4, 2, 3)).reshape(ko * bo, ki * bi, kh, kw)


def to_blocked(x, block=16):
    """kiln::ToBlocked: NCHW -> NCHW[block]c."""
    return (to_blocked_array(x, block),)


def from_blocked(x, channels=0):
    """kiln::FromBlocked: NCHW[b]c -> NCHW (the first ``channels`` channels, 0: all)."""
    return (from_blocked_array(x, channels or None),)


def blocked_conv(x, w, b=None, z=None, activation="", activation_params=(), **conv_attrs):
    """kiln::BlockedConv: FusedConv on NCHW[b]c tensors with a pre-packed weight."""
    bo = w.shape[-1]
    zz = None if z is None else from_blocked_array(z)
    (y,) = fused_conv(from_blocked_array(x), unpack_conv_weight(w), b, zz, activation, activation_params,
                      **conv_attrs)
    return (to_blocked_array(y, bo),)


def _to_blocked_shape(node: Node) -> list[tuple]:
    x, b = node.input(0), node.attr("block", 16)
    if x is None or x.shape is None or not isinstance(x.shape[1], int):
        return [(x.dtype if x else None, None)]
    return [(x.dtype, (x.shape[0], -(-x.shape[1] // b), *x.shape[2:], b))]


def _from_blocked_shape(node: Node) -> list[tuple]:
    x = node.input(0)
    if x is None or x.shape is None or not isinstance(x.shape[1], int) or not isinstance(x.shape[-1], int):
        return [(x.dtype if x else None, None)]
    return [(x.dtype, (x.shape[0], node.attr("channels", 0) or x.shape[1] * x.shape[-1], *x.shape[2:-1]))]


def _blocked_conv_shape(node: Node) -> list[tuple]:
    x, w = node.input(0), node.input(1)
    if x is None or w is None or x.shape is None or w.shape is None:
        return [(x.dtype if x else None, None)]
    plain = _conv_out_shape_for(node, (x.shape[0], 0, *x.shape[2:-1]), (0, 0, *w.shape[2:4]))
    return [(x.dtype, (plain[0], w.shape[0], *plain[2:], w.shape[-1]))]


def _validate_blocked(node: Node) -> list[str]:
    b = node.attr("block", 16)
    return [] if isinstance(b, int) and b > 0 else [f"block must be a positive int, not {b!r}"]


def _decompose_to_blocked(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    b = node.attr("block", 16)
    x = inputs[0]
    c = node.input(0).shape[1] if node.input(0) is not None and node.input(0).shape else None
    if isinstance(c, int) and c % b:  # zero lanes past C
        pads = np.array([0, 0, 0, 0, 0, -(-c // b) * b - c, 0, 0], np.int64)
        x = op.Pad(x, op.constant(pads)) if opset >= 11 else op.Pad(x, pads=pads.tolist())
    nhwc = op.Transpose(x, perm=[0, 2, 3, 1])
    split = op.Reshape(nhwc, op.constant(np.array([0, 0, 0, -1, b], np.int64)))
    return [op.Transpose(split, perm=[0, 3, 1, 2, 4])]


def _decompose_from_blocked(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    nhwcb = op.Transpose(inputs[0], perm=[0, 2, 3, 1, 4])
    nhwc = op.Reshape(nhwcb, op.constant(np.array([0, 0, 0, -1], np.int64)))
    channels = node.attr("channels", 0) if node.op_type == "FromBlocked" else 0
    if channels:
        def i64(v: int) -> Value:
            return op.constant(np.array([v], np.int64))

        nhwc = (op.Slice(nhwc, i64(0), i64(channels), i64(3)) if opset >= 10
                else op.Slice(nhwc, starts=[0], ends=[channels], axes=[3]))
    return [op.Transpose(nhwc, perm=[0, 3, 1, 2])]


def _decompose_blocked_conv(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    # shape-agnostic (decompositions are exported before shapes are known): the packed weight's
    # dims are read with Shape, [Ko, Ki, kh, kw, bi, bo] -> [Ko*bo, Ki*bi, kh, kw]
    attrs, act, params = _split_epilogue(node)
    x, w, b, z = (list(inputs) + [None, None])[:4]

    def dims(v: Value, start: int, end: int) -> Value:
        return op.Slice(op.Shape(v), op.constant(np.array([start], np.int64)), op.constant(np.array([end], np.int64)))

    w_t = op.Transpose(w, perm=[0, 5, 1, 4, 2, 3])  # [Ko, bo, Ki, bi, kh, kw]
    plain_shape = op.Concat(op.ReduceProd(dims(w_t, 0, 2), keepdims=1), op.ReduceProd(dims(w_t, 2, 4), keepdims=1),
                            dims(w_t, 4, 6), axis=0)
    plain_w = op.Reshape(w_t, plain_shape)
    xs = _decompose_from_blocked(op, node, [x], opset)[0]
    y = op.Conv(xs, plain_w, b, **attrs) if b is not None else op.Conv(xs, plain_w, **attrs)
    if z is not None:
        y = op.Add(y, _decompose_from_blocked(op, node, [z], opset)[0])
    y = decompose_activation(op, y, act, params, opset)
    nhwc = op.Transpose(y, perm=[0, 2, 3, 1])
    target = op.Concat(op.constant(np.array([0, 0, 0, -1], np.int64)), dims(w, 5, 6), axis=0)
    return [op.Transpose(op.Reshape(nhwc, target), perm=[0, 3, 1, 2, 4])]


register_kiln_op("ToBlocked", inputs=(1, 1), attrs={"block": (AttrType.INT, 16)}, infer=_to_blocked_shape,
                 decompose=_decompose_to_blocked, validate=_validate_blocked)(to_blocked)
register_kiln_op("FromBlocked", inputs=(1, 1), attrs={"channels": (AttrType.INT, 0)}, infer=_from_blocked_shape,
                 decompose=_decompose_from_blocked)(from_blocked)
register_kiln_op("BlockedConv", inputs=(2, 4), attrs={**_CONV_ATTRS, **_EPILOGUE_ATTRS}, infer=_blocked_conv_shape,
                 decompose=_decompose_blocked_conv, validate=_validate_epilogue)(blocked_conv)


# ``kiln::BF16BlockedConv(X, W, B?, Z?)``: BlockedConv (group 1) with bf16 inputs and weights and float32
#     sums, the layout of x86's ``vdpbf16ps``. X, B, Z and Y are BlockedConv's, float32; the conv
#     rounds X to bf16 (to nearest, ties to even). W holds bf16 bit patterns as uint16, packed
#     ``[O/16, C/16, kh, kw, 8, 16, 2]`` (input-channel pair, output lane, 2 input channels:
#     ``pack_bf16_conv_weight``). bf16 stays bits so that every stage below the IR (safetensors,
#     TVM's LLVM backend, which has no bfloat16 type) sees plain integers.


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16 (to nearest, ties to even) and widened back to float32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def pack_bf16_conv_weight(w: np.ndarray) -> np.ndarray:
    """A BlockedConv weight ``[O/16, C/16, kh, kw, 16, 16]`` (float32) -> bf16 bits ``[O/16, C/16, kh, kw, 8, 16, 2]``."""
    import ml_dtypes

    ko, ci, kh, kw, bi, bo = w.shape
    pairs = np.asarray(w, np.float32).reshape(ko, ci, kh, kw, bi // 2, 2, bo).transpose(0, 1, 2, 3, 4, 6, 5)
    return np.ascontiguousarray(pairs.astype(ml_dtypes.bfloat16)).view(np.uint16)


def unpack_bf16_conv_weight(w: np.ndarray) -> np.ndarray:
    """bf16 bits ``[O/16, C/16, kh, kw, 8, 16, 2]`` -> float32 ``[O, C, kh, kw]``."""
    import ml_dtypes

    ko, ci, kh, kw, pairs, bo, two = w.shape
    f = np.ascontiguousarray(w, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    blocked = f.transpose(0, 1, 2, 3, 4, 6, 5).reshape(ko, ci, kh, kw, pairs * two, bo)
    return unpack_conv_weight(blocked)


def bf16_blocked_conv(x, w, b=None, z=None, activation="", activation_params=(), **conv_attrs):
    """kiln::BF16BlockedConv: FusedConv of bf16-rounded X by the bf16 weight, summed in float32, on NCHW16c."""
    zz = None if z is None else from_blocked_array(z)
    (y,) = fused_conv(bf16_round(from_blocked_array(x)), unpack_bf16_conv_weight(w), b, zz, activation,
                      activation_params, **conv_attrs)
    return (to_blocked_array(y, w.shape[5]),)


def _bf16_blocked_conv_shape(node: Node) -> list[tuple]:
    x, w = node.input(0), node.input(1)
    if x is None or w is None or x.shape is None or w.shape is None:
        return [(x.dtype if x else None, None)]
    plain = _conv_out_shape_for(node, (x.shape[0], 0, *x.shape[2:-1]), (0, 0, *w.shape[2:4]))
    return [(x.dtype, (plain[0], w.shape[0], *plain[2:], w.shape[5]))]


def _decompose_bf16_blocked_conv(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    # ONNX cannot reinterpret bits: the weight (a constant) goes as float32, and X is rounded to
    # bf16 by Cast (round to nearest even, as the kernel does)
    attrs, act, params = _split_epilogue(node)
    x, _, b, z = (list(inputs) + [None, None])[:4]
    w = node.input(1)
    if w is None or not w.is_constant:
        raise ValueError(f"node {node.label()}: a BF16BlockedConv exports only with a constant weight")
    plain_w = op.constant(unpack_bf16_conv_weight(w.numpy()))
    xs = _decompose_from_blocked(op, node, [x], opset)[0]
    xs = op.Cast(op.Cast(xs, to=16), to=1)  # 16: BFLOAT16, 1: FLOAT
    y = op.Conv(xs, plain_w, b, **attrs) if b is not None else op.Conv(xs, plain_w, **attrs)
    if z is not None:
        y = op.Add(y, _decompose_from_blocked(op, node, [z], opset)[0])
    y = decompose_activation(op, y, act, params, opset)
    nhwc = op.Transpose(y, perm=[0, 2, 3, 1])
    target = op.constant(np.array([0, 0, 0, -1, int(w.shape[5])], np.int64))
    return [op.Transpose(op.Reshape(nhwc, target), perm=[0, 3, 1, 2, 4])]


def _validate_bf16_conv(node: Node) -> list[str]:
    problems = _validate_epilogue(node)
    w = node.input(1)
    if w is not None and w.dtype is not None and w.dtype != DType.UINT16:
        problems.append(f"the weight holds bf16 bits as uint16, not {w.dtype}")
    if node.attr("group", 1) != 1:
        problems.append("BF16BlockedConv takes group 1 only")
    return problems


register_kiln_op("BF16BlockedConv", inputs=(2, 4), attrs={**_CONV_ATTRS, **_EPILOGUE_ATTRS},
                 infer=_bf16_blocked_conv_shape, decompose=_decompose_bf16_blocked_conv,
                 validate=_validate_bf16_conv)(bf16_blocked_conv)


# ``kiln::BF16Dense(A, W, C?)``: ``act(A W + C)`` with A rounded to bf16, bf16 weights and float32 sums.
#     A is float32 ``[..., K]`` (rows); W holds bf16 bits as uint16, ``[N'/16, K'/2, 16, 2]`` (output
#     block, input pair, output lane, 2 inputs: ``pack_bf16_dense_weight``), N' and K' the counts
#     rounded up to 16 and 2 with zeros; C is float32 ``[N']`` or absent; Y is float32 ``[..., n]``.


def pack_bf16_dense_weight(w_kn: np.ndarray) -> np.ndarray:
    """float32 ``[K, N]`` -> bf16 bits ``[N'/16, K'/2, 16, 2]``, zero-padded."""
    import ml_dtypes

    k, n = w_kn.shape
    kp, npad = -(-k // 2) * 2, -(-n // 16) * 16
    full = np.zeros((kp, npad), np.float32)
    full[:k, :n] = w_kn
    pairs = full.reshape(kp // 2, 2, npad // 16, 16).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(pairs.astype(ml_dtypes.bfloat16)).view(np.uint16)


def unpack_bf16_dense_weight(w: np.ndarray) -> np.ndarray:
    """bf16 bits ``[N'/16, K'/2, 16, 2]`` -> float32 ``[K', N']``."""
    import ml_dtypes

    no, kp, lanes, two = w.shape
    f = np.ascontiguousarray(w, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.ascontiguousarray(f.transpose(1, 3, 0, 2)).reshape(kp * two, no * lanes)


def bf16_dense(a, w, c=None, n=0, activation="", activation_params=()):
    """kiln::BF16Dense: act(bf16(A) W + C) in float32, the first ``n`` outputs."""
    wf = unpack_bf16_dense_weight(w)
    k = a.shape[-1]
    y = bf16_round(a).astype(np.float64) @ wf[:k].astype(np.float64)
    if c is not None:
        y = y + c.astype(np.float64)
    return (apply_activation(y[..., :n].astype(np.float32), activation, activation_params),)


def _bf16_dense_shape(node: Node) -> list[tuple]:
    a = node.input(0)
    if a is None or a.shape is None:
        return [(DType.FLOAT32, None)]
    return [(DType.FLOAT32, (*a.shape[:-1], node.attr("n", 0)))]


def _decompose_bf16_dense(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    a, _, c = (list(inputs) + [None])[:3]
    w = node.input(1)
    if w is None or not w.is_constant or node.input(0).shape is None:
        raise ValueError(f"node {node.label()}: a BF16Dense exports only with a constant weight and a known K")
    k, n = node.input(0).shape[-1], node.attr("n", 0)
    plain = unpack_bf16_dense_weight(w.numpy())[:k, :n]
    y = op.MatMul(op.Cast(op.Cast(a, to=16), to=1), op.constant(np.ascontiguousarray(plain)))  # 16: BFLOAT16
    if c is not None:
        y = op.Add(y, op.constant(np.ascontiguousarray(node.input(2).numpy()[:n])))
    return [decompose_activation(op, y, node.attr("activation", "") or "", tuple(node.attr("activation_params", ())
                                                                                 or ()), opset)]


register_kiln_op("BF16Dense", inputs=(2, 3), attrs={"n": (AttrType.INT, 0), **_EPILOGUE_ATTRS},
                 infer=_bf16_dense_shape, decompose=_decompose_bf16_dense, validate=_validate_epilogue)(bf16_dense)


# ``kiln::QBlockedConv(X, W, B, S)``: an int8 conv on blocked tensors, the layout of x86's VNNI
#     instruction. X is uint8 ``[N, C/16, H, W, 16]``; W is int8 ``[K/16, C/16, kh, kw, 4, 16, 4]``
#     (input-channel group of 4, output lane, input channel in the group); B is int32 ``[K]`` and
#     S float32 ``[K]``. With X padded by ``x_zero_point``:
#     ``acc[k] = sum(X * W) + B[k]``, ``Y = clip(round_half_even(acc * S[k]) + y_zero_point, lo, 255)``
#     as uint8, with ``lo = y_zero_point`` when ``relu`` (a fused ReLU) and 0 otherwise. The bias
#     folds the input zero point in (``bias - x_zero_point * sum(W[k])``), and S is
#     ``x_scale * w_scale[k] / y_scale``. Channel counts are the padded ones.
#     With a fifth input Z (uint8, Y's shape: a residual), or an ``activation``, Y goes on through
#     what a QDQ model writes after a conv's output, in float32: ``v = (Y - y_zero_point) * y_scale
#     (+ (Z - z_zero_point) * z_scale)``, ``max(v, 0)`` if ``out_relu``, the activation (one of
#     the epilogue activations above, with ``activation_params``), then
#     ``clip(round_half_even(v / out_scale) + out_zero_point, 0, 255)`` as uint8.
_QCONV_ATTRS = {"pads": (AttrType.INTS, ()), "strides": (AttrType.INTS, ()), "kernel_shape": (AttrType.INTS, ()),
                "x_zero_point": (AttrType.INT, 0), "y_zero_point": (AttrType.INT, 0), "relu": (AttrType.INT, 0),
                "y_scale": (AttrType.FLOAT, 1.0), "z_scale": (AttrType.FLOAT, 1.0), "z_zero_point": (AttrType.INT, 0),
                "out_scale": (AttrType.FLOAT, 1.0), "out_zero_point": (AttrType.INT, 0), "out_relu": (AttrType.INT, 0),
                **_EPILOGUE_ATTRS}


def qresidual_array(y: np.ndarray, z: np.ndarray | None, y_scale: float, y_zero_point: int, z_scale: float,
                    z_zero_point: int, out_scale: float, out_zero_point: int, out_relu: int, activation: str = "",
                    activation_params: Sequence[float] = ()) -> np.ndarray:
    """uint8 ``Q(act(Relu?(DQ(y) + DQ(z))))`` in float32, the write-back step of QBlockedConv."""
    f32 = np.float32
    v = (y.astype(f32) - f32(y_zero_point)) * f32(y_scale)
    if z is not None:
        v = v + (z.astype(f32) - f32(z_zero_point)) * f32(z_scale)
    if out_relu:
        v = np.maximum(v, f32(0))
    v = apply_activation(v, activation, activation_params).astype(f32)
    q = np.rint(v / f32(out_scale)) + f32(out_zero_point)
    return np.clip(q, 0, 255).astype(np.uint8)


def pack_qconv_weight(w: np.ndarray, lanes: int = 16, group: int = 4) -> np.ndarray:
    """OIHW int8 ``[K, C, kh, kw]`` -> ``[K/16, C/16, kh, kw, 4, 16, 4]``, K and C zero-padded to 16."""
    k, c, r, s = w.shape
    kp, cp = -(-k // lanes) * lanes, -(-c // lanes) * lanes
    full = np.zeros((kp, cp, r, s), np.int8)
    full[:k, :c] = w
    blocks = full.reshape(kp // lanes, lanes, cp // lanes, lanes // group, group, r, s)
    # (ko, ki, co, cg, ci, r, s) -> (ko, co, r, s, cg, ki, ci)
    return np.ascontiguousarray(blocks.transpose(0, 2, 5, 6, 3, 1, 4))


def unpack_qconv_weight(w: np.ndarray) -> np.ndarray:
    """``[K/16, C/16, kh, kw, 4, 16, 4]`` -> ``[K, C, kh, kw]``."""
    ko, co, kh, kw, g, bo, gi = w.shape
    return np.ascontiguousarray(w.transpose(0, 5, 1, 4, 6, 2, 3)).reshape(ko * bo, co * g * gi, kh, kw)


def qblocked_conv(x, w, b, s, z=None, pads=(), strides=(), kernel_shape=(), x_zero_point=0, y_zero_point=0, relu=0,
                  y_scale=1.0, z_scale=1.0, z_zero_point=0, out_scale=1.0, out_zero_point=0, out_relu=0, activation="",
                  activation_params=()):
    """kiln::QBlockedConv: int8 conv with int32 accumulation and a fused requantize, on NCHW16c."""
    xs = from_blocked_array(x).astype(np.int64)
    wk = unpack_qconv_weight(w).astype(np.int64)
    top, left, bottom, right = list(pads) or [0, 0, 0, 0]
    sy, sx = list(strides) or [1, 1]
    n, c, h, wd = xs.shape
    k, _, kh, kw = wk.shape
    xp = np.full((n, c, h + top + bottom, wd + left + right), x_zero_point, np.int64)
    xp[:, :, top:top + h, left:left + wd] = xs
    oh, ow = (xp.shape[2] - kh) // sy + 1, (xp.shape[3] - kw) // sx + 1
    acc = np.zeros((n, k, oh, ow), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, :, dy:dy + sy * (oh - 1) + 1:sy, dx:dx + sx * (ow - 1) + 1:sx]
            acc += np.einsum("nchw,kc->nkhw", patch, wk[:, :, dy, dx])
    acc += b.astype(np.int64)[None, :, None, None]
    q = np.rint(acc.astype(np.float32) * s.astype(np.float32)[None, :, None, None]).astype(np.int64) + y_zero_point
    y = to_blocked_array(np.clip(q, y_zero_point if relu else 0, 255).astype(np.uint8), w.shape[5])
    if z is not None or activation:
        y = qresidual_array(y, z, y_scale, y_zero_point, z_scale, z_zero_point, out_scale, out_zero_point, out_relu,
                            activation, activation_params)
    return (y,)


def _qblocked_conv_shape(node: Node) -> list[tuple]:
    x, w = node.input(0), node.input(1)
    if x is None or w is None or x.shape is None or w.shape is None:
        return [(DType.UINT8, None)]
    plain = _conv_out_shape_for(node, (x.shape[0], 0, *x.shape[2:-1]), (0, 0, *w.shape[2:4]))
    return [(DType.UINT8, (plain[0], w.shape[0], *plain[2:], w.shape[5]))]


def _decompose_qblocked_conv(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    # ConvInteger pads with the zero point and subtracts it: sum((X - zp) W) = sum(X W) - zp sum(W)
    x, w, b, s, z = (list(inputs) + [None])[:5]
    xzp, yzp = node.attr("x_zero_point", 0), node.attr("y_zero_point", 0)
    attrs = {k: node.attr(k) for k in ("pads", "strides", "kernel_shape") if node.attr(k)}

    def dims(v: Value, start: int, end: int) -> Value:
        return op.Slice(op.Shape(v), op.constant(np.array([start], np.int64)), op.constant(np.array([end], np.int64)))

    w_t = op.Transpose(w, perm=[0, 5, 1, 4, 6, 2, 3])  # [Ko, 16, Co, 4, 4, kh, kw]
    plain_shape = op.Concat(op.ReduceProd(dims(w_t, 0, 2), keepdims=1), op.ReduceProd(dims(w_t, 2, 5), keepdims=1),
                            dims(w_t, 5, 7), axis=0)
    plain_w = op.Reshape(w_t, plain_shape)
    xs = _decompose_from_blocked(op, node, [x], opset)[0]
    acc = op.ConvInteger(xs, plain_w, op.constant(np.array(xzp, np.uint8)), **attrs)
    w_sum = op.ReduceSum(op.Cast(plain_w, to=6), op.constant(np.array([1, 2, 3], np.int64)), keepdims=0)
    per_k = op.Add(b, op.Mul(w_sum, op.constant(np.array(xzp, np.int32))))
    per_k_shape = op.constant(np.array([1, -1, 1, 1], np.int64))
    acc = op.Add(acc, op.Reshape(per_k, per_k_shape))
    scaled = op.Round(op.Mul(op.Cast(acc, to=1), op.Reshape(s, per_k_shape)))
    q = op.Add(op.Cast(scaled, to=6), op.constant(np.array(yzp, np.int32)))
    q = op.Max(op.Min(q, op.constant(np.array(255, np.int32))),
               op.constant(np.array(yzp if node.attr("relu", 0) else 0, np.int32)))
    y = op.Cast(q, to=2)
    nhwc = op.Transpose(y, perm=[0, 2, 3, 1])
    target = op.Concat(op.constant(np.array([0, 0, 0, -1], np.int64)), dims(w, 5, 6), axis=0)
    y = op.Transpose(op.Reshape(nhwc, target), perm=[0, 3, 1, 2, 4])
    act = node.attr("activation", "") or ""
    if z is None and not act:
        return [y]

    def f32(v: float) -> Value:
        return op.constant(np.array(v, np.float32))

    def dq(t: Value, scale: float, zp: int) -> Value:
        return op.Mul(op.Sub(op.Cast(t, to=1), f32(zp)), f32(scale))

    v = dq(y, node.attr("y_scale", 1.0), yzp)
    if z is not None:
        v = op.Add(v, dq(z, node.attr("z_scale", 1.0), node.attr("z_zero_point", 0)))
    if node.attr("out_relu", 0):
        v = op.Relu(v)
    if act:
        v = decompose_activation(op, v, act, tuple(node.attr("activation_params", ()) or ()), opset)
    q = op.Add(op.Round(op.Div(v, f32(node.attr("out_scale", 1.0)))), f32(node.attr("out_zero_point", 0)))
    return [op.Cast(op.Max(op.Min(q, f32(255)), f32(0)), to=2)]


register_kiln_op("QBlockedConv", inputs=(4, 5), attrs=_QCONV_ATTRS, infer=_qblocked_conv_shape,
                 decompose=_decompose_qblocked_conv, validate=_validate_epilogue)(qblocked_conv)


# ``kiln::QDense(X, W, C, S, B?)``: an int8 dense layer in the layout of x86's VNNI instruction.
#     X is uint8 ``[M, K]`` (K a multiple of 4); W is int8 ``[N'/16, K/4, 16, 4]`` (output block,
#     input group of 4, output lane, input in the group: ``pack_qdense_weight``), N' the output
#     count padded to 16; C is int32 ``[N']``: the input zero point's term ``-x_zp * sum_k W[n, k]``;
#     S is float32 ``[N']`` (``x_scale * w_scale[n]``) and B an optional float32 ``[N']`` bias.
#     ``Y[m, n] = float32(sum_k X[m, k] W[n, k] + C[n]) * S[n] + B[n]``, float32 ``[M, n]`` for the
#     attribute ``n``, the true output count.
def pack_qdense_weight(w_nk: np.ndarray, lanes: int = 16, group: int = 4) -> np.ndarray:
    """int8 ``[N, K]`` -> ``[N'/16, K/4, 16, 4]``, N zero-padded to 16 (K must divide by 4)."""
    n, k = w_nk.shape
    npad = -(-n // lanes) * lanes
    full = np.zeros((npad, k), np.int8)
    full[:n] = w_nk
    return np.ascontiguousarray(full.reshape(npad // lanes, lanes, k // group, group).transpose(0, 2, 1, 3))


def unpack_qdense_weight(w: np.ndarray) -> np.ndarray:
    """``[N'/16, K/4, 16, 4]`` -> ``[N', K]``."""
    no, ko, lanes, group = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3)).reshape(no * lanes, ko * group)


def qdense(x, w, c, s, b=None, n=0):
    """kiln::QDense: uint8 x int8 with int32 accumulation, scaled to float32."""
    acc = x.astype(np.int64) @ unpack_qdense_weight(w).astype(np.int64).T + c.astype(np.int64)
    y = acc.astype(np.float32) * s.astype(np.float32)
    if b is not None:
        y = y + b.astype(np.float32)
    return (y[:, :n].astype(np.float32),)


def _qdense_shape(node: Node) -> list[tuple]:
    x = node.input(0)
    m = x.shape[0] if x is not None and x.shape is not None else None
    return [(DType.FLOAT32, (m, node.attr("n", 0)) if m is not None else None)]


def _decompose_qdense(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    x, w, c, s, b = (list(inputs) + [None])[:5]
    no, ko, lanes, group = w.shape
    plain = op.Reshape(op.Transpose(w, perm=[1, 3, 0, 2]), op.constant(np.array([ko * group, no * lanes], np.int64)))
    acc = op.Add(op.MatMulInteger(x, plain), c)  # [M, N'] int32
    y = op.Mul(op.Cast(acc, to=1), s)
    if b is not None:
        y = op.Add(y, b)
    return [op.Slice(y, op.constant(np.array([0], np.int64)), op.constant(np.array([node.attr("n", 0)], np.int64)),
                     op.constant(np.array([1], np.int64)))]


register_kiln_op("QDense", inputs=(4, 5), attrs={"n": (AttrType.INT, 0)}, infer=_qdense_shape,
                 decompose=_decompose_qdense)(qdense)


# ``kiln::DynQDense(X, W, WSUM, WS, B?)``: a dense layer with int8 weights whose float input is
#     quantized on every call, as onnxruntime's ``quantize_dynamic`` writes it (DynamicQuantizeLinear,
#     MatMulInteger, Cast, Mul): X is float32 ``[..., K]`` (K a multiple of 4), quantized to uint8 per
#     tensor with the scale ``(max(x, 0) - min(x, 0)) / 255`` (1 when X is all zeros) and the zero point
#     ``round(-min(x, 0) / scale)``; W is int8 ``[N'/16, K/4, 16, 4]`` as for QDense; WSUM is int32
#     ``[N']``, ``sum_k W[n, k]``; WS is float32 ``[N']``, the weights' scale per output.
#     ``Y[..., n] = float32(sum_k Xq[..., k] W[n, k] - zp * WSUM[n]) * (scale * WS[n]) + B[n]``.
def dynamic_quantize_uint8(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX's DynamicQuantizeLinear: uint8 ``x`` with its scale and zero point from its range (and 0)."""
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255)) or np.float32(1)
    zp = np.uint8(np.clip(np.rint(np.float32(-lo) / scale), 0, 255))
    q = np.clip(np.rint(x.astype(np.float32) / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    return q, scale, zp


def dyn_qdense(x, w, wsum, ws, b=None, n=0):
    """kiln::DynQDense: quantize ``x`` per tensor, uint8 x int8 with int32 sums, scaled to float32."""
    q, scale, zp = dynamic_quantize_uint8(x)
    acc = q.astype(np.int64) @ unpack_qdense_weight(w).astype(np.int64).T - int(zp) * wsum.astype(np.int64)
    y = acc.astype(np.float32) * (scale * ws.astype(np.float32))
    if b is not None:
        y = y + b.astype(np.float32)
    return (y[..., :n].astype(np.float32),)


def _dyn_qdense_shape(node: Node) -> list[tuple]:
    x = node.input(0)
    if x is None or x.shape is None:
        return [(DType.FLOAT32, None)]
    return [(DType.FLOAT32, (*x.shape[:-1], node.attr("n", 0)))]


def _decompose_dyn_qdense(op: Any, node: Node, inputs: Sequence[Value | None], opset: int) -> list[Value]:
    x, w, wsum, ws, b = (list(inputs) + [None])[:5]
    no, ko, lanes, group = w.shape
    n = node.attr("n", 0)
    plain = op.Reshape(op.Transpose(w, perm=[1, 3, 0, 2]), op.constant(np.array([ko * group, no * lanes], np.int64)))
    xq, scale, zp = op.DynamicQuantizeLinear(x, _outputs=3)
    acc = op.MatMulInteger(xq, plain, zp)  # [..., N'] int32, the zero point's term included
    y = op.Mul(op.Cast(acc, to=1), op.Mul(scale, ws))
    if b is not None:
        y = op.Add(y, b)
    return [op.Slice(y, op.constant(np.array([0], np.int64)), op.constant(np.array([n], np.int64)),
                     op.constant(np.array([-1], np.int64)), op.constant(np.array([1], np.int64)))]


register_kiln_op("DynQDense", inputs=(4, 5), attrs={"n": (AttrType.INT, 0)}, infer=_dyn_qdense_shape,
                 decompose=_decompose_dyn_qdense)(dyn_qdense)


# --------------------------------------------------------------------------- DynQRecurrence
#
# ``kiln::DynQRecurrence(XW, R, RS, B?, sequence_lens?, initial_h?, initial_c?, P?) -> Y, Y_h(, Y_c)``
#     The time loop of an ONNX LSTM, GRU or RNN (attribute ``op``) whose hidden-state products are dynamic
#     int8. XW is float32 ``[seq, batch, dirs*G*H]`` (``layout=1``: ``[batch, seq, ...]``): every step's
#     input projection ``X·Wᵀ`` plus ``Wb + Rb``, less the GRU h gate's ``Rb`` under linear_before_reset
#     (read from B, the node's ONNX bias, which only that case reads). R is int8 ``[dirs, G*H, H]``,
#     symmetric per gate row, with RS float32 ``[dirs, G*H]`` its scales. At every step, each direction
#     quantizes the product's source (a batch row's hidden state; for the GRU h gate without
#     linear_before_reset, ``r ⊙ h``) to uint8 per row as DynamicQuantizeLinear does, and adds
#     ``float32(sum_k (q[b, k] - zp[b]) R[g, k]) * (scale[b] * RS[g])`` to the gates: a row's result does not
#     depend on the rows batched with it. The other inputs, the
#     attributes and the outputs are the ONNX op's.

#: activation -> its default (alpha, beta), None where it takes none (ONNX's RNN activations)
RNN_ACTIVATION_PARAMS: dict[str, tuple[float | None, float | None]] = {
    "relu": (None, None), "tanh": (None, None), "sigmoid": (None, None), "softsign": (None, None),
    "softplus": (None, None), "affine": (1.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None),
    "scaledtanh": (1.0, 1.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None),
}
DEFAULT_RNN_ACTIVATIONS = {"RNN": ["tanh"], "GRU": ["sigmoid", "tanh"], "LSTM": ["sigmoid", "tanh", "tanh"]}
RNN_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def rnn_activations(op: str, dirs: int, names: Sequence[str], alphas: Sequence[float],
                    betas: Sequence[float]) -> list[list[tuple[str, float, float]]]:
    """Each direction's activations (f, g, h for LSTM) as (name, alpha, beta), the alphas and betas consumed in
    order and defaulted as ONNX says; ValueError names what is wrong."""
    names = [a.lower() for a in names] or DEFAULT_RNN_ACTIVATIONS[op] * dirs
    per = len(DEFAULT_RNN_ACTIVATIONS[op])
    if len(names) != per * dirs:
        raise ValueError(f"{len(names)} activations given, {op} needs {per * dirs}")
    alphas, betas = list(alphas), list(betas)
    acts = []
    for name in names:
        if name not in RNN_ACTIVATION_PARAMS:
            raise ValueError(f"unknown activation '{name}'")
        da, db = RNN_ACTIVATION_PARAMS[name]
        a = (alphas.pop(0) if alphas else da) if da is not None else 0.0
        b = (betas.pop(0) if betas else db) if db is not None else 0.0
        acts.append((name, float(a), float(b)))
    return [acts[d * per:(d + 1) * per] for d in range(dirs)]


def _rnn_activation(x: np.ndarray, name: str, a: float, b: float) -> np.ndarray:
    f = np.float32
    if name == "sigmoid":
        return f(1) / (f(1) + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, f(0))
    if name == "affine":
        return f(a) * x + f(b)
    if name == "leakyrelu":
        return np.where(x >= 0, x, f(a) * x)
    if name == "thresholdedrelu":
        return np.where(x > f(a), x, f(0))
    if name == "scaledtanh":
        return f(a) * np.tanh(f(b) * x)
    if name == "hardsigmoid":
        return np.maximum(f(0), np.minimum(f(1), f(a) * x + f(b)))
    if name == "elu":
        return np.where(x >= 0, x, f(a) * (np.exp(x) - f(1)))
    if name == "softsign":
        return x / (f(1) + np.abs(x))
    return np.log(f(1) + np.exp(x))  # softplus


def _int8_product(src: np.ndarray, r: np.ndarray, rs: np.ndarray) -> np.ndarray:
    """``src [batch, H]`` quantized per row (DynamicQuantizeLinear on each) times ``r [n, H]`` int8, in float32."""
    out = []
    for row in src:
        q, scale, zp = dynamic_quantize_uint8(row)
        acc = (q.astype(np.int64) - int(zp)) @ r.astype(np.int64).T
        out.append(acc.astype(np.float32) * (np.float32(scale) * rs.astype(np.float32)))
    return np.stack(out) if out else np.zeros((0, r.shape[0]), np.float32)


def dyn_q_recurrence(xw, r, rs, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, op="LSTM",
                     hidden_size=0, direction="forward", activations=(), activation_alpha=(), activation_beta=(),
                     clip=-1.0, layout=0, input_forget=0, linear_before_reset=0):
    """kiln::DynQRecurrence: an LSTM, GRU or RNN time loop with dynamic int8 hidden-state products."""
    f32 = np.float32
    xw = xw.astype(f32)
    if layout:
        xw = xw.transpose(1, 0, 2)
    seq, batch = xw.shape[0], xw.shape[1]
    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    nd, H = len(reverse), int(hidden_size) or r.shape[-1]
    G = RNN_GATES[op]
    gh = G * H
    acts = rnn_activations(op, nd, activations, activation_alpha, activation_beta)
    lens = (np.full(batch, seq, np.int64) if sequence_lens is None
            else np.clip(sequence_lens.astype(np.int64), 0, seq))

    def cl(v: np.ndarray) -> np.ndarray:
        return v if clip is None or clip < 0 else np.clip(v, -f32(clip), f32(clip))

    def st(v: np.ndarray | None) -> np.ndarray:  # an initial state as [dirs, batch, H]
        if v is None:
            return np.zeros((nd, batch, H), f32)
        return (v.transpose(1, 0, 2) if layout else v).astype(f32).copy()

    y = np.zeros((seq, nd, batch, H), f32)
    yh, yc = st(initial_h), st(initial_c)
    for d in range(nd):
        act = [lambda v, a=a: _rnn_activation(v, *a) for a in acts[d]]
        rd, rsd = r[d], rs[d]
        for s in range(seq):
            t = np.maximum(lens - 1 - s, 0) if reverse[d] else np.full(batch, s)
            x_t = xw[np.minimum(t, seq - 1), np.arange(batch), d * gh:(d + 1) * gh]
            h = yh[d]
            if op == "GRU":
                zr = x_t[:, :2 * H] + _int8_product(h, rd[:2 * H], rsd[:2 * H])
                z, rg = act[0](cl(zr[:, :H])), act[0](cl(zr[:, H:]))
                if linear_before_reset:
                    rb = b[d, gh + 2 * H:gh + 3 * H].astype(f32) if b is not None else f32(0)
                    hg = _int8_product(h, rd[2 * H:], rsd[2 * H:]) + rb
                    n = act[1](cl(x_t[:, 2 * H:] + rg * hg))
                else:
                    n = act[1](cl(x_t[:, 2 * H:] + _int8_product(rg * h, rd[2 * H:], rsd[2 * H:])))
                hn, cn = (f32(1) - z) * n + z * h, None
            else:
                g = x_t + _int8_product(h, rd, rsd)
                if op == "LSTM":  # gates i, o, f, c
                    cp = yc[d]
                    i_, o_, f_, c_ = (g[:, k * H:(k + 1) * H] for k in range(4))
                    if p is not None:
                        i_ = i_ + p[d, :H] * cp
                        f_ = f_ + p[d, 2 * H:] * cp
                    ig = act[0](cl(i_))
                    fg = f32(1) - ig if input_forget else act[0](cl(f_))
                    cn = fg * cp + ig * act[1](cl(c_))
                    if p is not None:
                        o_ = o_ + p[d, H:2 * H] * cn
                    hn = act[0](cl(o_)) * act[2](cn)
                else:
                    hn, cn = act[0](cl(g)), None
            live = (s < lens)[:, None]
            yh[d] = np.where(live, hn, h)
            if cn is not None:
                yc[d] = np.where(live, cn, yc[d])
            rows = np.arange(batch)
            y[np.where(live[:, 0], t, s), d, rows] = np.where(live, hn, f32(0))
        done = lens == 0
        yh[d][done] = 0
        yc[d][done] = 0
    outs = [y.transpose(2, 0, 1, 3), yh.transpose(1, 0, 2)] if layout else [y, yh]
    if op == "LSTM":
        outs.append(yc.transpose(1, 0, 2) if layout else yc)
    return tuple(o.astype(f32) for o in outs)


def _dyn_q_recurrence_shape(node: Node) -> list[tuple]:
    xw, H = node.input(0), node.attr("hidden_size", 0)
    nd = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    n_out = len(node.outputs)
    if xw is None or xw.shape is None or len(xw.shape) != 3:
        return [(DType.FLOAT32, None)] * n_out
    a, b = xw.shape[0], xw.shape[1]  # (seq, batch), or (batch, seq) under layout=1
    if node.attr("layout", 0):
        shapes = [(a, b, nd, H), (a, nd, H)]
    else:
        shapes = [(a, nd, b, H), (nd, b, H)]
    shapes.append(shapes[1])
    return [(DType.FLOAT32, s) for s in shapes[:n_out]]


def _validate_dyn_q_recurrence(node: Node) -> list[str]:
    op = node.attr("op", "LSTM")
    if op not in RNN_GATES:
        return [f"op must be LSTM, GRU or RNN, not '{op}'"]
    if len(node.outputs) > (3 if op == "LSTM" else 2):
        return [f"{op} has {3 if op == 'LSTM' else 2} outputs at most"]
    nd = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    try:
        rnn_activations(op, nd, node.attr("activations", ()) or (), node.attr("activation_alpha", ()) or (),
                        node.attr("activation_beta", ()) or ())
    except ValueError as e:
        return [str(e)]
    return []


register_kiln_op("DynQRecurrence", inputs=(3, 8), outputs=(1, 3), attrs={
    "op": (AttrType.STRING, "LSTM"), "hidden_size": (AttrType.INT, 0), "direction": (AttrType.STRING, "forward"),
    "activations": (AttrType.STRINGS, ()), "activation_alpha": (AttrType.FLOATS, ()),
    "activation_beta": (AttrType.FLOATS, ()), "clip": (AttrType.FLOAT, -1.0), "layout": (AttrType.INT, 0),
    "input_forget": (AttrType.INT, 0), "linear_before_reset": (AttrType.INT, 0),
}, infer=_dyn_q_recurrence_shape, validate=_validate_dyn_q_recurrence)(dyn_q_recurrence)
