"""A tiny BERT and GPT-2, exported from transformers with random weights: O2 fuses their
LayerNorm, GELU and attention, and the optimized models match onnxruntime on the originals."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.ir.oracle import compare, run_onnxruntime
from kiln.passes import PassManager
from kiln.passes.pipeline import passes_for
from models import CACHE

EXPORTER = Path(__file__).parent / "tools" / "export_tiny_transformers.py"


@pytest.fixture(scope="module")
def tiny_models() -> Path:
    torch = pytest.importorskip("torch", reason="torch is not installed (the transformers-tests extra)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed")
    out = CACHE / "tiny-transformers" / f"torch-{torch.__version__}-transformers-{transformers.__version__}"
    if not all((out / f"{name}.onnx").exists() for name in ("bert", "gpt2", "bert_dynamic")):
        proc = subprocess.run([sys.executable, str(EXPORTER), str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out


FEEDS = {
    "bert": {"input_ids": np.random.default_rng(0).integers(0, 128, (1, 16)).astype(np.int64),
             "attention_mask": (np.arange(16) < 12).astype(np.int64)[None]},  # the last four positions masked
    "gpt2": {"input_ids": np.random.default_rng(1).integers(0, 128, (1, 16)).astype(np.int64)},
}
#: GELUs that fuse-gemm takes into a product's epilogue (GPT-2's moves before the Reshape after its Gemm first)
EPILOGUE_GELUS = {"bert": 2, "gpt2": 2}
EXPECTED = {
    "bert": {"attention-sdpa-masked": 2, "gelu-erf-scaled": 2},
    "gpt2": {"attention-sdpa-masked": 2, "gelu-tanh": 2},
}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_tiny_transformer_fuses_and_matches(tiny_models, name):
    path = tiny_models / f"{name}.onnx"
    g, report = PassManager(passes_for("O2"), verify_each=True).run(kiln.load(path))
    fired = report.rule_counts()
    for rule, count in EXPECTED[name].items():
        assert fired.get(rule, 0) == count, fired
    ops = collections.Counter(n.qualified_op for n in g.nodes)
    in_epilogues = sum(1 for n in g.nodes if n.op_type == "FusedGemm" and n.attr("activation") == "Gelu")
    assert ops["LayerNormalization"] == 5 and ops["kiln::Attention"] == 2, ops
    assert ops["kiln::Gelu"] + in_epilogues == 2 and in_epilogues == EPILOGUE_GELUS[name], (ops, in_epilogues)
    assert not {"Softmax", "Erf", "Tanh", "ReduceMean"} & set(ops)
    cmp = compare(name, run_onnxruntime(kiln.to_onnx(g).SerializeToString(), FEEDS[name]),
                  run_onnxruntime(str(path), FEEDS[name]), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_bert_with_symbolic_batch_and_sequence_compiles_once_and_matches(tiny_models, tmp_path):
    """torch's dynamo export with ``batch`` and ``sequence`` dims, transformers' own mask builder
    (``arange(batch)``) included: compiled with no shape flags, run at three sizes."""
    import kiln.runtime

    path = tiny_models / "bert_dynamic.onnx"
    kiln.compile(path, tmp_path / "bert.kiln")
    compiled = kiln.runtime.load(tmp_path / "bert.kiln")
    assert [s.shape for s in compiled.inputs] == [("batch", "sequence")] * 2
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 5), (3, 16), (2, 40)):
        feeds = {"input_ids": rng.integers(0, 128, (batch, seq)).astype(np.int64),
                 "attention_mask": (rng.random((batch, seq)) > 0.3).astype(np.int64)}
        feeds["attention_mask"][:, 0] = 1
        cmp = compare(f"{batch}x{seq}", compiled.run(feeds), run_onnxruntime(str(path), feeds), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs
