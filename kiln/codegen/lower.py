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
from typing import Any, Callable, Sequence, Iterator

import numpy as np

from kiln.errors import KilnError
from kiln.ir import Graph, Node, Value

BAKE_LIMIT = 64  # constants with at most this many elements are compiled in
OPAQUE = 8  # TVM's kOpaque op pattern


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


#: For ops whose inputs can be wrong in a way the model itself only meets at run time (onnxruntime fails
#: there too): a check that says why. An If branch that fails such a check at the pinned shapes compiles to a
#: run-time error instead of code (silero-vad's 8 kHz branch given 512 samples).
FailureCheck = Callable[[Node], "str | None"]
RUN_TIME_FAILURES: dict[tuple[str, str], FailureCheck] = {}


def run_time_failure(*ops: str, domain: str = "") -> Callable[[FailureCheck], FailureCheck]:
    def register(fn: FailureCheck) -> FailureCheck:
        for op in ops:
            RUN_TIME_FAILURES[(domain, op)] = fn
        return fn

    return register


def _reads(node: Node) -> Iterator[Value]:
    """The values lowering ``node`` reads: the inputs its lowering uses, and what its subgraphs read from outside."""
    reads = DATA_INPUTS.get((node.domain, node.op_type))
    for i, inp in enumerate(node.inputs):
        if inp is not None and (reads is None or i in reads):
            yield inp
    for sub in node.subgraphs():
        yield from outer_reads(sub)


def outer_reads(graph: Graph) -> list[Value]:
    """The values of enclosing graphs that ``graph``'s needed nodes (and outputs) read."""
    own = {id(v) for v in graph.values()}
    out = [v for n in needed_nodes(graph) for v in _reads(n) if id(v) not in own]
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
        stack.extend(_reads(n))
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


@dataclass
class Lowered:
    """A lowered model: the Relax module and the order of ``main``'s parameters."""

    module: Any
    inputs: list[str]  # graph input names, in order
    weights: dict[str, np.ndarray]  # weight parameters, in order after the inputs


def unsupported(graph: Graph) -> dict[tuple[str, str], list[str]]:
    """Every op the compiled graph needs but kiln cannot lower, with the nodes that use it (subgraphs too)."""
    out: dict[tuple[str, str], list[str]] = {}
    for n in needed_nodes(graph):
        if (n.domain, n.op_type) not in LOWERINGS:
            out.setdefault((n.domain, n.op_type), []).append(n.name)
            continue
        for sub in n.subgraphs():
            if branch_failure(sub) is None:  # a branch that fails at run time is not compiled
                for key, names in unsupported(sub).items():
                    out.setdefault(key, []).extend(names)
    return out


