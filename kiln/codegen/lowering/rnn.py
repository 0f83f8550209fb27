"""Lowerings of the recurrent layers, LSTM and GRU.

The recurrence is unrolled over the sequence, which must be static and at most
:data:`MAX_UNROLL` steps long (silero-vad runs one step per call); longer or
symbolic sequences are refused. The input projections of all steps are one
matmul up front, so each step adds only the hidden-state matmul and the gates.
One LSTM/GRU node becomes one prim func with ``Y``, ``Y_h`` (and ``Y_c``) as outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from kiln.codegen.lowering.registry import CodegenError, lowers, run_time_failure
from kiln.codegen.lowering.te import get_topi
from kiln.ir import Node, const_ints

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer

MAX_UNROLL = 64  # sequence steps an RNN may unroll into

_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


@run_time_failure("LSTM", "GRU")
def _rnn_x_rank(node: Node) -> str | None:
    """Why X cannot feed the recurrence (onnxruntime refuses it at run time too), or None."""
    x = node.input(0)
    if x is not None and x.rank is not None and x.rank != 3:
        return f"node {node.label()}: X must have 3 dims, but it is {x.type_str()}"
    return None


def _rnn_config(node: Node) -> tuple[int, list[bool]]:
    """The static sequence length and the directions (False forward, True reverse); refuses what does not lower."""
    op = node.op_type
    direction = node.attr("direction", "forward")
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if dirs is None:
        raise CodegenError(f"node {node.label()}: unknown direction '{direction}'")
    acts = [a.lower() for a in node.attr("activations", ()) or ()]
    if acts and acts != _DEFAULT_ACTIVATIONS[op] * len(dirs):
        raise CodegenError(f"node {node.label()}: only the default activations compile ({acts} given)")
    for name in ("activation_alpha", "activation_beta", "clip"):
        if node.attr(name) is not None:
            raise CodegenError(f"node {node.label()}: the '{name}' attribute does not compile yet")
    if node.attr("layout", 0) != 0:
        raise CodegenError(f"node {node.label()}: layout=1 (batch first) does not compile yet; transpose X first")
    if op == "LSTM" and (node.attr("input_forget", 0) or node.input(7) is not None):
        raise CodegenError(f"node {node.label()}: LSTM peepholes (P) and input_forget do not compile yet")
    reason = _rnn_x_rank(node)
    if reason:
        raise CodegenError(reason)
    seq = node.input(0).shape[0]
    if not isinstance(seq, int) or seq > MAX_UNROLL:
        raise CodegenError(f"node {node.label()}: the sequence length {seq} must be static and at most {MAX_UNROLL} "
                           "to compile (kiln unrolls the recurrence)")
    lens = node.input(4)
    if lens is not None:
        got = const_ints(lens)
        if got is None or any(n != seq for n in got):
            raise CodegenError(f"node {node.label()}: sequence_lens must be constant and all equal to {seq} to compile")
    return seq, dirs


def _rnn_compute(node: Node, seq: int, dirs: list[bool], has_b: bool, has_h: bool,
                 has_c: bool) -> Callable[..., list[Any]]:
    """The TE function of one LSTM or GRU node: (X, W, R, [B], [initial_h], [initial_c]) -> [Y, Y_h(, Y_c)]."""
    lstm = node.op_type == "LSTM"
    gates = 4 if lstm else 3
    hidden = node.attr("hidden_size") or node.input(2).shape[-1]
    lbr = node.attr("linear_before_reset", 0)

    def compute(X: Any, W: Any, R: Any, *rest: Any) -> list[Any]:
        from tvm import te, tirx

        topi = get_topi()

        rest_l = list(rest)
        B = rest_l.pop(0) if has_b else None
        H0 = rest_l.pop(0) if has_h else None
        C0 = rest_l.pop(0) if has_c else None
        batch, width = X.shape[1], X.shape[2]
        dt = X.dtype
        H = hidden

        def part(t: Any, d: Any, lo: int, size: Any, name: str) -> Any:  # t[d, lo:lo+size, ...]
            return te.compute((size, *t.shape[2:]), lambda a, *k: t[d, lo + a, *k], name=name)

        def cols(t: Any, k: int) -> Any:  # gate k's columns of a [batch, gates*H] tensor
            return te.compute((batch, H), lambda b, j: t[b, k * H + j], name=f"gate{k}")

        ys, last_h, last_c = [], [], []
        for d, reverse in enumerate(dirs):
            w, r = part(W, d, 0, gates * H, "w"), part(R, d, 0, gates * H, "r")
            xw = topi.nn.matmul(topi.reshape(X, (seq * batch, width)), w, transpose_b=True)
            rbh = None
            if B is not None:
                wb, rb = part(B, d, 0, gates * H, "wb"), part(B, d, gates * H, gates * H, "rb")
                if lbr and not lstm:  # the h gate's recurrent bias goes inside the reset product
                    rbh = te.compute((H,), lambda j: rb[2 * H + j], name="rbh")
                    bias = te.compute((gates * H,), lambda j: wb[j] + tirx.if_then_else(
                        j < 2 * H, rb[j], tirx.const(0, dt)), name="bias")
                else:
                    bias = topi.add(wb, rb)
                xw = topi.add(xw, bias)
            xw = topi.reshape(xw, (seq, batch, gates * H))
            h = (te.compute((batch, H), lambda b, j: H0[d, b, j], name="h0") if H0 is not None
                 else topi.full((batch, H), dt, 0.0))
            c = (te.compute((batch, H), lambda b, j: C0[d, b, j], name="c0") if C0 is not None
                 else topi.full((batch, H), dt, 0.0))
            steps: list[Any] = [None] * seq
            for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
                xt = part(xw, t, 0, batch, "xt")
                hr = topi.nn.matmul(h, r, transpose_b=True)
                if lstm:  # gates i, o, f, c
                    g = topi.add(xt, hr)
                    i_, o_, f_, c_ = (cols(g, k) for k in range(4))
                    c = topi.add(topi.multiply(topi.sigmoid(f_), c), topi.multiply(topi.sigmoid(i_), topi.tanh(c_)))
                    h = topi.multiply(topi.sigmoid(o_), topi.tanh(c))
                else:  # gates z, r, h
                    z = topi.sigmoid(topi.add(cols(xt, 0), cols(hr, 0)))
                    rr = topi.sigmoid(topi.add(cols(xt, 1), cols(hr, 1)))
                    if lbr:
                        hh = cols(hr, 2) if rbh is None else topi.add(cols(hr, 2), rbh)
                        n = topi.tanh(topi.add(cols(xt, 2), topi.multiply(rr, hh)))
                    else:
                        rh = part(R, d, 2 * H, H, "rh")
                        rh_h = topi.nn.matmul(topi.multiply(rr, h), rh, transpose_b=True)
                        n = topi.tanh(topi.add(cols(xt, 2), rh_h))
                    h = topi.add(topi.multiply(topi.subtract(1.0, z), n), topi.multiply(z, h))
                steps[t] = h
            ys.append(steps)
            last_h.append(h)
            last_c.append(c)
        y = topi.stack([topi.stack([ys[d][t] for d in range(len(dirs))], 0) for t in range(seq)], 0)
        outs = [y, topi.stack(last_h, 0)]
        if lstm:
            outs.append(topi.stack(last_c, 0))
        return outs

    return compute


@lowers("LSTM", "GRU", reads=(0, 1, 2, 3, 5, 6))
def _rnn(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    seq, dirs = _rnn_config(node)
    b, h0 = node.input(3), node.input(5)
    c0 = node.input(6) if node.op_type == "LSTM" else None
    args = [lw.get(node.input(i)) for i in range(3)] + [lw.get(v) for v in (b, h0, c0) if v is not None]
    fn = _rnn_compute(node, seq, dirs, b is not None, h0 is not None, c0 is not None)
    tup = lw.emit(fn, *args, name=node.op_type.lower())
    n_out = 3 if node.op_type == "LSTM" else 2
    return [lw.bb.emit(relax.TupleGetItem(tup, i)) for i in range(n_out)][:len(node.outputs)]
