"""Lowering of LinearAttention: the recurrent (linear-attention) state update over time.

One TIR kernel (``te.extern``): for each batch row and KV head, in parallel, a serial loop over
time keeps the [d_k, d_v] state in the ``present_state`` output and updates it with the chosen
rule: ``linear`` (S += kᵀv), ``gated`` (S = exp(g)·S + kᵀv, g per head or per key dim),
``delta`` and ``gated_delta`` (v replaced by β·(v − kS) first). Each query head of a KV group
reads its KV head's state: out = scale · q·S. ``chunk_size`` is a tuning hint and changes nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import statements
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer

_RULES = ("linear", "gated", "delta", "gated_delta")


@lowers("LinearAttention")
def _linear_attention(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te

    q, k, v, past, decay, beta = (node.input(i) for i in range(6))
    rule = node.attr("update_rule", "gated_delta")
    hq, hk = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if rule not in _RULES:
        raise CodegenError(f"node {node.label()}: update_rule {rule!r} is not one of {', '.join(_RULES)}")
    if not hq or not hk or hq % hk:
        raise CodegenError(f"node {node.label()}: q_num_heads ({hq}) must be a positive multiple of kv_num_heads ({hk})")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if gated != (decay is not None) or delta != (beta is not None):
        raise CodegenError(f"node {node.label()}: update_rule {rule!r} "
                           f"{'needs' if gated else 'forbids'} decay and {'needs' if delta else 'forbids'} beta")
    if any(t.rank != 3 for t in (q, k, v)):
        raise CodegenError(f"node {node.label()}: LinearAttention needs rank-3 (batch, time, heads·dim) inputs")
    widths = [t.shape[-1] for t in (q, v)] + ([decay.shape[-1]] if gated else []) + ([beta.shape[-1]] if delta else [])
    if not all(isinstance(w, int) for w in widths):
        raise CodegenError(f"node {node.label()}: LinearAttention needs static head widths to compile")
    dk, dv = q.shape[-1] // hq, v.shape[-1] // hk
    per_dim = gated and decay.shape[-1] == hk * dk
    beta_per_head = delta and beta.shape[-1] == hk
    scale = node.attr("scale", 0.0) or 1.0 / math.sqrt(dk)
    dt = q.dtype.numpy.name
    if past is not None and past.dtype.numpy.name != dt:
        raise CodegenError(f"node {node.label()}: a past_state of another type than the query does not compile yet")
    has = [x is not None for x in (past, decay, beta)]

    def compute(qt: Any, kt: Any, vt: Any, *rest: Any) -> list[Any]:
        b, t = qt.shape[0], qt.shape[1]
        shapes = [(b, t, hq * dv), (b, hk, dk, dv)]
        return te.extern(shapes, [qt, kt, vt, *rest],
                         lambda i, o: _kernel(i, o, has, hq, hk, dk, dv, per_dim, beta_per_head, scale, dt),
                         dtype=[dt, dt], name="linear_attention")

    args = [lw.get(x) for x in (q, k, v, past, decay, beta) if x is not None]
    result = lw.emit(compute, *args, name="linear_attention")
    return lw.unpack_all(result, 2)


def _kernel(ins: list[Any], outs: list[Any], has: list[bool], hq: int, hk: int, dk: int, dv: int, per_dim: bool,
            beta_per_head: bool, scale: float, dt: str) -> Any:
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    q, k, v = (T.buffer_proxy(p) for p in ins[:3])
    rest = iter(ins[3:])
    past, decay, beta = (T.buffer_proxy(next(rest)) if h else None for h in has)
    out, state = T.buffer_proxy(outs[0]), T.buffer_proxy(outs[1])
    group = hq // hk

    def c(x: float) -> Any:
        return tirx.const(x, dt)

    with IRBuilder() as ib:
        nb, nt = ins[0].shape[0], ins[0].shape[1]
        with statements(), T.parallel(0, nb * hk) as bh:
            b, h = bh // hk, bh % hk
            vp = T.buffer_proxy(T.alloc_buffer((dv,), dt, scope="local"))
            acc = T.buffer_proxy(T.alloc_buffer((1,), dt, scope="local"))
            with T.serial(0, dk) as d, T.serial(0, dv) as m:
                state[b, h, d, m] = past[b, h, d, m] if past is not None else c(0)
            with T.serial(0, nt) as s:
                if decay is not None:
                    with T.serial(0, dk) as d:
                        g = tirx.exp(decay[b, s, h * dk + d] if per_dim else decay[b, s, h])
                        with T.serial(0, dv) as m:
                            state[b, h, d, m] = state[b, h, d, m] * g
                with T.serial(0, dv) as m:
                    if beta is not None:
                        acc[0] = c(0)
                        with T.serial(0, dk) as d:
                            acc[0] = acc[0] + state[b, h, d, m] * k[b, s, h * dk + d]
                        bt = beta[b, s, h] if beta_per_head else beta[b, s, 0]
                        vp[m] = bt * (v[b, s, h * dv + m] - acc[0])
                    else:
                        vp[m] = v[b, s, h * dv + m]
                with T.serial(0, dk) as d, T.serial(0, dv) as m:
                    state[b, h, d, m] = state[b, h, d, m] + k[b, s, h * dk + d] * vp[m]
                with T.serial(0, group) as g, T.serial(0, dv) as m:
                    acc[0] = c(0)
                    with T.serial(0, dk) as d:
                        acc[0] = acc[0] + q[b, s, (h * group + g) * dk + d] * state[b, h, d, m]
                    out[b, s, (h * group + g) * dv + m] = acc[0] * c(scale)
    return ib.get()
