"""Quantization: models already quantized in QDQ form compile to int8 kernels.

onnxruntime's quantizer (``quantize_static``, QDQ format) writes an int8 conv as float math
between QuantizeLinear/DequantizeLinear pairs::

    Q(Conv(DQ(x_q), DQ(w_q), DQ(b_q)), y_scale, y_zp)

``qdq-conv`` reads that back as the one ``QLinearConv`` it stands for, so the conv runs on
integers: the layout pass then blocks it onto the VNNI kernel (``kiln::QBlockedConv``), and
elsewhere it lowers to a plain int32 conv with a requantize. The rewrite is exact when the
bias is quantized with ``x_scale * w_scale`` and zero point 0, which is how the quantizer
writes it; the check refuses anything else with its reason.

The pass runs first in every level, before constant folding would turn ``DQ(w_q)`` into a
float weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from kiln.ir import DType, Graph, Node, Value, infer_shapes
from kiln.passes.manager import Pass, PassResult, register_pass
from kiln.passes.pattern import Const, MatchContext, MatchFailure, Optional, RewriteBuilder, copy_attrs
from kiln.passes.rules import RewriteRule, example_graph, register_rule_set


def _dequantized_input(op, xq, xs, xzp):
    """``DequantizeLinear(xq, xs, xzp)``, which may also feed other layers (two convs, say)."""
    return op.DequantizeLinear(xq, xs, xzp, _name="dq_x", _shared=True)


def _dequantized_weight(op, wq, ws, wzp):
    return op.DequantizeLinear(wq, ws, Optional(wzp), _name="dq_w")


def _dequantized_bias(op, bq, bs, bzp):
    return op.DequantizeLinear(bq, bs, Optional(bzp), _name="dq_b")


def _qdq_conv_pattern(op, xq, xs=Const(), xzp=Const(), wq=Const(), ws=Const(), wzp=Const(), bq=Const(), bs=Const(),
                      bzp=Const(), ys=Const(), yzp=Const()):
    x, w = _dequantized_input(op, xq, xs, xzp), _dequantized_weight(op, wq, ws, wzp)
    b = _dequantized_bias(op, bq, bs, bzp)
    return op.QuantizeLinear(op.Conv(x, w, Optional(b), _name="conv"), ys, yzp, _name="q")


def _scalar(v: Value) -> bool:
    return v.numpy().size == 1


def _qdq_conv_check(ctx: MatchContext, xq: Value, xs: Value, xzp: Value, wq: Value, ws: Value, ys: Value, yzp: Value,
                    dq_x: Node, dq_w: Node, conv: Node, q: Node, wzp: Value | None = None, bq: Value | None = None,
                    bs: Value | None = None, bzp: Value | None = None, dq_b: Node | None = None) -> None:
    if xq.dtype not in (DType.UINT8, DType.INT8) or wq.dtype not in (DType.UINT8, DType.INT8):
        raise MatchFailure(f"activations {xq.dtype}, weights {wq.dtype}: not 8-bit integers")
    if yzp.dtype != xq.dtype:
        raise MatchFailure(f"the conv's input is {xq.dtype} and its output {yzp.dtype}")
    if not (_scalar(xs) and _scalar(xzp) and _scalar(ys) and _scalar(yzp)):
        raise MatchFailure("activation scales and zero points must be per tensor")
    k = wq.shape[0] if wq.shape else 0
    if not _scalar(ws) and (ws.numpy().size != k or dq_w.attr("axis", 1) != 0):
        raise MatchFailure("the weight scale is neither per tensor nor per output channel (axis 0)")
    if any(n.attr(a) not in (None, 1) for n in (dq_x, dq_w, q) for a in ("saturate",)):
        raise MatchFailure("float8 saturation attributes are not int8 quantization")
    if bq is not None:
        if bq.dtype != DType.INT32 or (bzp is not None and np.any(bzp.numpy() != 0)):
            raise MatchFailure("the bias is not int32 with zero point 0")
        want = (xs.numpy().astype(np.float32).reshape(()) * ws.numpy().astype(np.float32).reshape(-1))
        if not np.allclose(bs.numpy().astype(np.float32).reshape(-1) * np.ones_like(want), want, rtol=1e-6, atol=0):
            raise MatchFailure("the bias scale is not x_scale * w_scale")


def _qdq_conv_rewrite(op, xq, xs, xzp, wq, ws, ys, yzp, dq_x, dq_w, conv, q, wzp=None, bq=None, bs=None, bzp=None,
                      dq_b=None):
    if wzp is None:
        wzp = op.constant(np.zeros(1 if _scalar(ws) else ws.numpy().size, wq.dtype.numpy).reshape(ws.numpy().shape),
                          f"{wq.name}_zero_point")
    inputs = [xq, xs, xzp, wq, ws, wzp, ys, yzp] + ([bq] if bq is not None else [])
    return op.QLinearConv(*inputs, **copy_attrs(conv))


def _qdq_conv_example() -> Graph:
    rng = np.random.default_rng(0)

    def build(op, x):  # per-channel weights, a bias, stride 2 and padding, as quantize_static writes them
        xs, xzp = op.constant(np.float32(0.03)), op.constant(np.uint8(128))
        ws = (rng.random(24) * 0.004 + 0.001).astype(np.float32)
        w = op.DequantizeLinear(op.constant(rng.integers(-127, 128, (24, 20, 3, 3)).astype(np.int8)),
                                op.constant(ws), op.constant(np.zeros(24, np.int8)), axis=0)
        b = op.DequantizeLinear(op.constant(rng.integers(-3000, 3000, 24).astype(np.int32)),
                                op.constant(np.float32(0.03) * ws), op.constant(np.zeros(24, np.int32)), axis=0)
        c = op.Conv(op.DequantizeLinear(op.QuantizeLinear(x, xs, xzp), xs, xzp), w, b, pads=[1, 1, 1, 1],
                    strides=[2, 2])
        ys, yzp = op.constant(np.float32(0.05)), op.constant(np.uint8(100))
        return op.DequantizeLinear(op.QuantizeLinear(c, ys, yzp), ys, yzp)

    return example_graph("qdq_conv", {"x": (DType.FLOAT32, (1, 20, 9, 9))}, build, opset=17)


# The example dequantizes the output: the tolerance is one output step (0.05), for products
# that the float and integer forms round to different sides of a half.
QDQ_CONV = RewriteRule(
    "qdq-conv", _qdq_conv_pattern, _qdq_conv_rewrite, check=_qdq_conv_check, example=_qdq_conv_example, rtol=0,
    atol=0.0501, description="Q(Conv(DQ(x), DQ(w), DQ(b))) from a QDQ model is the QLinearConv it stands for: "
                             "the conv runs on integers.")

def _qdq_maxpool_pattern(op, xq, xs=Const(), xzp=Const(), ys=Const(), yzp=Const()):
    x = op.DequantizeLinear(xq, xs, xzp, _name="dq")
    return op.QuantizeLinear(op.MaxPool(x, _name="pool"), ys, yzp, _name="q")


def _qdq_maxpool_check(ctx: MatchContext, xq: Value, xs: Value, xzp: Value, ys: Value, yzp: Value,
                       pool: Node) -> None:
    if xq.dtype not in (DType.UINT8, DType.INT8) or yzp.dtype != xq.dtype:
        raise MatchFailure(f"input {xq.dtype} and output {yzp.dtype} are not the same 8-bit type")
    if not all(_scalar(v) for v in (xs, xzp, ys, yzp)):
        raise MatchFailure("scales and zero points must be per tensor")
    if (xs.numpy().astype(np.float32).reshape(()) != ys.numpy().astype(np.float32).reshape(())
            or xzp.numpy().reshape(()) != yzp.numpy().reshape(()) or float(xs.numpy().reshape(())) <= 0):
        raise MatchFailure("the pool's input and output are quantized differently: it would requantize")
    if len([o for o in pool.outputs if o.name]) > 1:
        raise MatchFailure("the pool's indices output is used")


def _qdq_maxpool_rewrite(op, xq, pool):
    return op.MaxPool(xq, **copy_attrs(pool))


def _qdq_maxpool_example() -> Graph:
    def build(op, x):
        s, z = op.constant(np.float32(0.04)), op.constant(np.uint8(10))
        p = op.MaxPool(op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                       strides=[2, 2])
        return op.DequantizeLinear(op.QuantizeLinear(p, s, z), s, z)

    return example_graph("qdq_maxpool", {"x": (DType.FLOAT32, (1, 5, 9, 9))}, build, opset=17)


# exact: a positive scale keeps the order, so the max of the integers is the integer of the max
QDQ_MAXPOOL = RewriteRule(
    "qdq-maxpool", _qdq_maxpool_pattern, _qdq_maxpool_rewrite, check=_qdq_maxpool_check, example=_qdq_maxpool_example,
    rtol=0, atol=0, description="Q(MaxPool(DQ(x))) with one scale and zero point is MaxPool on the 8-bit values.")

def _qdq_dense_rule(op_type: str) -> RewriteRule:
    """``Gemm/MatMul(DQ(x), DQ(w_q), DQ(b_q)?)`` as ``MatMulInteger`` scaled to float32: integer products."""

    if op_type == "MatMul":
        def pattern(op, xq, xs=Const(), xzp=Const(), wq=Const(), ws=Const(), wzp=Const()):
            return op.MatMul(_dequantized_input(op, xq, xs, xzp), _dequantized_weight(op, wq, ws, wzp), _name="core")
    else:
        def pattern(op, xq, xs=Const(), xzp=Const(), wq=Const(), ws=Const(), wzp=Const(), bq=Const(), bs=Const(),
                    bzp=Const()):
            x, w = _dequantized_input(op, xq, xs, xzp), _dequantized_weight(op, wq, ws, wzp)
            return op.Gemm(x, w, Optional(_dequantized_bias(op, bq, bs, bzp)), _name="core")

    def check(ctx: MatchContext, xq: Value, xs: Value, xzp: Value, wq: Value, ws: Value, dq_w: Node, core: Node,
              wzp: Value | None = None) -> None:
        if xq.dtype not in (DType.UINT8, DType.INT8) or wq.dtype != DType.INT8:
            raise MatchFailure(f"activations {xq.dtype}, weights {wq.dtype}: not 8-bit x int8")
        if xq.shape is None or len(xq.shape) != 2 or wq.shape is None or len(wq.shape) != 2:
            raise MatchFailure("only 2-D inputs and weights are taken")
        if not (_scalar(xs) and _scalar(xzp)):
            raise MatchFailure("the activation scale and zero point must be per tensor")
        if wzp is not None and np.any(wzp.numpy() != 0):
            raise MatchFailure("the weights' zero point is not 0")
        trans_b = op_type == "Gemm" and core.attr("transB", 0)
        if op_type == "Gemm" and (core.attr("transA", 0) or core.attr("alpha", 1.0) != 1.0
                                  or core.attr("beta", 1.0) != 1.0):
            raise MatchFailure("transA, alpha or beta is not the default")
        n = wq.shape[0] if trans_b else wq.shape[1]
        if not _scalar(ws) and (ws.numpy().size != n or dq_w.attr("axis", 1) != (0 if trans_b else 1)):
            raise MatchFailure("the weight scale is neither per tensor nor per output column")

    def rewrite(op, xq, xs, xzp, wq, ws, core, bq=None, bs=None, bzp=None):
        trans_b = op_type == "Gemm" and core.attr("transB", 0)
        w_kn = wq.numpy().T if trans_b else wq.numpy()
        scale = (np.float32(xs.numpy().reshape(())) * ws.numpy().astype(np.float32).reshape(-1)).astype(np.float32)
        y = op.Mul(op.Cast(op.MatMulInteger(xq, op.constant(np.ascontiguousarray(w_kn), f"{wq.name}_kn"), xzp), to=1),
                   op.constant(scale if scale.size > 1 else scale.reshape(()), f"{wq.name}_dense_scale"))
        if bq is not None:  # the float bias DequantizeLinear would compute
            zp = bzp.numpy().astype(np.float32) if bzp is not None else np.float32(0)
            b = ((bq.numpy().astype(np.float32) - zp) * bs.numpy().astype(np.float32)).astype(np.float32)
            y = op.Add(y, op.constant(b, f"{bq.name}_float"))
        return y

    def example() -> Graph:
        rng = np.random.default_rng(1)

        def build(op, x):  # per-column weight scales, a bias, as quantize_static writes a classifier
            xs, xzp = op.constant(np.float32(0.05)), op.constant(np.uint8(10))
            ws = (rng.random(12) * 0.01 + 0.002).astype(np.float32)
            wq = rng.integers(-127, 128, (12, 40) if op_type == "Gemm" else (40, 12)).astype(np.int8)
            w = op.DequantizeLinear(op.constant(wq), op.constant(ws), op.constant(np.zeros(12, np.int8)),
                                    axis=0 if op_type == "Gemm" else 1)
            x_dq = op.DequantizeLinear(op.QuantizeLinear(x, xs, xzp), xs, xzp)
            if op_type == "MatMul":
                return op.MatMul(x_dq, w)
            b = op.DequantizeLinear(op.constant(rng.integers(-500, 500, 12).astype(np.int32)),
                                    op.constant(np.float32(0.05) * ws), op.constant(np.zeros(12, np.int32)), axis=0)
            return op.Gemm(x_dq, w, b, transB=1)

        return example_graph(f"qdq_{op_type.lower()}", {"x": (DType.FLOAT32, (3, 40))}, build, opset=17)

    # the same real number: float32 sums of dequantized products against an exact integer sum
    return RewriteRule(f"qdq-{op_type.lower()}", pattern, rewrite, check=check, example=example, rtol=1e-5,
                       atol=1e-4, description=f"{op_type}(DQ(x), DQ(w)) of a QDQ model multiplies the integers "
                                              "(MatMulInteger) and scales the int32 sums once.")


RULES = [QDQ_CONV, QDQ_MAXPOOL, _qdq_dense_rule("Gemm"), _qdq_dense_rule("MatMul")]

register_rule_set("qdq", RULES)


# =========================================================================== float models: kiln's own quantizer
#
# ``kiln compile --quantize int8`` quantizes a float model itself. The plan is per layer: a
# *layer* is a node that runs on integers when it is enabled, a Conv (its input activations
# and its weights) or a residual Add/Sum (its two inputs). Enabling a layer quantizes the
# tensors it reads; a tensor is quantized once, with one scale and zero point, and every
# reader except a layer kept in float reads the quantized copy. The result is the QDQ form
# that ``qdq-conv`` and the layout pass's int8 rules already turn into VNNI kernels:
#
#   * a Relu between a quantized tensor and its producer is absorbed: uint8 with zero point 0
#     saturates at 0, so ``Q(x)`` is ``Q(Relu(x))``;
#   * tensors joined by layout-transparent ops (MaxPool, Reshape, Transpose, Concat, ...)
#     share one scale, so the op commutes with quantization exactly and chains stay int8;
#   * weights are symmetric int8 (per output channel unless told otherwise), biases int32
#     at ``x_scale * w_scale``: the requantize, bias and activation fold into the kernel.

#: Ops whose output holds exactly the values of their inputs (reordered, or a subset): a
#: quantized tensor keeps its scale through them. AveragePool is not one: it averages.
TRANSPARENT_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                             "Concat", "Slice", "Split", "Pad"})


@dataclass(frozen=True)
class QParams:
    """A per-tensor activation quantization: ``x ~ scale * (q - zero_point)``, q in uint8."""

    scale: float
    zero_point: int

    @staticmethod
    def from_range(lo: float, hi: float, *, symmetric: bool = False) -> QParams:
        """uint8 parameters covering ``[lo, hi]`` (widened to hold 0, so that 0 is exact).

        Asymmetric (the default) spends all 256 levels on the range. Symmetric centres the grid
        on 0: a non-negative tensor gets zero point 0, a signed one zero point 128, which is
        int8's symmetric grid stored offset by 128 so that the u8 x s8 VNNI kernel reads it.
        """
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi - lo <= 0:
            return QParams(1.0, 0)
        if symmetric:
            if lo == 0:
                return QParams(float(np.float32(hi / 255)), 0)
            return QParams(float(np.float32(max(-lo, hi) / 127)), 128)
        scale = float(np.float32((hi - lo) / 255))
        return QParams(scale, int(np.clip(np.round(-lo / scale), 0, 255)))


@dataclass
class QuantLayer:
    """A node that runs on integers when enabled: its name, kind and the activations it reads."""

    name: str
    kind: str  # "conv", "dense" (Gemm or MatMul) or "add"
    node: Node
    inputs: tuple[Value, ...]
    #: The output the layer quantizes itself (after a Relu it feeds alone): set when no layer
    #: reads it (an activation, a pool or a head does), so the layer still ends in uint8.
    output: Value | None = None


def check_int8_conv_attrs(conv: Node) -> None:
    """A Conv's or QLinearConv's attributes suit kiln's VNNI kernel; else MatchFailure says why not."""
    if conv.attr("group", 1) != 1:
        raise MatchFailure("grouped convs have no int8 kernel yet")
    if any(d != 1 for d in conv.attr("dilations", ()) or ()):
        raise MatchFailure("dilated convs have no int8 kernel yet")
    if conv.attr("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise MatchFailure("the conv uses auto_pad")


def check_int8_conv(conv: Node) -> None:
    """kiln's VNNI kernel can run this Conv; else MatchFailure says why not."""
    w = conv.input(1)
    x = conv.input(0)
    if w is None or not w.is_constant:
        raise MatchFailure("its weight is not a constant")
    if w.shape is None or len(w.shape) != 4 or x is None or x.shape is None or len(x.shape) != 4:
        raise MatchFailure("only 2-D convs have an int8 kernel")
    check_int8_conv_attrs(conv)
    b = conv.input(2)
    if b is not None and not b.is_constant:
        raise MatchFailure("its bias is not a constant")


def check_int8_dense(node: Node) -> None:
    """A Gemm or MatMul can run as kiln's int8 dense kernel; else MatchFailure says why not."""
    x, w = node.input(0), node.input(1)
    if w is None or not w.is_constant or w.shape is None or len(w.shape) != 2:
        raise MatchFailure("its weight is not a constant matrix")
    if x is None or x.shape is None or len(x.shape) != 2:
        raise MatchFailure("only 2-D inputs have an int8 dense kernel")
    if node.op_type == "Gemm":
        if node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
            raise MatchFailure("transA, alpha or beta is not the default")
        b = node.input(2)
        n = w.shape[0] if node.attr("transB", 0) else w.shape[1]
        if b is not None and (not b.is_constant or b.numpy().size not in (1, n) or b.numpy().ndim > 1):
            raise MatchFailure("its bias is not a constant vector")
    k = w.shape[1] if node.op_type == "Gemm" and node.attr("transB", 0) else w.shape[0]
    if k % 4:
        raise MatchFailure(f"its reduction ({k}) is not a multiple of 4")


def _passes(check: Callable[[Node], None], node: Node) -> bool:
    """Whether ``check(node)`` holds (raises no MatchFailure)."""
    try:
        check(node)
    except MatchFailure:
        return False
    return True


def _dense_axis(node: Node) -> int:
    """The weight axis of a Gemm's or MatMul's output columns."""
    return 0 if node.op_type == "Gemm" and node.attr("transB", 0) else 1


def quantizable_layers(graph: Graph) -> list[QuantLayer]:
    """The layers of ``graph`` that kiln can run in int8, in graph order.

    Convs that the VNNI kernel takes, and residual Adds/Sums of two float tensors of one
    shape of which at least one is a quantizable conv's output (possibly through a Relu):
    quantizing those lets the add run in the conv's write-back.
    """
    layers: list[QuantLayer] = []
    conv_outputs: set[int] = set()
    for n in graph.nodes:
        if n.domain or n.op_type not in ("Conv", "Add", "Sum", "Gemm", "MatMul"):
            continue
        if n.op_type in ("Gemm", "MatMul"):
            if _passes(check_int8_dense, n) and n.inputs[0].dtype == DType.FLOAT32:
                layers.append(QuantLayer(n.name, "dense", n, (n.inputs[0],)))
            continue
        if n.op_type == "Conv":
            if _passes(check_int8_conv, n) and n.inputs[0].dtype == DType.FLOAT32:
                layers.append(QuantLayer(n.name, "conv", n, (n.inputs[0],)))
                conv_outputs.add(id(_through_relu(n.outputs[0])))
            continue
        ins = [v for v in n.inputs if v is not None]
        if (len(ins) == 2 and all(v.dtype == DType.FLOAT32 and v.shape is not None and len(v.shape) == 4 for v in ins)
                and ins[0].shape == ins[1].shape and any(id(v) in conv_outputs for v in ins)):
            layers.append(QuantLayer(n.name, "add", n, tuple(ins)))
    nodes = {id(ly.node) for ly in layers}
    for ly in layers:
        if ly.kind == "dense":
            continue  # the int8 dense kernel ends in float32
        out = _through_relu(ly.node.outputs[0])
        if out.uses and not out.is_graph_output and not any(id(u.node) in nodes for u in out.uses):
            ly.output = out
    return layers


def _through_relu(v: Value) -> Value:
    """``Relu(v)`` when that Relu is v's only reader, else ``v``."""
    users = v.users
    if len(users) == 1 and users[0].op_type == "Relu" and not users[0].domain and not v.is_graph_output:
        return users[0].outputs[0]
    return v


class _Groups:
    """Union-find over tensors that must share a scale (joined by layout-transparent ops)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.values: dict[int, Value] = {}

    def find(self, v: Value) -> int:
        k = id(v)
        self.values.setdefault(k, v)
        self.parent.setdefault(k, k)
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: Value, b: Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def members(self, v: Value) -> list[Value]:
        root = self.find(v)
        return [self.values[k] for k in list(self.parent) if self.find(self.values[k]) == root]


def _transparent_groups(graph: Graph, seeds: list[Value]) -> _Groups:
    """Tensors connected to ``seeds`` through layout-transparent float ops."""
    groups = _Groups()
    for n in graph.nodes:
        if n.domain or n.op_type not in TRANSPARENT_OPS:
            continue
        data = [n.inputs[0]] if n.op_type != "Concat" else [v for v in n.inputs if v is not None]
        outs = [o for o in n.outputs if o.name]
        if n.op_type == "MaxPool" and len(outs) > 1:
            continue  # the indices output is not data
        if any(v is None or v.dtype != DType.FLOAT32 for v in [*data, *outs]):
            continue
        for v in [*data, *outs]:
            groups.union(data[0], v)
    for v in seeds:
        groups.find(v)
    return groups


def quantized_tensors(graph: Graph, layers: list[QuantLayer], readers: list[QuantLayer] = ()) -> list[Value]:
    """Every tensor that quantizing ``layers`` quantizes, in graph order: the layers' inputs and
    own outputs, the inputs of ``readers`` (float layers that read quantized inputs), and the
    tensors that share their scale through layout-transparent ops."""
    seeds = [v for layer in layers for v in (*layer.inputs, *([layer.output] if layer.output else []))]
    seeds += [v for layer in readers for v in layer.inputs]
    groups = _transparent_groups(graph, seeds)
    roots = {groups.find(v) for v in seeds}
    chosen = {id(v): v for v in seeds}
    for k, v in groups.values.items():
        if groups.find(v) in roots:
            chosen[k] = v
    order = {id(v): i for i, v in enumerate([*graph.inputs, *(o for n in graph.nodes for o in n.outputs)])}
    return sorted(chosen.values(), key=lambda v: order.get(id(v), -1))


def scale_groups(graph: Graph, tensors: list[Value]) -> dict[str, list[str]]:
    """Tensor name -> the names of the quantized tensors that must share its scale."""
    groups = _transparent_groups(graph, tensors)
    names = {id(v) for v in tensors}
    return {v.name: [m.name for m in groups.members(v) if id(m) in names] for v in tensors}


#: The int32 bias may use this much of its range: the kernel adds ``-x_zp * sum(w)`` (at most
#: 255 * 127 per reduction element) to it, and 2**30 leaves room for reductions up to 33,000.
BIAS_LIMIT = 2**30


def weight_quantization(w: np.ndarray, *, per_channel: bool = True, bias: np.ndarray | None = None,
                        x_scale: float | None = None, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights in [-127, 127] and their scales (per output channel, or one).

    With ``bias`` and ``x_scale``, a scale is raised where the bias would not fit int32 at
    ``x_scale * w_scale`` (a channel of near-zero weights with a large bias, as after folding a
    BatchNorm): that channel's weights get coarser instead of its bias overflowing.
    """
    if axis:
        q, scale = weight_quantization(np.moveaxis(np.asarray(w), axis, 0), per_channel=per_channel, bias=bias,
                                       x_scale=x_scale)
        return np.ascontiguousarray(np.moveaxis(q, 0, axis)), scale
    w = np.asarray(w, np.float32)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    if bias is not None and x_scale:
        need = np.abs(np.asarray(bias, np.float64)) / (float(x_scale) * BIAS_LIMIT)
        scale = np.maximum(scale, (need if per_channel else need.max(keepdims=True)).astype(np.float32))
    shaped = scale.reshape(-1, *([1] * (w.ndim - 1))) if per_channel else scale.reshape(())
    q = np.clip(np.round(w / shaped), -127, 127).astype(np.int8)
    return q, scale if per_channel else scale.reshape(())


def bias_quantization(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An int32 bias at scale ``x_scale * w_scale`` (zero point 0), as the int8 conv adds it."""
    scale = (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)  # w_scale's shape
    q = np.clip(np.round(np.asarray(b, np.float64) / scale), -BIAS_LIMIT, BIAS_LIMIT).astype(np.int32)
    return q, scale


@dataclass
class Quantize(Pass):
    """Quantize a float model's layers to int8 from calibrated ranges (see ``kiln.calibrate``).

    ``ranges`` maps tensor names to their calibrated ``(min, max)``; ``layers`` names the
    layers to quantize (None: every quantizable layer); ``keep_float`` names layers to leave
    in float. A tensor without a range is left in float, with the layers that read it.
    """

    name: ClassVar[str] = "quantize"
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_channel: bool = True
    symmetric: bool = False
    keep_float: frozenset[str] = frozenset()
    params: dict[str, QParams] = field(default_factory=dict, init=False)  # what the last run chose
    int8_layers: list[str] = field(default_factory=list, init=False)  # the layers the last run quantized

    def plan(self, graph: Graph) -> tuple[list[QuantLayer], dict[str, QParams]]:
        """The enabled layers and each quantized tensor's parameters (groups share the union range).

        A conv whose output ends up unquantized (a graph output, or read only by layers kept in
        float) is left in float too: without a requantize it has no int8 kernel, and quantizing
        only its weights would cost accuracy for nothing.
        """
        readers = [ly for ly in quantizable_layers(graph) if ly.name not in self.keep_float
                   and all(v.name in self.ranges for v in ly.inputs)]
        layers = readers
        while True:
            # a conv left float this way still reads its inputs quantized: their producers stay int8
            enabled, params = self._params_for(graph, layers, [ly for ly in readers if ly not in layers])
            kept = [ly for ly in enabled if ly.kind != "conv" or _through_relu(ly.node.outputs[0]).name in params]
            if len(kept) == len(layers):
                return kept, params
            layers = kept

    def _params_for(self, graph: Graph, layers: list[QuantLayer],
                    readers: list[QuantLayer]) -> tuple[list[QuantLayer], dict[str, QParams]]:
        tensors = quantized_tensors(graph, layers, readers)
        groups = scale_groups(graph, tensors)
        params: dict[str, QParams] = {}
        for v in tensors:
            names = [n for n in groups[v.name] if n in self.ranges] or [v.name]
            if not any(n in self.ranges for n in names):
                continue
            lo = min(self.ranges[n][0] for n in names if n in self.ranges)
            hi = max(self.ranges[n][1] for n in names if n in self.ranges)
            params[v.name] = QParams.from_range(lo, hi, symmetric=self.symmetric)
        layers = [ly for ly in layers if all(v.name in params for v in ly.inputs)]
        return layers, params

    def run(self, graph: Graph) -> PassResult:
        if not self.ranges:
            return PassResult.of(graph, 0)
        if graph.model_opset.get("", 0) < 13:
            raise ValueError(f"quantize needs ai.onnx opset 13 or later (per-axis QuantizeLinear); the model has "
                             f"{graph.model_opset.get('', 0)}")
        layers, params = self.plan(graph)
        self.params, self.int8_layers = params, [ly.name for ly in layers]
        float_readers = {id(n) for n in graph.nodes if n.name in self.keep_float}
        values = {v.name: v for v in graph.values()}
        for name, p in params.items():
            _insert_qdq(graph, values[name], p, float_readers)
        for ly in layers:
            if ly.kind in ("conv", "dense"):
                self._quantize_weights(graph, ly.node, params[ly.inputs[0].name])
        graph.sort()
        infer_shapes(graph)
        return PassResult.of(graph, len(params) + len(layers), {"quantized-tensors": len(params),
                                                                "int8-layers": len(layers)})

    def _quantize_weights(self, graph: Graph, node: Node, x: QParams) -> None:
        """A conv's or dense layer's weights as DQ(int8), its bias as DQ(int32)."""
        op = RewriteBuilder(graph, node)
        w, b = node.input(1), node.input(2)
        channel = _dense_axis(node) if node.op_type in ("Gemm", "MatMul") else 0
        wq, ws = weight_quantization(w.numpy(), per_channel=self.per_channel,
                                     bias=b.numpy() if b is not None else None, x_scale=x.scale, axis=channel)
        axis = {"axis": channel} if self.per_channel else {}
        node.set_input(1, op.DequantizeLinear(op.constant(wq, f"{w.name}_int8"), op.constant(ws, f"{w.name}_scale"),
                                              op.constant(np.zeros(ws.shape, np.int8), f"{w.name}_zero_point"), **axis))
        if b is not None:
            bq, bs = bias_quantization(b.numpy(), x.scale, ws)
            node.set_input(2, op.DequantizeLinear(op.constant(bq, f"{b.name}_int32"), op.constant(bs, f"{b.name}_scale"),
                                                  op.constant(np.zeros(bs.shape, np.int32), f"{b.name}_zero_point"),
                                                  **({"axis": 0} if self.per_channel else {})))


def _insert_qdq(graph: Graph, v: Value, p: QParams, float_readers: set[int]) -> Value:
    """``DQ(Q(v))`` read by all of v's readers but the float-kept layers; a Relu that only clips
    what uint8 with zero point 0 clips anyway is bypassed."""
    source = v
    producer = v.producer
    if (p.zero_point == 0 and producer is not None and producer.op_type == "Relu" and not producer.domain
            and len(producer.inputs[0].uses) == 1 and not producer.inputs[0].is_graph_output
            and not producer.inputs[0].is_graph_input):
        source = producer.inputs[0]
    readers = [u for u in v.uses if id(u.node) not in float_readers]
    if not readers:
        return v
    first = {id(u.node) for u in readers}
    anchor = next(n for n in graph.nodes if id(n) in first)
    op = RewriteBuilder(graph, anchor)
    s, z = op.constant(np.float32(p.scale), f"{v.name}_scale"), op.constant(np.uint8(p.zero_point), f"{v.name}_zero_point")
    dq = op.DequantizeLinear(op.QuantizeLinear(source, s, z, _name=f"{v.name}_quantize"), s, z,
                             _name=f"{v.name}_dequantize")
    for use in readers:
        use.node.set_input(use.index, dq)
    return dq


register_pass(Quantize)


def fake_quant_model(graph: Graph, layers: list[QuantLayer], params: dict[str, QParams], *,
                     per_channel: bool = True) -> tuple[Graph, str]:
    """A float copy of ``graph`` in which each layer's int8 arithmetic is simulated behind a mask.

    The copy takes one more input, ``kiln_layer_mask`` (float32, one entry per layer): where
    entry i is 1, layer i reads its activations through ``DQ(Q(x))`` with the parameters the
    quantize pass would use, a conv uses its dequantized int8 weights and int32 bias, and an
    output the layer quantizes itself goes through ``DQ(Q(y))``.
    One compile of this model measures any set of layers in int8 (sensitivity, budgets);
    a conv computes both weight versions, so it runs at about twice the float cost.
    """

    g = graph.clone()
    by_name = {n.name: n for n in g.nodes}
    conv_out: dict[str, Value] = {}  # a conv's output name -> its gated value
    mask = g.add_input(g.fresh_name("kiln_layer_mask"), DType.FLOAT32, (len(layers),))
    op = RewriteBuilder(g, None)

    def bit(i: int) -> Value:
        return op.Greater(op.Gather(mask, op.constant(np.int64(i), f"mask_index_{i}"), axis=0),
                          op.constant(np.float32(0.5), "half"))

    def fake_quant(on: Value, v: Value, p: QParams, name: str) -> Value:
        s, z = op.constant(np.float32(p.scale), f"{name}_scale"), op.constant(np.uint8(p.zero_point), f"{name}_zp")
        return op.Where(on, op.DequantizeLinear(op.QuantizeLinear(v, s, z), s, z), v)

    def gate_readers(gated: Value, readers: list) -> None:
        for use in readers:
            use.node.set_input(use.index, gated)

    for i, layer in enumerate(layers):
        node = by_name[layer.name]
        op._anchor = node
        on = bit(i)
        for k, original in enumerate(layer.inputs):  # by position: an earlier layer may have gated the value
            node.set_input(k, fake_quant(on, node.input(k), params[original.name], original.name))
        if layer.kind == "add":
            continue
        w, b = node.input(1), node.input(2)
        channel = _dense_axis(node) if layer.kind == "dense" else 0
        wq, ws = weight_quantization(w.numpy(), per_channel=per_channel, bias=b.numpy() if b is not None else None,
                                     x_scale=params[layer.inputs[0].name].scale, axis=channel)
        shaped = np.expand_dims(ws, [d for d in range(w.numpy().ndim) if d != channel]) if per_channel else ws
        inputs = [node.input(0), op.constant((wq.astype(np.float32) * shaped).astype(np.float32), f"{w.name}_fq")]
        if b is not None:
            bq, bs = bias_quantization(b.numpy(), params[layer.inputs[0].name].scale, ws)
            inputs.append(op.constant((bq.astype(np.float64) * bs).astype(np.float32), f"{b.name}_fq"))
        y = node.outputs[0]
        readers = list(y.uses)
        gated = conv_out[y.name] = op.Where(on, getattr(op, node.op_type)(*inputs, **copy_attrs(node)), y)
        gate_readers(gated, readers)
        if y.is_graph_output:  # the output keeps its name
            name = y.name
            g.rename_value(y, g.fresh_name(f"{name}_float"))
            g.rename_value(gated, name)
            g.outputs = [gated if v is y else v for v in g.outputs]
    values = {v.name: v for v in g.values()}
    for i, layer in enumerate(layers):  # the outputs layers quantize themselves, behind the same mask
        if layer.output is None or layer.output.name not in params:
            continue
        v = conv_out.get(layer.output.name) or values[layer.output.name]
        readers = list(v.uses)
        op._anchor = readers[0].node
        gate_readers(fake_quant(bit(i), v, params[layer.output.name], layer.output.name), readers)
    g.sort()
    infer_shapes(g)
    return g, mask.name


# =========================================================================== dynamic int8


def dynamic_weight_quantization(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``w [K, N]`` as symmetric int8 per output column with ``bits`` of magnitude (8: [-127, 127];
    7: [-63, 63], what AVX2's ``vpmaddubsw`` multiplies exactly); the weights and their scales ``[N]``."""
    top = float(2 ** (bits - 1) - 1)
    amax = np.abs(w.astype(np.float32)).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(top), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -top, top).astype(np.int8)
    return q, scale


def dynamic_dense_reason(node: Node) -> str | None:
    """Why ``node`` (MatMul or Gemm) cannot run as a dynamic int8 dense layer, or None if it can."""
    if node.op_type == "Gemm":
        if node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
            return "a Gemm with transA, alpha or beta"
        if node.input(2) is not None and not node.input(2).is_constant:
            return "its bias is not a constant"
    x, w = node.input(0), node.input(1)
    if w is None or not w.is_constant or w.shape is None or len(w.shape) != 2:
        return "its weights are not a 2-D constant (an activation x activation product)"
    if x is None or x.dtype != DType.FLOAT32 or x.rank is None or x.rank < 2:
        return "its input is not float32 of rank 2 or more"
    k = w.shape[1] if node.op_type == "Gemm" and node.attr("transB", 0) else w.shape[0]
    if k % 4:
        return f"its reduction ({k}) is not a multiple of 4"
    return None


#: the recurrent ops whose weight products ``quantize-dynamic`` puts in int8
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


def dynamic_recurrent_reason(node: Node) -> str | None:
    """Why ``node`` (LSTM, GRU or RNN) cannot run with dynamic int8 products, or None if it can."""
    from kiln.ir.kiln_ops import rnn_activations

    w, r, b = node.input(1), node.input(2), node.input(3)
    if w is None or r is None or not (w.is_constant and r.is_constant) or len(w.shape) != 3 or len(r.shape) != 3:
        return "its W and R are not 3-D constants"
    if b is not None and not b.is_constant:
        return "its bias is not a constant"
    x = node.input(0)
    if x is None or x.dtype != DType.FLOAT32 or (x.rank is not None and x.rank != 3):
        return f"its input is {'absent' if x is None else x.type_str()}, not float32 of rank 3"
    if w.shape[-1] % 4:
        return f"its input width ({w.shape[-1]}) is not a multiple of 4"
    dirs = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    try:
        rnn_activations(node.op_type, dirs, node.attr("activations", ()) or (), node.attr("activation_alpha", ()) or (),
                        node.attr("activation_beta", ()) or ())
    except ValueError as e:
        return str(e)
    return None


def _replace_outputs(graph: Graph, node: Node, new: list[Value]) -> None:
    """``node``'s outputs replaced by ``new`` (by position) and the node removed; graph outputs keep their names."""
    pairs = [(old, v, old.name) for old, v in zip(node.outputs, new)]
    for old, v, _ in pairs:
        old.replace_all_uses_with(v)
    graph.remove_node(node)
    for _, v, name in pairs:
        if v in graph.outputs:
            graph.rename_value(v, name)


@register_pass
@dataclass
class QuantizeDynamic(Pass):
    """Dense layers with constant weights as onnxruntime's dynamic int8 form: the input quantized per
    call (DynamicQuantizeLinear), int8 weights per output column, MatMulInteger, and the two scales.
    The layout pass turns each into ``kiln::DynQDense``. ``weight_bits`` is 7 for CPUs without VNNI.
    An LSTM, GRU or RNN with constant weights becomes such a dense layer for its input projection and a
    ``kiln::DynQRecurrence`` that quantizes its hidden state at every step."""

    name: ClassVar[str] = "quantize-dynamic"
    weight_bits: int = 8
    #: an LSTM's, GRU's or RNN's weights (input projection and hidden-state products): 8 bits on every CPU,
    #: since their error compounds over the steps (silero-vad's speech probabilities drift 0.03 with 7-bit
    #: projections); without VNNI the projection runs on the exact 8-bit AVX2 kernel, and the hidden-state
    #: products multiply in int32. 7 matches a model onnxruntime quantized with reduce_range
    recurrent_weight_bits: int = 8
    layers: list[str] = field(default_factory=list, init=False)  # the layers the last run quantized
    kept_float: dict[str, str] = field(default_factory=dict, init=False)  # layer -> why it stayed float

    def run(self, graph: Graph) -> PassResult:
        self.layers, self.kept_float = [], {}
        changed = 0
        for g in list(graph.walk_graphs()):  # If branches too (silero-vad's LSTMs live in them)
            for node in list(g.nodes):
                if node.domain or node.op_type not in ("MatMul", "Gemm", *RECURRENT_OPS):
                    continue
                recurrent = node.op_type in RECURRENT_OPS
                reason = (dynamic_recurrent_reason if recurrent else dynamic_dense_reason)(node)
                if reason:
                    if node.input(1) is not None and node.input(1).is_constant:
                        self.kept_float[node.name] = reason
                    continue
                (self._rewrite_recurrent if recurrent else self._rewrite)(g, node)
                self.layers.append(node.name)
                changed += 1
        if changed:
            infer_shapes(graph)
        return PassResult.of(graph, changed, {"dense-dynamic-int8": changed} if changed else {})

    def _dense(self, op: RewriteBuilder, x: Value, w_kn: np.ndarray, name: str, bias: Value | None,
               bits: int) -> Value:
        """``x · w_kn (+ bias)`` in the dynamic form, ``w_kn [K, N]`` quantized per column to ``bits``; its output."""
        q, scale = dynamic_weight_quantization(w_kn, bits)
        xq, xs, xzp = op.DynamicQuantizeLinear(x, _outputs=3)
        acc = op.MatMulInteger(xq, op.constant(q, f"{name}_quantized"), xzp,
                               op.constant(np.zeros(q.shape[1], np.int8), f"{name}_zero_point"))
        y = op.Mul(op.Cast(acc, to=1), op.Mul(xs, op.constant(scale, f"{name}_scale")))
        return y if bias is None else op.Add(y, bias)

    def _rewrite(self, graph: Graph, node: Node) -> None:
        w = node.input(1).numpy()
        if node.op_type == "Gemm" and node.attr("transB", 0):
            w = w.T
        op = RewriteBuilder(graph, anchor=node)
        bias = node.input(2) if node.op_type == "Gemm" else None
        _replace_outputs(graph, node, [self._dense(op, node.input(0), w, node.input(1).name, bias, self.weight_bits)])

    def _rewrite_recurrent(self, graph: Graph, node: Node) -> None:
        """An LSTM, GRU or RNN as its input projection (a dynamic dense layer over every step and direction)
        and a ``kiln::DynQRecurrence`` whose hidden-state products are int8; both ``recurrent_weight_bits``."""
        kind = node.op_type
        w, r = node.input(1).numpy().astype(np.float32), node.input(2).numpy().astype(np.float32)
        dirs, gh, _ = w.shape
        hidden = r.shape[-1]
        op = RewriteBuilder(graph, anchor=node)
        b = node.input(3)
        lbr = kind == "GRU" and bool(node.attr("linear_before_reset", 0))
        bias = None
        if b is not None:
            bv = b.numpy().astype(np.float32)
            rb = bv[:, gh:].copy()
            if lbr:  # the h gate's Rb multiplies by r inside the recurrence
                rb[:, 2 * hidden:] = 0
            bias = op.constant((bv[:, :gh] + rb).reshape(-1), f"{b.name}_projection")
        xw = self._dense(op, node.input(0), w.reshape(dirs * gh, -1).T, node.input(1).name, bias,
                         self.recurrent_weight_bits)
        q, scale = dynamic_weight_quantization(r.reshape(dirs * gh, hidden).T, self.recurrent_weight_bits)
        inputs = [xw, op.constant(np.ascontiguousarray(q.T.reshape(dirs, gh, hidden)), f"{node.input(2).name}_quantized"),
                  op.constant(scale.reshape(dirs, gh), f"{node.input(2).name}_scale"), b if lbr else None,
                  node.input(4), node.input(5), *((node.input(6), node.input(7)) if kind == "LSTM" else ())]
        while inputs[-1] is None:
            inputs.pop()
        attrs = {k: node.attr(k) for k in ("direction", "activations", "activation_alpha", "activation_beta", "clip",
                                            "layout", "input_forget", "linear_before_reset")
                 if node.attr(k) is not None}
        outs = op.kiln.DynQRecurrence(*inputs, op=kind, hidden_size=hidden, _outputs=len(node.outputs), **attrs)
        _replace_outputs(graph, node, list(outs) if len(node.outputs) > 1 else [outs])
