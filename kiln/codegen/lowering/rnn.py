"""Lowerings of the recurrent layers, RNN, GRU and LSTM, as a loop over time.

Each node becomes two kernels, whatever the sequence length:

- the input projection of every step at once, ``X·Wᵀ + bias``: one matmul under kiln's
  dense schedule, with the directions side by side in its columns;
- the recurrence: one TIR kernel (``te.extern``) whose serial loop over time runs the
  hidden-state matvec (register-blocked, vectorised over the gate columns) and the gates.
  Directions run in parallel; the state lives in the ``Y_h``/``Y_c`` outputs.

So the sequence length and the batch may be symbolic, a 1,000-step sequence compiles as fast
as a 10-step one, and ``sequence_lens`` may be a run-time input: past a row's length its ``Y``
is zero and its state stays put (onnxruntime's semantics). Every ONNX attribute compiles:
activations with their alphas and betas, clip, input_forget, peepholes and ``layout=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kiln.codegen.int8 import dq_scale, dq_value, dq_zero_point
from kiln.codegen.lowering.registry import CodegenError, lowers, prepacks, run_time_failure
from kiln.codegen.lowering.te import exp_expr, statements
from kiln.ir import Node
from kiln.ir.kiln_ops import RNN_GATES, rnn_activations

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer

LANES = 16  # the most vector lanes of a gate-column block
BLOCK_VECTORS = 4  # vectors of gate columns accumulated in registers by the matvec, one batch row at a time
#: with a batch (or a symbolic one), batch rows x 16-lane vectors per register tile, by the target's vector
#: lanes: 12 of AVX2's 16 registers, 16 of AVX-512's 32
ROW_TILES = {8: (3, 2), 16: (4, 4)}
#: multiply-adds per step from which one direction's matvec is split over the cores: below it a fork and join
#: per step costs more than it saves (LSTM from a hidden size of 256)
PARALLEL_MATVEC_MIN = 1 << 18


@run_time_failure("RNN", "LSTM", "GRU")
def _rnn_x_rank(node: Node) -> str | None:
    """Why X cannot feed the recurrence (onnxruntime refuses it at run time too), or None."""
    x = node.input(0)
    if x is not None and x.rank is not None and x.rank != 3:
        return f"node {node.label()}: X must have 3 dims, but it is {x.type_str()}"
    return None


@dataclass(frozen=True)
class Activation:
    """One of ONNX's RNN activations with its alpha and beta."""

    name: str
    alpha: float = 0.0
    beta: float = 0.0

    def __call__(self, x: Any, dt: str) -> Any:
        from tvm import tirx

        def c(v: float) -> Any:
            return tirx.const(v, dt)

        n, a, b = self.name, self.alpha, self.beta
        if n == "sigmoid":
            return c(1) / (c(1) + _exp(-x, dt))
        if n == "tanh":
            return _tanh(x, dt)
        if n == "relu":
            return tirx.max(x, c(0))
        if n == "affine":
            return c(a) * x + c(b)
        if n == "leakyrelu":
            return tirx.Select(x >= c(0), x, c(a) * x)
        if n == "thresholdedrelu":
            return tirx.Select(x > c(a), x, c(0))
        if n == "scaledtanh":
            return c(a) * _tanh(c(b) * x, dt)
        if n == "hardsigmoid":
            return tirx.max(c(0), tirx.min(c(1), c(a) * x + c(b)))
        if n == "elu":
            return tirx.Select(x >= c(0), x, c(a) * (_exp(x, dt) - c(1)))
        if n == "softsign":
            return x / (c(1) + tirx.abs(x))
        return tirx.log(c(1) + _exp(x, dt))  # softplus


def _exp(x: Any, dt: str) -> Any:
    from tvm import tirx

    return exp_expr(x) if dt == "float32" else tirx.exp(x)


