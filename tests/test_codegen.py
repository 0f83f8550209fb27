"""Codegen and the runtime on the bundled example: compile once, run, compare with onnxruntime."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import kiln
import kiln.runtime
from kiln.check import compare
from kiln.cli import main
from kiln.codegen.build import build
from kiln.codegen.lower import CodegenError
from kiln.errors import InputError
from kiln.passes import PassManager
from kiln.passes.pipeline import passes_for
from test_onnx_io import f32, make_model, ort_outputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    g, _ = PassManager(passes_for("O2")).run(kiln.load(EXAMPLE))
    out = tmp_path_factory.mktemp("kiln") / "tiny.kiln"
    build(g, out)
    return out


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_example_matches_onnxruntime(artifact, batch):
    model = kiln.runtime.load(artifact)
    got = model.run({"input": _x(batch)})
    cmp = compare("kiln vs ort", got, ort_outputs(str(EXAMPLE), {"input": _x(batch)}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_runtime_runs_without_the_compiler_or_onnx(artifact):
    code = (
        "import sys, numpy as np, kiln.runtime\n"
        f"m = kiln.runtime.load({str(artifact)!r})\n"
        "y = m.run({'input': np.zeros((2, 3, 64, 64), np.float32)})['probs']\n"
        "assert y.shape == (2, 10) and abs(float(y.sum()) - 2.0) < 1e-4\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('tvm', 'onnx'))\n"
        "print('modules:', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "modules: []" in proc.stdout


@pytest.mark.parametrize("feeds, message", [
    ({"image": np.zeros((1, 3, 64, 64), np.float32)}, "missing input; unexpected image"),
    ({"input": np.zeros((1, 3, 64, 64), np.float64)}, "dtype float64"),
    ({"input": np.zeros((1, 3, 32, 64), np.float32)}, r"shape \[1, 3, 32, 64\]"),
    ({"input": np.zeros((3, 64, 64), np.float32)}, r"shape \[3, 64, 64\]"),
])
def test_wrong_inputs_are_refused_with_the_signature(artifact, feeds, message):
    model = kiln.runtime.load(artifact)
    with pytest.raises(InputError, match=message) as err:
        model.run(feeds)
    assert "expected input: float32[N,3,64,64]" in str(err.value)


def test_concurrent_runs_from_several_threads(artifact):
    model = kiln.runtime.load(artifact)
    inputs = {b: _x(b, seed=b) for b in (1, 2, 3, 4)}
    expected = {b: ort_outputs(str(EXAMPLE), {"input": x})["probs"] for b, x in inputs.items()}
    errors: list[str] = []

    def work(b: int) -> None:
        for _ in range(15):
            y = model.run({"input": inputs[b]})["probs"]
            if not np.allclose(y, expected[b], rtol=1e-4, atol=1e-5):
                errors.append(f"batch {b}: max error {np.abs(y - expected[b]).max()}")

    threads = [threading.Thread(target=work, args=(b,)) for b in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unsupported_ops_are_listed_before_compiling(tmp_path):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Unique", ["r"], ["v"], name="unique")],
        [f32("x", [2, 5])], [f32("v", [None])],
    )
    with pytest.raises(CodegenError, match=r"kiln cannot compile these ops yet: Unique \(nodes: unique\)"):
        build(kiln.load(model), tmp_path / "x.kiln")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unknown_dims_need_a_bound(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", ["?", 4])], [f32("y", None)])
    with pytest.raises(CodegenError, match=r"dims \[0\] are unknown; give them sizes with --input-shape x=1x4"):
        build(kiln.load(model), tmp_path / "x.kiln")


def test_cli_compile_and_run(tmp_path, capsys):
    out = tmp_path / "m.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out)]) == 0
    assert "kernels, target" in capsys.readouterr().out
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, input=_x(2))
    assert main(["run", str(out), "--inputs", str(inputs), "-o", str(outputs)]) == 0
    got = dict(np.load(outputs))
    cmp = compare("cli", got, ort_outputs(str(EXAMPLE), {"input": _x(2)}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs
    assert main(["compile", str(EXAMPLE), "-o", str(EXAMPLE)]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err


def test_cli_run_refuses_a_tampered_artifact(artifact, tmp_path, capsys):
    import zipfile

    bad = tmp_path / "bad.kiln"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = bytearray(zin.read(name))
            if name == "model.so":
                data[len(data) // 2] ^= 0xFF
            zout.writestr(name, bytes(data))
    np.savez(tmp_path / "in.npz", input=_x(1))
    assert main(["run", str(bad), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz")]) == 2
    assert "member 'model.so' does not match its sha256" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["light_squeezenet", "light_resnet50", "light_densenet121", "yolov8n", "ocr_det",
                                  "ocr_rec", "ocr_cls"])
def test_real_models_compile_run_and_match(name, real_model, tmp_path):
    from models import MODELS, make_inputs

    path = real_model(name)
    out = tmp_path / f"{name}.kiln"
    pins = [arg for k, v in MODELS[name].inputs.items() for arg in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
    assert main(["compile", str(path), "-o", str(out), *pins]) == 0
    feeds = make_inputs(name)
    got = kiln.runtime.load(out).run(feeds)
    cmp = compare(name, got, ort_outputs(str(path), feeds), rtol=1e-3, atol=1e-4)
    assert cmp.passed, cmp.max_abs


def test_demo_script_runs():
    proc = subprocess.run([sys.executable, "examples/demo.py", "--rounds", "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max abs error vs onnxruntime" in proc.stdout and "median latency" in proc.stdout
    err = float(proc.stdout.split("max abs error vs onnxruntime ")[1].split()[0])
    assert err < 1e-4


def test_symbolic_width_compiles_once_and_runs_at_two_widths(real_model, tmp_path):
    """rapidocr's cls model compiled with a named width W, run at W=192 and W=320."""
    path = real_model("ocr_cls")
    out = tmp_path / "cls.kiln"
    assert main(["compile", str(path), "-o", str(out), "--input-shape", "x=1x3x48xW"]) == 0
    model = kiln.runtime.load(out)
    assert model.inputs[0].shape == (1, 3, 48, "W")
    for width in (192, 320):
        x = np.random.default_rng(width).standard_normal((1, 3, 48, width)).astype(np.float32)
        cmp = compare(f"W={width}", model.run({"x": x}), ort_outputs(str(path), {"x": x}), rtol=1e-3, atol=1e-4)
        assert cmp.passed, cmp.max_abs


