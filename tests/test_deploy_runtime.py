"""The deploy-only install: the kiln-runtime wheel in a fresh venv runs an artifact compiled here, without the compiler."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.ir.oracle import compare
from helpers import ort_outputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
sys.path.insert(0, str(REPO / "packaging" / "runtime"))

import deploy_venv  # noqa: E402

COMPILER_MODULES = ("tvm", "onnx", "onnxruntime", "kiln.codegen", "kiln.passes", "kiln.ir", "kiln.driver")


def _pins(requirements: list[str]) -> dict[str, str]:
    return dict(r.split("==", 1) for r in requirements)


def test_runtime_pins_are_the_compilers():
    compiler = _pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    runtime = _pins(deploy_venv.requirements())
    assert runtime and {k: compiler.get(k) for k in runtime} == runtime


def test_what_the_wheel_ships_imports_nothing_of_the_compiler():
    tool = tomllib.loads((REPO / "packaging" / "runtime" / "pyproject.toml").read_text())["tool"]["kiln-runtime"]
    files = [f for entry in tool["include"] for f in ([REPO / entry] if entry.endswith(".py")
                                                       else sorted((REPO / entry).rglob("*.py")))]
    assert any(f.name == "app.py" for f in files) and any(f.name == "ray.py" for f in files)
    banned = re.compile(r"^\s*(import (onnx|onnxruntime|tvm)\b|from (onnx|onnxruntime|tvm)\b|"
                        r"(from|import) kiln\.(ir|passes|codegen|driver|check|quantize|bench)\b)", re.M)
    offenders = [str(f.relative_to(REPO)) for f in files if banned.search(f.read_text())]
    assert offenders == []


@pytest.fixture(scope="module")
def deploy_python(tmp_path_factory) -> Path:
    """A fresh venv with only kiln-runtime and its dependencies (wheels cached in ~/.cache/kiln/deploy)."""
    try:
        wheels = deploy_venv.dependency_wheels()
    except deploy_venv.Unavailable as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("deploy")
    wheel = deploy_venv.build_wheel(tmp / "dist")
    return deploy_venv.make_venv(tmp / "venv", wheel, wheels)


def test_only_the_runtime_packages_are_installed(deploy_python):
    names = {n.lower().replace("_", "-") for n in deploy_venv.installed(deploy_python)}
    assert names == {"kiln-runtime", "numpy", "safetensors", "apache-tvm-ffi", "typing-extensions"}
    code = ("import importlib.util as u; "
            "print([m for m in ('tvm', 'onnx', 'onnxruntime', 'kiln.codegen', 'kiln.ir') if u.find_spec(m)])")
    out = subprocess.run([str(deploy_python), "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_an_artifact_compiled_here_runs_there_without_the_compiler(deploy_python, tmp_path):
    artifact = tmp_path / "tiny.kiln"
    kiln.compile(EXAMPLE, artifact)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(deploy_python), "-c", deploy_venv.RUN_SCRIPT, str(artifact), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    site = deploy_venv.site_packages(deploy_python)
    assert Path(report["kiln"]).is_relative_to(site)  # the wheel's kiln, not this checkout's
    libs = {Path(p).name: Path(p) for p in report["libraries"]}
    assert libs["libtvm_runtime.so"].is_relative_to(site / "kiln" / "runtime" / "lib")  # the vendored copy
    assert all(p.is_relative_to(site) for p in libs.values()) and "libtvm_compiler.so" not in libs, libs
    imported = [m for m in report["modules"] if any(m == c or m.startswith(c + ".") for c in COMPILER_MODULES)]
    assert imported == []
    with np.load(tmp_path / "out.npz") as out:
        got = {k: out[k] for k in out.files}
    cmp = compare("deploy venv vs onnxruntime", got, ort_outputs(str(EXAMPLE), {"input": x}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs
