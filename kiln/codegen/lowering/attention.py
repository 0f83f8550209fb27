"""Lowerings of attention: ``kiln::Attention`` (what the transformer fusion makes), ONNX's Attention
op and RotaryEmbedding.

ONNX's Attention (opsets 23+) is one prim func: 3-D or 4-D Q/K/V, grouped KV heads, a bool or
additive mask (shorter masks padded), a past KV cache (with the present outputs), causal masking,
sliding windows, ``nonpad_kv_seqlen``, softcap and every ``qk_matmul_output_mode``. It follows
onnx's reference implementation step by step: the scale is split as sqrt(scale) on Q and on K,
rows whose bias masks every key give zeros, and a softcap applies before the bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.softmax import emit_softmax
from kiln.codegen.lowering.te import broadcast_dims, exp_expr, is_one, scheduled_batch_matmul
from kiln.ir import DType, Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


@lowers("Attention", domain="kiln")
def _kiln_attention(lw: Lowerer, node: Node) -> list[Any]:
    """``softmax(scale * Q @ Kt + Mask) @ V`` over the last axis (see kiln.ir.kiln_ops), as one
    kernel that the ``attention`` schedule runs a tile of query rows at a time, in cache."""
    q, kt, v, mask = (node.input(i) for i in range(4))
    scale = node.attr("scale", 1.0)
    nan_to_zero = bool(node.attr("nan_to_zero", 0))

    keys = kt.shape[-1] if kt.shape else None
    if isinstance(keys, int) and keys > FUSED_ATTENTION_MAX_KEYS and q.dtype is DType.FLOAT32:
        return [_attention_in_three_kernels(lw, q, kt, v, mask, scale, nan_to_zero)]

    def compute(qt: Any, ktt: Any, vt: Any, *m: Any) -> Any:
        return fused_attention(qt, ktt, vt, m[0] if m else None, scale, nan_to_zero)

    args = [lw.get(q), lw.get(kt), lw.get(v)] + ([lw.get(mask)] if mask is not None else [])
    return [lw.emit(compute, *args, name="attention", attrs={"kiln.schedule": "attention"})]


#: keys up to which one fused kernel runs an attention; beyond, a tile of query rows' scores no
#: longer stays in cache, and three kernels are faster: Whisper's 1500 keys ran 178 ms a layer fused
#: and about 90 ms as Q·Kt, softmax and P·V (AMD EPYC Zen 3, 2 threads)
FUSED_ATTENTION_MAX_KEYS = 512


def scaled_masked(x: Any, i: tuple, scale: float, mask: Any | None, dtype: str) -> Any:
    """A score ``x`` at index ``i``, scaled, plus the mask, which broadcasts against the scores
    from the right."""
    from tvm import tirx

    x = x * tirx.const(scale, dtype) if scale != 1.0 else x
    if mask is None:
        return x
    off = len(i) - len(mask.shape)
    return x + mask[tuple(0 if is_one(n) else i[off + k] for k, n in enumerate(mask.shape))]


def _attention_in_three_kernels(lw: Lowerer, q: Any, kt: Any, v: Any, mask: Any | None, scale: float,
                                nan_to_zero: bool) -> Any:
    """``kiln::Attention`` as the scheduled batch matmul Q·Kt (the scale and the mask in its
    write-back), kiln's row softmax, and the batch matmul P·V. A fully masked row is NaN, as the
    softmax of a row of -inf is, or 0 with ``nan_to_zero``."""
    from tvm import te, tirx

    def scores(qt: Any, ktt: Any, *m: Any) -> Any:
        return scheduled_batch_matmul(qt, ktt, lambda x, i: scaled_masked(x, i, scale, m[0] if m else None, qt.dtype))

    args = [lw.get(q), lw.get(kt)] + ([lw.get(mask)] if mask is not None else [])
    s = lw.emit(scores, *args, name="attention_scores", attrs={"kiln.schedule": "dense"})
    p = emit_softmax(lw, s)
    if nan_to_zero:
        p = lw.emit(lambda t: te.compute(t.shape, lambda *i: tirx.Select(tirx.isnan(t[i]), tirx.const(0, t.dtype), t[i]),
                                         name="nan_to_zero"), p, name="nan_to_zero")
    return lw.emit(scheduled_batch_matmul, p, lw.get(v), name="attention_values", attrs={"kiln.schedule": "dense"})


def fused_attention(q: Any, kt: Any, v: Any, mask: Any | None, scale: float, nan_to_zero: bool) -> Any:
    """The stages of one attention, named for the ``attention`` schedule: ``qk`` (Q @ Kt), ``row_max``,
    ``exp`` (of the scaled, masked scores less the row's max), ``row_sum``, ``pv`` (exp @ V) and
    ``attention`` (pv over the row's sum).

    A row whose every score is -inf (fully masked) gives NaN, as softmax's 0/0 does, or 0 with
    ``nan_to_zero``; a NaN score makes its row NaN.
    """
    from tvm import te, tirx

    dt = q.dtype
    batch = broadcast_dims(broadcast_dims(list(q.shape[:-2]), list(kt.shape[:-2])), list(v.shape[:-2]))
    sq, d, sk, dv = q.shape[-2], q.shape[-1], kt.shape[-1], v.shape[-1]
    nb = len(batch)

    def at(t: Any, idx: tuple, *last: Any) -> Any:  # t's element for output batch index idx (broadcast)
        lead = t.shape[:len(t.shape) - len(last)]
        off = nb - len(lead)
        return t[(*[0 if is_one(n) else idx[off + k] for k, n in enumerate(lead)], *last)]

    rd = te.reduce_axis((0, d), "rd")
    qk = te.compute((*batch, sq, sk), lambda *i: te.sum(at(q, i, i[-2], rd) * at(kt, i, rd, i[-1]), axis=rd),
                    name="qk")

    def score(*i: Any) -> Any:
        return scaled_masked(qk[i], i, scale, mask, dt)

    ninf, zero = tirx.const(float("-inf"), dt), tirx.const(0, dt)
    rj = te.reduce_axis((0, sk), "rj")
    row_max = te.compute((*batch, sq), lambda *i: te.max(score(*i, rj), axis=rj), name="row_max")

    def exp_of(*i: Any) -> Any:
        x = score(*i) - row_max[i[:-1]]
        e = exp_expr(x) if dt == "float32" else tirx.exp(x)
        return tirx.Select(row_max[i[:-1]] == ninf, zero, e)

    e = te.compute((*batch, sq, sk), exp_of, name="exp")
    rs = te.reduce_axis((0, sk), "rs")

    def term(*i: Any) -> Any:
        # a NaN score makes its row's sum, and so the row, NaN: checked here, in the serial sum,
        # not in exp, where a Select on isnan does not vectorise (it scalarised the whole exp stage)
        x = score(*i) - row_max[i[:-1]]
        return tirx.Select(tirx.isnan(x), x, e[i])

    row_sum = te.compute((*batch, sq), lambda *i: te.sum(term(*i, rs), axis=rs), name="row_sum")
    rp = te.reduce_axis((0, sk), "rp")
    pv = te.compute((*batch, sq, dv), lambda *i: te.sum(e[(*i[:-1], rp)] * at(v, i[:-2], rp, i[-1]), axis=rp),
                    name="pv")
    masked = zero if nan_to_zero else tirx.const(float("nan"), dt)

    def normalized(*i: Any) -> Any:
        o = tirx.Select(row_max[i[:-1]] == ninf, masked, pv[i] / row_sum[i[:-1]])
        return tirx.Select(tirx.isnan(o), zero, o) if nan_to_zero else o

    return te.compute((*batch, sq, dv), normalized, name="attention")


@lowers("Attention")
def _attention(lw: Lowerer, node: Node) -> list[Any]:
    from tvm import te, tirx

    q_v = node.input(0)
    rank = q_v.rank
    if rank not in (3, 4):
        raise CodegenError(f"node {node.label()}: Attention needs 3-D or 4-D inputs")
    names = ["q", "k", "v", "mask", "past_k", "past_v", "nonpad"]
    present = [n for i, n in enumerate(names) if node.input(i) is not None]
    mask_v = node.input(3)
    mask_bool = mask_v is not None and mask_v.dtype.numpy.kind == "b"
    q_heads_attr, kv_heads_attr = node.attr("q_num_heads"), node.attr("kv_num_heads")
    scale_attr = node.attr("scale")
    causal = bool(node.attr("is_causal", 0))
    softcap = node.attr("softcap")
    softcap = softcap if softcap else None
    mode = node.attr("qk_matmul_output_mode", 0)
    left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
    n_out = len(node.outputs)

    def compute(*ts: Any) -> Any:
        t = dict(zip(present, ts))
        q, k, v = t["q"], t["k"], t["v"]
        dt = q.dtype
        ninf = tirx.const(float("-inf"), dt)
        zero = tirx.const(0, dt)
        if rank == 3:
            hq, hk = int(q_heads_attr), int(kv_heads_attr)
            dq, dk, dv = q.shape[2] // hq, k.shape[2] // hk, v.shape[2] // hk

            def q4(b: Any, h: Any, i: Any, d: Any) -> Any:
                return q[b, i, h * dq + d]

            def k4(b: Any, h: Any, j: Any, d: Any) -> Any:
                return k[b, j, h * dk + d]

            def v4(b: Any, h: Any, j: Any, d: Any) -> Any:
                return v[b, j, h * dv + d]

            batch, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
        else:
            hq, hk = int(q.shape[1]), int(k.shape[1])
            dq, dv = q.shape[3], v.shape[3]
            q4, k4, v4 = (lambda b, h, i, d: q[b, h, i, d]), (lambda b, h, j, d: k[b, h, j, d]), \
                (lambda b, h, j, d: v[b, h, j, d])
            batch, s_q, s_k = q.shape[0], q.shape[2], k.shape[2]
        past = int(t["past_k"].shape[2]) if "past_k" in t else 0
        total = s_k + past
        kfull = te.compute((batch, hk, total, dq), lambda b, h, j, d: tirx.Select(
            j < past, t["past_k"][b, h, tirx.min(j, max(past - 1, 0)), d] if past else zero,
            k4(b, h, j - past, d)), name="present_key") if (past or n_out > 1) else None
        vfull = te.compute((batch, hk, total, dv), lambda b, h, j, d: tirx.Select(
            j < past, t["past_v"][b, h, tirx.min(j, max(past - 1, 0)), d] if past else zero,
            v4(b, h, j - past, d)), name="present_value") if (past or n_out > 1) else None
        kf = (lambda b, h, j, d: kfull[b, h, j, d]) if kfull is not None else k4
        vf = (lambda b, h, j, d: vfull[b, h, j, d]) if vfull is not None else v4
        reps = hq // hk
        sqrt_scale = tirx.sqrt(tirx.const(scale_attr, dt)) if scale_attr is not None else \
            tirx.sqrt(tirx.const(1.0, dt) / tirx.sqrt(tirx.Cast(dt, dq)))

        def bias(b: Any, h: Any, i: Any, j: Any) -> Any:
            out: Any = zero
            if "mask" in t:
                m = t["mask"]
                mr = len(m.shape)
                full = [b, h, i, j][4 - mr:]
                idx = [0 if is_one(d) else ix for d, ix in zip(m.shape[:-1], full[:-1])]
                ml = m.shape[-1]
                jj = tirx.min(j, ml - 1)
                val = m[(*idx, jj)]
                val = tirx.Select(val, zero, ninf) if mask_bool else val
                out = tirx.Select(j < ml, val, ninf)
            offset: Any = past
            if "nonpad" in t and not past:
                offset = t["nonpad"][b] - s_q
            if causal:
                out = tirx.Select(j <= i + offset, out, ninf)
            if left >= 0 or right >= 0:
                diff = i + offset - j
                ok: Any = tirx.const(True)
                if left >= 0:
                    ok = tirx.all(ok, diff <= left)
                if right >= 0:
                    ok = tirx.all(ok, -diff <= right)
                out = tirx.Select(ok, out, ninf)
            if "nonpad" in t:
                out = tirx.Select(j < t["nonpad"][b], out, ninf)
            return out

        rd = te.reduce_axis((0, dq), "rd")
        qk = te.compute((batch, hq, s_q, total), lambda b, h, i, j: te.sum(
            q4(b, h, i, rd) * sqrt_scale * (kf(b, h // reps, j, rd) * sqrt_scale), axis=[rd]), name="qk")
        if softcap is not None:
            c = tirx.const(softcap, dt)
            qk = te.compute(qk.shape, lambda *i: tirx.tanh(qk[i] / c) * c, name="softcap")
        bias_t = te.compute(qk.shape, bias, name="bias")
        sb = te.compute(qk.shape, lambda *i: qk[i] + bias_t[i], name="qk_bias")
        r1 = te.reduce_axis((0, total), "r1")
        mx = te.compute(qk.shape[:3], lambda b, h, i: te.max(sb[b, h, i, r1], axis=[r1]), name="row_max")
        r2 = te.reduce_axis((0, total), "r2")
        bmax = te.compute(qk.shape[:3], lambda b, h, i: te.max(bias_t[b, h, i, r2], axis=[r2]), name="bias_max")
        safe = te.compute(mx.shape, lambda *i: tirx.Select(tirx.isinf(mx[i]), zero, mx[i]), name="safe_max")
        ex = te.compute(qk.shape, lambda b, h, i, j: tirx.exp(sb[b, h, i, j] - safe[b, h, i]), name="exp")
        r3 = te.reduce_axis((0, total), "r3")
        sm = te.compute(mx.shape, lambda b, h, i: te.sum(ex[b, h, i, r3], axis=[r3]), name="row_sum")
        p = te.compute(qk.shape, lambda b, h, i, j: tirx.Select(
            tirx.isinf(bmax[b, h, i]), zero,
            ex[b, h, i, j] / tirx.Select(sm[b, h, i] == zero, tirx.const(1, dt), sm[b, h, i])), name="probs")
        r4 = te.reduce_axis((0, total), "r4")
        if rank == 3:
            y = te.compute((batch, s_q, hq * dv), lambda b, i, hd: te.sum(
                p[b, hd // dv, i, r4] * vf(b, (hd // dv) // reps, r4, hd % dv), axis=[r4]), name="attention")
        else:
            y = te.compute((batch, hq, s_q, dv), lambda b, h, i, d: te.sum(
                p[b, h, i, r4] * vf(b, h // reps, r4, d), axis=[r4]), name="attention")
        outs = [y]
        if n_out > 1:
            outs += [kfull, vfull]
        if n_out > 3:
            outs.append({2: sb, 3: p}.get(mode, qk))
        return outs if n_out > 1 else y

    out = lw.emit(compute, *[lw.get(node.input(i)) for i, _ in enumerate(names) if node.input(i) is not None],
                  name="attention")
    if n_out == 1:
        return [out]
    return lw.unpack(out, node)


@lowers("RotaryEmbedding")
def _rotary(lw: Lowerer, node: Node) -> list[Any]:
    """RotaryEmbedding (3-D with num_heads, or 4-D (B, H, S, D)), split halves or interleaved pairs,
    on the first ``rotary_embedding_dim`` features, with or without position ids."""
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank
    interleaved = bool(node.attr("interleaved", 0))
    heads = node.attr("num_heads", 0)
    rot_attr = node.attr("rotary_embedding_dim", 0)
    has_pos = node.input(3) is not None
    if rank not in (3, 4) or (rank == 3 and not heads):
        raise CodegenError(f"node {node.label()}: RotaryEmbedding needs 4-D input or num_heads")

    def compute(t: Any, cos: Any, sin: Any, *pos: Any) -> Any:
        head = t.shape[2] // heads if rank == 3 else t.shape[3]
        rot = rot_attr or int(head)
        half = rot // 2

        def cache(c: Any, b: Any, s: Any, j: Any) -> Any:
            return c[pos[0][b, s], j] if pos else c[b, s, j]

        def body(*i: Any) -> Any:
            if rank == 3:
                b, s, hd = i
                d = hd % head
                base = hd - d

                def at(dd: Any) -> Any:
                    return t[b, s, base + dd]
            else:
                b, h, s, d = i

                def at(dd: Any) -> Any:
                    return t[b, h, s, dd]
            if interleaved:
                j, second = d // 2, d % 2 == 1
                x1, x2 = at(d - d % 2), at(d - d % 2 + 1)
            else:
                j, second = tirx.Select(d < half, d, d - half), d >= half
                x1, x2 = at(tirx.Select(d < half, d, d - half)), at(tirx.Select(d < half, d + half, d))
            jj = tirx.min(j, half - 1)
            c, sn = cache(cos, b, s, jj), cache(sin, b, s, jj)
            rotated = tirx.Select(second, sn * x1 + c * x2, c * x1 - sn * x2)
            return tirx.Select(d < rot, rotated, at(d))

        return te.compute(t.shape, body, name="rotary_embedding")

    ins = [lw.get(node.input(i)) for i in range(3)] + ([lw.get(node.input(3))] if has_pos else [])
    return [lw.emit(compute, *ins, name="rotary_embedding")]
