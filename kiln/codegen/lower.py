"""Lowering: a kiln ``Graph`` becomes a Relax ``main`` built with ``relax.BlockBuilder``.

Each kiln node, fused kiln ops included, becomes one prim func through
``bb.emit_te`` with topi computes. Weights stay function parameters (the
artifact keeps them in safetensors); constants of at most a few elements are
baked into the code. Symbolic dims become ``int64`` TIR variables, so one
compiled function runs at any size of them.

Every op kiln can lower has an entry in :data:`LOWERINGS`. Lowering checks the
whole graph first and refuses, in one error, every op it cannot lower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kiln.errors import KilnError
from kiln.ir import Graph, Node, Value

BAKE_LIMIT = 64  # constants with at most this many elements are compiled in


class CodegenError(KilnError):
    """The graph cannot be lowered: unsupported ops, unknown dims without bounds, ..."""


Lowering = Callable[["Lowerer", Node], list[Any]]
LOWERINGS: dict[tuple[str, str], Lowering] = {}
#: For ops whose lowering reads only some inputs (the rest must be constants, or only shape the
#: output, which kiln's shape inference already knows): the indices it reads.
DATA_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {}


def lowers(*ops: str, domain: str = "", reads: tuple[int, ...] | None = None) -> Callable[[Lowering], Lowering]:
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[(domain, op)] = fn
            if reads is not None:
                DATA_INPUTS[(domain, op)] = reads
        return fn

    return register


def needed_nodes(graph: Graph) -> list[Node]:
    """The nodes whose values the outputs depend on, through the inputs each lowering reads, in order.

    A Reshape whose target is computed from ``Shape`` ops does not need that computation: its
    output shape is known symbolically, so the shape subgraph is not compiled at all.
    """
    live: set[int] = set()
    stack = [v for v in graph.outputs]
    while stack:
        v = stack.pop()
        n = v.producer
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        reads = DATA_INPUTS.get((n.domain, n.op_type))
        for i, inp in enumerate(n.inputs):
            if inp is not None and (reads is None or i in reads):
                stack.append(inp)
    return [n for n in graph.nodes if id(n) in live]


@dataclass
class Lowered:
    """A lowered model: the Relax module and the order of ``main``'s parameters."""

    module: Any
    inputs: list[str]  # graph input names, in order
    weights: dict[str, np.ndarray]  # weight parameters, in order after the inputs


def unsupported(graph: Graph) -> dict[tuple[str, str], list[str]]:
    """Every op the compiled graph needs but kiln cannot lower, with the nodes that use it."""
    out: dict[tuple[str, str], list[str]] = {}
    for n in needed_nodes(graph):
        if (n.domain, n.op_type) not in LOWERINGS:
            out.setdefault((n.domain, n.op_type), []).append(n.name)
    return out


