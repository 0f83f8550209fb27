"""kiln's default CPU schedules, applied without tuning.

TVM's Relax CPU pipeline schedules nothing: every prim func runs as one serial loop nest.
kiln runs its own pipeline (:func:`cpu_pipeline`): TVM's legalisation and fusion of
injective kernels, then :func:`schedule_module`, then TVM's lowering. Each prim func gets

- the schedule named by its ``kiln.schedule`` attribute, set by the lowering
  (``conv_nchwc``, ``depthwise_nchwc``); or else
- the generic schedule: the outer spatial loops of every stage fused and run in parallel.

A schedule that fails on some func leaves that func as it was (correct, only slower), so
scheduling can never break a build. The tile rules come from measurements on AVX-512
(see the conv schedule notes in docs): the register tile keeps at most 16 accumulator
vectors, which is what the 32 zmm registers hold alongside the weights and inputs; on AVX2,
whose 16 ymm registers hold half as many, 12 (:func:`float_registers`). The int8
kernels' VNNI schedules are :mod:`kiln.codegen.int8`'s, applied only where the target has VNNI.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import kiln.codegen.bf16 as bf16
import kiln.codegen.int8 as int8
from kiln.codegen._tvm import target_has, unroll_static

log = logging.getLogger("kiln.schedule")

PARALLEL_MIN_ELEMENTS = 4096  # below this, a thread-pool launch costs more than it saves
#: float32 products a register tile sums before adding them to the output's running sum. One
#: register summing all K products serially loses accuracy with K: a 3x3, 512-channel conv (K =
#: 4608) was 4.4x further from a float64 result than onnxruntime, whose kernels sum blocks of K
#: and then the blocks. Summed in blocks of at most this many, kiln is as close as onnxruntime.
K_BLOCK = 256


class FloatRegisters(NamedTuple):
    """What a float32 register tile may use on the target's vector registers."""

    lanes: int  #: float32 lanes of one vector
    registers: int  #: vector registers
    accumulators: int  #: accumulator vectors a tile keeps, beside its operands
    vectors: int  #: vectors a dense tile spans across N (each one loaded per K step)
    row_vectors: int  #: vectors across N of a one-row tile (a symbolic M gets one row: no tail)


#: AVX-512: 32 zmm registers; a tile of 16 accumulators leaves room for the weights and inputs
AVX512_REGISTERS = FloatRegisters(lanes=16, registers=32, accumulators=16, vectors=4, row_vectors=4)
#: AVX2: 16 ymm registers; 12 accumulators (6 rows x 2 vectors), 2 B vectors and a broadcast
AVX2_REGISTERS = FloatRegisters(lanes=8, registers=16, accumulators=12, vectors=2, row_vectors=8)


def float_registers() -> FloatRegisters:
    """The register budget of the current target (``with target:``): AVX-512's, else AVX2's.

    A tile sized for AVX-512 on an AVX2 CPU keeps 32 ymm accumulators in 16 registers and spills
    on every K step."""
    return AVX512_REGISTERS if target_has("avx512f") else AVX2_REGISTERS


def _static(e: Any) -> int | None:
    v = getattr(e, "value", e)
    return v if isinstance(v, int) else None


def _largest_divisor_at_most(n: int | None, limit: int) -> int:
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _width_tile(ow: int | None, limit: int) -> int:
    """An output-width tile for the depthwise kernel: the largest divisor of ``ow`` up to
    ``limit``, unless that is below 4 (a prime width such as 17); then 8, with a guarded tail."""
    if ow is None:
        return min(8, limit)
    d = _largest_divisor_at_most(ow, limit)
    return d if d >= 4 else min(ow, 8, limit)


