"""What ``kiln inspect`` reports about a graph: signature, op histogram, parameters, MACs.

MAC counts are polynomials in the graph's symbolic dims: a Conv whose output is
``[N, 64, H, W]`` costs ``k·N·H·W`` MACs, reported as such rather than guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.ir.core import Graph, Node, Shape, Value
from kiln.ir.kiln_ops import RNN_GATES


class Poly:
    """A polynomial with integer coefficients over dim symbols: ``{(sym, ...): coeff}``."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, ...], int] | None = None):
        self.terms = {k: v for k, v in (terms or {}).items() if v}

    @staticmethod
    def product(dims: Shape) -> Poly:
        coeff, syms = 1, []
        for d in dims:
            if isinstance(d, int):
                coeff *= d
            else:
                syms.append(d)
        return Poly({tuple(sorted(syms)): coeff})

    def __add__(self, other: Poly) -> Poly:
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0) + v
        return Poly(out)

    def __mul__(self, k: int) -> Poly:
        return Poly({s: c * k for s, c in self.terms.items()})

    @property
    def is_constant(self) -> bool:
        return all(not s for s in self.terms)

    def constant(self) -> int:
        return self.terms.get((), 0)

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for syms, c in sorted(self.terms.items(), key=lambda kv: (len(kv[0]), kv[0])):
            factor = "·".join(syms)
            parts.append(human(c) + (f"·{factor}" if factor else ""))
        return " + ".join(parts)

    def to_json(self) -> Any:
        if self.is_constant:
            return self.constant()
        return [{"coeff": c, "dims": list(s)} for s, c in sorted(self.terms.items())]


