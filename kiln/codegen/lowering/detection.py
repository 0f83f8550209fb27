"""Lowerings of the ops of detection heads: RoiAlign, MaxRoiPool and NonMaxSuppression.

Each follows onnxruntime where onnx's reference is looser or silent (users compare with it):
RoiAlign's max mode takes the max of the four weighted corners of each sample, MaxRoiPool rounds
its rois half away from zero, and NonMaxSuppression visits boxes by score (ties: lower index
first), keeps a box unless its IoU with a kept one is above the threshold, and skips boxes whose
intersection or area is not positive. How many boxes NonMaxSuppression selects is known only at
run time (:meth:`~kiln.codegen.lowering.lowerer.Lowerer.runtime_dims`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.codegen.lowering.registry import CodegenError, lowers
from kiln.codegen.lowering.te import full, static_shape, statements
from kiln.ir import Node

if TYPE_CHECKING:
    from kiln.codegen.lowering.lowerer import Lowerer


@lowers("RoiAlign")
def _roi_align(lw: Lowerer, node: Node) -> list[Any]:
    """RoiAlign in avg or max mode, with ``half_pixel`` or ``output_half_pixel`` coordinates; with
    ``sampling_ratio`` 0 each roi's sampling grid (ceil(roi size / output size)) is read at run time."""
    from tvm import te, tirx

    x = node.input(0)
    if static_shape(x) is None:
        raise CodegenError(f"node {node.label()}: RoiAlign needs a static input shape to compile")
    oh, ow = int(node.attr("output_height", 1)), int(node.attr("output_width", 1))
    ratio = int(node.attr("sampling_ratio", 0))
    scale = float(node.attr("spatial_scale", 1.0))
    avg = node.attr("mode", "avg") == "avg"
    # before opset 16 there is no attribute, and the coordinates are output_half_pixel's
    default = "half_pixel" if lw.graph.model_opset.get("", 16) >= 16 else "output_half_pixel"
    half_pixel = node.attr("coordinate_transformation_mode", default) == "half_pixel"

    def compute(t: Any, rois: Any, batch: Any) -> Any:
        f = t.dtype
        _, ch, height, width = (int(d) for d in t.shape)

        def c(v: float) -> Any:
            return tirx.const(v, f)

        def body(n: Any, k: Any, ph: Any, pw: Any) -> Any:
            off = c(0.5 if half_pixel else 0.0)
            x0, y0 = rois[n, 0] * c(scale) - off, rois[n, 1] * c(scale) - off
            rw, rh = rois[n, 2] * c(scale) - off - x0, rois[n, 3] * c(scale) - off - y0
            if not half_pixel:
                rw, rh = tirx.max(rw, c(1)), tirx.max(rh, c(1))
            bin_h, bin_w = rh / c(oh), rw / c(ow)
            if ratio > 0:
                grid_h: Any = tirx.const(ratio, "int64")
                grid_w: Any = grid_h
            else:
                grid_h = tirx.Cast("int64", tirx.ceil(rh / c(oh)))
                grid_w = tirx.Cast("int64", tirx.ceil(rw / c(ow)))
            iy = te.reduce_axis((0, grid_h), "iy")
            ix = te.reduce_axis((0, grid_w), "ix")
            y = y0 + tirx.Cast(f, ph) * bin_h + (tirx.Cast(f, iy) + c(0.5)) * bin_h / tirx.Cast(f, grid_h)
            xx = x0 + tirx.Cast(f, pw) * bin_w + (tirx.Cast(f, ix) + c(0.5)) * bin_w / tirx.Cast(f, grid_w)
            b = tirx.Cast("int64", batch[n])
            outside = tirx.any(y < c(-1), y > c(height), xx < c(-1), xx > c(width))

            def axis(v: Any, size: int) -> tuple[Any, Any, Any]:
                v = tirx.max(v, c(0))
                low = tirx.Cast("int64", v)
                last = low >= size - 1
                low = tirx.Select(last, tirx.const(size - 1, "int64"), low)
                high = tirx.Select(last, low, low + 1)
                frac = tirx.Select(last, c(0), v - tirx.Cast(f, low))
                return low, high, frac

            yl, yh, ly = axis(y, height)
            xl, xh, lx = axis(xx, width)
            terms = [(c(1) - ly) * (c(1) - lx) * t[b, k, yl, xl], (c(1) - ly) * lx * t[b, k, yl, xh],
                     ly * (c(1) - lx) * t[b, k, yh, xl], ly * lx * t[b, k, yh, xh]]
            if avg:
                count = tirx.Cast(f, tirx.max(grid_h * grid_w, tirx.const(1, "int64")))
                total = terms[0] + terms[1] + terms[2] + terms[3]
                return te.sum(tirx.Select(outside, c(0), total) / count, axis=[iy, ix])
            # onnxruntime's max mode: the largest weighted corner of each sample, then the largest sample
            corner = tirx.max(tirx.max(tirx.max(terms[0], terms[1]), terms[2]), terms[3])
            return te.max(tirx.Select(outside, c(0), corner), axis=[iy, ix])

        shape = (rois.shape[0], ch, oh, ow)
        pooled = te.compute(shape, body, name="roi_align")
        if avg or ratio > 0 or not half_pixel:  # (output_half_pixel rois are at least 1 high and wide)
            return pooled

        def empty(n: Any) -> Any:  # a roi of no height or width has no samples: 0, not the max's identity
            rw = rois[n, 2] - rois[n, 0]
            rh = rois[n, 3] - rois[n, 1]
            return tirx.any(tirx.ceil(rh * c(scale) / c(oh)) <= c(0), tirx.ceil(rw * c(scale) / c(ow)) <= c(0))

        return te.compute(shape, lambda n, k, ph, pw: tirx.Select(empty(n), c(0), pooled[n, k, ph, pw]),
                          name="roi_align_max")

    return [lw.emit(compute, *[lw.get(node.input(i)) for i in range(3)], name="roi_align")]


