"""Lowerings of spectral ops: DFT (forward, inverse, one-sided, irfft) and STFT.

Both are written as a direct transform in TE: each output bin is one reduction over the signal,
with the twiddle angle reduced as ``(k·n) mod L`` in integers first, so it stays exact for long
lengths. That is O(N·L) per transformed row, not an FFT: right for the short frames of audio
front ends, slow for very long transforms. The transform length must be known at compile time
(a constant ``dft_length`` / ``frame_length``, or the signal's dim), or be read at run time: the
output's size is then computed from it before the kernel runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import pick, static_shape
from kiln.ir import Node, const_ints, normalize_axis

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


def _param(lw: Lowerer, node: Node, i: int) -> tuple[int | None, Any]:
    """Optional scalar input ``i``: (its value, None) when constant, (None, its lowered tensor) when
    read at run time, (None, None) when absent."""
    v = node.input(i)
    if v is None:
        return None, None
    got = const_ints(v)
    if got is not None and len(got) == 1:
        return int(got[0]), None
    return None, lw.get(v)


def _read(t: Any) -> Any:
    """A run-time scalar (0-d or [1]) tensor's value as int64."""
    from tvm import tirx

    return tirx.Cast("int64", t[()] if len(t.shape) == 0 else t[0])


def _twiddle(k: Any, n: Any, length: Any, dt: str) -> tuple[Any, Any]:
    """cos and sin of 2π·k·n/length, the angle reduced in integers (``length`` an int or int64 expression)."""
    from tvm import tirx

    m = tirx.Cast("int64", k) * tirx.Cast("int64", n) % length
    # in float64 whatever the data's type: sin(float32(π)) is -8.7e-8, not 0, and a real signal's
    # Nyquist bin would pick up an imaginary part that onnxruntime and numpy do not give
    angle = tirx.Cast("float64", m) * tirx.const(2 * math.pi, "float64") / tirx.Cast("float64", length)
    return tirx.Cast(dt, tirx.cos(angle)), tirx.Cast(dt, tirx.sin(angle))


def _static(d: Any) -> int | None:
    from tvm import tirx

    return int(d) if isinstance(d, (int, tirx.IntImm)) else None


