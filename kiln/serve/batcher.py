"""Dynamic batching: concurrent requests joined along the batch dim, run once in a worker thread, split back.

A model is *batchable* when one symbolic dim (``N``) is the leading dim of every input and
every output and appears nowhere else in the signature: then rows are independent, and
requests can be concatenated along dim 0 and the outputs split at the same offsets.

Each of ``workers`` loops on the event loop takes the next ready group and runs it in the
worker thread pool, so the event loop never waits on the model. A group (requests whose
non-batch dims agree) is ready when it holds ``max_batch`` rows, or when its oldest request
has waited ``max_delay``. While every worker is busy, requests keep joining their groups, so
batches grow with the load. A request with more rows than ``max_batch`` runs alone. A model
that is not batchable, or ``max_batch == 1``, runs requests one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kiln.serve.codec import Checked


def batch_dim(inputs: Sequence[Any], outputs: Sequence[Any]) -> str | None:
    """The symbolic dim requests can be joined along, or None (see the module docstring)."""
    sigs = [*inputs, *outputs]
    if not sigs or any(not s.shape for s in sigs):
        return None
    first = sigs[0].shape[0]
    if not isinstance(first, str) or any(s.shape[0] != first for s in sigs):
        return None
    if any(first in s.shape[1:] for s in sigs):
        return None
    return first


@dataclass
class _Pending:
    request: Checked
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchRun:
    """One model run, as the metrics see it."""

    requests: int
    rows: int
    seconds: float


class Batcher:
    """Queue requests, join them into batches, and run them on ``run_model`` in worker threads."""

    def __init__(self, run_model: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], *, batchable: bool,
                 max_batch: int, max_delay_s: float, workers: int = 1,
                 on_run: Callable[[BatchRun], None] | None = None) -> None:
        self._run_model = run_model
        self.max_batch = max_batch if batchable else 1
        self.max_delay_s = max_delay_s
        self.workers = workers
        self._on_run = on_run or (lambda _: None)
        self._groups: dict[tuple, deque[_Pending]] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None
        self._draining = False
        self._running = 0

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not yet running)."""
        return sum(len(q) for q in self._groups.values())

    def start(self) -> None:
        """Start the worker loops (on the running event loop)."""
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-model")
        self._tasks = [asyncio.create_task(self._worker(), name=f"kiln-batcher-{i}") for i in range(self.workers)]

    def drain(self) -> None:
        """From now on, run what is queued at once instead of waiting for batches to fill."""
        self._draining = True
        self._changed.set()

    async def stop(self) -> None:
        """Finish every queued and running request, then stop the workers and their threads."""
        self.drain()
        while self.depth or self._running:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, request: Checked) -> dict[str, np.ndarray]:
        """Queue one checked request and wait for its outputs."""
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        key = request.key if self.max_batch > 1 else (id(pending),)
        self._groups.setdefault(key, deque()).append(pending)
        self._changed.set()
        return await pending.future

    def _ready(self) -> tuple[tuple | None, float | None]:
        """The ready group with the oldest request, or None and how long until one is ready."""
        now = time.monotonic()
        best, wait = None, None
        for key, queue in self._groups.items():
            due = queue[0].enqueued + self.max_delay_s
            full = self.max_batch == 1 or sum(p.request.rows for p in queue) >= self.max_batch
            if full or self._draining or due <= now:
                if best is None or queue[0].enqueued < self._groups[best][0].enqueued:
                    best = key
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return best, wait

    def _take(self, key: tuple) -> list[_Pending]:
        queue = self._groups[key]
        batch = [queue.popleft()]
        rows = batch[0].request.rows
        while queue and rows + queue[0].request.rows <= self.max_batch:
            rows += queue[0].request.rows
            batch.append(queue.popleft())
        if not queue:
            del self._groups[key]
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key, wait = self._ready()
            if key is None:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = [p for p in self._take(key) if not p.future.done()]  # (a client that went away)
            if not batch:
                continue
            self._running += 1
            try:
                outs = await loop.run_in_executor(self._pool, self._run, [p.request for p in batch])
            except Exception as e:  # noqa: BLE001 - the error goes to every request of the batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
            else:
                for p, out in zip(batch, outs):
                    if not p.future.done():
                        p.future.set_result(out)
            finally:
                self._running -= 1

    def _run(self, requests: list[Checked]) -> list[dict[str, np.ndarray]]:
        """In a worker thread: join the requests, run the model once, split the outputs."""
        t0 = time.perf_counter()
        if len(requests) == 1:
            outs = [self._run_model(requests[0].arrays)]
        else:
            feeds = {name: np.concatenate([r.arrays[name] for r in requests]) for name in requests[0].arrays}
            joined = self._run_model(feeds)
            offsets = np.cumsum([r.rows for r in requests])[:-1]
            parts = {name: np.split(a, offsets) for name, a in joined.items()}
            outs = [{name: parts[name][i] for name in joined} for i in range(len(requests))]
        self._on_run(BatchRun(len(requests), sum(r.rows for r in requests), time.perf_counter() - t0))
        return outs