def test_cuda_artifact_builds_without_a_gpu(real_model, tmp_path):
    """A sm_90 artifact for the light ResNet-50: TVM's CUDA source, compiled to a fatbin by nvcc."""
    import shutil
    import zipfile

    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("nvcc is not installed: CUDA artifacts cannot be built here")
    path = real_model("light_resnet50")
    out = tmp_path / "r50_sm90.kiln"
    assert main(["compile", str(path), "-o", str(out), "--target", "cuda", "--arch", "sm_90"]) == 0
    from kiln.runtime.artifact import read_artifact

    art = read_artifact(out)
    assert art.manifest["target"]["kind"] == "cuda" and art.manifest["target"]["arch"] == "sm_90"
    assert b"__global__" in art.member("kernels.cu")
    assert len(art.member("kernels.fatbin")) > 1000
    with zipfile.ZipFile(out) as zf:
        assert {"kernels.cu", "kernels.fatbin", "model.so", "weights.safetensors"} <= set(zf.namelist())
    with pytest.raises(Exception, match="CUDA artifact"):
        kiln.runtime.load(out)


def test_cuda_needs_an_arch(capsys):
    assert main(["compile", str(EXAMPLE), "-o", "/tmp/never.kiln", "--target", "cuda"]) == 2
    assert "--target cuda needs --arch" in capsys.readouterr().err


def test_run_batch(artifact):
    model = kiln.runtime.load(artifact)
    batch = [{"input": _x(1, seed=s)} for s in range(3)]
    results = model.run_batch(batch)
    assert len(results) == 3
    for feeds, got in zip(batch, results):
        assert compare("batch", got, ort_outputs(str(EXAMPLE), feeds), rtol=1e-4, atol=1e-5).passed


def test_bench_alternates_engines_in_their_own_processes(tmp_path, capsys):
    import json
    import os

    out = tmp_path / "bench.json"
    assert main(["bench", str(EXAMPLE), "--against", "onnxruntime", "--batch", "2", "--rounds", "2",
                 "--iterations", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["engines"]) == {"kiln", "onnxruntime"} and data["batch"] == 2
    pids = {e["pid"] for e in data["engines"].values()}
    assert len(pids) == 2 and os.getpid() not in pids  # each engine in its own process
    assert all(e["samples"] == 4 and e["median_ms"] > 0 for e in data["engines"].values())
    assert data["ratios"]["kiln/onnxruntime"] > 0
    assert "onnxruntime spinning off" in capsys.readouterr().out
    assert main(["bench", str(EXAMPLE), "--against", "openvino"]) == 2


def test_compile_refuses_a_microsoft_op(tmp_path, capsys):
    model = make_model([helper.make_node("FusedGemm", ["x", "x"], ["y"], name="fg", domain="com.microsoft")],
                       [f32("x", [2, 2])], [f32("y", [2, 2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    src = tmp_path / "ms.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["compile", str(src), "-o", str(tmp_path / "ms.kiln")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kiln: error: ") and "com.microsoft::FusedGemm (nodes: fg)" in lines[-1]
    assert all(line.startswith("[kiln] ") for line in lines[:-1])  # the rest is the progress display
    assert not (tmp_path / "ms.kiln").exists()
