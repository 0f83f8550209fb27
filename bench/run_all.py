"""Run kiln's benchmark set and write bench/RESULTS.md.

Each row is ``kiln bench``'s method: each engine in its own process, alternating A B C A B C
after warm-up, medians over all timed runs. onnxruntime (ORT_ENABLE_ALL, spinning off) and
OpenVINO (CPU plugin, fp32, latency hint; ``--no-openvino`` leaves it out) are measured in
every row, with kiln's ratio to the faster of the two; TVM's own pipeline (``from_onnx`` +
``tvm.compile``, no tuning) at batch 1 only, with fewer rounds, since one of its runs takes
seconds. Models come from the test suite's cache (``tests/models.py``).

    .venv/bin/python bench/run_all.py [--rounds 8] [--only NAME,...] [--tuned NAME=DB_DIR ...]

``--tuned`` adds a batch-1 row for that model compiled with a tuning database made by
``kiln tune`` (say how long it was tuned in the commit that updates RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from models import make_inputs, model_path  # noqa: E402

from kiln.bench import bench  # noqa: E402
from kiln.errors import KilnError  # noqa: E402


@dataclass
class Case:
    name: str  # the model's name in tests/models.py
    label: str
    shapes: dict[str, tuple]  # --input-shape for the compile ("N" frees the batch)
    batches: tuple[int, ...] = (1,)
    tvm: bool = True
    feeds: bool = False  # the model needs real inputs (silero's sample rate)
    notes: list[str] = field(default_factory=list)


CASES = [
    Case("light_resnet50", "light ResNet-50 (random weights)", {"gpu_0/data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("light_densenet121", "light DenseNet-121 (random weights)", {"data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("light_squeezenet", "light SqueezeNet (random weights)", {"data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("yolov8n", "YOLOv8n 1x3x320x320", {"images": (1, 3, 320, 320)}),
    Case("ocr_det", "rapidocr det 1x3x640x640", {"x": (1, 3, 640, 640)}),
    Case("ocr_rec", "rapidocr rec 1x3x48x320", {"x": (1, 3, 48, 320)}),
    Case("silero_vad", "silero-vad (512 samples, 16 kHz)", {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
         tvm=False, feeds=True),
]


def _cpu() -> tuple[str, str]:
    from kiln.runtime.cpu import host_cpu_features, host_cpu_name

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
    have = host_cpu_features()
    return host_cpu_name(), " ".join(f for f in wanted if f in have)


def _cell(report, engine: str) -> str:
    r = report.results.get(engine)
    return f"{r.median_ms:.2f} ({r.percentile_ms(10):.2f}..{r.percentile_ms(90):.2f})" if r else "not run"


def _row(label: str, batch: int, report, tvm_cell: str, tvm_ratio: str) -> str:
    ov = report.ratio("openvino")
    best = min(x for x in (report.ratio("onnxruntime"), ov) if x is not None)
    return (f"| {label} | {batch} | {_cell(report, 'kiln')} | {_cell(report, 'onnxruntime')} "
            f"| **{report.ratio('onnxruntime'):.3f}** | {_cell(report, 'openvino')} "
            f"| {'' if ov is None else f'**{ov:.3f}**'} | {best:.3f} | {tvm_cell} | {tvm_ratio} |")


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--tvm-rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--tuned", action="append", default=[], metavar="NAME=DB_DIR",
                    help="add a batch-1 row for NAME compiled with this tuning database")
    ap.add_argument("--no-openvino", action="store_true", help="time onnxruntime only")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    peers = ("onnxruntime",) if args.no_openvino else ("onnxruntime", "openvino")
    tuned = dict(t.split("=", 1) for t in args.tuned)

    rows: list[str] = []
    start = time.time()
    for case in CASES:
        if only and case.name not in only:
            continue
        path = model_path(case.name)
        for batch in case.batches:
            feeds = make_inputs(case.name) if case.feeds else None
            # batch 1 compiles the model as exported (static); other batches free the batch dim
            shapes = {k: tuple(1 if (d == "N" and batch == 1) else d for d in v) for k, v in case.shapes.items()}
            print(f"[bench] {case.label}, batch {batch}", flush=True)
            ort = bench(path, against=peers, batch=batch, rounds=args.rounds,
                        iterations=args.iterations, input_shapes=shapes, inputs=feeds)
            tvm_cell, tvm_ratio = "not run", ""
            if case.tvm and batch == 1:
                try:
                    tv = bench(path, against=("tvm",), batch=batch, rounds=args.tvm_rounds, iterations=1,
                               input_shapes=shapes)
                    tvm_cell = f"{tv.results['tvm'].median_ms:,.1f}"
                    tvm_ratio = f"{tv.ratio('tvm'):.4f}"
                except KilnError as e:
                    tvm_cell = f"fails: {str(e).split(': ', 2)[-1][:60]}"
            rows.append(_row(case.label, batch, ort, tvm_cell, tvm_ratio))
            print("   ", rows[-1], flush=True)
            if batch == 1 and case.name in tuned:
                print(f"[bench] {case.label}, batch 1, tuned", flush=True)
                tr = bench(path, against=peers, batch=batch, rounds=args.rounds,
                           iterations=args.iterations, input_shapes=shapes, inputs=feeds, tune_db=tuned[case.name])
                rows.append(_row(f"{case.label}, tuned (`kiln tune`)", batch, tr, "", ""))
                print("   ", rows[-1], flush=True)

    model, flags = _cpu()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("apache-tvm", "apache-tvm-ffi", "onnxruntime", "openvino", "numpy")
                         if _installed(p))
    from kiln import __version__

    text = "\n".join([
        "# kiln benchmark results",
        "",
        f"- date: {datetime.date.today().isoformat()}; {len(rows)} rows in {(time.time() - start) / 60:.0f} min",
        f"- machine: {model}; {platform.machine()}; flags {flags}",
        f"- kiln {__version__} (level O3; default schedules, untuned except rows marked tuned); {versions}",
        f"- method: `bench/run_all.py --rounds {args.rounds} --iterations {args.iterations}`: 2 threads per engine, each "
        "engine in its own process, alternating runs after warm-up, onnxruntime ORT_ENABLE_ALL with spinning off, "
        "OpenVINO's CPU plugin (fp32, latency hint, reshaped to the input's static shape); "
        f"medians (p10..p90) in ms over {args.rounds}x{args.iterations} runs; TVM's own pipeline over "
        f"{args.tvm_rounds} runs at batch 1",
        "- batch 1 compiles each model at its exported, static shape; batch 8 on the light models compiles them "
        "with a free batch N, and onnxruntime runs kiln's export of the same graph, its batch freed the same way",
        "",
        "| model | batch | kiln ms | onnxruntime ms | kiln / onnxruntime | OpenVINO ms | kiln / OpenVINO "
        "| kiln / the faster peer | TVM pipeline ms | kiln / TVM |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
