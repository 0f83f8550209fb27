"""Run kiln's benchmark set and the real-model corpus, and write bench/RESULTS.md.

Each row is ``kiln bench``'s method: each engine in its own process, alternating A B C A B C
after warm-up, medians over all timed runs. onnxruntime (ORT_ENABLE_ALL, spinning off) and
OpenVINO (CPU plugin, fp32, latency hint; ``--no-openvino`` leaves it out) are measured in
every row, with kiln's ratio to the faster of the two; TVM's own pipeline (``from_onnx`` +
``tvm.compile``, no tuning) at batch 1 only, with fewer rounds, since one of its runs takes
seconds. The benchmark set comes from the test suite's cache (``tests/models.py``); the corpus
rows are torch's default exporter's models with random weights (``tests/tools/export_corpus.py``,
cached beside the test corpus, exported on first use), the text and audio ones at their real
sizes. Each model is compiled once, by ``kiln compile`` in its own process, whose wall time and
peak memory are recorded; the table ends with the geometric means of the batch-1 ratios.

    .venv/bin/python bench/run_all.py [--rounds 8] [--only NAME,...] [--batches 1] [--tuned NAME=DB_DIR ...]

``--tuned`` adds a batch-1 row for that model compiled with a tuning database made by
``kiln tune`` (say how long it was tuned in the commit that updates RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from models import corpus_dir, make_inputs, model_path  # noqa: E402

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
    corpus: bool = False  # exported by tests/tools/export_corpus.py, not fetched by tests/models.py
    notes: list[str] = field(default_factory=list)


def _image(name: str, label: str, batches: tuple[int, ...] = (1,)) -> Case:
    return Case(name, label, {"x": ("N", 3, 224, 224)}, batches, tvm=False, corpus=True)


def _text(name: str, label: str) -> Case:
    return Case(name, f"{label}, sequence 128", {"input_ids": (1, 128), "attention_mask": (1, 128)},
                tvm=False, corpus=True)


CASES = [
    Case("light_resnet50", "light ResNet-50 (random weights)", {"gpu_0/data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("light_densenet121", "light DenseNet-121 (random weights)", {"data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("light_squeezenet", "light SqueezeNet (random weights)", {"data_0": ("N", 3, 224, 224)}, (1, 8)),
    Case("yolov8n", "YOLOv8n 1x3x320x320", {"images": (1, 3, 320, 320)}),
    Case("ocr_det", "rapidocr det 1x3x640x640", {"x": (1, 3, 640, 640)}),
    Case("ocr_rec", "rapidocr rec 1x3x48x320", {"x": (1, 3, 48, 320)}),
    Case("silero_vad", "silero-vad (512 samples, 16 kHz)", {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
         tvm=False, feeds=True),
    _image("resnet18", "torchvision ResNet-18", (1, 8)),
    _image("resnet50", "torchvision ResNet-50", (1, 8)),
    _image("resnext50_32x4d", "torchvision ResNeXt-50 32x4d"),
    _image("mobilenet_v2", "torchvision MobileNetV2", (1, 8)),
    _image("mobilenet_v3_large", "torchvision MobileNetV3-Large"),
    _image("efficientnet_b0", "torchvision EfficientNet-B0"),
    _image("efficientnet_v2_s", "torchvision EfficientNetV2-S"),
    _image("shufflenet_v2_x1_0", "torchvision ShuffleNetV2 x1.0"),
    _image("regnet_y_400mf", "torchvision RegNetY-400MF"),
    _image("googlenet", "torchvision GoogLeNet"),
    _image("convnext_tiny", "torchvision ConvNeXt-Tiny"),
    _image("vit_b_16", "torchvision ViT-B/16"),
    _image("swin_t", "torchvision Swin-T"),
    _text("distilbert_base", "DistilBERT-base (6 layers)"),
    _text("roberta_base", "RoBERTa-base (12 layers)"),
    _text("bert_base", "BERT-base (12 layers)"),
    _text("gpt2", "GPT-2 small (12 layers)"),
    Case("whisper_tiny_encoder", "Whisper-tiny encoder, 1x80x3000", {"input_features": (1, 80, 3000)}, tvm=False,
         corpus=True),
]


def _corpus_path(name: str) -> Path:
    """The corpus model's file, exported by the test suite's exporter if it is not cached yet."""
    out = corpus_dir()
    path = out / f"{name}.onnx"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "export_corpus.py"), str(out), name],
                       check=True)
    return path


#: ``kiln compile`` that reports its own peak resident memory (VmHWM, in kB) on its last stderr line. The
#: child's rusage will not do: Linux carries the parent's resident high-water mark across fork and exec.
_COMPILE = ("import sys\nfrom kiln.cli import main\nrc = main(sys.argv[1:])\n"
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0], "
            "file=sys.stderr)\nsys.exit(rc)")


def _compile(path: Path, shapes: dict[str, tuple], out: Path) -> tuple[float, float]:
    """``kiln compile`` in its own process: (wall seconds, peak resident GB)."""
    cmd = [sys.executable, "-c", _COMPILE, "compile", str(path), "-o", str(out)]
    for k, v in shapes.items():
        cmd += ["--input-shape", f"{k}={'x'.join(str(d) for d in v)}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        raise KilnError(lines[-2] if len(lines) > 1 else f"kiln compile exited with {proc.returncode}")
    return seconds, int(lines[-1]) / 2**20


def _cpu() -> tuple[str, str]:
    from kiln.runtime.cpu import host_cpu_features, host_cpu_name

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
    have = host_cpu_features()
    return host_cpu_name(), " ".join(f for f in wanted if f in have)


def _cell(report, engine: str) -> str:
    r = report.results.get(engine)
    return f"{r.median_ms:.2f} ({r.percentile_ms(10):.2f}..{r.percentile_ms(90):.2f})" if r else "not run"


def _best(report) -> float:
    """kiln's ratio to the faster of the peers timed (the larger ratio)."""
    return max(x for x in (report.ratio("onnxruntime"), report.ratio("openvino")) if x is not None)


