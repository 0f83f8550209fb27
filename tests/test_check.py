"""``kiln check`` on compiled artifacts: per-output figures, exit codes, refusals, and every benchmark model at O3.

Real models are compiled once per version of kiln's code and kept in the model cache
(:func:`cached_artifact`), so a rerun of the suite checks them without compiling again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.check import check_model, compare_outputs
from kiln.cli import main
from helpers import make_model
from models import CACHE, MODELS, make_inputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"


@lru_cache(maxsize=None)
def _kiln_version_key() -> str:
    """A digest of kiln's source and the TVM version: compiled artifacts are reused only for the same code."""
    h = hashlib.sha256(metadata.version("apache-tvm").encode())
    for p in sorted((REPO / "kiln").rglob("*")):
        if p.suffix in (".py", ".j2"):
            h.update(p.relative_to(REPO).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:24]


STALE_SECONDS = 86400  # artifacts of other code versions, unused this long, are removed


def cached_artifact(model: Path, name: str, shapes: dict[str, tuple]) -> Path:
    """``model`` compiled at O3 with ``shapes`` pinned: from the cache, or compiled now and kept there."""
    key = hashlib.sha256(model.read_bytes() + repr(sorted(shapes.items())).encode()).hexdigest()[:16]
    here = CACHE / "compiled" / _kiln_version_key()
    out = here / f"{name}-{key}.kiln"
    if here.is_dir():
        os.utime(here)
    for other in here.parent.glob("*") if here.parent.is_dir() else ():
        if other != here and other.is_dir() and time.time() - other.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(other, ignore_errors=True)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".kiln.tmp")
        os.close(fd)
        try:
            kiln.compile(model, tmp, level="O3", input_shapes=shapes)
            os.replace(tmp, out)  # atomic: a concurrent worker compiling the same model writes the same bytes
        finally:
            Path(tmp).unlink(missing_ok=True)
    return out


def _log_model(path: Path) -> Path:
    """y = Log(x) and z = 1 / x: NaN for negative x, -inf and inf at zero, in both engines."""
    model = make_model([helper.make_node("Log", ["x"], ["y"]), helper.make_node("Reciprocal", ["x"], ["z"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])])
    path.write_bytes(model.SerializeToString())
    return path