def human(n: float, unit: str = "") -> str:
    """``1234567`` → ``1.23 M``; keeps small numbers exact."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}".rstrip()
    return f"{n:g}{(' ' + unit) if unit else ''}"


@dataclass
class Summary:
    """Everything ``kiln inspect`` prints."""

    name: str
    producer: str
    ir_version: int | None
    opset: dict[str, int]
    inputs: list[Value]
    outputs: list[Value]
    op_counts: Counter
    num_nodes: int
    num_subgraphs: int
    params: int
    param_bytes: int
    fill_params: int  # weights held as ConstantOfShape fills (counted in params)
    macs: dict[str, Poly]
    #: ops kiln cannot evaluate: import refuses a model that has them
    cannot_evaluate: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    #: ops kiln can evaluate but not compile yet (filled by the caller, which knows the code generator)
    cannot_compile: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def total_macs(self) -> Poly:
        total = Poly()
        for p in self.macs.values():
            total = total + p
        return total

    def to_json(self) -> dict[str, Any]:
        def sig(v: Value) -> dict[str, Any]:
            return {"name": v.name, "dtype": v.dtype.name.lower() if v.dtype else None,
                    "shape": None if v.shape is None else list(v.shape)}

        return {
            "graph": self.name,
            "producer": self.producer,
            "ir_version": self.ir_version,
            "opsets": {d or "ai.onnx": v for d, v in sorted(self.opset.items())},
            "inputs": [sig(v) for v in self.inputs],
            "outputs": [sig(v) for v in self.outputs],
            "nodes": self.num_nodes,
            "subgraphs": self.num_subgraphs,
            "ops": dict(self.op_counts.most_common()),
            "parameters": {"count": self.params, "bytes": self.param_bytes, "constant_of_shape_fills": self.fill_params},
            "macs": {"total": self.total_macs.to_json(), **{k: v.to_json() for k, v in sorted(self.macs.items())}},
            "cannot_evaluate": _op_list(self.cannot_evaluate),
            "cannot_compile": _op_list(self.cannot_compile),
        }

    def format(self) -> str:
        """The human-readable report."""

        def sig(v: Value) -> str:
            return f"    {v.name}: {v.type_str()}"

        lines = [f"graph '{self.name}'" + (f"  (producer: {self.producer})" if self.producer else "")]
        lines.append("  opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opset.items()))
                     + (f"   ir_version {self.ir_version}" if self.ir_version else ""))
        lines.append("  inputs:")
        lines += [sig(v) for v in self.inputs]
        lines.append("  outputs:")
        lines += [sig(v) for v in self.outputs]
        sub = f", {self.num_subgraphs} subgraphs" if self.num_subgraphs else ""
        lines.append(f"  nodes: {self.num_nodes}{sub}")
        width = max((len(op) for op in self.op_counts), default=0)
        for op, n in self.op_counts.most_common():
            lines.append(f"    {op.ljust(width)}  {n}")
        fills = f", {human(self.fill_params)} of them as ConstantOfShape fills" if self.fill_params else ""
        lines.append(f"  parameters: {human(self.params)} ({human(self.param_bytes, 'B')}){fills}")
        lines.append(f"  MACs: {self.total_macs}")
        for op, p in sorted(self.macs.items()):
            lines.append(f"    {op}: {p}")
        for title, ops in (("ops kiln cannot evaluate (import refuses the model)", self.cannot_evaluate),
                           ("ops kiln cannot compile yet (kiln compile refuses the model)", self.cannot_compile)):
            if ops:
                lines.append(f"  {title}:")
                for (d, op), nodes in sorted(ops.items()):
                    lines.append(f"    {d or 'ai.onnx'}::{op}  ({len(nodes)} nodes: {', '.join(nodes[:5])})")
        return "\n".join(lines)


def _op_list(ops: dict[tuple[str, str], list[str]]) -> list[dict[str, Any]]:
    return [{"domain": d or "ai.onnx", "op": op, "nodes": nodes} for (d, op), nodes in sorted(ops.items())]


MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
           "LSTM", "GRU", "RNN")
#: kiln's own ops that multiply and accumulate (fused before layout; blocked or packed after it).
KILN_MAC_OPS = ("FusedConv", "BlockedConv", "BF16BlockedConv", "FusedGemm", "Attention", "QBlockedConv", "QDense",
                "DynQDense", "DynQRecurrence")
#: Where each op's weight (or second operand) is among its inputs.
_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3}


def node_macs(node: Node) -> Poly | None:
    """Multiply-accumulates of one product node (Conv, Gemm, MatMul, their integer and QLinear forms,
    and kiln's fused, blocked and int8 kernels), if its shapes are known.

    Blocked and packed kernels count the padded channels they compute.
    """
    op = node.op_type
    if not (node.domain == "" and op in MAC_OPS or node.domain == "kiln" and op in KILN_MAC_OPS):
        return None
    x, w = node.input(0), node.input(_WEIGHT_INPUT.get(op, 1))
    if x is None or w is None or x.shape is None or w.shape is None or len(x.shape) < 2:
        return None
    if op in ("LSTM", "GRU", "RNN"):  # every step and direction: X [seq, batch, I] by W [D, G*H, I] and R [.., H]
        return Poly.product((*x.shape[:2], *w.shape[:2])) * (_static_product(w.shape[2:]) + w.shape[1] // RNN_GATES[op])
    if op == "DynQRecurrence":  # the hidden-state products alone: XW [seq, batch, ...] by R [D, G*H, H]
        return Poly.product((*x.shape[:2], *w.shape))
    y = node.outputs[0]
    if y.shape is None:
        return None
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
        return Poly.product(y.shape) * _static_product(w.shape[1:])
    if op == "ConvTranspose":
        return Poly.product(x.shape) * _static_product(w.shape[1:])
    if op in ("BlockedConv", "QBlockedConv", "BF16BlockedConv"):  # W is [O/bo, C'/bi, kh, kw, bi, bo] (int8, bf16: more inner axes)
        return Poly.product(y.shape) * _static_product(w.shape[1:-1] if op == "BlockedConv" else
                                                       (w.shape[1], *w.shape[2:4], w.shape[4] * w.shape[6]))
    if op in ("QDense", "DynQDense"):  # W is [N'/16, K/4, 16, 4]; Y is [M, N] (DynQDense: [..., N])
        return Poly.product((*y.shape, w.shape[1] * w.shape[3]))
    if op == "Attention":  # softmax(Q Kt) V: [.., S, D] x [.., D, T], then [.., S, T] x [.., T, Dv]
        v = node.input(2)
        if v is None or v.shape is None:
            return None
        return Poly.product((*x.shape[:-1], w.shape[-1], x.shape[-1])) + Poly.product(
            (*x.shape[:-1], w.shape[-1], v.shape[-1]))
    if op in ("Gemm", "FusedGemm"):
        k = x.shape[0] if node.attr("transA", 0) else x.shape[-1]
        return Poly.product((*y.shape, k))
    # MatMul: the contracted dim is the last of A
    return Poly.product((*y.shape, x.shape[-1]))


def _static_product(dims: Shape) -> int:
    return int(np.prod([d if isinstance(d, int) else 1 for d in dims], dtype=np.int64))


def summarize(graph: Graph, cannot_evaluate: dict[tuple[str, str], list[str]] | None = None) -> Summary:
    """Build the inspect report for ``graph`` (and its subgraphs)."""
    op_counts: Counter = Counter()
    macs: dict[str, Poly] = {}
    params = param_bytes = fills = 0
    nodes = 0
    subgraphs = sum(1 for _ in graph.walk_graphs()) - 1
    for g in graph.walk_graphs():
        for v in g.constants.values():
            assert v.const is not None
            params += v.const.size
            param_bytes += v.const.nbytes
        for n in g.nodes:
            nodes += 1
            op_counts[n.qualified_op] += 1
            m = node_macs(n)
            if m is not None:
                macs[n.op_type] = macs.get(n.op_type, Poly()) + m
            shape = n.input(0)
            if n.op_type == "ConstantOfShape" and shape is not None and shape.is_constant and n.outputs[0].uses:
                count = int(np.prod(shape.numpy(), dtype=np.int64))
                fills += count
                params += count
                dtype = n.outputs[0].dtype
                param_bytes += count * (dtype.itemsize if dtype else 4)
    return Summary(
        name=graph.name, producer=graph.producer, ir_version=graph.ir_version, opset=dict(graph.opset),
        inputs=list(graph.inputs), outputs=list(graph.outputs), op_counts=op_counts, num_nodes=nodes,
        num_subgraphs=subgraphs, params=params, param_bytes=param_bytes, fill_params=fills, macs=macs,
        cannot_evaluate=dict(cannot_evaluate or {}),
    )


def _at_one(p: Poly) -> int:
    """A MAC polynomial with every symbolic dim at 1."""
    return sum(p.terms.values())


def compression_entry(before: Summary, after: Summary) -> dict[str, Any]:
    """The manifest's ``compression`` entry: parameters, weight bytes and MACs before and after, and
    the compression rates (1 - after/before) of bytes and MACs.

    ``before`` is the model as given; ``after`` the graph as compressed, before the layout pass pads
    channels to its blocks. Symbolic MACs are also given as polynomials; their rate is at every
    symbolic dim = 1 (``macs_at`` says so).
    """
    def side(s: Summary) -> dict[str, Any]:
        total = s.total_macs
        return {"params": s.params, "weight_bytes": s.param_bytes, "macs": _at_one(total),
                "macs_poly": str(total)}

    def rate(a: int, b: int) -> float | None:
        return None if not b else round(1.0 - a / b, 4)

    b, a = side(before), side(after)
    symbolic = not (before.total_macs.is_constant and after.total_macs.is_constant)
    return {"before": b, "after": a,
            "rate": {"weight_bytes": rate(a["weight_bytes"], b["weight_bytes"]), "macs": rate(a["macs"], b["macs"]),
                     "params": rate(a["params"], b["params"])},
            "macs_at": "every symbolic dim = 1" if symbolic else "the static shapes"}

