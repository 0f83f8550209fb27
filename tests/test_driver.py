"""The compile driver: kiln.compile and kiln compile are one pipeline."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.runtime
from kiln.cli import main
from kiln.errors import KilnError
from kiln.ir.oracle import run_onnxruntime

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_python_compile_writes_the_same_artifact_bytes_as_the_command(tmp_path):
    cli, py = tmp_path / "cli.kiln", tmp_path / "py.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(cli), "--input-shape", "input=1x3x64x64", "--level", "O3"]) == 0
    result = kiln.compile(EXAMPLE, py, input_shapes={"input": (1, 3, 64, 64)}, level="O3")
    assert result.path == py and result.level == "O3" and result.build.num_kernels > 0
    assert py.read_bytes() == cli.read_bytes()
    manifest = json.loads(_members(py)["manifest.json"])
    assert manifest["source"]["name"] == "tiny_cnn.onnx" and manifest["passes"] == result.passes


def test_with_a_symbolic_batch_everything_but_the_library_code_is_the_same(tmp_path):
    # TVM 0.27 orders a few stores of its symbolic-shape function differently from run to run, so
    # model.so differs by a few bytes between any two builds (two `kiln compile` runs too)
    cli, py = tmp_path / "cli.kiln", tmp_path / "py.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(cli)]) == 0
    kiln.compile(str(EXAMPLE), str(py))
    a, b = _members(cli), _members(py)
    assert list(a) == list(b) and a["weights.safetensors"] == b["weights.safetensors"]
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    ma["members"].pop("model.so"), mb["members"].pop("model.so")
    assert ma == mb
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    want = run_onnxruntime(str(EXAMPLE), {"input": x})
    for path in (cli, py):
        got = kiln.runtime.load(path).run({"input": x})
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5)


def test_compile_takes_a_graph_and_explicit_pass_specs(tmp_path):
    graph = kiln.load(EXAMPLE)
    result = kiln.compile(graph, tmp_path / "g.kiln", passes="fold-constants,fuse-conv,dce")
    assert result.level is None and [p.split("{")[0] for p in result.passes] == ["fold-constants", "fuse-conv", "dce"]
    assert result.pipeline.rule_counts().get("conv-bn", 0) > 0
    assert len(graph.nodes) > len(result.graph.nodes)  # the caller's graph is left as it was
    manifest = kiln.runtime.load(result.path).manifest
    assert manifest["passes"] == result.passes and manifest["source"] == {"name": None, "sha256": None}


def test_optimize_defaults_to_O2_and_explains_from_the_run():
    graph, report = kiln.optimize(kiln.load(EXAMPLE))
    assert set(report.stats) >= {"fuse-conv", "fuse-transformer"} and "layout" not in report.stats
    assert "fired 4 time(s) in pass 'fuse-conv'" in report.explain("conv-bn")


def test_compile_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    with pytest.raises(KilnError, match="refusing to overwrite the input model"):
        kiln.compile(src, src)
    assert src.read_bytes() == EXAMPLE.read_bytes()


def test_compile_explain_reports_the_pipeline_run(tmp_path, capsys):
    out = tmp_path / "o.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--explain", "conv-relu"]) == 0
    text = capsys.readouterr().out
    # at O3 the residual block's ReLU went into the FusedConv before conv-relu reached it: a miss seen in the run
    assert ("rule 'conv-relu' fired 3 time(s) in pass 'fuse-conv'; nearest miss in pass 'fuse-conv' at 'block.relu' "
            "(Relu): expected Conv, got 'fusedconv_5' (kiln::FusedConv)") in text
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--explain", "conv-blocked"]) == 0
    assert ("rule 'conv-blocked' did not fire in pass 'layout'; never came close: no Conv node was there when pass "
            "'layout' ran") in capsys.readouterr().out
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--explain", "nope"]) == 2
    assert "no rule named 'nope'" in capsys.readouterr().err