@lowers("DFT")
def _dft(lw: Lowerer, node: Node) -> list[Any]:
    """DFT-17 (axis an attribute) and DFT-20 (axis input 2); ``dft_length`` pads or truncates.

    An axis read at run time computes the transform over every axis the declared output shape
    allows and keeps the asked one; a ``dft_length`` read at run time sizes the output before the
    kernel runs (or the declared shape does).
    """
    from tvm import te, tirx

    x = node.input(0)
    rank = x.rank
    if rank is None or rank < 2:
        raise CodegenError(f"node {node.label()}: DFT needs an input of known rank (at least 2) to compile")
    axis_t = None
    if lw.graph.model_opset.get("", 20) < 20:
        axis: int | None = node.attr("axis", 1)
    else:
        axis, axis_t = _param(lw, node, 2)
        axis = -2 if axis is None and axis_t is None else axis
    inverse, onesided = bool(node.attr("inverse", 0)), bool(node.attr("onesided", 0))
    irfft = inverse and onesided
    length_c, length_t = _param(lw, node, 1)
    declared = static_shape(node.outputs[0])
    shape_in = x.shape or []

    def bins_of(a: int) -> int | None:
        n = shape_in[a] if isinstance(shape_in[a], int) else None
        length = length_c if length_c is not None else (None if length_t is not None or n is None else
                                                        2 * (n - 1) if irfft else n)
        if length is None:
            return None
        return length if inverse or not onesided else length // 2 + 1

    if axis is not None:
        axes = [normalize_axis(axis, rank)]
    else:  # read at run time: the axes whose transform has the declared shape
        axes = [a for a in range(rank - 1) if declared is not None and all(
            d == declared[k] for k, d in enumerate(shape_in[:-1]) if k != a) and bins_of(a) in (None, declared[a])]
        if not axes:
            raise CodegenError(f"node {node.label()}: DFT with its axis read at run time needs a declared output shape")
    if rank - 1 in axes:
        raise CodegenError(f"node {node.label()}: DFT's axis cannot be the last (real/imaginary) axis")
    bins_rt = None
    if declared is None and length_t is not None:  # the bin count follows the length read at run time

        def bins_at_run_time(ln: Any) -> Any:
            length = _read(ln)
            return te.compute((1,), lambda _: tirx.floordiv(length, 2) + 1 if onesided and not inverse else length,
                              name="dft_bins")

        (bins_rt,) = lw.computed_dims(bins_at_run_time, length_t, count=1, name="dft")

    def transform(t: Any, ln: Any, axis: int) -> Any:
        n_in = _static(t.shape[axis])
        complex_in = _static(t.shape[-1]) == 2
        n_dim = tirx.Cast("int64", t.shape[axis])
        if length_c is not None:
            length: Any = length_c
        elif ln is not None:
            length = _read(ln)
        elif n_in is not None:
            length = 2 * (n_in - 1) if irfft else n_in
        else:
            length = 2 * (n_dim - 1) if irfft else n_dim
        if isinstance(length, int) and length <= 0:
            raise CodegenError(f"node {node.label()}: DFT length {length} is not positive")
        if declared is not None:
            bins = declared[axis]
        elif isinstance(length, int):
            bins = length // 2 + 1 if onesided and not inverse else length
        elif bins_rt is not None:
            bins = bins_rt
        else:  # the signal's own symbolic length
            bins = tirx.floordiv(length, 2) + 1 if onesided and not inverse else length
        dt = str(t.dtype)
        wide = "float64" if dt == "float64" else "float32"
        used = tirx.min(n_dim, tirx.floordiv(length, 2) + 1) if irfft else tirx.min(n_dim, length)
        shape = [*t.shape[:axis], bins, *t.shape[axis + 1:-1], 1 if irfft else 2]
        sign = tirx.const(1.0 if inverse else -1.0, wide)

        def at(o: tuple, n: Any, part: int) -> Any:
            if part == 1 and not complex_in:
                return tirx.const(0.0, wide)
            return tirx.Cast(wide, t[(*o[:axis], n, *o[axis + 1:-1], part if complex_in else 0)])

        def body(*o: Any) -> Any:
            n = te.reduce_axis((0, used), "n")
            c, s = _twiddle(o[axis], n, length, wide)
            s = sign * s
            re, im = at(o, n, 0), at(o, n, 1)
            if irfft:  # x[j] = 1/L Σ_k w_k Re(X[k] e^{+iθ}), w_k = 1 at DC and Nyquist, else 2
                nyquist = tirx.all(tirx.floormod(length, 2) == 0, tirx.Cast("int64", n) == tirx.floordiv(length, 2))
                w = tirx.Select(tirx.any(n == 0, nyquist), tirx.const(1.0, wide), tirx.const(2.0, wide))
                term = w * (re * c - im * s)
            else:  # (re + i·im)(c + i·s): the real part for o[-1] = 0, the imaginary for 1
                term = tirx.Select(o[-1] == 0, re * c - im * s, re * s + im * c)
            return te.sum(term, axis=n)

        summed = te.compute(shape, body, name="dft_sum")
        scale = tirx.const(1.0, wide) / tirx.Cast(wide, length) if inverse else tirx.const(1.0, wide)
        return te.compute(shape, lambda *o: tirx.Cast(dt, summed[o] * scale), name="dft")

    def compute(t: Any, *params: Any) -> Any:
        p = list(params)
        ln = p.pop(0) if length_t is not None else None
        at = p.pop(0) if axis_t is not None else None
        outs = [transform(t, ln, a) for a in axes]
        if len(outs) == 1:
            return outs[0]

        def body(*o: Any) -> Any:
            asked = _read(at)
            asked = tirx.Select(asked < 0, asked + rank, asked)
            v = outs[-1][o]
            for a, out in zip(axes[-2::-1], outs[-2::-1]):
                v = tirx.Select(asked == a, out[o], v)
            return v

        return te.compute(outs[0].shape, body, name="dft_axis")

    args = [lw.get(x)] + [t for t in (length_t, axis_t) if t is not None]
    return [lw.emit(compute, *args, name="dft")]


