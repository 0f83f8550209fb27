"""The per-kernel profile of an artifact, with FLOPs, achieved GFLOP/s and the share of a measured peak.

Times come from :meth:`kiln.runtime.CompiledModel.profile` (the VM's instrument hook, per run,
over several runs). FLOPs come from the nodes each kernel computes (:mod:`.kernels`); a node
lowered to several funcs that land in different kernels counts in one of them (see ``kernel_rows``). The peak
is practical, not theoretical: numpy's float32 matrix product (its BLAS, on as many threads as
the artifact runs) of two ``PEAK_N x PEAK_N`` matrices, the best of ``PEAK_REPEATS`` timed runs
after one warm-up, at ``2 n^3`` FLOPs per product.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from kiln.report.kernels import kernel_map, node_flops, unknown_shapes

if TYPE_CHECKING:
    from kiln.ir import Graph

PEAK_N = 2048
PEAK_REPEATS = 3


@dataclass(frozen=True)
class Peak:
    """A practical float32 peak of this machine, and how it was measured."""

    gflops: float
    how: str


def measure_peak(n: int = PEAK_N, repeats: int = PEAK_REPEATS) -> Peak:
    """numpy's float32 GEMM rate on ``n x n`` matrices: the best of ``repeats`` runs after a warm-up."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    gflops = 2 * n ** 3 / best / 1e9
    return Peak(gflops, f"numpy float32 matmul {n}x{n} @ {n}x{n} (its BLAS, {os.cpu_count()} cores), best of "
                        f"{repeats} runs after a warm-up: {2 * n ** 3 / 1e9:.1f} GFLOP in {best * 1e3:.1f} ms")


@dataclass
class KernelRow:
    """One kernel of a run: time, share, FLOPs and rates, and the nodes it computes."""

    name: str
    calls: int
    ms: float
    share: float
    flops: int | None = None  # per run, all calls together
    gflops: float | None = None
    peak_share: float | None = None
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON."""
        return {"kernel": self.name, "calls": self.calls, "ms": round(self.ms, 4), "share": round(self.share, 4),
                "flops": self.flops, "gflops": None if self.gflops is None else round(self.gflops, 2),
                "peak_share": None if self.peak_share is None else round(self.peak_share, 4), "nodes": self.nodes,
                "ops": self.ops}


def is_quantized(passes: list[str]) -> bool:
    """Whether an artifact's recorded passes start with a quantization, which needs its calibration
    data: they cannot be re-run from the source model alone."""
    return bool(passes) and passes[0].split("{")[0] == "quantize"


def recorded_passes(passes: list[str]) -> list[Any]:
    """The passes an artifact's manifest records (``passes``), as pass objects to run again."""
    from kiln.codegen.target import cpu_target
    from kiln.driver import pipeline_passes

    return pipeline_passes(None, passes, target=cpu_target()) if passes else []


def artifact_graph(before: Graph, passes: list[str]) -> Graph | None:
    """The graph an artifact was built from, re-derived: its recorded ``passes`` re-run on a copy of
    ``before`` (the source model at the artifact's input shapes); None for a quantized artifact."""
    from kiln.passes import PassManager

    if is_quantized(passes):
        return None
    graph, _ = PassManager(recorded_passes(passes)).run(before.clone())
    return graph


def kernel_rows(artifact: str | os.PathLike, feeds: Mapping[str, np.ndarray], graph: Graph | None, peak: Peak | None,
                *, runs: int = 10, threads: int | None = None) -> tuple[list[KernelRow], str]:
    """The artifact's kernels, slowest first, over ``runs`` runs on ``feeds`` (at ``threads``, by
    default the artifact's own); and a note on what is missing.

    ``graph`` is the graph the artifact was built from (its kernels' nodes and FLOPs); without it
    the rows have times only.
    """
    import kiln.runtime

    model = kiln.runtime.load(Path(artifact), threads=threads)
    times = model.profile(feeds, runs=runs)
    total = sum(k.ms for k in times) or 1.0
    kmap = kernel_map(graph) if graph is not None else None
    by_name = {n.name: n for n in graph.walk_nodes()} if graph is not None else {}
    shapes = _run_shapes(graph, feeds) if graph is not None else {}
    rows = [KernelRow(k.name, k.calls, k.ms, k.ms / total) for k in times]
    if kmap is not None:
        for row in rows:
            row.nodes = kmap.nodes_of(row.name)
            row.ops = list(dict.fromkeys(by_name[n].qualified_op for n in row.nodes if n in by_name))
        # a node lowered to several funcs (a MatMul and the reshapes around it) may land in several kernels:
        # its FLOPs go to one of them, where its multiply-accumulates run: a kernel of one func if there is one
        # (kiln's scheduled convs and dense products stay whole; TVM fuses only the injective funcs around them),
        # and of those the slowest per call
        def weight(row: KernelRow) -> tuple[bool, float]:
            return row.name in kmap.funcs, row.ms / max(row.calls, 1)  # type: ignore[union-attr]

        home: dict[str, KernelRow] = {}
        for row in rows:
            for n in row.nodes:
                if n not in home or weight(row) > weight(home[n]):
                    home[n] = row
        for n, row in home.items():
            f = node_flops(by_name[n], shapes) if n in by_name else None
            if f:
                row.flops = (row.flops or 0) + f
        for row in rows:
            if row.flops and row.ms > 0:
                row.gflops = row.flops / (row.ms / 1e3) / 1e9
                row.peak_share = row.gflops / peak.gflops if peak is not None else None
    note = "" if kmap is not None else "without the graph the artifact was built from, kernels show times only"
    return rows, note


def _run_shapes(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The concrete shapes, on ``feeds``, of the values whose symbolic shapes keep FLOPs from being counted."""
    from kiln.bisect import Runner

    names = [n for n in unknown_shapes(graph) if n not in feeds]
    if not names:
        return {}
    values = Runner(feeds, []).run(graph, names)
    return {**{k: tuple(np.shape(v)) for k, v in feeds.items()}, **{k: tuple(np.shape(v)) for k, v in values.items()}}
