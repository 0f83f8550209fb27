"""Lowering of ``Loop`` and ``Scan`` to a tree of Relax calls that runs any number of iterations.

TVM's Relax has no while op, and its VM gives every call a frame, so a loop written as one recursive
function would need a frame per iteration. Instead each iteration is a call of the *step* function
(the body's kernels), and the calls form a tree: a level-1 function makes ``FAN_OUT`` guarded step
calls, a level-k function ``FAN_OUT`` guarded level-(k-1) calls, and the top function runs level
``LEVELS`` and then calls itself while the loop goes on. One top call covers ``FAN_OUT ** LEVELS``
(65,536) iterations, so the frames in use stay few for any trip count. Every call is guarded by
``relax.If`` on the loop state's ``go`` flag, so a loop that ends early costs at most ``FAN_OUT`` flag
checks per level after its last iteration.

The loop state passes from call to call as a tuple: the trip bound, the iteration number, ``go``,
the loop-carried values, one buffer per scan output (each iteration writes its row in place, with
``call_tir_inplace``) and, for Scan, the scanned tensors. A Loop that stops early by its condition
returns its scan outputs sliced to the iterations it ran, a size known only at run time.

Loop-carried values must keep their dtype and shape from one iteration to the next (symbolic dims
included); a Loop with scan outputs needs a trip count, which sizes their buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.ir import Graph, Node, Value, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer

FAN_OUT = 16  # guarded calls per level of the call tree
LEVELS = 4  # levels below the top function: one top call runs up to FAN_OUT ** LEVELS iterations
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class _Plan:
    """What the step of one Loop or Scan reads and writes; the state is ``[trip, i, go, carried..., buffers..., sources...]``."""

    node: Node
    body: Graph
    carried_in: list[Value]  # body inputs holding the carried values
    carried_out: list[Value]  # body outputs giving their next values
    scans: list[Value]  # body outputs written one row per iteration
    cond_in: Value | None = None  # Loop: the body's condition input (true whenever the body runs)
    cond_out: Value | None = None  # Loop: the body's next condition
    counter: Value | None = None  # Loop: the body's iteration-number input
    sliced: list[Value] = field(default_factory=list)  # Scan: body inputs bound to one slice of a source
    axes: list[int] = field(default_factory=list)  # Scan: each source's scan axis
    reverse_in: list[bool] = field(default_factory=list)
    reverse_out: list[bool] = field(default_factory=list)


def _scalar(lw: Lowerer, v: Any, name: str) -> Any:
    """A lowered one-element tensor (``[]`` or ``[1]``) as a scalar."""
    from kiln.codegen.lowering.te import get_topi

    if len(v.ty.shape.values) == 0:
        return v
    return lw.emit(lambda t: get_topi().reshape(t, ()), v, name=name)


def _check_carried(node: Node, plan: _Plan, initial: list[Value | None]) -> None:
    """Each carried value keeps its dtype and its (possibly symbolic) shape across an iteration."""
    for vin, vout, first in zip(plan.carried_in, plan.carried_out, initial):
        if first is None:
            raise CodegenError(f"node {node.label()}: the loop-carried value '{vin.name}' has no initial value")
        if vin.dtype != vout.dtype or vin.shape is None or vin.shape != vout.shape:
            raise CodegenError(
                f"node {node.label()}: the loop-carried value '{vin.name}' ({first.type_str()} on entry) does not keep "
                f"one shape and dtype across iterations (the body makes '{vout.name}' {vout.type_str()}); kiln compiles "
                f"loops whose carried values keep theirs")
    for s in plan.scans:
        if s.shape is None or s.dtype is None:
            raise CodegenError(f"node {node.label()}: the scan output '{s.name}' has an unknown shape ({s.type_str()})")


def _row_writer(lw: Lowerer, buf: Any, row: Any) -> Any:
    """A prim func writing ``row`` into row ``index`` of ``buf``, in place (buffer, row, index)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from kiln.codegen.lowering.lowerer import OPAQUE
    from kiln.codegen.lowering.te import statements

    shape = list(buf.ty.shape.values)
    dtype = buf.ty.dtype
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE})
            b = T.arg("buf", T.buffer(shape, dtype))
            r = T.arg("row", T.buffer(shape[1:], dtype))
            k = T.arg("index", T.buffer((), "int64"))
            with T.sblock("root"):  # a block-structured body, which GPU schedules (DefaultGPUSchedule) need
                idx = T.Bind(tirx.BufferLoad(k, []))
                def store(ix: list[Any]) -> None:
                    with T.sblock("scan_row"):
                        T.reads(r[tuple(ix)] if ix else r[()], k[()])
                        T.writes(b[(idx, *ix)])
                        T.buffer_store(b, tirx.BufferLoad(r, list(ix)), [idx, *ix])
                _nest([T.serial(0, d) for d in shape[1:]], store)
    return ib.get()