class Lowerer:
    """Builds the Relax module for one graph."""

    def __init__(self, graph: Graph):
        from tvm import relax

        self.graph = graph
        self.bb = relax.BlockBuilder()
        self.env: dict[int, Any] = {}
        self.syms: dict[str, Any] = {}

    # -- types and values
    def dim(self, d: int | str) -> Any:
        from tvm import tirx

        if isinstance(d, int):
            return d
        if d not in self.syms:
            self.syms[d] = tirx.Var(re.sub(r"\W", "_", d).strip("_") or "d", "int64")
        return self.syms[d]

    def tensor_type(self, v: Value) -> Any:
        from tvm import relax

        if v.shape is None or v.dtype is None:
            raise CodegenError(f"value '{v.name}' has an unknown shape or dtype; kiln cannot compile it")
        return relax.TensorType([self.dim(d) for d in v.shape], v.dtype.numpy.name)

    def get(self, v: Value | None) -> Any:
        if v is None:
            return None
        if id(v) not in self.env:
            raise CodegenError(f"value '{v.name}' is read before it is computed")
        return self.env[id(v)]

    def emit(self, fn: Callable[..., Any], *args: Any, name: str) -> Any:
        return self.bb.emit_te(fn, *args, primfunc_name_hint=re.sub(r"\W", "_", name))

    # -- the whole graph
    def lower(self) -> Lowered:
        from tvm import relax

        missing = unsupported(self.graph)
        if missing:
            parts = "; ".join(f"{d + '::' if d else ''}{op} (nodes: {', '.join(ns[:3])})" for (d, op), ns in sorted(missing.items()))
            raise CodegenError(f"kiln cannot compile these ops yet: {parts}")
        nodes = needed_nodes(self.graph)
        if any(True for n in nodes for _ in n.subgraphs()):
            raise CodegenError("graphs with If/Loop/Scan subgraphs cannot be compiled yet")
        params = []
        for v in self.graph.inputs:
            var = relax.Var(_ident(v.name), self.tensor_type(v))
            self.env[id(v)] = var
            params.append(var)
        weights: dict[str, np.ndarray] = {}
        read = {id(v) for n in nodes for i, v in enumerate(n.inputs) if v is not None and (
            DATA_INPUTS.get((n.domain, n.op_type)) is None or i in DATA_INPUTS[(n.domain, n.op_type)])}
        read |= {id(v) for v in self.graph.outputs}
        for v in self.graph.constants.values():
            if id(v) not in read:
                continue
            arr = v.numpy()
            if arr.size <= BAKE_LIMIT:
                self.env[id(v)] = relax.const(np.ascontiguousarray(arr) if arr.ndim else arr, arr.dtype.name)
            else:
                var = relax.Var(_ident(v.name), self.tensor_type(v))
                self.env[id(v)] = var
                params.append(var)
                weights[v.name] = arr
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in nodes:
                    outs = LOWERINGS[(node.domain, node.op_type)](self, node)
                    for o, r in zip([o for o in node.outputs if o.name], outs):
                        self.env[id(o)] = r
                results = [self.get(v) for v in self.graph.outputs]
                out = self.bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
            self.bb.emit_func_output(out)
        return Lowered(self.bb.finalize(), [v.name for v in self.graph.inputs], weights)


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name) or "v"


def lower(graph: Graph) -> Lowered:
    """Lower ``graph`` to a Relax module (raises ``CodegenError`` listing what it cannot lower)."""
    return Lowerer(graph).lower()


# =========================================================================== op lowerings

def _topi():
    from tvm import topi

    return topi


def _const_array(v: Value | None) -> np.ndarray | None:
    return None if v is None or not v.is_constant else v.numpy()


def _activation(x: Any, name: str, params: tuple[float, ...]) -> Any:
    """A kiln epilogue activation on a TE tensor (see kiln.ir.kiln_ops)."""
    topi = _topi()
    from tvm import te, tirx

    dt = x.dtype
    if name == "":
        return x
    if name == "Relu":
        return topi.nn.relu(x)
    if name == "Clip":
        return topi.clip(x, float(params[0]), float(params[1]))
    if name == "LeakyRelu":
        return topi.nn.leaky_relu(x, float(params[0]))
    if name == "Sigmoid":
        return topi.sigmoid(x)
    if name == "Tanh":
        return topi.tanh(x)
    if name == "HardSigmoid":
        return te.compute(x.shape, lambda *i: tirx.max(tirx.min(x(*i) * tirx.const(params[0], dt)
                                                              + tirx.const(params[1], dt), tirx.const(1, dt)),
                                                     tirx.const(0, dt)), name="hard_sigmoid")
    if name == "HardSwish":
        return te.compute(x.shape, lambda *i: x(*i) * tirx.max(tirx.min(x(*i) / tirx.const(6, dt) + tirx.const(0.5, dt),
                                                                        tirx.const(1, dt)), tirx.const(0, dt)),
                          name="hard_swish")
    if name == "SiLU":
        s = topi.sigmoid(x)
        return topi.multiply(x, s)
    if name == "Gelu":
        if params and params[0]:
            c = float(np.sqrt(2 / np.pi))
            return te.compute(x.shape, lambda *i: tirx.const(0.5, dt) * x(*i) * (tirx.const(1, dt) + tirx.tanh(
                tirx.const(c, dt) * (x(*i) + tirx.const(0.044715, dt) * x(*i) * x(*i) * x(*i)))), name="gelu_tanh")
        return te.compute(x.shape, lambda *i: tirx.const(0.5, dt) * x(*i) * (tirx.const(1, dt) + tirx.erf(
            x(*i) * tirx.const(float(1 / np.sqrt(2)), dt))), name="gelu")
    raise CodegenError(f"activation '{name}' has no lowering")


