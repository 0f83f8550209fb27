"""Calibration: samples read from an .npz, and observers that choose each tensor's int8 range."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kiln.quantize.options import QuantizeError

METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99  # percent of each tensor's values inside the percentile method's range
BINS = 2048


def read_samples(path: str | os.PathLike, inputs: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz keyed by input name with a leading sample axis, one feed dict each.

    An input of shape ``[1, 3, H, W]`` takes arrays ``[N, 3, H, W]`` or ``[N, 1, 3, H, W]``.
    """
    from kiln.check import read_npz

    arrays = read_npz(str(path))
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise QuantizeError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(arrays) or 'none'}")
    feeds: list[dict[str, np.ndarray]] = []
    count = None
    per_input: dict[str, list[np.ndarray]] = {}
    for v in inputs:
        a = arrays[v.name]
        want = np.dtype(v.dtype.numpy)
        if a.dtype != want:
            raise QuantizeError(f"{path}: '{v.name}' is {a.dtype}; the model takes {want}")
        rank = len(v.shape or ())
        if a.ndim == rank + 1:
            items = [a[i] for i in range(a.shape[0])]
        elif a.ndim == rank and rank and (v.shape[0] == 1 or isinstance(v.shape[0], str)):
            items = [a[i:i + 1] for i in range(a.shape[0])]
        else:
            raise QuantizeError(f"{path}: '{v.name}' has shape {list(a.shape)}; want a leading sample axis before "
                                f"the input's shape {list(v.shape or ())}")
        for it in items:
            if len(it.shape) != rank or any(isinstance(d, int) and d != s for d, s in zip(v.shape, it.shape)):
                raise QuantizeError(f"{path}: a '{v.name}' sample has shape {list(it.shape)}; the model takes "
                                    f"{list(v.shape)}")
        if count is not None and len(items) != count:
            raise QuantizeError(f"{path}: inputs hold different sample counts ({count} and {len(items)})")
        count = len(items)
        per_input[v.name] = items
    for i in range(count or 0):
        feeds.append({n: np.ascontiguousarray(per_input[n][i]) for n in names})
    if not feeds:
        raise QuantizeError(f"{path}: no samples")
    return feeds


@dataclass
class Observer:
    """One tensor's statistics over the calibration samples."""

    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None

    def see_range(self, a: np.ndarray) -> None:
        if a.size:
            self.lo = min(self.lo, float(a.min()))
            self.hi = max(self.hi, float(a.max()))

    def see_histogram(self, a: np.ndarray) -> None:
        lo, hi = self.edges()
        h, _ = np.histogram(a, bins=BINS, range=(lo, hi))
        self.hist = h if self.hist is None else self.hist + h

    def edges(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def range(self, method: str) -> tuple[float, float]:
        """The range to quantize: the observed one, or clipped by ``method``."""
        if method == "minmax" or self.hist is None or self.hist.sum() == 0:
            return (self.lo, self.hi)
        lo, hi = self.edges()
        width = (hi - lo) / BINS
        if method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            tail = (100 - PERCENTILE) / 100
            a = int(np.searchsorted(cdf, tail, side="left"))
            b = int(np.searchsorted(cdf, 1 - tail, side="left"))
            return (max(self.lo, lo + a * width) if self.lo < 0 else self.lo, min(self.hi, lo + (b + 1) * width))
        return self._entropy_range(lo, width)

    def _entropy_range(self, lo: float, width: float) -> tuple[float, float]:
        """The clipping threshold that minimises KL(observed || quantized) on the larger side of 0."""
        assert self.hist is not None
        zero = int(round(-lo / width))
        pos, neg = self.hist[zero:], self.hist[:zero][::-1]
        side = pos if pos.sum() >= neg.sum() else neg
        levels = 255 if self.lo >= 0 else 128
        t = _kl_threshold(side.astype(np.float64), levels) * width
        if side is pos:
            return (max(self.lo, -t) if self.lo < 0 else self.lo, min(self.hi, t))
        return (max(self.lo, -t), min(self.hi, t))


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Bins to keep (from 0 outwards) so that quantizing to ``levels`` loses the least (KL)."""
    n = len(hist)
    if n <= levels:
        return n
    best, best_i = math.inf, n
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:
            part = hist[c]
            nz = part > 0
            if nz.any():
                q[c[nz]] = part.sum() / nz.sum()
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i