def test_check_compiles_the_model_and_prints_every_figure(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["check", str(EXAMPLE), "--input-shape", "input=2x3x64x64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kiln artifact (O3, compiled now) vs onnxruntime: ok" in text
    assert "output   max abs   max rel    cosine  argmax  NaN got/ref  Inf got/ref  result" in text
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["level"] == "O3"
    art = data["comparisons"][-1]
    assert art["name"].startswith("kiln artifact") and (art["rtol"], art["atol"]) == (1e-3, 1e-4)
    (probs,) = art["outputs"]
    assert probs["name"] == "probs" and probs["shape"] == [2, 10] and probs["passed"]
    assert 0 < probs["max_abs"] < 1e-5 and probs["cosine"] > 0.999999 and probs["argmax_agreement"] == 1.0
    assert probs["nan"] == {"got": 0, "want": 0} and probs["inf"] == {"got": 0, "want": 0}


def test_check_counts_nan_and_inf_of_each_engine(tmp_path):
    model = _log_model(tmp_path / "log.onnx")
    x = np.array([[-1, 0, 1, 2, -3, 0.5, 4, 0], [1, 1, -2, 3, 0, 6, 7, 8]], np.float32)
    report = check_model(model, inputs={"x": x}, inputs_from="given")
    art = report.artifact_check
    assert art is not None and art.passed  # NaN where onnxruntime has NaN, inf where it has inf
    by_name = {o.name: o for o in art.outputs}
    assert by_name["y"].nan == (3, 3) and by_name["y"].inf == (3, 3)  # Log: 3 negatives, 3 zeros (-inf)
    assert by_name["z"].nan == (0, 0) and by_name["z"].inf == (3, 3)  # 1/0 = inf


def test_compare_outputs_fails_on_a_nan_where_the_reference_has_a_number():
    want = {"y": np.array([1.0, 2.0, 3.0], np.float32)}
    got = {"y": np.array([1.0, np.nan, 3.0], np.float32)}
    (o,) = compare_outputs("t", got, want, 1e-4, 1e-5).outputs
    assert not o.passed and o.nan == (1, 0) and o.max_abs == 0.0  # the finite elements agree
    (o,) = compare_outputs("t", {"y": want["y"] * 1.1}, want, 1e-4, 1e-5).outputs
    assert not o.passed and o.max_abs == pytest.approx(0.3, rel=1e-5) and o.max_rel == pytest.approx(0.1, rel=1e-5)


def test_tolerances_decide_pass_or_fail(tmp_path, capsys):
    """rtol 0 and atol 0 demand bit-identical floats, which no compiled conv gives: exit 1; the default passes."""
    art = tmp_path / "tiny.kiln"
    kiln.compile(EXAMPLE, art, input_shapes={"input": (1, 3, 64, 64)})
    assert main(["check", str(EXAMPLE), "--artifact", str(art), "--rtol", "0", "--atol", "0", "--no-evaluator"]) == 1
    text = capsys.readouterr().out
    assert "kiln artifact (tiny.kiln) vs onnxruntime: MISMATCH" in text and "FAIL" in text
    assert main(["check", str(EXAMPLE), "--artifact", str(art), "--no-evaluator"]) == 0


def test_an_artifact_from_another_model_is_refused_in_one_line(tmp_path, capsys):
    art = tmp_path / "log.kiln"
    kiln.compile(_log_model(tmp_path / "log.onnx"), art)
    assert main(["check", str(EXAMPLE), "--artifact", str(art)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was built from another model (log.onnx, sha256" in err
    assert f"not {EXAMPLE}" in err and "Traceback" not in err


@pytest.mark.parametrize("arrays, problem", [
    ({"image": np.zeros((1, 3, 64, 64), np.float32)}, "missing input; unexpected image"),
    ({"input": np.zeros((1, 3, 64, 64), np.float64)}, "input 'input' has dtype float64"),
    ({"input": np.zeros((1, 3, 32, 64), np.float32)}, "input 'input' has shape"),
])
def test_inputs_that_do_not_match_are_refused_with_the_signature(tmp_path, capsys, arrays, problem):
    npz = tmp_path / "in.npz"
    np.savez(npz, **arrays)
    assert main(["check", str(EXAMPLE), "--inputs", str(npz)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err and str(npz) in err
    assert "input: f32[N,3,64,64]" in err  # the expected signature


def test_bad_flags_are_refused(tmp_path, capsys):
    assert main(["check", str(EXAMPLE), "--artifact", "x.kiln", "--level", "O2"]) == 2
    assert "--artifact is already compiled" in capsys.readouterr().err
    assert main(["check", str(EXAMPLE), "--no-compile", "--bisect"]) == 2
    assert main(["check", str(EXAMPLE), "--rtol", "-1", "--input-shape", "input=1x3x64x64"]) == 2
    assert "--rtol must be a number >= 0" in capsys.readouterr().err


def test_no_compile_keeps_the_import_check(capsys):
    assert main(["check", str(EXAMPLE), "--input-shape", "input=1x3x64x64", "--no-compile"]) == 0
    text = capsys.readouterr().out
    assert "kiln evaluator vs onnxruntime: ok" in text and "kiln artifact" not in text


BENCHMARK_MODELS = ["light_resnet50", "light_densenet121", "light_squeezenet", "ocr_det", "ocr_rec", "yolov8n",
                    "silero_vad"]


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_check_passes_on_the_benchmark_models_at_o3(name, real_model, tmp_path, capsys):
    """The acceptance: every benchmark model, compiled at O3 for this CPU, agrees with onnxruntime
    at the default tolerances (rtol 1e-3, atol 1e-4), on seeded inputs (silero: a real 16 kHz rate)."""
    path = real_model(name)
    art = cached_artifact(path, name, dict(MODELS[name].inputs))
    args = ["check", str(path), "--artifact", str(art), "--no-evaluator", "--json", str(tmp_path / "c.json")]
    if name == "silero_vad":  # a random sample rate is no rate the model knows
        np.savez(tmp_path / "in.npz", **make_inputs(name))
        args += ["--inputs", str(tmp_path / "in.npz")]
    rc = main(args)
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads((tmp_path / "c.json").read_text())
    (art_check,) = [c for c in data["comparisons"] if c["name"].startswith("kiln artifact")]
    assert art_check["passed"] and art_check["rtol"] == 1e-3 and art_check["atol"] == 1e-4
    assert data["passes"][-4].startswith("layout")  # O3: the blocked layout ran