class Lowerer:
    """Builds the Relax module for one graph."""

    def __init__(self, graph: Graph):
        from tvm import relax

        self.graph = graph
        self.bb = relax.BlockBuilder()
        self.env: dict[int, Any] = {}
        self.syms: dict[str, Any] = {}  # named input dims: TIR variables
        self.derived: dict[str, Any] = {}  # kiln's other symbolic dims: their TIR expressions

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

    # -- types and values
    def dim(self, d: int | str) -> Any:
        from tvm import tirx

        if isinstance(d, int):
            return d
        if d in self.derived:
            return self.derived[d]
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

    def present_inputs(self, node: Node, names: Sequence[str]) -> tuple[list[str], list[Any]]:
        """The names (from ``names``, one per input slot) and lowered values of ``node``'s present inputs."""
        present = [i for i, v in enumerate(node.inputs[:len(names)]) if v is not None]
        return [names[i] for i in present], [self.get(node.input(i)) for i in present]

    def emit(self, fn: Callable[..., Any], *args: Any, name: str, attrs: dict[str, Any] | None = None) -> Any:
        """One prim func computing ``fn`` on ``args``; ``attrs`` (e.g. ``kiln.schedule``) go on the func.

        A func with a kiln schedule is marked opaque to TVM's FuseOps, so that it stays whole
        (its epilogue is already fused) and its schedule applies to the compute it was written for.
        """
        if attrs and "kiln.schedule" in attrs:
            attrs = {**attrs, "op_pattern": OPAQUE}
        kwargs = {"primfunc_attrs": attrs} if attrs else {}
        return self.bb.emit_te(fn, *args, primfunc_name_hint=re.sub(r"\W", "_", name), **kwargs)

    # -- the whole graph
    def lower(self) -> Lowered:
        from tvm import relax

        missing = unsupported(self.graph)
        if missing:
            parts = "; ".join(f"{d + '::' if d else ''}{op} (nodes: {', '.join(ns[:3])})" for (d, op), ns in sorted(missing.items()))
            raise CodegenError(f"kiln cannot compile these ops yet: {parts}")
        nodes = needed_nodes(self.graph)
        params = []
        for v in self.graph.inputs:
            var = relax.Var(_ident(v.name), self.tensor_type(v))
            self.env[id(v)] = var
            params.append(var)
        weights: dict[str, np.ndarray] = {}
        graphs = compiled_graphs(self.graph)
        read = {id(v) for g in graphs for n in needed_nodes(g) for v in _reads(n)}
        read |= {id(v) for g in graphs for v in g.outputs}
        for v in (c for g in graphs for c in g.constants.values()):
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
            if any(True for n in nodes for _ in n.subgraphs()):
                # relax.If stands outside dataflow blocks: with control flow, main is one plain binding block
                self.lower_nodes(nodes)
                out = self.bb.emit(self.pack(self.graph.outputs))
            else:
                with self.bb.dataflow():
                    self.lower_nodes(nodes)
                    out = self.bb.emit_output(self.pack(self.graph.outputs))
            self.bb.emit_func_output(out)
        return Lowered(self.bb.finalize(), [v.name for v in self.graph.inputs], weights)

    def lower_nodes(self, nodes: list[Node]) -> None:
        """Emit each node's lowering in the current block and record its outputs."""
        for node in nodes:
            outs = LOWERINGS[(node.domain, node.op_type)](self, node)
            for o, r in zip([o for o in node.outputs if o.name], outs):
                self.env[id(o)] = r
                self.bind_dims(o, r)

    def pack(self, values: list[Value]) -> Any:
        """One value as itself, several as a Relax tuple."""
        from tvm import relax

        results = [self.get(v) for v in values]
        return results[0] if len(results) == 1 else relax.Tuple(results)

    def lower_branch(self, graph: Graph, name: str) -> Any:
        """``graph`` (an If branch) as a call to its own Relax function, which takes the outer values it reads.

        A function of its own, not bindings inside the If: TVM's memory planner (StaticPlanBlockMemory)
        mishandles allocations inside If branches (apache/tvm#17348) and the VM then crashes.
        """
        from tvm import relax

        weights = [c for g in compiled_graphs(graph) for c in g.constants.values()]  # main's parameters
        reads = list({id(v): v for v in outer_reads(graph) + weights
                      if isinstance(self.env.get(id(v)), relax.Var)}.values())
        outer = {id(v): self.env[id(v)] for v in reads}
        params = [relax.Var(_ident(v.name), outer[id(v)].ty) for v in reads]
        self.env.update({id(v): p for v, p in zip(reads, params)})

        def body() -> Any:
            self.lower_nodes(needed_nodes(graph))
            return self.pack(graph.outputs)

        try:
            return self.call_function(name, params, [outer[id(v)] for v in reads], body)
        finally:
            self.env.update(outer)

    def call_function(self, name: str, params: list[Any], args: list[Any], body: Callable[[], Any]) -> Any:
        """Build a Relax function from what ``body`` emits (returning its result); an expression calling it."""
        from tvm import relax

        self.bb._begin_binding_block()
        result = body()
        fn = relax.Function(params, self.bb.normalize(relax.SeqExpr([self.bb._end_block()], result)))
        gv = self.bb.add_func(fn, _ident(name))
        return relax.SeqExpr([], relax.Call(gv, args))


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