_UNARY: dict[str, Callable[[Any], Any]] = {
    "Relu": lambda x: _topi().nn.relu(x), "Sigmoid": lambda x: _topi().sigmoid(x), "Tanh": lambda x: _topi().tanh(x),
    "Exp": lambda x: _topi().exp(x), "Log": lambda x: _topi().log(x), "Sqrt": lambda x: _topi().sqrt(x),
    "Abs": lambda x: _topi().abs(x), "Neg": lambda x: _topi().negative(x), "Erf": lambda x: _topi().erf(x),
    "Floor": lambda x: _topi().floor(x), "Ceil": lambda x: _topi().ceil(x), "Sin": lambda x: _topi().sin(x),
    "Cos": lambda x: _topi().cos(x), "Reciprocal": lambda x: _topi().divide(1.0, x),
}


@lowers(*_UNARY)
def _unary(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.emit(_UNARY[node.op_type], lw.get(node.input(0)), name=node.op_type.lower())]


@lowers("Identity")
def _alias(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.get(node.input(0))]


@lowers("LeakyRelu", "HardSigmoid", "HardSwish", "Gelu")
def _param_activation(lw: Lowerer, node: Node) -> list[Any]:
    op = node.op_type
    params: tuple[float, ...] = ()
    if op == "LeakyRelu":
        params = (node.attr("alpha", 0.01),)
    elif op == "HardSigmoid":
        params = (node.attr("alpha", 0.2), node.attr("beta", 0.5))
    elif op == "Gelu":
        params = (1.0,) if node.attr("approximate", "none") == "tanh" else ()
    return [lw.emit(lambda x: _activation(x, op, params), lw.get(node.input(0)), name=op.lower())]


@lowers("Gelu", domain="kiln")
def _kiln_gelu(lw: Lowerer, node: Node) -> list[Any]:
    params = (1.0,) if node.attr("approximate", "none") == "tanh" else ()
    return [lw.emit(lambda x: _activation(x, "Gelu", params), lw.get(node.input(0)), name="gelu")]


_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Max": "maximum",
           "Min": "minimum", "Equal": "equal", "Less": "less", "Greater": "greater", "LessOrEqual": "less_equal",
           "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or"}