def _nest(loops: list[Any], store: Callable[[list[Any]], None]) -> None:
    """Open ``loops`` (IRBuilder frames) one inside the next and emit ``store`` of their variables innermost."""
    if not loops:
        store([])
        return
    with loops[0] as v:
        _nest(loops[1:], lambda ix: store([v, *ix]))


def _write_row(lw: Lowerer, buf: Any, row: Any, index: Any) -> Any:
    from tvm import relax

    gv = lw.bb.add_func(_row_writer(lw, buf, row), "scan_row")
    return lw.bb.emit(relax.call_tir_inplace(gv, relax.Tuple([buf, row, index]), inplace_indices=[0], out_ty=buf.ty))


def _kernel(lw: Lowerer, fn: Callable[..., Any], *args: Any, name: str, dtype: str) -> Any:
    """A scalar kernel ``fn`` of the scalar tensors ``args`` (TE scalars)."""
    from tvm import te

    return lw.emit(lambda *ts: te.compute((), lambda: fn(*[t() for t in ts]).astype(dtype), name=name), *args, name=name)


def _step(lw: Lowerer, plan: _Plan, name: str, state: list[Any]) -> tuple[Any, list[Any]]:
    """The step function (one iteration of the body): the global, and the outer values to call it with after the state."""
    from tvm import relax, te, tirx

    nc, ns = len(plan.carried_in), len(plan.scans)
    params = [relax.Var(f"s{k}", s.ty) for k, s in enumerate(state)]
    trip, i = params[0], params[1]
    carried, bufs, sources = params[3:3 + nc], params[3 + nc:3 + nc + ns], params[3 + nc + ns:]
    lw.env.update({id(v): p for v, p in zip(plan.carried_in, carried)})
    if plan.counter is not None:
        lw.env[id(plan.counter)] = i
    true = relax.const(True, "bool")
    if plan.cond_in is not None:
        lw.env[id(plan.cond_in)] = true

    def slices() -> None:  # Scan: the body's inputs are this iteration's slices of the sources
        for v, src, axis, rev in zip(plan.sliced, sources, plan.axes, plan.reverse_in):
            lw.env[id(v)] = lw.emit(lambda x, k, m, a=axis, r=rev: te.compute(
                [d for j, d in enumerate(x.shape) if j != a],
                lambda *ix: x(*ix[:a], (m() - 1 - k()) if r else k(), *ix[a:]), name="scan_slice"),
                src, i, trip, name="scan_slice")

    def finish() -> Any:
        nxt = [lw.bb.match_cast(lw.get(v), p.ty) for v, p in zip(plan.carried_out, carried)]
        written = []
        for s, buf, rev in zip(plan.scans, bufs, plan.reverse_out or [False] * ns):
            at = _kernel(lw, lambda k, m: m - 1 - k, i, trip, name="scan_row_index", dtype="int64") if rev else i
            written.append(_write_row(lw, buf, lw.get(s), at))
        i1 = _kernel(lw, lambda k: k + 1, i, name="loop_next", dtype="int64")
        cond = None if plan.cond_out is None else lw.get(plan.cond_out)
        if cond is None or cond is true:  # the condition passes through: only the trip count ends the loop
            go = _kernel(lw, lambda k, m: k < m, i1, trip, name="loop_go", dtype="bool")
        else:
            go = _kernel(lw, lambda k, m, c: tirx.all(k < m, c), i1, trip, _scalar(lw, cond, "loop_cond"),
                         name="loop_go", dtype="bool")
        return relax.Tuple([trip, i1, go, *nxt, *written, *sources])

    return lw.subgraph_function(plan.body, name, params, finish, start=slices)