def _tanh(x: Any, dt: str) -> Any:
    """tanh from the vectorising exp; an odd polynomial near 0, where ``(1 - e)/(1 + e)`` cancels."""
    from tvm import tirx

    if dt != "float32":
        return tirx.tanh(x)

    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    ax = tirx.abs(x)
    e = _exp(c(-2) * ax, dt)
    big = (c(1) - e) / (c(1) + e)
    x2 = x * x
    small = x * (c(1) + x2 * (c(-1 / 3) + x2 * (c(2 / 15) + x2 * c(-17 / 315))))
    return tirx.Select(ax < c(0.0625), small, tirx.Select(x < c(0), -big, big))


def _activations(node: Node, dirs: int, op: str) -> list[list[Activation]]:
    """Each direction's activations (f, g, h for LSTM), with the alphas and betas they consume in order."""
    try:
        acts = rnn_activations(op, dirs, node.attr("activations", ()) or (), node.attr("activation_alpha", ()) or (),
                               node.attr("activation_beta", ()) or ())
    except ValueError as e:
        raise CodegenError(f"node {node.label()}: {e}") from None
    return [[Activation(*a) for a in per] for per in acts]


@dataclass(frozen=True)
class RnnConfig:
    """What the kernels of one recurrent node are specialised on."""

    op: str
    hidden: int
    dirs: list[bool]  # per direction: reversed?
    acts: list[list[Activation]]
    clip: float | None
    batch_first: bool
    input_forget: bool
    linear_before_reset: bool
    has: frozenset[str]  # the optional inputs given: B, sequence_lens, initial_h, initial_c, P
    row_tile: tuple[int, int]  # batch rows x vectors of a register tile (see ROW_TILES)
    int8: bool = False  # the hidden-state products are dynamic int8 (kiln::DynQRecurrence)

    @property
    def gates(self) -> int:
        return RNN_GATES[self.op]


_OPTIONAL = {3: "B", 4: "sequence_lens", 5: "initial_h", 6: "initial_c", 7: "P"}


def _rnn_config(node: Node, lanes: int) -> RnnConfig:
    """The node's configuration (an ONNX RNN, GRU or LSTM, or a kiln::DynQRecurrence); refuses, in one line,
    what does not lower."""
    int8 = node.domain == "kiln"
    op = node.attr("op", "LSTM") if int8 else node.op_type
    direction = node.attr("direction", "forward")
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if dirs is None:
        raise CodegenError(f"node {node.label()}: unknown direction '{direction}'")
    reason = _rnn_x_rank(node)
    if reason:
        raise CodegenError(reason)
    r = node.input(1 if int8 else 2)
    hidden = node.attr("hidden_size") or (r.shape[-1] if r.shape is not None else None)
    if not isinstance(hidden, int):
        raise CodegenError(f"node {node.label()}: hidden_size is not given and R's shape does not say it")
    w = node.input(1)
    if not int8 and (w.shape is None or not isinstance(w.shape[-1], int)):
        raise CodegenError(f"node {node.label()}: the input width (W's last dim) must be static to compile")
    clip = node.attr("clip")
    if int8 and clip is not None and clip < 0:  # kiln::DynQRecurrence's "no clip"
        clip = None
    has = frozenset(name for i, name in _OPTIONAL.items() if node.input(i) is not None
                    and (op == "LSTM" or i < 6))
    return RnnConfig(op, hidden, dirs, _activations(node, len(dirs), op), None if clip is None else float(clip),
                     bool(node.attr("layout", 0)), op == "LSTM" and bool(node.attr("input_forget", 0)),
                     op == "GRU" and bool(node.attr("linear_before_reset", 0)), has,
                     ROW_TILES.get(lanes, ROW_TILES[8]), int8)


def _projection(cfg: RnnConfig) -> Callable[..., Any]:
    """``X·Wᵀ + bias`` for every step and direction: (X2 [rows, width], Wᵀ [width, dirs*G*H], [B]) -> [rows, dirs*G*H].

    The bias is Wb + Rb, except the GRU h gate's Rb under linear_before_reset, which belongs
    inside the reset product (the recurrence adds it there).
    """
    gh = cfg.gates * cfg.hidden

    def compute(x: Any, wt: Any, *b: Any) -> Any:
        from tvm import te, tirx

        width, n = wt.shape
        k = te.reduce_axis((0, width), name="k")
        dense = te.compute((x.shape[0], n), lambda i, j: te.sum(x[i, k] * wt[k, j], axis=k), name="dense")
        if not b:
            return dense
        bias = b[0]

        def add(i: Any, j: Any) -> Any:
            d, g = j // gh, j % gh
            rb = bias[d, gh + g]
            if cfg.linear_before_reset:
                rb = tirx.Select(g < 2 * cfg.hidden, rb, tirx.const(0, x.dtype))
            return dense[i, j] + bias[d, g] + rb

        return te.compute(dense.shape, add, name="epilogue")

    return compute