def _conv_tiles(ow: int | None, ko: int | None, regs: FloatRegisters = AVX512_REGISTERS) -> tuple[int, int]:
    """(ow_tile, k_tile): the register tile of ``ow_tile x k_tile`` accumulator vectors.

    A small cost model picks it. Per lane step the tile issues ``k·o`` FMAs, each with its
    input broadcast folded in, and ``k`` weight-vector loads, which cost about twice a
    broadcast (they stride through the packed weight); at two per cycle, the cycles per FMA are
    ``max(k·o, 2k + o) / (k·o)``. Tiles divide the width: a guarded tail puts a predicate on
    every unrolled FMA, measured up to 2x slower (13 wide: 13x1 ran 145 GFLOP/s, 7x2 with a
    tail 96). Only when no divisor of at least 4 exists does a tile of 8 take a tail. At most
    ``regs.accumulators`` vectors, with the ``k`` weight vectors and a broadcast beside them in
    ``regs.registers`` (more spill: measured 1.4-3x slower); ties go to the wider tile. On AVX-512
    it picks 8x2 at width 56, 7x2 at 28, 14 and 7, 3x4 at 27 and 13x1 at 13.
    """
    limit = regs.accumulators
    widths = [o for o in range(1, limit + 1) if ow is not None and ow % o == 0]
    if not widths or max(widths) < 4:
        widths = sorted(set(widths) | {min(8, ow) if ow is not None else 8})
    k_options = [d for d in range(1, limit + 1) if ko is None or ko % d == 0]
    best: tuple[float, int, int] | None = None
    for o in widths:
        for k in k_options:
            if k * o > limit or k * o + k + 1 > regs.registers:
                break
            eff = 1.0 if ow is None or ow % o == 0 else ow / (-(-ow // o) * o)
            key = (round(max(k * o, 2 * k + o) / (k * o * eff), 6), -o, k)
            if best is None or key < best:
                best = key
    assert best is not None
    return -best[1], best[2]


def _pad_stage(sch: Any) -> None:
    """Materialise real zero padding as its own parallel copy; inline a padding of zero width.

    Inlined, a pad is a bounds check on every input read in the innermost loops: measured on
    AVX-512, a 3x3 64->64 conv at 56x56 took 2.4 ms inlined and 1.7 ms materialised, while a
    1x1 conv without padding is faster with nothing to copy.
    """
    pad = sch.get_sblock("pad")
    func = sch.mod["main"]
    if not int(func.attrs.get("kiln.pads", 0)):
        sch.compute_inline(pad)
        return
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*loops[:3]))
    sch.vectorize(loops[-1])


def _parallel_rows(sch: Any, n: Any, k: Any, h: Any) -> None:
    """Run ``n·k·oh`` output rows in parallel, as one fused loop.

    With both the batch and the height symbolic, the batch stays a serial loop outside: TVM's
    region analysis cannot see that an index fused from two symbolic extents picks one (n, k, oh),
    and sized the register tile and indexed its write-back from bounds that were wrong at run
    time (batch 2 came out wrong).
    """
    both_symbolic = _static(sch.get(n).extent) is None and _static(sch.get(h).extent) is None
    sch.parallel(sch.fuse(k, h) if both_symbolic else sch.fuse(n, k, h))