def _row(label: str, batch: int, report, build: str, tvm_cell: str, tvm_ratio: str,
         failed: dict[str, str] | None = None) -> str:
    ov = report.ratio("openvino")
    ov_cell = f"fails: {failed['openvino'][:60]}" if failed and "openvino" in failed else _cell(report, 'openvino')
    return (f"| {label} | {batch} | {_cell(report, 'kiln')} | {_cell(report, 'onnxruntime')} "
            f"| **{report.ratio('onnxruntime'):.3f}** | {ov_cell} "
            f"| {'' if ov is None else f'**{ov:.3f}**'} | {_best(report):.3f} | {build} | {tvm_cell} | {tvm_ratio} |")


def _bench_peers(path: Path, artifact: Path, peers: tuple[str, ...], batch: int, args: argparse.Namespace,
                 shapes: dict, feeds: Any) -> tuple[Any, dict[str, str]]:
    """``kiln bench`` of the artifact against ``peers``; a peer that cannot load the model is left out
    (its reason returned), so that the others are still timed."""
    failed: dict[str, str] = {}
    while True:
        left = tuple(p for p in peers if p not in failed)
        try:
            return bench(path, artifact=artifact, against=left, batch=batch, rounds=args.rounds,
                         iterations=args.iterations, input_shapes=shapes, inputs=feeds), failed
        except KilnError as e:
            m = re.match(r"engine (\S+) failed to load: (.*)", str(e))
            if not m or m.group(1) not in left or len(left) == 1:
                raise
            failed[m.group(1)] = " ".join(m.group(2).split())