def exp_expr(v: Any) -> Any:
    """``exp(v)`` for float32 from vector-friendly arithmetic (Cephes' expf: a degree-6
    polynomial on the reduced argument, scaled by 2^n through the exponent bits).

    LLVM turns ``exp`` into one libm call per lane, which made SiLU epilogues 4x slower than
    the conv they follow; this vectorises. Measured against numpy over [-100, 100]: at most
    1 ulp apart where the result is a normal float; 0 below -87.3, +inf above 88.7.
    """
    from tvm import tirx

    dt = "float32"

    def c(x: float) -> Any:
        return tirx.const(x, dt)

    x = tirx.min(tirx.max(v, c(-87.33654)), c(88.72283))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    r = x - n * c(0.693359375) + n * c(2.12194440e-4)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(k)
    y = p * r * r + r + c(1)
    def pow2(k: Any) -> Any:  # 2^k for |k| <= 64, through the exponent bits
        return tirx.reinterpret(dt, tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))

    ni = n.astype("int32")
    half = tirx.shift_right(ni, tirx.const(1, "int32"))  # 2^n as two factors: each stays a normal float
    big = tirx.Select(v > c(88.72283), c(float("inf")), y * pow2(half) * pow2(ni - half))
    return tirx.Select(v < c(-87.33654), c(0), big)


def _sigmoid_expr(v: Any) -> Any:
    if _expr_dtype(v) != "float32":
        from tvm import tirx

        return tirx.sigmoid(v)
    from tvm import tirx

    one = tirx.const(1, "float32")
    return one / (one + exp_expr(-v))


def _expr_dtype(v: Any) -> str:
    return str(v.ty) if hasattr(v, "ty") else v.dtype  # TIR exprs have .ty; TE tensor reads have .dtype


def activation_expr(v: Any, name: str, params: tuple[float, ...]) -> Any:
    """A kiln epilogue activation (see kiln.ir.kiln_ops) on one TIR scalar ``v``."""
    from tvm import tirx

    dt = _expr_dtype(v)

    def c(x: float) -> Any:
        return tirx.const(x, dt)

    if name == "":
        return v
    if name == "Relu":
        return tirx.max(v, c(0))
    if name == "Clip":
        return tirx.min(tirx.max(v, c(params[0])), c(params[1]))
    if name == "LeakyRelu":
        return tirx.Select(v >= c(0), v, v * c(params[0]))
    if name == "Sigmoid":
        return _sigmoid_expr(v)
    if name == "Tanh":
        return tirx.tanh(v)
    if name == "HardSigmoid":
        return tirx.max(tirx.min(v * c(params[0]) + c(params[1]), c(1)), c(0))
    if name == "HardSwish":
        return v * tirx.max(tirx.min(v / c(6) + c(0.5), c(1)), c(0))
    if name == "SiLU":
        return v * _sigmoid_expr(v)
    if name == "Gelu":
        if params and params[0]:
            k = float(np.sqrt(2 / np.pi))
            return c(0.5) * v * (c(1) + tirx.tanh(c(k) * (v + c(0.044715) * v * v * v)))
        return c(0.5) * v * (c(1) + tirx.erf(v * c(float(1 / np.sqrt(2)))))
    raise CodegenError(f"activation '{name}' has no lowering")


def _activation(x: Any, name: str, params: tuple[float, ...]) -> Any:
    """A kiln epilogue activation on a TE tensor."""
    from tvm import te

    if name == "":
        return x
    return te.compute(x.shape, lambda *i: activation_expr(x(*i), name, params), name=(name or "id").lower())


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
    """Gemm as one ``dense`` reduction and one ``epilogue`` stage (alpha, C, activation)."""
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)

    def compute(a: Any, b: Any, *c: Any) -> Any:
        from tvm import te, tirx

        m = a.shape[1] if trans_a else a.shape[0]
        kdim = a.shape[0] if trans_a else a.shape[1]
        n = b.shape[0] if trans_b else b.shape[1]
        k = te.reduce_axis((0, kdim), name="k")
        dense = te.compute((m, n), lambda i, j: te.sum((a[k, i] if trans_a else a[i, k])
                                                       * (b[j, k] if trans_b else b[k, j]), axis=k), name="dense")
        bias = c[0] if c else None

        def epilogue(i: Any, j: Any) -> Any:
            v = dense[i, j]
            if alpha != 1.0:
                v = v * tirx.const(alpha, a.dtype)
            if bias is not None:
                # C broadcasts to [M, N] from (), [N], [1, N], [M, 1] or [M, N]
                full = [i, j][2 - len(bias.shape):]
                cv = bias[tuple(0 if int(d) == 1 else ix for d, ix in zip(bias.shape, full))]
                v = v + (cv * tirx.const(beta, a.dtype) if beta != 1.0 else cv)
            return activation_expr(v, act, params)

        return te.compute((m, n), epilogue, name="epilogue")

    return compute


