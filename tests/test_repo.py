"""House rules of the repository, checked: sizes, import boundaries, the bundled example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def test_nothing_in_the_repo_is_larger_than_1_mb():
    big = [str(p.relative_to(REPO)) for p in tracked_files() if p.is_file() and p.stat().st_size > 1_000_000]
    assert big == []


def _python_files(package: str) -> list[Path]:
    return sorted((REPO / "kiln" / package).rglob("*.py")) if package else sorted((REPO / "kiln").rglob("*.py"))


_ONNX_IMPORT = re.compile(r"^\s*(import onnx\b|from onnx\b)", re.M)
_TVM_IMPORT = re.compile(r"^\s*(import tvm\b|from tvm\b)", re.M)


def test_only_kiln_ir_imports_onnx():
    offenders = [str(p.relative_to(REPO)) for p in _python_files("")
                 if _ONNX_IMPORT.search(p.read_text()) and "kiln/ir/" not in p.as_posix()]
    assert offenders == []


def test_only_codegen_and_runtime_import_tvm():
    offenders = [str(p.relative_to(REPO)) for p in _python_files("")
                 if _TVM_IMPORT.search(p.read_text())
                 and not re.search(r"kiln/(codegen|runtime)/", p.as_posix())]
    assert offenders == []


def test_importing_kiln_runtime_pulls_in_neither_onnx_nor_tvm():
    code = "import sys, kiln.runtime; print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'tvm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_bundled_example_is_regenerated_byte_for_byte(tmp_path):
    import make_tiny_cnn

    committed = (REPO / "examples" / "tiny_cnn.onnx").read_bytes()
    assert make_tiny_cnn.build().SerializeToString() == committed
    assert len(committed) < 1_000_000


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
    assert "make demo" in (REPO / "README.md").read_text()