def _geomean(xs: list[float]) -> str:
    return f"{math.exp(sum(math.log(x) for x in xs) / len(xs)):.3f}" if xs else ""


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
    ap.add_argument("--batches", help="comma-separated batch sizes to run (default: each model's own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--tuned", action="append", default=[], metavar="NAME=DB_DIR",
                    help="add a batch-1 row for NAME compiled with this tuning database")
    ap.add_argument("--no-openvino", action="store_true", help="time onnxruntime only")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    batches = {int(b) for b in args.batches.split(",")} if args.batches else None
    peers = ("onnxruntime",) if args.no_openvino else ("onnxruntime", "openvino")
    tuned = dict(t.split("=", 1) for t in args.tuned)

    rows: list[str] = []
    ratios: dict[str, list[float]] = {"onnxruntime": [], "openvino": [], "best": []}
    start = time.time()
    scratch = tempfile.TemporaryDirectory(prefix="kiln-bench-")  # removed at exit, whatever happens
    tmp = Path(scratch.name)
    for case in CASES:
        if only and case.name not in only:
            continue
        path = _corpus_path(case.name) if case.corpus else model_path(case.name)
        for batch in case.batches:
            if batches and batch not in batches:
                continue
            feeds = make_inputs(case.name) if case.feeds else None
            # batch 1 compiles the model at a static shape; other batches free the batch dim
            shapes = {k: tuple(1 if (d == "N" and batch == 1) else d for d in v) for k, v in case.shapes.items()}
            print(f"[bench] {case.label}, batch {batch}", flush=True)
            artifact = tmp / f"{case.name}-{batch}.kiln"
            try:
                seconds, gb = _compile(path, shapes, artifact)
                build = f"{seconds:.0f} s, {gb:.2f} GB"
                ort, failed = _bench_peers(path, artifact, peers, batch, args, shapes, feeds)
            except KilnError as e:  # a compile, or an engine, that fails: the row says why, the others still run
                rows.append(f"| {case.label} | {batch} | fails: {' '.join(str(e).split())[:160]} |  |  |  |  |  |  |  |  |")
                print("   ", rows[-1], flush=True)
                continue
            finally:
                artifact.unlink(missing_ok=True)
            if batch == 1:
                for peer in peers:
                    if ort.ratio(peer) is not None:
                        ratios[peer].append(ort.ratio(peer))
                ratios["best"].append(_best(ort))
            tvm_cell, tvm_ratio = "not run", ""
            if case.tvm and batch == 1:
                try:
                    tv = bench(path, against=("tvm",), batch=batch, rounds=args.tvm_rounds, iterations=1,
                               input_shapes=shapes)
                    tvm_cell = f"{tv.results['tvm'].median_ms:,.1f}"
                    tvm_ratio = f"{tv.ratio('tvm'):.4f}"
                except KilnError as e:
                    tvm_cell = f"fails: {str(e).split(': ', 2)[-1][:60]}"
            rows.append(_row(case.label, batch, ort, build, tvm_cell, tvm_ratio, failed))
            print("   ", rows[-1], flush=True)
            if batch == 1 and case.name in tuned:
                print(f"[bench] {case.label}, batch 1, tuned", flush=True)
                tr = bench(path, against=peers, batch=batch, rounds=args.rounds,
                           iterations=args.iterations, input_shapes=shapes, inputs=feeds, tune_db=tuned[case.name])
                rows.append(_row(f"{case.label}, tuned (`kiln tune`)", batch, tr, "", "", ""))
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
        "- batch 1 compiles each model at a static shape (the corpus's dynamic batch and sequence pinned); "
        "batch 8 compiles it with a free batch N (a light model's fixed batch freed, and onnxruntime runs kiln's "
        "export of the same graph, its batch freed the same way)",
        "- compile: `kiln compile` in its own process, wall time and peak resident memory; the corpus rows "
        "(torch's exporter, random weights) are not run through TVM's pipeline, whose runs take seconds each",
        "",
        "| model | batch | kiln ms | onnxruntime ms | kiln / onnxruntime | OpenVINO ms | kiln / OpenVINO "
        "| kiln / the faster peer | compile | TVM pipeline ms | kiln / TVM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        f"| geometric mean, batch 1 ({len(ratios['best'])} models) | | | | **{_geomean(ratios['onnxruntime'])}** | "
        f"| {_geomean(ratios['openvino'])} | {_geomean(ratios['best'])} | | | |",
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