def _lanes(h: int) -> int:
    """The vector lanes of a gate-column block: the most, up to :data:`LANES`, that divide ``h``."""
    return next(v for v in (LANES, 8, 4, 2, 1) if h % v == 0)


def _recurrence(cfg: RnnConfig) -> Callable[..., Any]:
    """The time loop: (XW [seq, batch, dirs*G*H] (batch first: [batch, seq, ...]), R_t [dirs, H, G*H] (int8:
    then RS [dirs, G*H], its scales), [B], [sequence_lens], [initial_h], [initial_c], [P]) -> [Y, Y_h(, Y_c)]."""
    H = cfg.hidden
    lanes = _lanes(H)
    names = [n for n in _OPTIONAL.values() if n in cfg.has]

    def compute(xw: Any, rt: Any, *rest: Any) -> list[Any]:
        from tvm import te

        seq, batch = (xw.shape[1], xw.shape[0]) if cfg.batch_first else (xw.shape[0], xw.shape[1])
        nd = len(cfg.dirs)
        dt = xw.dtype
        if cfg.batch_first:
            shapes = [(batch, seq, nd, H), (batch, nd, H)]
        else:
            shapes = [(seq, nd, batch, H), (nd, batch, H)]
        if cfg.op == "LSTM":
            shapes.append(shapes[1])
        ins = [xw, rt, *rest]
        return te.extern(shapes, ins, lambda i, o: _time_loop(cfg, lanes, names, seq, batch, dt, *i, *o),
                         dtype=[dt] * len(shapes), name=f"{cfg.op.lower()}_time_loop")

    return compute


