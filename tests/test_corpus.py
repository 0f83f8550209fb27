"""The real-model corpus: torchvision and transformers architectures as users export them (torch's
dynamo exporter, opset 18, random seeded weights, a dynamic batch dim, and a dynamic sequence dim
for the text and audio models), compiled once with no shape flags and matched against onnxruntime
at two sizes.

Exports are cached outside the repo (``$KILN_MODEL_CACHE/corpus/torch-V-torchvision-V``), by
``tests/tools/export_corpus.py``. Known failures are listed below with their reason.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.runtime
from kiln.check import compare
from helpers import ort_outputs
from models import corpus_dir

EXPORTER = Path(__file__).parent / "tools" / "export_corpus.py"

#: name -> the two sizes each run at: {input: shape}
SIZES: dict[str, list[dict[str, tuple[int, ...]]]] = {
    "mobilenet_v2": [{"x": (1, 3, 224, 224)}, {"x": (2, 3, 224, 224)}],
    "resnet50": [{"x": (1, 3, 224, 224)}, {"x": (2, 3, 224, 224)}],
    "googlenet": [{"x": (1, 3, 224, 224)}, {"x": (2, 3, 224, 224)}],
    "mnasnet1_0": [{"x": (1, 3, 224, 224)}, {"x": (2, 3, 224, 224)}],
    "lraspp_mobilenet_v3_large": [{"x": (1, 3, 256, 256)}, {"x": (2, 3, 256, 256)}],
    "fcn_resnet50": [{"x": (1, 3, 256, 256)}, {"x": (2, 3, 256, 256)}],
    "swin_t": [{"x": (1, 3, 224, 224)}, {"x": (2, 3, 224, 224)}],
    "r3d_18": [{"x": (1, 3, 8, 112, 112)}, {"x": (2, 3, 8, 112, 112)}],
    "distilbert": [{"input_ids": (1, 7), "attention_mask": (1, 7)}, {"input_ids": (3, 40), "attention_mask": (3, 40)}],
    "roberta": [{"input_ids": (1, 7), "attention_mask": (1, 7)}, {"input_ids": (3, 40), "attention_mask": (3, 40)}],
    "whisper_tiny_encoder": [{"input_features": (1, 80, 3000)}, {"input_features": (2, 80, 3000)}],
    "wav2vec2_base": [{"input_values": (1, 8000)}, {"input_values": (2, 16000)}],
}
#: Models that do not compile or match yet, with the reason (xfail, strict).
KNOWN: dict[str, str] = {
}


@pytest.fixture(scope="module")
def corpus() -> Path:
    pytest.importorskip("torch", reason="torch is not installed (the transformers-tests extra)")
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed")
    from importlib.metadata import PackageNotFoundError

    try:
        out = corpus_dir()
    except PackageNotFoundError:
        pytest.skip("torchvision is not installed (the transformers-tests extra)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # one test worker exports; the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((out / f"{name}.onnx").exists() for name in SIZES):
            proc = subprocess.run([sys.executable, str(EXPORTER), str(out)], capture_output=True, text=True,
                                  timeout=1800)
            assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _feeds(name: str, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        if k == "input_ids":
            out[k] = rng.integers(0, 1000, shape).astype(np.int64)
        elif k == "attention_mask":
            mask = (rng.random(shape) > 0.2).astype(np.int64)
            mask[:, 0] = 1
            out[k] = mask
        else:
            out[k] = rng.standard_normal(shape).astype(np.float32)
    return out


@pytest.mark.models
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=True))
                                  if n in KNOWN else n for n in SIZES])
def test_corpus_model_compiles_unpinned_and_matches_at_two_sizes(name, corpus, tmp_path):
    path = corpus / f"{name}.onnx"
    out = tmp_path / f"{name}.kiln"
    kiln.compile(path, out)
    compiled = kiln.runtime.load(out)
    for seed, shapes in enumerate(SIZES[name]):
        feeds = _feeds(name, shapes, seed)
        cmp = compare(f"{name} {shapes}", compiled.run(feeds), ort_outputs(str(path), feeds), rtol=1e-3, atol=1e-4)
        assert cmp.passed, cmp.max_abs