def schedule_conv_in_k_blocks(sch: Any) -> None:
    """Register-tiled NCHW[b]c conv summing K in blocks (see :data:`K_BLOCK`):
    ``(n·ko_o·oh) parallel, ow_o, rc_o, [rc_i, ry, rx, rl, ko_i, ow_i, lanes], ko_i, ow_i, lanes``.

    Each block of input-channel groups is summed from zero in the register tile, then added to
    the tile's running sum (in L1); the epilogue runs as the tile is written back. Where the
    width is symbolic, or K is a single block, :func:`schedule_conv_nchwc` applies instead.
    """
    conv = sch.get_sblock("conv")
    n, k, h, w, j, rc, ry, rx, rl = sch.get_loops(conv)
    extents = [_static(sch.get(loop).extent) for loop in (w, rc, ry, rx, rl)]
    if None in extents:
        raise ValueError("conv K blocks need a static width and reduction")
    groups = _largest_divisor_at_most(extents[1], max(1, K_BLOCK // (extents[2] * extents[3] * extents[4])))
    if extents[1] // groups < 2:
        raise ValueError("conv K is a single block")
    _pad_stage(sch)
    rco, _ = sch.split(rc, [None, groups])
    partial = sch.rfactor(rco, factor_axis=0)
    n, k, h, w, j, rco = sch.get_loops(conv)
    ow_tile, k_tile = _conv_tiles(extents[0], _static(sch.get(k).extent), float_registers())
    ko, ki = sch.split(k, [None, k_tile])
    wo, wi = sch.split(w, [None, ow_tile])
    sch.reorder(n, ko, h, wo, rco, ki, wi, j)
    _parallel_rows(sch, n, ko, h)
    _sum_blocks_in_registers(sch, conv, partial, wo, rco, [ki, wi], j, unroll_last_reduction=True)


def schedule_conv_nchwc(sch: Any) -> None:
    """Register-tiled NCHW[b]c conv: ``(n·ko_o·oh) parallel, ow_o, rc, ry, rx, rl, ko_i, ow_i, lanes``."""
    conv = sch.get_sblock("conv")
    _pad_stage(sch)
    n, k, h, w, j, rc, ry, rx, rl = sch.get_loops(conv)
    ow_tile, k_tile = _conv_tiles(_static(sch.get(w).extent), _static(sch.get(k).extent), float_registers())
    ko, ki = sch.split(k, [None, k_tile])
    wo, wi = sch.split(w, [None, ow_tile])
    sch.reorder(n, ko, h, wo, rc, ry, rx, rl, ki, wi, j)
    _parallel_rows(sch, n, ko, h)
    unroll_static(sch, rl)  # the lane reduction too: 3-10% on ResNet-50's layers, measured side by side
    _accumulate_in_registers(sch, conv, wo, [ki, wi], j, rc)


def schedule_depthwise_nchwc(sch: Any) -> None:
    """Depthwise NCHW[b]c conv: ``(n·k·oh) parallel, ow_o, ry, rx, ow_i, lanes``."""
    conv = sch.get_sblock("conv")
    _pad_stage(sch)
    n, k, h, w, j, ry, rx = sch.get_loops(conv)
    ow_tile = _width_tile(_static(sch.get(w).extent), float_registers().accumulators)
    wo, wi = sch.split(w, [None, ow_tile])
    sch.reorder(n, k, h, wo, ry, rx, wi, j)
    _parallel_rows(sch, n, k, h)
    _accumulate_in_registers(sch, conv, wo, [wi], j, ry)


def _accumulate_in_registers(sch: Any, conv: Any, tile_loop: Any, unrolled: list[Any], lanes: Any,
                             first_reduce: Any) -> None:
    """Accumulate one register tile locally, then write it back through the fused epilogue."""
    write_back = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(write_back, tile_loop)
    for loop in unrolled:
        unroll_static(sch, loop)
    sch.vectorize(lanes)
    init = sch.decompose_reduction(conv, first_reduce)  # after vectorize: else "not compact dataflow"
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_inline(sch.get_sblock("epilogue"))
    tile = sch.get_loops(write_back)  # includes the loops above the tile: pick those below it
    depth = next(i for i, loop in enumerate(tile) if sch.get(loop).same_as(sch.get(tile_loop))) + 1
    *outer, lane = tile[depth:]
    for loop in outer:
        unroll_static(sch, loop)
    sch.vectorize(lane)


def _dense_tile(sch: Any, m: Any, n: Any) -> tuple[int, int, int]:
    """(m_tile, vectors, lanes) of a dense register tile: up to ``vectors`` vectors across N (4 of 16
    lanes on AVX-512, 2 of 8 on AVX2), and as many rows as keep the target's accumulators."""
    regs = float_registers()
    n_static, m_static = _static(sch.get(n).extent), _static(sch.get(m).extent)
    lanes = regs.lanes if n_static is None or n_static >= regs.lanes else n_static
    # one row of up to 64 columns where M is symbolic: 2 vectors of one row (AVX2's 6 x 2 tile
    # with 1 row) made DistilBERT's GEMMs 1.7x slower, unpinned
    most = regs.vectors if m_static else regs.row_vectors
    if n_static is not None and n_static % lanes == 0:  # no guard on the lanes (layout pads N)
        vecs = _largest_divisor_at_most(n_static // lanes, most)
    else:
        vecs = most if n_static is None or n_static >= most * lanes else max(1, n_static // lanes)
    m_tile = _largest_divisor_at_most(m_static, regs.accumulators // vecs) if m_static else 1
    return m_tile, vecs, lanes


def _b_pad_stage(sch: Any) -> None:
    """A batched dense kernel's zero-padded copy of B (see ``scheduled_batch_matmul``), if it has
    one: its rows in parallel, each row vectorised."""
    pad = _block(sch, "b_pad")
    if pad is None:
        return
    *outer, last = sch.get_loops(pad)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(sch.split(last, [None, float_registers().lanes])[1])


def _parallel_panels(sch: Any, batch: list[Any], no: Any) -> None:
    """Run a (batched) dense kernel's N panels in parallel, fused with its batch loops unless two of
    those extents are symbolic (TVM's region analysis then misreads the fused index; see
    :func:`_parallel_rows`): then the batch loops stay serial outside."""
    loops = [*batch, no]
    symbolic = sum(_static(sch.get(loop).extent) is None for loop in loops)
    sch.parallel(sch.fuse(*loops) if batch and symbolic <= 1 else no)


def schedule_dense_in_k_blocks(sch: Any) -> None:
    """``Y[m, n] = A[m, k] B[k, n]`` summing K in blocks (see :data:`K_BLOCK`):
    ``n_o parallel, m_o, k_o, [k_i, m_i, n_vec, lanes], m_i, n_vec, lanes``.

    The block is the largest divisor of K up to :data:`K_BLOCK` (no guarded tail in the inner
    loop). Where K is symbolic, under two blocks, or has no divisor of at least a quarter block,
    :func:`schedule_dense` applies instead.
    """
    dense = sch.get_sblock("dense")
    *batch, m, n, k = sch.get_loops(dense)
    k_static = _static(sch.get(k).extent)
    k_block = _largest_divisor_at_most(k_static, K_BLOCK)
    if k_static is None or k_static < 2 * K_BLOCK or k_block < K_BLOCK // 4 or _static(sch.get(n).extent) is None:
        raise ValueError("dense K blocks need a static K of at least two blocks that a block divides, and a static N")
    m_tile, vecs, lanes = _dense_tile(sch, m, n)
    ko, _ = sch.split(k, [None, k_block])
    partial = sch.rfactor(ko, factor_axis=len(batch))
    *batch, m, n, ko = sch.get_loops(dense)
    no, nv, nl = sch.split(n, [None, vecs, lanes])
    mo, mi = sch.split(m, [None, m_tile])
    sch.reorder(*batch, no, mo, ko, mi, nv, nl)
    _parallel_panels(sch, batch, no)
    _b_pad_stage(sch)
    _sum_blocks_in_registers(sch, dense, partial, mo, ko, [mi, nv], nl, unroll_last_reduction=False, lanes=lanes)


def schedule_dense(sch: Any) -> None:
    """``Y[m, n] = A[m, k] B[k, n]``: ``n_o parallel, m_o, k, m_i, n_vec (unrolled), lanes``.

    A tile of up to 4 rows x 4 vectors of 16 lanes (AVX-512; 6 x 2 of 8 on AVX2) accumulates in
    registers. Each parallel task owns a column panel of B and walks every row tile through it, so
    B is read from memory once, not once per row. Batch dims (a batched MatMul) run in parallel
    beside the panels.
    """
    dense = sch.get_sblock("dense")
    *batch, m, n, k = sch.get_loops(dense)
    m_tile, vecs, lanes = _dense_tile(sch, m, n)
    no, nv, nl = sch.split(n, [None, vecs, lanes])
    mo, mi = sch.split(m, [None, m_tile])
    sch.reorder(*batch, no, mo, k, mi, nv, nl)
    _parallel_panels(sch, batch, no)
    _b_pad_stage(sch)
    _accumulate_in_registers(sch, dense, mo, [mi, nv], nl, k)


def _sum_blocks_in_registers(sch: Any, block: Any, partial: Any, tile_loop: Any, block_loop: Any,
                             unrolled: list[Any], lane_loop: Any, *, unroll_last_reduction: bool,
                             lanes: int | None = None) -> None:
    """Schedule a reduction split by ``rfactor`` into K blocks: ``partial`` sums one block of the
    register tile from zero, under ``block_loop``; ``block`` adds each into the tile's running sum,
    a buffer the epilogue reads as the tile is written back, under ``tile_loop``."""
    write_back = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(write_back, tile_loop)
    sch.compute_at(partial, block_loop)
    sch.set_scope(partial, 0, "local")
    loops = sch.get_loops(partial)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(block_loop))) + 1
    below = loops[depth:]  # the tile's spatial loops, then the block's reduction loops (extents of 1 dropped)
    n_reduce = sum(1 for iv in sch.get(partial).iter_vars if int(iv.iter_type) == 2 and _static(iv.dom.extent) != 1)
    spatial, reduce = below[:len(below) - n_reduce], below[len(below) - n_reduce:]
    sch.reorder(*reduce, *spatial)
    if unroll_last_reduction:
        unroll_static(sch, reduce[-1])
    *outer, lane = spatial
    if lanes is not None and _static(sch.get(lane).extent) not in (None, lanes):
        vec, lane = sch.split(lane, [None, lanes])
        outer.append(vec)
    for loop in outer:
        unroll_static(sch, loop)
    sch.vectorize(lane)
    init = sch.decompose_reduction(partial, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in unrolled:
        unroll_static(sch, loop)
    sch.vectorize(lane_loop)
    init = sch.decompose_reduction(block, block_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_inline(sch.get_sblock("epilogue"))
    tile = sch.get_loops(write_back)
    depth = next(i for i, loop in enumerate(tile) if sch.get(loop).same_as(sch.get(tile_loop))) + 1
    *outer, lane = tile[depth:]
    for loop in outer:
        unroll_static(sch, loop)
    sch.vectorize(lane)


#: query rows an attention tile takes through QK^T, softmax and P·V together: its scores (rows x
#: keys floats) stay in L1 for keys up to a few hundred
ATTENTION_ROWS = 16


def schedule_attention(sch: Any) -> None:
    """One attention (:func:`kiln.codegen.lowering.attention.fused_attention`), a tile of
    :data:`ATTENTION_ROWS` query rows at a time: ``(batch, heads, row tiles) parallel``, and under
    it every stage for those rows only, so the scores never leave the core's cache.

    Both products accumulate register tiles of 4 rows x up to 4 vectors (QK^T across keys, P·V
    across the value dims), summing over the contracted dim; exp and the normalisation run
    over whole vectors.
    """
    regs = float_registers()
    out = sch.get_sblock("attention")
    *batch, rows, cols = sch.get_loops(out)
    row_tile, row = sch.split(rows, [None, ATTENTION_ROWS])
    tasks = sch.fuse(*batch, row_tile)
    sch.parallel(tasks)
    _, lanes = sch.split(cols, [None, regs.lanes])
    sch.vectorize(lanes)
    for name in ("pv", "row_sum", "exp", "row_max", "qk"):
        sch.compute_at(sch.get_sblock(name), tasks)
    for name in ("qk", "pv"):
        block = sch.get_sblock(name)
        r, c, k = sch.get_loops(block)[-3:]
        ro, ri = sch.split(r, [None, 4])
        c_static = _static(sch.get(c).extent)
        vecs = regs.vectors if c_static is None else max(1, min(regs.vectors, c_static // regs.lanes))
        co, cv, cl = sch.split(c, [None, vecs, regs.lanes])
        sch.reorder(ro, co, k, ri, cv, cl)
        write_back = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_back, co)
        unroll_static(sch, ri)
        unroll_static(sch, cv)
        sch.vectorize(cl)
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(write_back)[-1])
    _, lanes = sch.split(sch.get_loops(sch.get_sblock("exp"))[-1], [None, regs.lanes])
    sch.vectorize(lanes)


def schedule_softmax(sch: Any) -> None:
    """A last-axis softmax (:func:`kiln.codegen.lowering.softmax.softmax_last_axis`) a row at a time:
    the rows in parallel, and under each row its max, exp, sum and normalisation, vectorised along
    the row. With two symbolic row dims the first runs in parallel and the others serially under it
    (see :func:`_parallel_rows`)."""
    lanes = float_registers().lanes
    out = sch.get_sblock("softmax")
    *outer, cols = sch.get_loops(out)
    if not outer:
        raise ValueError("a softmax of one row has nothing to run in parallel")
    if sum(_static(sch.get(loop).extent) is None for loop in outer) <= 1:
        row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(row)
    else:
        sch.parallel(outer[0])
        row = outer[-1]
    n = _static(sch.get(cols).extent)
    if n is None or n % lanes == 0:
        sch.vectorize(sch.split(cols, [None, lanes])[1])
    for name in ("row_sum", "exp", "row_pad", "row_max"):
        block = _block(sch, name)  # a row the vectors divide has no row_pad
        if block is not None:
            sch.compute_at(block, row)
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("exp"))[-1], [None, lanes])[1])


def first_that_applies(*schedules: Callable[[Any], None]) -> Callable[[Any], None]:
    """A schedule applying the first of ``schedules`` that succeeds on a copy (the last one as it is)."""

    def apply(sch: Any) -> None:
        for schedule in schedules[:-1]:
            try:
                schedule(sch.copy())
            except Exception as e:  # noqa: BLE001 - TVM's schedule errors: try the next one
                log.debug("%s does not apply: %s", schedule.__name__, e)
                continue
            schedule(sch)
            return
        schedules[-1](sch)

    return apply


def needs(has: Callable[[], bool], what: str, schedule: Callable[[Any], None]) -> Callable[[Any], None]:
    """``schedule`` where the current target has ``what`` (``has()``); elsewhere a schedule that
    raises, so that the kernel compiles unscheduled: correct, and slow."""

    def where_it_has(sch: Any) -> None:
        if not has():
            raise RuntimeError(f"the target has no {what}")
        schedule(sch)

    return where_it_has


def schedule_conv_nchwc_bf16(sch: Any) -> None:
    """``(n·ko_o·oh) parallel, ow_o, rc, ry, rx, rp, ko_i, ow_i`` around ``vdpbf16ps``: the float
    conv's register tile (``vdpbf16ps`` broadcasts its pair from memory as an FMA does its float),
    the rounding to bf16 in the parallel padding stage, the epilogue in the write-back."""
    intrin = bf16.register_bf16_intrinsic()
    conv = sch.get_sblock("conv")
    int8.parallel_pad_stage(sch)
    n, k, h, w, j, rc, ry, rx, rp, rq = sch.get_loops(conv)
    ow, ko, regs = _static(sch.get(w).extent), _static(sch.get(k).extent), float_registers()
    if ow is None:
        raise ValueError("the bf16 conv needs a static width")
    ow_tile, k_tile = _conv_tiles(ow, ko, regs)
    if ow % ow_tile:  # no guarded tail: the instruction cannot take a predicate
        ow_tile = _largest_divisor_at_most(ow, regs.accumulators)
        k_tile = _largest_divisor_at_most(ko, max(1, regs.accumulators // ow_tile))
    k_o, k_i = sch.split(k, [None, k_tile])
    w_o, w_i = sch.split(w, [None, ow_tile])
    sch.reorder(n, k_o, h, w_o, rc, ry, rx, rp, k_i, w_i, j, rq)
    _parallel_rows(sch, n, k_o, h)
    sch.annotate(w_o, "pragma_import_llvm", bf16.LLVM_IR)  # kiln_dpbf16ps, which the intrinsic calls
    int8.tensorized_conv_tile(sch, conv, w_o, [k_i, w_i], rc, intrin)


#: accumulator vectors of a bf16 dense tile across N, beside its :data:`kiln.codegen.bf16.ROW_TILE` rows
BF16_DENSE_VECTORS = 4


def schedule_dense_bf16(sch: Any) -> None:
    """``(n_o·m_o) parallel, k/2, m_i, n_vec, 16 x 2`` around ``vdpbf16ps``: a register tile of
    4 rows (the rows are padded to whole tiles) x up to 4 vectors, the input rounded to bf16 rows in
    parallel, the epilogue in the write-back."""
    intrin = bf16.register_bf16_intrinsic()
    pad = sch.get_sblock("pad")
    row, col = sch.get_loops(pad)
    sch.parallel(row)
    sch.vectorize(sch.split(col, [None, bf16.LANES])[1])
    dense = sch.get_sblock("dense")
    m, c, rk, rq = sch.get_loops(dense)
    m_static = _static(sch.get(m).extent)
    vecs = _largest_divisor_at_most(_static(sch.get(c).extent) // bf16.LANES, BF16_DENSE_VECTORS)
    no, nv, nl = sch.split(c, [None, vecs, bf16.LANES])
    # the rows are a whole number of tiles (padded by the compute), which TVM cannot prove for a symbolic M
    mo, mi = sch.split(m, [None, bf16.ROW_TILE], disable_predication=True)
    sch.reorder(no, mo, rk, mi, nv, nl, rq)
    sch.annotate(rk, "pragma_import_llvm", bf16.LLVM_IR)  # kiln_dpbf16ps, which the intrinsic calls
    if m_static is None:  # fused with a symbolic row count, the index mixes int32 and int64, and TVM
        sch.parallel(no)      # cannot blockize the tile for the instruction: the panels alone in parallel
        tile = mo
    else:
        tile = sch.fuse(no, mo)
        sch.parallel(tile)
    int8.tensorized_conv_tile(sch, dense, tile, [mi, nv], rk, intrin)


SCHEDULES: dict[str, Callable[[Any], None]] = {
    "conv_nchwc_int8": needs(int8.has_vnni, "AVX-512 VNNI", int8.schedule_conv_nchwc_int8),
    "conv_nchwc_bf16": needs(bf16.has_bf16, "AVX-512 BF16", schedule_conv_nchwc_bf16),
    "dense_bf16": needs(bf16.has_bf16, "AVX-512 BF16", schedule_dense_bf16),
    "dense_int8": needs(int8.has_vnni, "AVX-512 VNNI", int8.schedule_dense_int8),
    "dense_int8_dynamic": int8.schedule_dense_int8_dynamic,
    "dynamic_quantize": int8.schedule_dynamic_quantize,
    "dense": first_that_applies(schedule_dense_in_k_blocks, schedule_dense),
    "softmax": schedule_softmax,
    "conv_nchwc": first_that_applies(schedule_conv_in_k_blocks, schedule_conv_nchwc),
    "depthwise_nchwc": schedule_depthwise_nchwc,
    "attention": first_that_applies(schedule_attention, lambda sch: schedule_generic(sch)),
}


def schedule_generic(sch: Any) -> bool:
    """Run the outer spatial loops of every root stage in parallel; False if nothing was worth it."""
    from tvm import tirx

    changed = False
    root = _block(sch, "root")
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        loops = sch.get_loops(block)
        if not loops:
            continue
        iters = sch.get(block).iter_vars
        spatial: list[Any] = []
        size = 1
        for loop, it in zip(loops, iters):
            if it.iter_type != tirx.IterVar.DataPar or sch.get(loop).kind != tirx.ForKind.SERIAL:
                break
            spatial.append(loop)
            extent = _static(sch.get(loop).extent)
            size = size * extent if extent is not None and size is not None else None
        if not spatial:
            continue
        total = size
        for loop in loops[len(spatial):]:
            extent = _static(sch.get(loop).extent)
            total = total * extent if total is not None and extent is not None else None
        if total is not None and total < PARALLEL_MIN_ELEMENTS:
            continue
        # parallelise enough outer loops for the cores, keeping the inner ones for vectors; a
        # symbolic extent (a free batch) may be 1 at run time, so it does not count towards that
        outer: list[Any] = []
        extent_so_far = 1
        for loop in spatial[:-1] if len(spatial) > 1 else spatial:
            outer.append(loop)
            extent_so_far *= _static(sch.get(loop).extent) or 1
            if extent_so_far >= 64:
                break
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        changed = True
    return changed


def _block(sch: Any, name: str) -> Any | None:
    """The block called ``name``, or None if the func has none."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return None


def apply_default_schedule(sch: Any) -> bool:
    """Apply kiln's default schedule to ``sch`` in place; False if it left the func as it was.

    The schedule is the one named by the func's ``kiln.schedule`` attribute, or the generic
    one. On an error the schedule is left half done, so callers start from a fresh one.
    """
    func = sch.mod["main"]
    kind = func.attrs.get("kiln.schedule") if func.attrs is not None else None
    if kind is not None:
        SCHEDULES[str(kind)](sch)
        return True
    return schedule_generic(sch)


def schedule_func(func: Any, tuned: Callable[[Any], Any | None] | None = None) -> Any:
    """``func`` with its tuned schedule, else kiln's default one; unchanged if scheduling fails.

    ``tuned`` looks ``func`` up in a tuning database and returns its scheduled form, or None.
    """
    from tvm import s_tir

    if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
        return func
    if tuned is not None:
        found = tuned(func)
        if found is not None:
            return found.with_attr("tirx.is_scheduled", True)
    sch = s_tir.Schedule(func)
    try:
        if not apply_default_schedule(sch):
            return func
    except Exception as e:  # noqa: BLE001 - any schedule error: keep the unscheduled (correct) func
        kind = func.attrs.get("kiln.schedule") if func.attrs is not None else None
        log.debug("schedule %s failed: %s", kind or "generic", e)
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_module(mod: Any, tuned: Callable[[str, Any], Any | None] | None = None) -> Any:
    """Every prim func of ``mod`` scheduled (see :func:`schedule_func`).

    ``tuned(name, func)`` looks a kernel up in a tuning database by its global name and func.
    """
    from tvm import tirx

    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            lookup = None if tuned is None else (lambda f, name=gv.name_hint: tuned(name, f))
            new = schedule_func(func, lookup)
            if new is not func:
                updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _subfunctions_to_dataflow() -> Any:
    """A pass putting the pure bindings of every Relax function but ``main`` into dataflow blocks.

    The functions kiln builds for control flow (If branches, a Loop's step and call tree) are plain
    binding blocks, and FuseOps fuses only inside dataflow blocks. ``main`` keeps its blocks as the
    lowerer built them: with control flow it is one plain block, in which the kernels sized by dims
    read at run time stay after the ``match_cast`` that defines those dims.
    """
    import tvm
    from tvm import relax
    from tvm.relax import transform

    @tvm.transform.module_pass(opt_level=0, name="KilnSubfunctionsToDataflow")
    def convert(mod: Any, _ctx: Any) -> Any:
        others = [gv for gv, f in mod.functions.items() if isinstance(f, relax.Function) and gv.name_hint != "main"]
        if not others:
            return mod
        copy = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
        copy = transform.ConvertToDataflow()(copy)
        out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        for gv in others:
            out[gv] = copy[gv]
        return out

    return convert


def _binding_order(bindings: list[Any]) -> list[Any]:
    """``bindings`` reordered, as little as possible, so each comes after what it reads.

    "What it reads" counts the Relax variables it uses and the TIR dims in its types: a kernel sized
    by dims that a ``match_cast`` reads at run time must come after that ``match_cast``. FuseOps
    orders the fused block by data flow alone, and a ``match_cast`` has no data consumers, so it
    can land after the kernels it sizes; the VM then reads an uncomputed dim.
    """
    import heapq

    from tvm import relax
    from tvm.relax import analysis

    by_var = {b.var: k for k, b in enumerate(bindings)}
    defines: dict[Any, int] = {}
    for k, b in enumerate(bindings):
        if isinstance(b, relax.MatchCast):
            for v in analysis.definable_tir_vars_in_type(b.ty if hasattr(b, "ty") else b.var.ty):
                defines.setdefault(v, k)
    deps: list[set[int]] = []
    for k, b in enumerate(bindings):
        need = {by_var[v] for v in analysis.free_vars(b.value) if v in by_var}
        need |= {defines[v] for v in analysis.tir_vars_in_type(b.var.ty) if v in defines}
        need |= {defines[v] for v in analysis.free_symbolic_vars(b.value) if v in defines}
        need.discard(k)
        deps.append(need)
    waiting = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in bindings]
    for k, d in enumerate(deps):
        for j in d:
            users[j].append(k)
    ready = [k for k, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(bindings):  # a cycle cannot happen in valid Relax; keep the block as it is
        return list(bindings)
    return [bindings[k] for k in order]


def _order_dims_before_use() -> Any:
    """A pass reordering each binding block so dims read at run time are defined before use (:func:`_binding_order`)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KilnOrderDimsBeforeUse")
    def reorder(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            blocks, changed = [], False
            for block in func.body.blocks:
                bindings = list(block.bindings)
                order = _binding_order(bindings)
                if any(not a.same_as(b) for a, b in zip(order, bindings)):
                    changed = True
                    block = (relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock)(order)
                blocks.append(block)
            if changed:
                body = relax.SeqExpr(blocks, func.body.body)
                mod[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        return mod

    return reorder


def fusion_passes() -> list[Any]:
    """Legalisation and TVM's fusion of injective kernels: what runs before scheduling.

    Tuning extracts its kernels after these passes, so a tuned kernel is the same prim func
    that compilation later schedules.
    """
    from tvm.relax import backend, transform

    return [_subfunctions_to_dataflow(), backend.DispatchSampling(), backend.DispatchSortScan(), transform.LegalizeOps(),
            transform.AnnotateTIROpPattern(), transform.FuseOps(), transform.FuseTIR(), _order_dims_before_use()]


def cpu_pipeline(target: Any, tuned: Callable[[str, Any], Any | None] | None = None) -> Any:
    """tvm.compile's default CPU pipeline, plus TVM's fusion of injective kernels and kiln's schedules.

    After legalisation, FuseOps/FuseTIR merge chains of elementwise and layout kernels (a
    BatchNorm's multiply-add before a ReLU, a transform before a concat) into one loop nest;
    funcs with a kiln schedule are opaque to it (see ``Lowerer.emit``). Then every prim func
    is scheduled. TVM's FoldConstant stays out: kiln folds constants itself, and it would run
    kernels without inputs at compile time, such as the assertion of a failing If branch.
    """
    import tvm
    from tvm.relax import transform

    @tvm.transform.module_pass(opt_level=0, name="KilnSchedule")
    def kiln_schedule(mod: Any, _ctx: Any) -> Any:
        return schedule_module(mod, tuned)

    @tvm.transform.module_pass(opt_level=0, name="KilnCPUPipeline")
    def pipeline(mod: Any, _ctx: Any) -> Any:
        seq = tvm.transform.Sequential([
            *fusion_passes(), kiln_schedule,
            transform.RewriteDataflowReshape(), transform.ToNonDataflow(), transform.RemovePurityChecking(),
            transform.CallTIRRewrite(), transform.StaticPlanBlockMemory(), transform.LowerAllocTensor(),
            transform.KillAfterLastUse(), transform.LowerRuntimeBuiltin(), transform.ComputePrimValue(),
            transform.VMShapeLower(), transform.AttachGlobalSymbol(),
        ])
        with target:
            return seq(mod)

    return pipeline