def _gemm_attrs(node: Node) -> dict[str, Any]:
    """The dense schedule needs A row-major and B as [K, N] (the layout pass un-transposes constant Bs)."""
    return {"kiln.schedule": "dense"} if not node.attr("transA", 0) and not node.attr("transB", 0) else {}


@lowers("Gemm")
def _gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    return [lw.emit(_gemm_compute(node), *ins, name="gemm", attrs=_gemm_attrs(node))]


@lowers("FusedGemm", domain="kiln")
def _fused_gemm(lw: Lowerer, node: Node) -> list[Any]:
    ins = [lw.get(v) for v in node.inputs if v is not None]
    act = node.attr("activation", "") or ""
    params = tuple(node.attr("activation_params", ()) or ())
    return [lw.emit(_gemm_compute(node, act, params), *ins, name=f"fused_gemm_{act.lower() or 'linear'}",
                    attrs=_gemm_attrs(node))]


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
    x = node.input(0)
    n = len(kernel)
    if n == 3 and kernel[2] == strides[2] == dil[2] == 1 and pads[2] == pads[5] == 0 and x.shape \
            and isinstance(x.shape[-1], int):
        # blocked NCHW[b]c data (the layout pass): a 2-D pool with a window of 1 over the lanes
        kernel, strides, dil, pads = kernel[:2], strides[:2], dil[:2], [pads[0], pads[1], pads[3], pads[4]]
        n, layout = 2, f"NCHW{x.shape[-1]}c"
    else:
        layout = {1: "NCW", 2: "NCHW", 3: "NCDHW"}.get(n, "")
    if n not in (1, 2, 3):
        raise CodegenError(f"node {node.label()}: {n}-D pooling does not compile yet")
    pool = {1: _topi().nn.pool1d, 2: _topi().nn.pool2d, 3: _topi().nn.pool3d}[n]
    kind = "max" if node.op_type == "MaxPool" else "avg"
    include_pad = bool(node.attr("count_include_pad", 0))
    return [lw.emit(lambda t: pool(t, kernel, strides, dil, pads, kind, ceil, layout, include_pad),
                    lw.get(x), name=f"{kind}_pool{n}d")]


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
    if _known_shape(node.outputs[0], lw.derived):
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
    if _known_shape(node.outputs[0], lw.derived):
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


def _known_shape(v: Value, derived: dict[str, Any] | None = None) -> bool:
    """Every dim of ``v`` is an int, a named symbol, or a derived dim the lowerer can express."""
    from kiln.ir import is_unknown_dim

    return v.shape is not None and not any(
        d is None or (is_unknown_dim(d) and d not in (derived or {})) for d in v.shape)