def _run(lw: Lowerer, name: str, state: list[Any], step: tuple[Any, list[Any]]) -> list[Any]:
    """Run the loop from ``state`` through the call tree over ``step``; the final state's members."""
    from tvm import relax

    gv_step, outer = step
    n = len(state)
    types = [s.ty for s in state] + [o.ty for o in outer]

    def guarded(child: Any, s: list[Any], extra: list[Any]) -> list[Any]:
        branch = relax.If(s[2], relax.SeqExpr([], relax.Call(child, s + extra)), relax.SeqExpr([], relax.Tuple(s)))
        r = lw.bb.emit(branch)
        return [lw.bb.emit(relax.TupleGetItem(r, k)) for k in range(n)]

    def params() -> list[Any]:
        return [relax.Var(f"s{k}", t) for k, t in enumerate(types)]

    child = gv_step
    for level in range(1, LEVELS + 1):
        ps = params()

        def body(ps: list[Any] = ps, child: Any = child) -> Any:
            s = ps[:n]
            for _ in range(FAN_OUT):
                s = guarded(child, s, ps[n:])
            return relax.Tuple(s)

        child = lw.add_function(f"{name}_level{level}", ps, body)
    # the top function runs one full tree, then calls itself while the loop goes on
    ps = params()
    top = lw.add_function(f"{name}_top", ps, lambda: relax.Tuple(ps[:n]))  # a placeholder: calls need its global
    ps = params()

    def top_body() -> Any:
        r = lw.bb.emit(relax.Call(child, ps))
        s = [lw.bb.emit(relax.TupleGetItem(r, k)) for k in range(n)]
        return relax.Tuple(guarded(top, s, ps[n:]))

    lw.bb._begin_binding_block()
    result = top_body()
    fn = relax.Function(ps, lw.bb.normalize(relax.SeqExpr([lw.bb._end_block()], result)))
    lw.bb.update_func(top, fn)
    r = lw.bb.emit(relax.Call(top, state + outer))
    return [lw.bb.emit(relax.TupleGetItem(r, k)) for k in range(n)]


def _buffer(lw: Lowerer, rows: Any, row: Value, name: str) -> Any:
    """A zeroed buffer of ``rows`` rows shaped like the scan output ``row``."""
    from tvm import te, tirx

    dtype = row.dtype.numpy.name
    shape = [rows, *[lw.dim(d) for d in row.shape]]
    return lw.emit(lambda: te.compute(shape, lambda *_: tirx.const(0, dtype), name=name), name=name)


def _rows_of(lw: Lowerer, count: Any, name: str) -> Any:
    """The run-time value of the int64 scalar tensor ``count`` (clamped at 0) as a dim."""
    from tvm import te, tirx

    return lw.computed_dims(lambda c: te.compute((1,), lambda _: tirx.max(c(), tirx.const(0, "int64"))), count,
                            count=1, name=name)[0]


