"""kiln's main job on the bundled example: compile, run, compare with onnxruntime, time both.

    python examples/demo.py [MODEL.onnx] [--batch N] [--rounds R]

The two engines are timed alternately in one process with onnxruntime's
spin-waiting turned off (``session.intra_op.allow_spinning = 0``), so their
thread pools do not distort each other; the medians are printed side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import kiln
import kiln.runtime
from kiln.codegen.build import build, file_sha256
from kiln.passes import PassManager
from kiln.codegen.target import cpu_target
from kiln.passes.pipeline import DEFAULT_COMPILE_LEVEL, passes_for

EXAMPLE = Path(__file__).with_name("tiny_cnn.onnx")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(EXAMPLE))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()

    src = Path(args.model)
    graph = kiln.load(src)
    passes = passes_for(DEFAULT_COMPILE_LEVEL, block=cpu_target().layout_block)
    graph, report = PassManager(passes).run(graph)
    print(f"optimized {src.name}: {report.nodes_before} -> {report.nodes_after} nodes")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{src.stem}.kiln"
        t = time.perf_counter()
        build(graph, out, source_sha256=file_sha256(src), source_name=src.name, passes=[p.describe() for p in passes])
        print(f"compiled {out.name} in {time.perf_counter() - t:.1f} s ({out.stat().st_size / 1e3:.0f} KB)")
        model = kiln.runtime.load(out)

        (sig,) = model.inputs
        shape = [args.batch if not isinstance(d, int) else d for d in sig.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(sig.dtype)
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])

        ours = model.run({sig.name: x})
        theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {sig.name: x})))
        worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
        print(f"input {sig.name}{shape}: max abs error vs onnxruntime {worst:.2e}")

        times: dict[str, list[float]] = {"kiln": [], "onnxruntime": []}
        for _ in range(3):  # warm-up
            model.run({sig.name: x})
            session.run(None, {sig.name: x})
        for _ in range(args.rounds):  # alternate: kiln, onnxruntime, kiln, ...
            t = time.perf_counter()
            model.run({sig.name: x})
            times["kiln"].append(time.perf_counter() - t)
            t = time.perf_counter()
            session.run(None, {sig.name: x})
            times["onnxruntime"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"median latency over {args.rounds} alternating rounds: kiln {med['kiln']:.2f} ms, "
              f"onnxruntime {med['onnxruntime']:.2f} ms (ratio {med['kiln'] / med['onnxruntime']:.2f}; one process, "
              "onnxruntime spinning off; `kiln bench` times each engine in its own process)")


if __name__ == "__main__":
    main()
