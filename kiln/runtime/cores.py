"""How the runs of every loaded model share this process's cores.

A run of width ``w`` is a kernel sequence whose parallel loops use ``w`` threads. It runs on a
long-lived *runner* thread that owns a fixed block of ``w`` cores, with its TVM thread pool sized
to ``w`` and bound to that block once. (TVM's pool belongs to the thread that calls a kernel: it
is neither sized for, nor freed with, short-lived caller threads, so callers never run kernels
themselves; they hand the run to a runner and wait asleep.)

The width is chosen when a run starts, from how many runs are in flight in the process:

- one run alone gets the model's full width (its ``threads``), the lowest latency;
- several runs at once split the cores between them, down to one core each. On 2 cores, 8
  callers then run two single-threaded kernel sequences side by side, instead of queueing for
  one 2-thread run whose parallel loops wait on whichever thread the OS preempted to run a
  caller's Python. Throughput with many callers is thus at least that of one caller.

A runner takes its block only while no other run holds any core of it, so runs never share a
core. Outputs do not depend on the width: kiln's kernels split only independent loops between
threads, never a reduction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import threading
from typing import Any, Callable, Iterator


def host_cpus() -> list[int]:
    """The logical CPUs this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


class Cores:
    """The process's cores: which are held by a run, and how many runs are in flight."""

    def __init__(self, cpus: list[int]):
        self.cpus = cpus
        self.busy = [False] * len(cpus)
        self.in_flight = 0
        self._cv = threading.Condition()

    @property
    def count(self) -> int:
        return len(self.cpus)

    @contextlib.contextmanager
    def in_flight_run(self) -> Iterator[None]:
        """Count a run as in flight (asked for, not yet finished) while the block runs."""
        with self._cv:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cv:
                self.in_flight -= 1

    def width(self, threads: int) -> int:
        """The width for a run that starts now, of a model that runs with ``threads`` threads."""
        with self._cv:
            streams = max(1, min(self.in_flight, self.count))
        if streams == 1:
            return max(1, threads)
        return max(1, min(threads, self.count // streams))

    @contextlib.contextmanager
    def hold(self, block: range) -> Iterator[None]:
        """Hold the cores of ``block`` for a run, waiting (asleep) while any of them is held."""
        with self._cv:
            while any(self.busy[i] for i in block):
                self._cv.wait()
            for i in block:
                self.busy[i] = True
        try:
            yield
        finally:
            with self._cv:
                for i in block:
                    self.busy[i] = False
                self._cv.notify_all()


CORES = Cores(host_cpus())
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_runner = threading.local()  # on a runner thread: .block, the range of core slots it owns


def _block(width: int, k: int, cores: int) -> range:
    """Runner ``k`` of width ``width``: its core slots (all of them when the width is the host's or more)."""
    if width >= cores:
        return range(cores)
    return range(k * width, (k + 1) * width)


def _pool(width: int, configure: Callable[[int, list[int]], None]) -> concurrent.futures.ThreadPoolExecutor:
    """The runner threads of width ``width``: as many as the host has disjoint blocks of that width."""
    with _POOLS_LOCK:
        pool = _POOLS.get(width)
        if pool is None:
            n = CORES.count
            slots = itertools.count()

            def start_runner() -> None:
                _runner.block = block = _block(width, next(slots), n)
                cpus = [CORES.cpus[block[j % len(block)]] for j in range(width)]
                configure(width, cpus)

            pool = concurrent.futures.ThreadPoolExecutor(max(1, n // width), thread_name_prefix=f"kiln-run{width}",
                                                         initializer=start_runner)
            _POOLS[width] = pool
        return pool


def run_on_cores(threads: int, work: Callable[[], Any], configure: Callable[[int, list[int]], None]) -> Any:
    """Run ``work()`` on a runner thread, at the width the cores allow now; returns its result.

    ``configure(width, cpus)`` sizes and binds a new runner's TVM thread pool, once per runner.
    """
    with CORES.in_flight_run():
        width = CORES.width(threads)

        def on_runner() -> Any:
            with CORES.hold(_runner.block):
                return work()

        return _pool(width, configure).submit(on_runner).result()
