"""onnxruntime's contrib ops that kiln imports as its own, rewritten in the ONNX proto before import.

``com.microsoft::DynamicQuantizeLSTM`` (what onnxruntime's ``quantize_dynamic`` writes for an LSTM whose
weights are initializers) becomes the form kiln's own ``quantize-dynamic`` pass writes:

- the input projection as DynamicQuantizeLinear, MatMulInteger by the int8 W of every direction side by
  side, Cast, the two scales and the bias ``Wb + Rb``: the layout pass puts it on a DynQDense kernel;
- ``kiln::DynQRecurrence`` for the time loop, with R as int8 ``[dirs, 4H, H]`` and its scale per gate row.

With one batch row the numbers are onnxruntime's. With more, kiln quantizes the hidden state per row,
where onnxruntime quantizes it over the rows one of its threads takes.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from kiln.ir.proto import walk_nodes

CONTRIB_DOMAIN = "com.microsoft"
_LSTM_ATTRS = ("activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
               "input_forget")


def import_contrib_ops(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """``model`` with every contrib op kiln knows rewritten (the proto is copied only if one is found), and why
    each one that stays (and so is an unsupported op) could not be."""
    if not any(n.domain == CONTRIB_DOMAIN and n.op_type == "DynamicQuantizeLSTM" for n in walk_nodes(model.graph)):
        return model, []
    out = ModelProto()
    out.CopyFrom(model)
    refused: list[str] = []
    _rewrite_graph(out.graph, {}, refused)
    if not any(o.domain == "kiln" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("kiln", 1))
    return out, refused


class _Refused(Exception):
    """Why a contrib node stays as it is."""


def _rewrite_graph(g: GraphProto, outer: dict[str, TensorProto], refused: list[str]) -> None:
    inits = {**outer, **{t.name: t for t in g.initializer}}
    nodes: list[NodeProto] = []
    replaced: set[str] = set()
    for n in g.node:
        for a in n.attribute:
            if a.g.node:
                _rewrite_graph(a.g, inits, refused)
            for sg in a.graphs:
                _rewrite_graph(sg, inits, refused)
        if n.domain == CONTRIB_DOMAIN and n.op_type == "DynamicQuantizeLSTM":
            try:
                new_nodes, new_inits = _dynamic_quantize_lstm(n, inits, len(nodes))
            except _Refused as e:
                refused.append(f"{n.name or f'#{len(nodes)}'}: {e}")
                nodes.append(n)
                continue
            nodes.extend(new_nodes)
            g.initializer.extend(new_inits)
            replaced.update(x for x in n.input if x)
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    read = {x for m in walk_nodes(g) for x in m.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name not in replaced or t.name in read]  # the old W, R and scales go
    del g.initializer[:]
    g.initializer.extend(kept)


def _dynamic_quantize_lstm(n: NodeProto, inits: dict[str, TensorProto],
                           index: int) -> tuple[list[NodeProto], list[TensorProto]]:
    """One DynamicQuantizeLSTM as the projection's nodes and a kiln::DynQRecurrence, with their constants;
    :class:`_Refused` says why not."""
    ins = list(n.input) + [""] * (12 - len(n.input))

    def const(i: int, what: str) -> np.ndarray:
        if ins[i] not in inits:
            raise _Refused(f"its {what} must be an initializer for kiln to import it")
        return numpy_helper.to_array(inits[ins[i]])

    w, r = const(1, "W"), const(2, "R")  # [D, I, 4H], [D, H, 4H]
    dirs, width, gh = w.shape
    hidden = r.shape[1]
    ws, rs = (np.broadcast_to(const(i, what).astype(np.float32).reshape(dirs, -1), (dirs, gh))
              for i, what in ((8, "W_scale"), (10, "R_scale")))
    wz, rz = (np.broadcast_to(const(i, what).reshape(dirs, -1), (dirs, gh)).astype(np.int32)
              for i, what in ((9, "W_zero_point"), (11, "R_zero_point")))
    # R centred on its zero point must be int8 for kiln's recurrence (onnxruntime's uint8 weights have 128)
    r_centred = r.astype(np.int32) - rz[:, None, :]
    if r_centred.min() < -128 or r_centred.max() > 127:
        raise _Refused("its R less its zero point leaves int8's range; kiln's recurrence takes int8 weights")
    base = n.name or f"dqlstm{index}"

    def name(s: str) -> str:
        return f"{base}/{s}"

    tensors = {
        "w": w.transpose(1, 0, 2).reshape(width, dirs * gh),  # [I, D*4H]: each direction's gate columns in turn
        "w_zero_point": wz.reshape(-1).astype(w.dtype),
        "w_scale": np.ascontiguousarray(ws.reshape(-1)),
        "r": np.ascontiguousarray(r_centred.transpose(0, 2, 1).astype(np.int8)),  # [D, 4H, H]
        "r_scale": np.ascontiguousarray(rs),
    }
    out_inits = [numpy_helper.from_array(np.ascontiguousarray(v), name(k)) for k, v in tensors.items()]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [ins[0]], [name("xq"), name("xs"), name("xzp")]),
        helper.make_node("MatMulInteger", [name("xq"), name("w"), name("xzp"), name("w_zero_point")],
                         [name("acc")]),
        helper.make_node("Cast", [name("acc")], [name("accf")], to=TensorProto.FLOAT),
        helper.make_node("Mul", [name("xs"), name("w_scale")], [name("scale")]),
        helper.make_node("Mul", [name("accf"), name("scale")], [name("xw")]),
    ]
    xw = name("xw")
    if ins[3]:
        b = const(3, "B").astype(np.float32)  # [D, 8H]: Wb then Rb
        out_inits.append(numpy_helper.from_array((b[:, :gh] + b[:, gh:]).reshape(-1), name("bias")))
        nodes.append(helper.make_node("Add", [xw, name("bias")], [name("xw_biased")]))
        xw = name("xw_biased")
    rec_in = [xw, name("r"), name("r_scale"), "", *ins[4:8]]
    while rec_in and not rec_in[-1]:
        rec_in.pop()
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name in _LSTM_ATTRS}
    attrs["hidden_size"] = hidden
    if "direction" in attrs and isinstance(attrs["direction"], bytes):
        attrs["direction"] = attrs["direction"].decode()
    if "activations" in attrs:
        attrs["activations"] = [a.decode() if isinstance(a, bytes) else a for a in attrs["activations"]]
    nodes.append(helper.make_node("DynQRecurrence", rec_in, list(n.output), domain="kiln", name=base, op="LSTM",
                                  **attrs))
    return nodes, out_inits