@lowers("MaxRoiPool")
def _max_roi_pool(lw: Lowerer, node: Node) -> list[Any]:
    """MaxRoiPool as onnxruntime computes it (see ``kiln.ir.interpreter.MaxRoiPool``): each bin's max
    over a window of at most ceil(H / pooled) + 1 rows (and columns), masked to the bin."""
    from tvm import te, tirx

    x = node.input(0)
    si = static_shape(x)
    if si is None:
        raise CodegenError(f"node {node.label()}: MaxRoiPool needs a static input shape to compile")
    ph_n, pw_n = (int(v) for v in node.attr("pooled_shape"))
    scale = float(node.attr("spatial_scale", 1.0))
    _, ch, height, width = si
    win_h, win_w = -(-height // ph_n) + 2, -(-width // pw_n) + 2  # a bin never spans more (the image clips it)

    def compute(t: Any, rois: Any) -> Any:
        f = t.dtype

        def rounded(v: Any) -> Any:  # std::round: half away from zero
            s = v * tirx.const(scale, f)
            return tirx.Cast("int64", tirx.Select(s < tirx.const(0, f), tirx.ceil(s - tirx.const(0.5, f)),
                                                  tirx.floor(s + tirx.const(0.5, f))))

        def window(n: Any, ph: Any, pw: Any) -> tuple[Any, Any, Any, Any]:
            """The bin's rows [h0, h1) and columns [w0, w1), clipped to the image."""
            x1, y1, x2, y2 = (rounded(rois[n, j]) for j in range(1, 5))
            one = tirx.const(1, "int64")
            bin_h = tirx.Cast(f, tirx.max(y2 - y1 + one, one)) / tirx.const(ph_n, f)
            bin_w = tirx.Cast(f, tirx.max(x2 - x1 + one, one)) / tirx.const(pw_n, f)

            def span(p: Any, size: Any, start: Any, limit: int) -> tuple[Any, Any]:
                lo = tirx.Cast("int64", tirx.floor(tirx.Cast(f, p) * size)) + start
                hi = tirx.Cast("int64", tirx.ceil(tirx.Cast(f, p + 1) * size)) + start
                clip = tirx.const(limit, "int64")
                return tirx.min(tirx.max(lo, 0), clip), tirx.min(tirx.max(hi, 0), clip)

            return (*span(ph, bin_h, y1, height), *span(pw, bin_w, x1, width))

        def body(n: Any, k: Any, ph: Any, pw: Any) -> Any:
            b = tirx.Cast("int64", rois[n, 0])
            h0, h1, w0, w1 = window(n, ph, pw)
            rh, rw = te.reduce_axis((0, win_h), "rh"), te.reduce_axis((0, win_w), "rw")
            h, w = h0 + rh, w0 + rw
            inside = tirx.all(h < h1, w < w1)
            value = t[b, k, tirx.min(h, height - 1), tirx.min(w, width - 1)]
            return te.max(tirx.Select(inside, value, tirx.min_value(f)), axis=[rh, rw])

        shape = (rois.shape[0], ch, ph_n, pw_n)
        pooled = te.compute(shape, body, name="max_roi_pool")

        def nonempty(n: Any, k: Any, ph: Any, pw: Any) -> Any:  # a bin clipped away is 0, not the max's identity
            h0, h1, w0, w1 = window(n, ph, pw)
            return tirx.Select(tirx.all(h1 > h0, w1 > w0), pooled[n, k, ph, pw], tirx.const(0, f))

        return te.compute(shape, nonempty, name="max_roi_pool_bins")

    return [lw.emit(compute, lw.get(x), lw.get(node.input(1)), name="max_roi_pool")]


@lowers("NonMaxSuppression")
def _nms(lw: Lowerer, node: Node) -> list[Any]:
    """NonMaxSuppression per batch and class, as onnxruntime runs it: (batch, class, box) rows in
    selection order; the row count is read at run time."""
    boxes, scores = node.input(0), node.input(1)
    sb, ss = static_shape(boxes), static_shape(scores)
    if sb is None or ss is None:
        raise CodegenError(f"node {node.label()}: NonMaxSuppression needs static box and score shapes to compile")
    batches, classes, n = ss
    center = bool(node.attr("center_point_box", 0))
    optional = [node.input(i) is not None for i in (2, 3, 4)]

    def select(bx: Any, sc: Any, *params: Any) -> list[Any]:
        rest = list(params)
        limit, iou, floor = (rest.pop(0) if given else None for given in optional)
        order = _by_score(sc, batches, classes, n)
        return _greedy(bx, sc, order, limit, iou, floor, center, batches, classes, n)

    args = [lw.get(boxes), lw.get(scores)] + [lw.get(node.input(i)) for i in (2, 3, 4) if node.input(i) is not None]
    picked = lw.emit(select, *args, name="nms_select")
    kept, counts, total = lw.unpack_all(picked, 3)
    (m,) = lw.runtime_dims(total, 1, "selected")

    def rows(kept_t: Any, counts_t: Any) -> Any:
        return _selected_rows(kept_t, counts_t, m, classes)

    return [lw.emit(rows, kept, counts, name="nms_rows")]


def _by_score(sc: Any, batches: int, classes: int, n: int) -> Any:
    """(B, C, N) int64: for each batch and class, the box indices by descending score (ties: lower index first)."""
    from tvm import te, tirx

    r = te.reduce_axis((0, n), "r")

    def rank_of(b: Any, c: Any, i: Any) -> Any:
        mine, other = sc[b, c, i], sc[b, c, r]
        ahead = tirx.Or(other > mine, tirx.And(other == mine, r < i))
        return te.sum(tirx.Select(ahead, tirx.const(1, "int64"), tirx.const(0, "int64")), axis=[r])

    rank = te.compute((batches, classes, n), rank_of, name="score_rank")
    r2 = te.reduce_axis((0, n), "r2")
    return te.compute((batches, classes, n), lambda b, c, p: te.min(
        tirx.Select(rank[b, c, r2] == p, r2.var.astype("int64"), tirx.const(n, "int64")), axis=[r2]), name="by_score")


def _greedy(bx: Any, sc: Any, order: Any, limit: Any, iou: Any, floor: Any, center: bool, batches: int,
            classes: int, n: int) -> list[Any]:
    """The greedy pass (serial per batch and class): [kept (B, C, N) int64, counts (B, C) int64, their total (1,)]."""
    from tvm import te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    f = "float32"

    def ir(bx_p: Any, sc_p: Any, order_p: Any, *rest: Any) -> Any:
        *params, kept_p, counts_p = rest
        with IRBuilder() as ib:
            box, score, by_score = T.buffer_proxy(bx_p), T.buffer_proxy(sc_p), T.buffer_proxy(order_p)
            kept, counts = T.buffer_proxy(kept_p), T.buffer_proxy(counts_p)
            vals = [T.buffer_proxy(p) for p in params]
            limit_v = tirx.Cast("int64", vals.pop(0)[0]) if limit is not None else tirx.const(0, "int64")
            iou_v = tirx.Cast(f, vals.pop(0)[0]) if iou is not None else tirx.const(0.0, f)
            floor_v = tirx.Cast(f, vals.pop(0)[0]) if floor is not None else None
            with statements(), T.serial(0, batches * classes) as bc:
                b, c = bc // classes, bc % classes
                cnt = T.buffer_proxy(T.alloc_buffer((1,), "int64", scope="local"))
                keep = T.buffer_proxy(T.alloc_buffer((1,), "int32", scope="local"))
                cnt[0] = tirx.const(0, "int64")
                with T.serial(0, n) as p:
                    i = by_score[b, c, p]
                    ok = cnt[0] < limit_v
                    if floor_v is not None:
                        ok = tirx.all(ok, score[b, c, i] > floor_v)
                    with T.If(ok):
                        with T.Then():
                            keep[0] = tirx.const(1, "int32")
                            with T.serial(0, cnt[0]) as q:
                                j = kept[b, c, q]
                                with T.If(_suppresses(box, b, i, j, iou_v, center, f)):
                                    with T.Then():
                                        keep[0] = tirx.const(0, "int32")
                            with T.If(keep[0] == 1):
                                with T.Then():
                                    kept[b, c, cnt[0]] = i
                                    cnt[0] = cnt[0] + 1
                counts[b, c] = cnt[0]
        return ib.get()

    ins = [bx, sc, order] + [p for p in (limit, iou, floor) if p is not None]
    outs = [tirx.decl_buffer((batches, classes, n), "int64", "kept"), tirx.decl_buffer((batches, classes), "int64", "counts")]
    kept, counts = te.extern([(batches, classes, n), (batches, classes)], ins, lambda i, o: ir(*i, *o),
                             dtype=["int64", "int64"], out_buffers=outs, name="nms_greedy")
    rb, rc = te.reduce_axis((0, batches), "rb"), te.reduce_axis((0, classes), "rc")
    total = te.compute((1,), lambda _: te.sum(counts[rb, rc], axis=[rb, rc]), name="total")
    return [kept, counts, total]


def _suppresses(box: Any, b: Any, i: Any, j: Any, thr: Any, center: bool, f: str) -> Any:
    """Whether box i's IoU with box j is above ``thr`` (onnxruntime's SuppressByIOU: a non-positive
    intersection or area never suppresses)."""
    from tvm import tirx

    def corners(k: Any) -> tuple[Any, Any, Any, Any]:  # (y_min, x_min, y_max, x_max)
        v = [tirx.Cast(f, box[b, k, q]) for q in range(4)]
        if center:  # [x_center, y_center, width, height]
            hw, hh = v[2] / tirx.const(2, f), v[3] / tirx.const(2, f)
            return v[1] - hh, v[0] - hw, v[1] + hh, v[0] + hw
        return tirx.min(v[0], v[2]), tirx.min(v[1], v[3]), tirx.max(v[0], v[2]), tirx.max(v[1], v[3])

    ay0, ax0, ay1, ax1 = corners(i)
    by0, bx0, by1, bx1 = corners(j)
    iy0, ix0, iy1, ix1 = tirx.max(ay0, by0), tirx.max(ax0, bx0), tirx.min(ay1, by1), tirx.min(ax1, bx1)
    inter = (iy1 - iy0) * (ix1 - ix0)
    area_a, area_b = (ay1 - ay0) * (ax1 - ax0), (by1 - by0) * (bx1 - bx0)
    union = area_a + area_b - inter
    zero = tirx.const(0, f)
    positive = tirx.all(iy1 > iy0, ix1 > ix0, inter > zero, area_a > zero, area_b > zero, union > zero)
    return tirx.all(positive, inter / tirx.Select(positive, union, tirx.const(1, f)) > thr)


def _selected_rows(kept: Any, counts: Any, m: Any, classes: int) -> Any:
    """(m, 3) rows [batch, class, box]: each (batch, class)'s kept boxes in turn."""
    from tvm import te, tirx, topi

    bcs = int(counts.shape[0]) * classes
    flat = topi.reshape(counts, (bcs,))
    ends = topi.cumsum(flat, 0, "int64")
    if bcs == 0:
        return full((m, 3), 0, "int64", "selected_indices")
    r = te.reduce_axis((0, bcs), "r")
    which = te.compute((m,), lambda p: te.sum(tirx.Select(ends[r] <= p, tirx.const(1, "int64"),
                                                          tirx.const(0, "int64")), axis=[r]), name="which")

    def body(p: Any, col: Any) -> Any:
        bc = which[p]
        start = ends[bc] - flat[bc]
        box = kept[bc // classes, bc % classes, p - start]
        return tirx.Select(col == 0, bc // classes, tirx.Select(col == 1, bc % classes, box))

    return te.compute((m, 3), body, name="selected_indices")