@lowers("Loop")
def _loop(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax

    body: Graph = node.attr("body")
    nc = len(node.inputs) - 2
    plan = _Plan(node, body, body.inputs[2:2 + nc], body.outputs[1:1 + nc], body.outputs[1 + nc:],
                 cond_in=body.inputs[1], cond_out=body.outputs[0], counter=body.inputs[0])
    _check_carried(node, plan, node.inputs[2:])
    name = node.name or "loop"
    m, c = node.input(0), node.input(1)
    unbounded = m is None or (m.is_constant and int(m.numpy().reshape(())) == _INT64_MAX)
    trip = relax.const(_INT64_MAX, "int64") if m is None else _scalar(lw, lw.get(m), "loop_trip")
    zero = relax.const(0, "int64")
    if c is None:
        go = _kernel(lw, lambda k, t: k < t, zero, trip, name="loop_go", dtype="bool")
    else:
        from tvm import tirx

        go = _kernel(lw, lambda k, t, g: tirx.all(k < t, g), zero, trip, _scalar(lw, lw.get(c), "loop_cond"),
                     name="loop_go", dtype="bool")
    outs = node.outputs
    scan_outs = [o if o.name and (o.uses or o.is_graph_output) else None
                 for o in [outs[nc + k] if nc + k < len(outs) else Value("") for k in range(len(plan.scans))]]
    used = [k for k, o in enumerate(scan_outs) if o is not None]  # a scan output no one reads is not written
    plan.scans = [plan.scans[k] for k in used]
    bufs, cut, rows = [], [], None
    for k, s in zip(used, plan.scans):
        out = scan_outs[k]
        fixed = out.shape is not None and isinstance(out.shape[0], int)  # shape inference found the trip count
        if not fixed and unbounded:
            raise CodegenError(f"node {node.label()}: a Loop with scan outputs ('{s.name}') needs a trip count to size "
                               f"them; this one runs until its condition fails")
        if not fixed and rows is None:
            rows = _rows_of(lw, trip, "loop_rows")
        bufs.append(_buffer(lw, out.shape[0] if fixed else rows, s, "scan_buffer"))
        cut.append(not fixed)
    state = [trip, zero, go, *[lw.get(v) for v in node.inputs[2:]], *bufs]
    final = _run(lw, name, state, _step(lw, plan, f"{name}_step", state))
    results = dict(enumerate(final[3:3 + nc]))
    count = None
    for k, buf, s, sliced in zip(used, final[3 + nc:], plan.scans, cut):
        if sliced:  # it may have stopped by its condition: the rows it wrote
            count = count if count is not None else _rows_of(lw, final[1], "loop_count")
            shape = [count, *[lw.dim(d) for d in s.shape]]
            buf = lw.emit(lambda b, shape=shape: _te_rows(b, shape), buf, name="scan_rows")
        results[nc + k] = buf
    return [results.get(k) for k, o in enumerate(outs) if o.name]


def _te_rows(b: Any, shape: list[Any]) -> Any:
    from tvm import te

    return te.compute(shape, lambda *ix: b(*ix), name="scan_rows")


@lowers("Scan")
def _scan(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import relax, te

    from kiln.codegen.lowering.te import get_topi

    body: Graph = node.attr("body")
    if (node.graph.model_opset.get("", 0) if node.graph else 0) < 9:
        raise CodegenError(f"node {node.label()}: Scan before opset 9 (a batch axis and sequence_lens) is not compiled; "
                           f"kiln compiles Scan-9 and later")
    m = node.attr("num_scan_inputs")
    n = len(node.inputs) - m
    axes = list(node.attr("scan_input_axes", ()) or [0] * m)
    sources = node.inputs[n:]
    axes = [normalize_axis(a, len(v.shape)) for a, v in zip(axes, sources)]
    k = len(body.outputs) - n
    plan = _Plan(node, body, body.inputs[:n], body.outputs[:n], body.outputs[n:], sliced=body.inputs[n:], axes=axes,
                 reverse_in=[bool(d) for d in node.attr("scan_input_directions", ()) or [0] * m],
                 reverse_out=[bool(d) for d in node.attr("scan_output_directions", ()) or [0] * k])
    _check_carried(node, plan, node.inputs[:n])
    name = node.name or "scan"
    first, axis = lw.get(sources[0]), axes[0]
    trip = lw.emit(lambda x: te.compute((), lambda: x.shape[axis], name="scan_length"), first, name="scan_length")
    length = lw.dim(sources[0].shape[axis])
    zero = relax.const(0, "int64")
    go = _kernel(lw, lambda i, t: i < t, zero, trip, name="loop_go", dtype="bool")
    bufs = [_buffer(lw, length, s, "scan_buffer") for s in plan.scans]
    state = [trip, zero, go, *[lw.get(v) for v in node.inputs[:n]], *bufs, *[lw.get(v) for v in sources]]
    final = _run(lw, name, state, _step(lw, plan, f"{name}_step", state))
    results = final[3:3 + n]
    out_axes = list(node.attr("scan_output_axes", ()) or [0] * k)
    for buf, s, a in zip(final[3 + n:3 + n + k], plan.scans, out_axes):
        a = normalize_axis(a, len(s.shape) + 1)
        if a:
            perm = [*range(1, a + 1), 0, *range(a + 1, len(s.shape) + 1)]
            buf = lw.emit(lambda b, p=perm: get_topi().transpose(b, p), buf, name="scan_output_axis")
        results.append(buf)
    return [r for r, o in zip(results, node.outputs) if o.name]