@lowers("Reshape", reads=(0,))
def _reshape(lw: Lowerer, node: Node) -> list[Any]:
    from kiln.ir import is_unknown_dim
    from kiln.ir.shape_rules import shape_value

    out = node.outputs[0]
    if _known_shape(out, lw.derived):
        dims = [lw.dim(d) for d in out.shape]
        return [lw.emit(lambda x: _topi().reshape(x, dims), lw.get(node.input(0)), name=node.op_type.lower())]
    target = shape_value(node.input(1)) if node.op_type == "Reshape" else None
    src_shape = list(node.input(0).shape or [])
    if target is None or target[1] or node.attr("allowzero", 0) or any(
            d is None or (isinstance(d, str) and d not in src_shape and d not in lw.derived
                          and (is_unknown_dim(d) or d not in lw.syms))
            for d in target[0]):
        raise CodegenError(f"node {node.label()}: the output shape {out.type_str()} is not known well enough to compile")
    entries = target[0]

    def reshape(x: Any) -> Any:
        # resolve 0 (copy), -1 (the rest) and dims read from the input's own shape against its
        # actual (symbolic) TE shape; a named input symbol is its TIR variable
        def resolve(i: int, d: Any) -> Any:
            if isinstance(d, str):
                return x.shape[src_shape.index(d)] if d in src_shape else lw.dim(d)
            return x.shape[i] if d == 0 else d

        dims: list[Any] = [resolve(i, d) for i, d in enumerate(entries)]
        if -1 in entries:
            k = entries.index(-1)
            dims[k] = _simplify(_prod(x.shape) // _prod([d for i, d in enumerate(dims) if i != k]))
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
    return _broadcast_batch_matmul(a, b, trans_b)


def _broadcast_batch_matmul(a: Any, b: Any, trans_b: bool) -> Any:
    """``a @ b`` (or ``a @ b^T``) for rank >= 3, broadcasting the batch dims in place.

    A direct compute rather than topi's batch_matmul, which asserts that the contracted dims
    are identical after simplifying each separately, and so refuses equal symbolic dims that
    reached it along different paths (rapidocr rec with a symbolic width).
    """
    from tvm import te

    rank = max(len(a.shape), len(b.shape))
    a_batch = [1] * (rank - len(a.shape)) + list(a.shape[:-2])
    b_batch = [1] * (rank - len(b.shape)) + list(b.shape[:-2])
    batch = _broadcast_dims(a_batch, b_batch)
    n_out = b.shape[-2] if trans_b else b.shape[-1]
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    a_off, b_off = rank - len(a.shape), rank - len(b.shape)

    def pick(idx: tuple, dims: list, off: int) -> list:
        return [0 if _is_one(d) else idx[off + i] for i, d in enumerate(dims[off:])]

    def body(*idx: Any) -> Any:
        i, j = idx[-2], idx[-1]
        ai = pick(idx, a_batch, a_off) + [i, k]
        bi = pick(idx, b_batch, b_off) + ([j, k] if trans_b else [k, j])
        return te.sum(a[tuple(ai)] * b[tuple(bi)], axis=k)

    return te.compute((*batch, a.shape[-2], n_out), body, name="batch_matmul")


def _is_one(d: Any) -> bool:
    return isinstance(d, int) and d == 1 or getattr(d, "value", None) == 1


def _simplify(e: Any) -> Any:
    """A symbolic dim expression in its simplest form (ints pass through)."""
    from tvm.sym import Analyzer  # tvm.arith in older TVM

    return e if isinstance(e, int) else Analyzer().simplify(e)


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
    if a.rank >= 2 and b.rank == 2 and a.dtype == b.dtype and a.dtype is not None and a.dtype.is_float:
        # [..., K] @ [K, N]: the scheduled dense kernel on [M, K], between reshapes that
        # TVM turns into views (RewriteDataflowReshape)
        lead = list(lw.get(a).ty.shape.values)[:-1]
        flat = lw.emit(lambda x: _topi().reshape(x, (_simplify(_prod(x.shape[:-1])), x.shape[-1])), lw.get(a),
                       name="matmul_rows")
        y = lw.emit(_gemm_compute(node), flat, lw.get(b), name="matmul", attrs={"kiln.schedule": "dense"})
        return [lw.emit(lambda t: _topi().reshape(t, (*lead, t.shape[-1])), y, name="matmul_unrows")]

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
from kiln.codegen import (  # noqa: E402,F401
    lower_attention, lower_blocked, lower_control, lower_elementwise, lower_image, lower_nn, lower_reduce, lower_rnn,
    lower_tensor,
)