@lowers(*_BINARY, "Sum")
def _binary(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    fn_name = _BINARY.get(node.op_type, "add")
    if len(ins) == 1:
        return [ins[0]]

    def compute(*xs: Any) -> Any:
        fn = getattr(_topi(), fn_name)
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return [lw.emit(compute, *ins, name=node.op_type.lower())]


@lowers("Where")
def _where(lw: Lowerer, node: Node) -> list[Any]:
    return [lw.emit(_topi().where, *[lw.get(v) for v in node.inputs], name="where")]


def spatial_pads(node: Node, kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """ONNX pads ``[begins..., ends...]`` of a conv or pool, resolving ``auto_pad`` from the input shape."""
    n = len(kernel)
    auto = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto == "VALID":
        return [0] * (2 * n)
    if auto == "NOTSET":
        return list(node.attr("pads", ()) or [0] * (2 * n))
    spatial = list((node.input(0).shape or [])[2:])
    if len(spatial) != n or not all(isinstance(d, int) for d in spatial):
        raise CodegenError(f"node {node.label()}: auto_pad {auto} needs static spatial input dims to compile")
    begins, ends = [], []
    for d, k, st, dl in zip(spatial, kernel, strides, dil):
        out = -(-d // st)
        total = max((out - 1) * st + (k - 1) * dl + 1 - d, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _conv2d(x: Any, w: Any, node: Node) -> Any:
    """An N-d (1-D, 2-D or 3-D) NC... convolution with groups, dilations and auto_pad."""
    topi = _topi()
    k = len(w.shape) - 2
    kernel = [int(d) for d in w.shape[2:]]
    strides = list(node.attr("strides", ()) or [1] * k)
    dil = list(node.attr("dilations", ()) or [1] * k)
    pads = spatial_pads(node, kernel, strides, dil)
    group = node.attr("group", 1)
    if k == 1:
        return topi.nn.conv1d(x, w, strides, pads, dil, group, "NCW", "OIW")
    if k == 3:
        return topi.nn.conv3d_ncdhw(x, w, strides, pads, dil, group)
    if k != 2:
        raise CodegenError(f"node {node.label()}: {k}-D convolutions do not compile yet")
    padding = (pads[0], pads[1], pads[2], pads[3])
    if group == 1:
        return topi.nn.conv2d_nchw(x, w, strides, padding, dil)
    return topi.nn.group_conv2d_nchw(x, w, strides, padding, dil, group)


def _channel(b: Any, rank: int = 4) -> Any:
    """A per-channel vector as [1, C, 1, ...] for broadcasting over NC... of ``rank`` dims."""
    return _topi().reshape(b, (1, b.shape[0], *([1] * (rank - 2))))


@lowers("Conv")
def _conv(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b = (lw.get(node.input(i)) for i in range(3))

    def compute(x: Any, w: Any, *b: Any) -> Any:
        y = _conv2d(x, w, node)
        if b:
            y = _topi().add(y, _channel(b[0], len(y.shape)))
        return y

    return [lw.emit(compute, x, w, *([b] if b is not None else []), name="conv2d")]


@lowers("FusedConv", domain="kiln")
def _fused_conv(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b, z = (lw.get(node.input(i)) for i in range(4))
    act = node.attr("activation", "") or ""
    params = tuple(node.attr("activation_params", ()) or ())
    has_b, has_z = b is not None, z is not None

    def compute(x: Any, w: Any, *rest: Any) -> Any:
        topi = _topi()
        y = _conv2d(x, w, node)
        rest_l = list(rest)
        if has_b:
            y = topi.add(y, _channel(rest_l.pop(0), len(y.shape)))
        if has_z:
            y = topi.add(y, rest_l.pop(0))
        return _activation(y, act, params)

    extra = [v for v in (b, z) if v is not None]
    return [lw.emit(compute, x, w, *extra, name=f"fused_conv2d_{act.lower() or 'linear'}")]


def _gemm_compute(node: Node, act: str = "", params: tuple[float, ...] = ()) -> Callable[..., Any]:
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)

    def compute(a: Any, b: Any, *c: Any) -> Any:
        topi = _topi()
        y = topi.nn.matmul(a, b, transpose_a=bool(trans_a), transpose_b=bool(trans_b))
        if alpha != 1.0:
            y = topi.multiply(y, alpha)
        if c:
            y = topi.add(y, topi.multiply(c[0], beta) if beta != 1.0 else c[0])
        return _activation(y, act, params)

    return compute


@lowers("Gemm")
def _gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(_gemm_compute(node), *ins, name="gemm")]


@lowers("FusedGemm", domain="kiln")
def _fused_gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    act = node.attr("activation", "") or ""
    params = tuple(node.attr("activation_params", ()) or ())
    return [lw.emit(_gemm_compute(node, act, params), *ins, name=f"fused_gemm_{act.lower() or 'linear'}")]


def pool_geometry(node: Node) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """A pool's kernel, strides, dilations, pads (auto_pad resolved) and ceil_mode."""
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = list(node.attr("strides", ()) or [1] * n)
    dil = list(node.attr("dilations", ()) or [1] * n)
    return kernel, strides, dil, spatial_pads(node, kernel, strides, dil), bool(node.attr("ceil_mode", 0))


@lowers("MaxPool", "AveragePool")
def _pool(lw: Lowerer, node: Node) -> list[Any]:
    if len([o for o in node.outputs if o.name]) > 1:
        from kiln.codegen.lower_nn import max_pool_with_indices

        return max_pool_with_indices(lw, node)
    kernel, strides, dil, pads, ceil = pool_geometry(node)
    n = len(kernel)
    if n not in (1, 2, 3):
        raise CodegenError(f"node {node.label()}: {n}-D pooling does not compile yet")
    pool = {1: _topi().nn.pool1d, 2: _topi().nn.pool2d, 3: _topi().nn.pool3d}[n]
    layout = {1: "NCW", 2: "NCHW", 3: "NCDHW"}[n]
    kind = "max" if node.op_type == "MaxPool" else "avg"
    include_pad = bool(node.attr("count_include_pad", 0))
    return [lw.emit(lambda x: pool(x, kernel, strides, dil, pads, kind, ceil, layout, include_pad),
                    lw.get(node.input(0)), name=f"{kind}_pool{n}d")]


@lowers("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(lw: Lowerer, node: Node) -> list[Any]:
    kind = "avg" if node.op_type == "GlobalAveragePool" else "max"
    return [lw.emit(lambda x: _topi().nn.global_pool(x, kind, "NCHW"), lw.get(node.input(0)), name=f"global_{kind}_pool")]


def _axes_of(node: Node, rank: int) -> list[int] | None:
    axes = node.attr("axes")
    if axes is None and node.input(1) is not None:
        axes = _const_ints(node.input(1))
    return None if axes is None else sorted(a + rank if a < 0 else a for a in axes)


@lowers("Squeeze", reads=(0,))
def _squeeze(lw: Lowerer, node: Node) -> list[Any]:
    if _known_shape(node.outputs[0]):
        return _reshape(lw, node)  # axes computed at run time: the declared shape settles them
    x = node.input(0)
    axes = _axes_of(node, x.rank or 0)
    if axes is None and (node.input(1) is not None or not all(isinstance(d, int) for d in x.shape or [None])):
        raise CodegenError(f"node {node.label()}: Squeeze needs constant axes (or a static input) to compile")
    axes = axes if axes is not None else [i for i, d in enumerate(x.shape) if d == 1]

    def squeeze(t: Any) -> Any:
        return _topi().reshape(t, [d for i, d in enumerate(t.shape) if i not in axes])

    return [lw.emit(squeeze, lw.get(x), name="squeeze")]


@lowers("Unsqueeze", reads=(0,))
def _unsqueeze(lw: Lowerer, node: Node) -> list[Any]:
    if _known_shape(node.outputs[0]):
        return _reshape(lw, node)
    x = node.input(0)
    axes = _axes_of(node, (x.rank or 0) + len(node.attr("axes") or _const_ints(node.input(1)) or []))
    if axes is None:
        raise CodegenError(f"node {node.label()}: Unsqueeze needs constant axes to compile")

    def unsqueeze(t: Any) -> Any:
        dims = list(t.shape)
        for a in axes:
            dims.insert(a, 1)
        return _topi().reshape(t, dims)

    return [lw.emit(unsqueeze, lw.get(x), name="unsqueeze")]


@lowers("Flatten")
def _flatten(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    axis = node.attr("axis", 1)
    axis = axis + (x.rank or 0) if axis < 0 else axis

    def flatten(t: Any) -> Any:
        return _topi().reshape(t, (_prod(t.shape[:axis]), _prod(t.shape[axis:])))

    return [lw.emit(flatten, lw.get(x), name="flatten")]


def _known_shape(v: Value) -> bool:
    from kiln.ir import is_unknown_dim

    return v.shape is not None and not any(d is None or is_unknown_dim(d) for d in v.shape)


@lowers("Reshape", reads=(0,))
def _reshape(lw: Lowerer, node: Node) -> list[Any]:
    from kiln.ir import is_unknown_dim
    from kiln.ir.shape_rules import shape_value

    out = node.outputs[0]
    if _known_shape(out):
        dims = [lw.dim(d) for d in out.shape]
        return [lw.emit(lambda x: _topi().reshape(x, dims), lw.get(node.input(0)), name=node.op_type.lower())]
    target = shape_value(node.input(1)) if node.op_type == "Reshape" else None
    src_shape = list(node.input(0).shape or [])
    if target is None or target[1] or node.attr("allowzero", 0) or any(
            d is None or (isinstance(d, str) and d not in src_shape and (is_unknown_dim(d) or d not in lw.syms))
            for d in target[0]):
        raise CodegenError(f"node {node.label()}: the output shape {out.type_str()} is not known well enough to compile")
    entries = target[0]

    def reshape(x: Any) -> Any:
        # resolve 0 (copy), -1 (the rest) and dims read from the input's own shape against its
        # actual (symbolic) TE shape; a named input symbol is its TIR variable
        def resolve(i: int, d: Any) -> Any:
            if isinstance(d, str):
                return x.shape[src_shape.index(d)] if d in src_shape else lw.syms[d]
            return x.shape[i] if d == 0 else d

        dims: list[Any] = [resolve(i, d) for i, d in enumerate(entries)]
        if -1 in entries:
            k = entries.index(-1)
            dims[k] = _prod(x.shape) // _prod([d for i, d in enumerate(dims) if i != k])
        return _topi().reshape(x, dims)

    return [lw.emit(reshape, lw.get(node.input(0)), name="reshape")]


@lowers("Transpose")
def _transpose(lw: Lowerer, node: Node) -> list[Any]:
    perm = node.attr("perm")
    return [lw.emit(lambda x: _topi().transpose(x, list(perm) if perm else None), lw.get(node.input(0)),
                    name="transpose")]


@lowers("Concat")
def _concat(lw: Lowerer, node: Node) -> list[Any]:
    axis = node.attr("axis")
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(lambda *xs: _topi().concatenate(list(xs), axis), *ins, name="concat")]


@lowers("Softmax")
def _softmax(lw: Lowerer, node: Node) -> list[Any]:
    x = node.input(0)
    opset = lw.graph.model_opset.get("", 13)
    axis = node.attr("axis", -1 if opset >= 13 else 1)
    if opset >= 13 or axis in (-1, (x.rank or 0) - 1):
        return [lw.emit(lambda t: _topi().nn.softmax(t, axis), lw.get(x), name="softmax")]

    def coerced(t: Any) -> Any:
        # before opset 13: flatten to [prod(dims[:axis]), prod(dims[axis:])], normalise rows, restore
        topi = _topi()
        a = axis + len(t.shape) if axis < 0 else axis
        rows, cols = 1, 1
        for d in t.shape[:a]:
            rows = rows * d
        for d in t.shape[a:]:
            cols = cols * d
        return topi.reshape(topi.nn.softmax(topi.reshape(t, (rows, cols)), 1), t.shape)

    return [lw.emit(coerced, lw.get(x), name="softmax_2d")]


@lowers("BatchNormalization")
def _batchnorm(lw: Lowerer, node: Node) -> list[Any]:
    stats = [_const_array(node.input(i)) for i in range(1, 5)]
    if node.attr("training_mode", 0):
        raise CodegenError(f"node {node.label()}: training-mode BatchNormalization does not compile")
    if any(s is None for s in stats):
        from kiln.codegen.lower_nn import batch_norm

        return batch_norm(lw, node)  # statistics computed at run time
    scale, bias, mean, var = (s.astype(np.float64) for s in stats)  # type: ignore[union-attr]
    k = scale / np.sqrt(var + node.attr("epsilon", 1e-5))
    shift = bias - mean * k
    x = node.input(0)
    shape = (1, -1) + (1,) * ((x.rank or 2) - 2)
    dt = x.dtype.numpy
    from tvm import relax

    kc = relax.const(k.reshape(shape).astype(dt))
    sc = relax.const(shift.reshape(shape).astype(dt))
    return [lw.emit(lambda t, a, b: _topi().add(_topi().multiply(t, a), b), lw.get(x), kc, sc, name="batchnorm")]


def _const_ints(v: Value | None) -> list[int] | None:
    a = _const_array(v)
    return None if a is None else [int(x) for x in np.asarray(a).reshape(-1)]


@lowers("Split", reads=(0,))
def _split(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    x = node.input(0)
    axis = node.attr("axis", 0)
    axis = axis + x.rank if axis < 0 else axis
    sizes = _const_ints(node.input(1)) if node.input(1) is not None else node.attr("split")
    outs = [o for o in node.outputs if o.name]
    declared = [o.shape[axis] if o.shape is not None and len(o.shape) > axis else None for o in node.outputs]
    if sizes is None and all(isinstance(d, int) for d in declared):
        sizes = declared  # sizes computed at run time, or num_outputs: the declared shapes settle them
    if sizes is None:
        dim = x.shape[axis]
        if not isinstance(dim, int) or dim % len(node.outputs):
            raise CodegenError(f"node {node.label()}: Split needs constant sizes or an evenly divisible static dim")
        sizes = [dim // len(node.outputs)] * len(node.outputs)
    bounds = [int(b) for b in np.cumsum([0, *sizes])]  # zero-size parts are allowed

    def parts(t: Any) -> list[Any]:
        return [_topi().strided_slice(t, [lo], [hi], [1], [axis]) for lo, hi in zip(bounds, bounds[1:])]

    tup = lw.emit(parts, lw.get(x), name="split")
    return [lw.bb.emit(relax.TupleGetItem(tup, i)) for i in range(len(outs))]


@lowers("ConvTranspose")
def _conv_transpose(lw: Lowerer, node: Node) -> list[Any]:
    x, w, b = node.input(0), node.input(1), node.input(2)
    if x.rank != 4 or node.attr("group", 1) != 1 or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "") \
            or node.attr("output_shape") is not None or any(d != 1 for d in node.attr("dilations", ()) or ()):
        from kiln.codegen.lower_nn import conv_transpose

        return conv_transpose(lw, node)  # the general N-d form, written out in TE
    strides = list(node.attr("strides", ()) or [1, 1])
    pads = list(node.attr("pads", ()) or [0, 0, 0, 0])
    out_pad = list(node.attr("output_padding", ()) or [0, 0])
    has_b = b is not None

    def compute(t: Any, k: Any, *bias: Any) -> Any:
        y = _topi().nn.conv2d_transpose_nchw(t, k, strides, pads, t.dtype, out_pad)
        return _topi().add(y, _channel(bias[0])) if has_b else y

    args = [lw.get(x), lw.get(w)] + ([lw.get(b)] if has_b else [])
    return [lw.emit(compute, *args, name="conv2d_transpose")]


def _batched_matmul(a: Any, b: Any, trans_b: bool = False) -> Any:
    """N-D MatMul (numpy broadcasting over the batch dims) as reshapes around batch_matmul."""
    topi = _topi()
    if len(a.shape) == 2 and len(b.shape) == 2:
        return topi.nn.matmul(a, b, transpose_b=trans_b)
    if len(b.shape) == 2:
        m = topi.nn.matmul(topi.reshape(a, (_prod(a.shape[:-1]), a.shape[-1])), b, transpose_b=trans_b)
        return topi.reshape(m, (*a.shape[:-1], m.shape[-1]))
    batch = _broadcast_dims(list(a.shape[:-2]), list(b.shape[:-2]))
    a3 = topi.reshape(topi.broadcast_to(a, (*batch, *a.shape[-2:])), (_prod(batch), *a.shape[-2:]))
    b3 = topi.reshape(topi.broadcast_to(b, (*batch, *b.shape[-2:])), (_prod(batch), *b.shape[-2:]))
    n_out = b.shape[-2] if trans_b else b.shape[-1]
    y = topi.nn.batch_matmul(a3, b3, oshape=(_prod(batch), a.shape[-2], n_out), transpose_b=trans_b)
    return topi.reshape(y, (*batch, a.shape[-2], n_out))


def _broadcast_dims(a: list[Any], b: list[Any]) -> list[Any]:
    """numpy broadcasting of two dim lists (a size-1 dim gives way to the other)."""
    from tvm import tirx

    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    return [y if isinstance(x, (int, tirx.IntImm)) and int(x) == 1 else x for x, y in zip(a, b)]


def _prod(dims: Any) -> Any:
    out = 1
    for d in dims:
        out = out * d
    return out


@lowers("MatMul")
def _matmul_nd(lw: Lowerer, node: Node) -> list[Any]:
    a, b = node.input(0), node.input(1)
    if not a.rank or not b.rank:
        raise CodegenError(f"node {node.label()}: MatMul of 0-d operands does not compile")

    def compute(x: Any, y: Any) -> Any:
        # numpy's 1-D rules: a vector on the left is a row, on the right a column, then dropped
        topi = _topi()
        x2 = topi.reshape(x, (1, x.shape[0])) if len(x.shape) == 1 else x
        y2 = topi.reshape(y, (y.shape[0], 1)) if len(y.shape) == 1 else y
        z = _batched_matmul(x2, y2)
        dims = list(z.shape)
        if len(y.shape) == 1:
            dims.pop(-1)
        if len(x.shape) == 1:
            dims.pop(-1 if len(y.shape) == 1 else -2)
        return topi.reshape(z, dims) if len(dims) != len(z.shape) else z

    return [lw.emit(compute, lw.get(a), lw.get(b), name="matmul")]


@lowers("LayerNorm", domain="kiln")
@lowers("LayerNormalization")
def _layer_norm(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    x, scale, bias = node.input(0), node.input(1), node.input(2)
    n_out = len(node.outputs)  # Y, then the optional Mean and InvStdDev
    axis = node.attr("axis", -1)
    axis = axis + x.rank if axis < 0 else axis
    eps = node.attr("epsilon", 1e-5)
    has_bias = bias is not None

    def compute(t: Any, g: Any, *b: Any) -> Any:
        topi = _topi()
        axes = list(range(axis, len(t.shape)))
        count = _prod(t.shape[axis:])
        mean = topi.divide(topi.sum(t, axes, keepdims=True), topi.cast(count, t.dtype))
        d = topi.subtract(t, mean)
        var = topi.divide(topi.sum(topi.multiply(d, d), axes, keepdims=True), topi.cast(count, t.dtype))
        inv = topi.divide(1.0, topi.sqrt(topi.add(var, eps)))
        y = topi.multiply(topi.multiply(d, inv), g)
        y = topi.add(y, b[0]) if b else y
        return [y, mean, inv][:n_out] if n_out > 1 else y

    args = [lw.get(x), lw.get(scale)] + ([lw.get(bias)] if has_bias else [])
    out = lw.emit(compute, *args, name="layer_norm")
    if n_out == 1:
        return [out]
    return [lw.bb.emit(relax.TupleGetItem(out, i)) for i, o in enumerate(node.outputs) if o.name]


@lowers("Attention", domain="kiln")
def _attention(lw: Lowerer, node: Node) -> list[Any]:
    q, kt, v, mask = (node.input(i) for i in range(4))
    scale = node.attr("scale", 1.0)
    nan_to_zero = node.attr("nan_to_zero", 0)
    has_mask = mask is not None

    def compute(qt: Any, ktt: Any, vt: Any, *m: Any) -> Any:
        topi = _topi()
        s = _batched_matmul(qt, ktt)
        if scale != 1.0:
            s = topi.multiply(s, scale)
        if m:
            s = topi.add(s, m[0])
        p = topi.nn.softmax(s, -1)
        if nan_to_zero:
            p = topi.where(topi.isnan(p), topi.full_like(p, 0.0), p)
        return _batched_matmul(p, vt)

    args = [lw.get(q), lw.get(kt), lw.get(v)] + ([lw.get(mask)] if has_mask else [])
    return [lw.emit(compute, *args, name="attention")]


# The op families in their own files register themselves in LOWERINGS on import.
from kiln.codegen import lower_attention, lower_elementwise, lower_image, lower_nn, lower_reduce, lower_tensor  # noqa: E402,F401
