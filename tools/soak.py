"""Soak a loaded kiln model: many threads sharing one CompiledModel, every output checked.

    python tools/soak.py MODEL.kiln [--callers 8] [--calls 10000] [--json OUT.json]

Each caller thread runs the model ``--calls`` times on its own seeded input and compares every
output bit for bit with a single-threaded run of the same input. Reported: calls and callers,
mismatches, resident memory after warm-up and at the end (growth must stay under 5%), OS
threads before and after (none may be left behind), and throughput with 1 caller and with all
callers (calls per second, each measured for the same number of calls). The figures in
docs/reliability.md come from this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SoakReport:
    """What a soak run measured."""

    artifact: str
    cpu: str
    callers: int
    calls_per_caller: int
    mismatches: int
    rss_after_warmup_mb: float
    rss_end_mb: float
    os_threads_before: int
    os_threads_after: int
    calls_per_s_1_caller: float
    calls_per_s_all_callers: float

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mb / self.rss_after_warmup_mb - 1


def rss_mb() -> float:
    """Resident memory of this process, in MB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def os_threads(settle: float = 1.0) -> int:
    """This process's OS threads, once the count stops falling (exited threads take a moment to go)."""
    count = len(os.listdir("/proc/self/task"))
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = len(os.listdir("/proc/self/task"))
        if now >= count:
            break
        count = now
    return count


def cpu_model() -> str:
    """The CPU model (with its family and model numbers where the name is generic)."""
    from kiln.runtime.cpu import host_cpu_name

    return host_cpu_name()


def feeds_for(model: Any, seed: int) -> dict[str, np.ndarray]:
    """A seeded input for ``model``, symbolic dims at 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in model.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in s.shape)
        dt = np.dtype(s.dtype)
        out[s.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                       else rng.integers(0, 4, shape).astype(dt))
    return out


def _throughput(model: Any, callers: int, total: int, feeds: dict[str, np.ndarray]) -> float:
    per = max(1, total // callers)
    threads = [threading.Thread(target=lambda: [model.run(feeds) for _ in range(per)]) for _ in range(callers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return per * callers / (time.perf_counter() - t)


def soak(path: str | os.PathLike, *, callers: int = 8, calls: int = 10_000, throughput_calls: int = 2000) -> SoakReport:
    """Run the soak on the artifact at ``path``; see the module docstring."""
    import kiln.runtime

    threads_before = os_threads()
    model = kiln.runtime.load(path)
    feeds = [feeds_for(model, seed) for seed in range(callers)]
    expected = [model.run(f) for f in feeds]  # single-threaded reference
    mismatches = [0] * callers

    def caller(i: int, n: int) -> None:
        for _ in range(n):
            got = model.run(feeds[i])
            if any(not np.array_equal(got[k], expected[i][k], equal_nan=True) for k in expected[i]):
                mismatches[i] += 1

    def all_callers(n: int) -> None:
        workers = [threading.Thread(target=caller, args=(i, n)) for i in range(callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    # warm-up, as many callers as the soak: every runner's TVM pool and VM (several runs in flight use
    # narrower runners than one alone), numpy's allocator
    all_callers(20)
    rss_warm = rss_mb()
    all_callers(calls)
    rss_end = rss_mb()
    one = _throughput(model, 1, throughput_calls, feeds[0])
    many = _throughput(model, callers, throughput_calls, feeds[0])
    del model
    return SoakReport(str(path), cpu_model(), callers, calls, sum(mismatches), round(rss_warm, 1), round(rss_end, 1),
                      threads_before, os_threads(), round(one, 1), round(many, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    report = soak(args.artifact, callers=args.callers, calls=args.calls)
    text = json.dumps({**asdict(report), "rss_growth": round(report.rss_growth, 4)}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report.mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