@lowers("STFT")
def _stft(lw: Lowerer, node: Node) -> list[Any]:
    """STFT-17: frames of ``frame_length`` every ``frame_step`` samples, weighted by ``window``.

    ``frame_step`` and ``frame_length`` may be read at run time; the frame count and bins are then
    computed from them before the kernel runs (or taken from the declared output shape).
    """
    from tvm import te, tirx

    x, window = node.input(0), node.input(2)
    if x.rank != 3:
        raise CodegenError(f"node {node.label()}: STFT needs a [batch, samples, 1 or 2] signal to compile")
    step_c, step_t = _param(lw, node, 1)
    frame_c, frame_t = _param(lw, node, 3)
    if step_c is None and step_t is None:
        raise CodegenError(f"node {node.label()}: STFT needs a frame_step")
    wlen = window.shape[0] if window is not None and window.shape and isinstance(window.shape[0], int) else None
    if window is not None and wlen is None:
        raise CodegenError(f"node {node.label()}: STFT needs a window of static length to compile")
    if frame_c is None and frame_t is None:
        if wlen is None:
            raise CodegenError(f"node {node.label()}: STFT needs a frame_length or a window")
        frame_c = wlen
    if (step_c is not None and step_c <= 0) or (frame_c is not None and frame_c <= 0):
        raise CodegenError(f"node {node.label()}: STFT needs a positive frame_step and frame_length")
    onesided = bool(node.attr("onesided", 1))
    declared = static_shape(node.outputs[0])
    dims_rt = None
    if declared is None and (step_c is None or frame_c is None):  # frames and bins from the values read at run time

        def dims_of(t: Any, *params: Any) -> Any:
            p = list(params)
            step = step_c if step_c is not None else _read(p.pop(0))
            frame = frame_c if frame_c is not None else _read(p.pop(0))
            frames = tirx.floordiv(tirx.Cast("int64", t.shape[1]) - frame, step) + 1
            bins = tirx.floordiv(frame, 2) + 1 if onesided else frame
            return te.compute((2,), lambda i: pick(i, [frames, bins]), name="stft_dims")

        dims_rt = lw.computed_dims(dims_of, lw.get(x), *[v for v in (step_t, frame_t) if v is not None], count=2,
                                   name="stft")

    def compute(t: Any, *params: Any) -> Any:
        p = list(params)
        st = p.pop(0) if step_t is not None else None
        fr = p.pop(0) if frame_t is not None else None
        w = p.pop(0) if window is not None else None
        step = step_c if step_c is not None else _read(st)
        frame = frame_c if frame_c is not None else _read(fr)
        dt = str(t.dtype)
        wide = "float64" if dt == "float64" else "float32"
        complex_in = _static(t.shape[-1]) == 2
        if declared is not None:
            frames, bins = declared[1], declared[2]
        elif dims_rt is not None:
            frames, bins = dims_rt
        else:
            frames = tirx.floordiv(tirx.Cast("int64", t.shape[1]) - frame, step) + 1
            bins = frame // 2 + 1 if onesided else frame
        extent = wlen if wlen is not None else frame

        def at(b: Any, f: Any, n: Any, part: int) -> Any:
            if part == 1 and not complex_in:
                return tirx.const(0.0, wide)
            v = tirx.Cast(wide, t[b, f * step + n, part if complex_in else 0])
            return v * tirx.Cast(wide, w[n]) if w is not None else v

        def body(b: Any, f: Any, k: Any, c: Any) -> Any:
            n = te.reduce_axis((0, extent), "n")
            cs, sn = _twiddle(k, n, frame, wide)
            re, im = at(b, f, n, 0), at(b, f, n, 1)
            return te.sum(tirx.Select(c == 0, re * cs + im * sn, im * cs - re * sn), axis=n)

        shape = [t.shape[0], frames, bins, 2]
        summed = te.compute(shape, body, name="stft_sum")
        return te.compute(shape, lambda *o: tirx.Cast(dt, summed[o]), name="stft")

    args = [lw.get(x)] + [v for v in (step_t, frame_t) if v is not None]
    args += [lw.get(window)] if window is not None else []
    return [lw.emit(compute, *args, name="stft")]