def _time_loop(cfg: RnnConfig, lanes: int, names: list[str], seq: Any, batch: Any, dt: str, xw_p: Any,
               rt_p: Any, *rest: Any) -> Any:
    """The TIR of the recurrence (see :func:`_recurrence`)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    H, G = cfg.hidden, cfg.gates
    gh = G * H
    lstm, gru = cfg.op == "LSTM", cfg.op == "GRU"
    rs_p = rest[0] if cfg.int8 else None
    rest = rest[1:] if cfg.int8 else rest
    n_in = len(names)
    opt = dict(zip(names, rest[:n_in]))
    outs = rest[n_in:]

    def c(v: float) -> Any:
        return tirx.const(v, dt)

    def clip(x: Any) -> Any:
        return x if cfg.clip is None else tirx.max(c(-cfg.clip), tirx.min(c(cfg.clip), x))

    with IRBuilder() as ib:
        xw, rt = T.buffer_proxy(xw_p), T.buffer_proxy(rt_p)
        rs = T.buffer_proxy(rs_p) if rs_p is not None else None
        y, yh = T.buffer_proxy(outs[0]), T.buffer_proxy(outs[1])
        yc = T.buffer_proxy(outs[2]) if lstm else None
        bias = T.buffer_proxy(opt["B"]) if "B" in opt else None
        lens = T.buffer_proxy(opt["sequence_lens"]) if "sequence_lens" in opt else None
        h0 = T.buffer_proxy(opt["initial_h"]) if "initial_h" in opt else None
        c0 = T.buffer_proxy(opt["initial_c"]) if "initial_c" in opt else None
        peep = T.buffer_proxy(opt["P"]) if "P" in opt else None
        idt = seq.dtype if hasattr(seq, "dtype") else "int64"
        zero = tirx.const(0, idt)

        def st(d: Any, b: Any, j: Any) -> tuple[Any, ...]:  # an index of Y_h / Y_c / initial states
            return (b, d, j) if cfg.batch_first else (d, b, j)

        def yi(t: Any, d: Any, b: Any, j: Any) -> tuple[Any, ...]:
            return (b, t, d, j) if cfg.batch_first else (t, d, b, j)

        def xwi(t: Any, b: Any, col: Any) -> tuple[Any, ...]:
            return (b, t, col) if cfg.batch_first else (t, b, col)

        def direction(d: int) -> None:
            reverse = cfg.dirs[d]
            act = cfg.acts[d]
            nb = tirx.Cast(idt, batch)
            gates = T.buffer_proxy(T.alloc_buffer((nb, gh), dt, scope="global"))
            rh = (T.buffer_proxy(T.alloc_buffer((nb, H), dt, scope="global"))
                  if gru and not cfg.linear_before_reset else None)
            hq = T.buffer_proxy(T.alloc_buffer((nb, H), "int32", scope="global")) if cfg.int8 else None
            hs = T.buffer_proxy(T.alloc_buffer((nb,), dt, scope="global")) if cfg.int8 else None
            with T.serial(zero, nb) as b, T.serial(0, H) as j:
                yh[st(d, b, j)] = h0[st(d, b, j)] if h0 is not None else c(0)
                if lstm:
                    yc[st(d, b, j)] = c0[st(d, b, j)] if c0 is not None else c(0)

            def length(b: Any) -> Any:  # row b's steps (a length past the sequence reads as the sequence)
                n = tirx.Cast(idt, seq)
                return n if lens is None else tirx.max(zero, tirx.min(tirx.Cast(idt, lens[b]), n))

            def t_of(s: Any, b: Any) -> Any:  # the time row b is at at loop step s (in range once the row is done)
                return tirx.max(length(b) - 1 - s, zero) if reverse else s

            def quantized(src: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
                """``src`` quantized to uint8 per batch row as DynamicQuantizeLinear does (the row's scale in ``hs``),
                held centred (``q - zp``, int32 in ``hq``); the centred reader."""
                lim = T.buffer_proxy(T.alloc_buffer((2,), dt, scope="local"))  # max, min (with 0)
                with T.serial(zero, nb) as b:
                    lim[0], lim[1] = c(0), c(0)
                    with T.serial(0, H) as k:
                        v = T.Bind(src(b, k))
                        lim[0] = tirx.max(lim[0], v)
                        lim[1] = tirx.min(lim[1], v)
                    scale = T.Bind(dq_scale(lim[0], lim[1]))
                    zp = T.Bind(dq_zero_point(lim[1], scale))
                    hs[b] = scale
                    with T.serial(0, H) as k:
                        hq[b, k] = tirx.Cast("int32", dq_value(src(b, k), scale, zp)) - tirx.Cast("int32", zp)
                return lambda b, k: hq[b, k]

            def matvec(s: Any, col0: int, ncols: int, src: Callable[[Any, Any], Any], init: str) -> None:
                """gates[:, col0:col0+ncols] = init + src · R_t[d, :, col0:col0+ncols] for every row (init: xw, rbh
                or 0): for each block of gate columns (one thread's share), tiles of rows that accumulate in registers.
                int8: src is quantized first, the tiles accumulate int32 and the scales apply once at the end."""
                split = len(cfg.dirs) == 1 and G * H * H >= PARALLEL_MATVEC_MIN
                if cfg.int8:
                    src = quantized(src)
                acc_dt = "int32" if cfg.int8 else dt
                rows_most, most = cfg.row_tile
                if isinstance(batch, (int, tirx.IntImm)) and int(batch) == 1:  # one row: the widest tile
                    rows_most, most = 1, BLOCK_VECTORS
                vecs = next(v for v in range(min(most, ncols // lanes), 0, -1) if (ncols // lanes) % v == 0)
                width = vecs * lanes
                blocks = nb // rows_most

                def start(b: Any, col: Any) -> Any:  # what the gate column starts from
                    if init == "xw":
                        return xw[xwi(t_of(s, b), b, d * gh + col)]
                    return bias[d, gh + col] if init == "rbh" else c(0)

                with (T.parallel if split else T.serial)(0, ncols // width) as jo:
                    acc = T.buffer_proxy(T.alloc_buffer((rows_most * width,), acc_dt, scope="local"))

                    def tile(b0: Any, rows: int) -> None:
                        def each() -> Any:  # (row, gate column vector, lane) over the tile
                            return T.unroll(0, rows), T.unroll(0, vecs), T.vectorized(0, lanes)

                        with each()[0] as r, each()[1] as u, each()[2] as v:
                            col = col0 + jo * width + u * lanes + v
                            acc[r * width + u * lanes + v] = (tirx.const(0, "int32") if cfg.int8
                                                              else start(b0 + r, col))
                        with T.serial(0, H) as k, each()[0] as r:
                            hk = T.Bind(src(b0 + r, k))
                            with each()[1] as u, each()[2] as v:
                                a = r * width + u * lanes + v
                                w = rt[d, k, col0 + jo * width + u * lanes + v]
                                acc[a] = acc[a] + hk * (tirx.Cast("int32", w) if cfg.int8 else w)
                        with each()[0] as r, each()[1] as u, each()[2] as v:
                            col = col0 + jo * width + u * lanes + v
                            a = r * width + u * lanes + v
                            gates[b0 + r, col] = (start(b0 + r, col) + tirx.Cast(dt, acc[a]) * (hs[b0 + r] * rs[d, col])
                                                  if cfg.int8 else acc[a])

                    with T.serial(zero, blocks) as bo:
                        tile(bo * rows_most, rows_most)
                    with T.serial(blocks * rows_most, nb) as b:
                        tile(b, 1)

            def hprev(b: Any, k: Any) -> Any:
                return yh[st(d, b, k)]

            def update(t: Any, b: Any) -> None:
                """Row b's gates, new state and output at time t."""
                with T.serial(0, H // lanes) as jo, T.vectorized(0, lanes) as v:
                    j = jo * lanes + v
                    hp = T.Bind(yh[st(d, b, j)])
                    g = [gates[b, q * H + j] for q in range(G)]
                    if lstm:  # gates i, o, f, c
                        cp = T.Bind(yc[st(d, b, j)])
                        i_, o_, f_, g_ = g
                        if peep is not None:
                            i_ = i_ + peep[d, j] * cp
                            f_ = f_ + peep[d, 2 * H + j] * cp
                        ig = act[0](clip(i_), dt)
                        fg = c(1) - ig if cfg.input_forget else act[0](clip(f_), dt)
                        cn = T.Bind(fg * cp + ig * act[1](clip(g_), dt))
                        if peep is not None:
                            o_ = o_ + peep[d, H + j] * cn
                        hn = act[0](clip(o_), dt) * act[2](cn, dt)
                        yc[st(d, b, j)] = cn
                    elif gru:  # gates z, r, h
                        z = act[0](clip(g[0]), dt)
                        if cfg.linear_before_reset:
                            r = act[0](clip(g[1]), dt)
                            n = act[1](clip(xw[xwi(t, b, d * gh + 2 * H + j)] + r * g[2]), dt)
                        else:
                            n = act[1](clip(g[2]), dt)
                        hn = (c(1) - z) * n + z * hp
                    else:
                        hn = act[0](clip(g[0]), dt)
                    hn = T.Bind(hn)  # one value for both stores: the expression reads the state they overwrite
                    yh[st(d, b, j)] = hn
                    y[yi(t, d, b, j)] = hn

            with T.serial(zero, tirx.Cast(idt, seq)) as s:
                if gru:
                    matvec(s, 0, 2 * H, hprev, "xw")
                    if cfg.linear_before_reset:
                        matvec(s, 2 * H, H, hprev, "rbh" if bias is not None else "zero")
                    else:
                        with T.serial(zero, nb) as b, T.serial(0, H // lanes) as jo, T.vectorized(0, lanes) as v:
                            j = jo * lanes + v
                            rh[b, j] = act[0](clip(gates[b, H + j]), dt) * yh[st(d, b, j)]
                        matvec(s, 2 * H, H, lambda b, k: rh[b, k], "xw")
                else:
                    matvec(s, 0, gh, hprev, "xw")
                with T.serial(zero, nb) as b:
                    with T.If(s < length(b)):
                        with T.Then():
                            update(t_of(s, b), b)
                        with T.Else(), T.serial(0, H) as j:
                            y[yi(s, d, b, j)] = c(0)
            # a row of length 0 ends with zero states, not its initial ones: onnxruntime's choice (the spec is silent)
            with T.serial(zero, nb) as b, T.If(length(b) == zero), T.Then(), T.serial(0, H) as j:
                yh[st(d, b, j)] = c(0)
                if lstm:
                    yc[st(d, b, j)] = c(0)

        with statements():
            if len(cfg.dirs) == 1:
                direction(0)
            else:
                _parallel_directions(T, direction)
    return ib.get()


def _parallel_directions(T: Any, direction: Callable[[int], None]) -> None:
    """Both directions of a bidirectional node, one per thread."""
    with T.parallel(0, 2) as dd, T.If(dd == 0):
        with T.Then():
            direction(0)
        with T.Else():
            direction(1)


def _w_packed(w: np.ndarray) -> np.ndarray:
    """W [dirs, G*H, width] as the projection's [width, dirs*G*H]."""
    return w.reshape(-1, w.shape[-1]).T


def _r_packed(r: np.ndarray) -> np.ndarray:
    """R [dirs, G*H, H] as the matvec's [dirs, H, G*H]: each hidden unit's gate columns side by side."""
    return r.transpose(0, 2, 1)


@prepacks("RNN", "GRU", "LSTM", input_1=_w_packed, input_2=_r_packed)
@lowers("RNN", "GRU", "LSTM")
def _rnn(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    cfg = _rnn_config(node, lw.lanes)
    x = lw.get(node.input(0))
    xs = list(x.ty.shape.values)
    width = node.input(1).shape[-1]
    n = len(cfg.dirs) * cfg.gates * cfg.hidden
    x2 = lw.bb.emit(relax.op.reshape(x, (xs[0] * xs[1], width)))
    wt = lw.packed(node, 1)
    if wt is None:  # W computed at run time
        wt = lw.bb.emit(relax.op.permute_dims(relax.op.reshape(lw.get(node.input(1)), (n, width))))
    rt = lw.packed(node, 2)
    if rt is None:
        rt = lw.bb.emit(relax.op.permute_dims(lw.get(node.input(2)), [0, 2, 1]))
    bias = [lw.get(node.input(3))] if "B" in cfg.has else []
    xw = lw.emit(_projection(cfg), x2, wt, *bias, name=f"{cfg.op.lower()}_projection",
                 attrs={"kiln.schedule": "dense"})
    xw3 = lw.bb.emit(relax.op.reshape(xw, (xs[0], xs[1], n)))
    opt = [lw.get(node.input(i)) for i, name in _OPTIONAL.items() if name in cfg.has]
    tup = lw.emit(_recurrence(cfg), xw3, rt, *opt, name=f"{cfg.op.lower()}_recurrence")
    return lw.unpack(tup, node)


@prepacks("DynQRecurrence", domain="kiln", input_1=_r_packed)
@lowers("DynQRecurrence", domain="kiln")
def _dyn_q_recurrence(lw: Lowerer, node: Node) -> list[Any]:
    """kiln::DynQRecurrence: the time loop alone (its input projection is a DynQDense before it), int8 products."""
    from tvm import relax

    cfg = _rnn_config(node, lw.lanes)
    rt = lw.packed(node, 1)
    if rt is None:
        rt = lw.bb.emit(relax.op.permute_dims(lw.get(node.input(1)), [0, 2, 1]))
    opt = [lw.get(node.input(i)) for i, name in _OPTIONAL.items() if name in cfg.has]
    tup = lw.emit(_recurrence(cfg), lw.get(node.input(0)), rt, lw.get(node.input(2)), *opt,
                  name=f"{cfg.op.lower()}_int8_recurrence")
    return lw.unpack(tup, node)
