"""A deploy-only environment from scratch: the kiln-runtime wheel in a fresh venv, measured.

    .venv/bin/python packaging/runtime/deploy_venv.py [ARTIFACT.kiln INPUTS.npz ...]

builds the kiln-runtime wheel from this repository, makes a fresh venv (``python -m venv
--without-pip``) in a temporary directory, installs the wheel into it offline (``pip --python
VENV install --no-index --find-links WHEELS``) with its dependencies' wheels, which
``pip download`` fetches once into ``~/.cache/kiln/deploy/wheels``, and prints the install
size (site-packages, and kiln's own share) and the cold start of each artifact given: the
wall time of ``python -c "import kiln.runtime; m = kiln.runtime.load(A); m.run(...)"``,
median of 5 runs. ``tests/test_deploy_runtime.py`` uses the same functions.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "deploy"

#: What the cold-start and the test run inside the deploy venv: load, run, and list the modules imported.
RUN_SCRIPT = """
import json, sys
import numpy as np
import kiln.runtime
model = kiln.runtime.load(sys.argv[1])
with np.load(sys.argv[2]) as data:
    outputs = model.run({k: data[k] for k in data.files})
np.savez(sys.argv[3], **outputs)
libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libtvm" in line})
print(json.dumps({"modules": sorted(sys.modules), "kiln": kiln.__file__, "libraries": libs}))
"""


class Unavailable(Exception):
    """A wheel the deploy venv needs cannot be had (offline, and not cached)."""


def requirements() -> list[str]:
    """kiln-runtime's pinned dependencies, from its pyproject.toml."""
    return list(tomllib.loads((HERE / "pyproject.toml").read_text())["project"]["dependencies"])


def build_wheel(out: Path) -> Path:
    """The kiln-runtime wheel, built by pip through the in-tree backend, into ``out``."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                           "--disable-pip-version-check", "-w", str(out), str(HERE)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"building the kiln-runtime wheel failed:\n{proc.stderr[-3000:]}")
    (wheel,) = out.glob("kiln_runtime-*.whl")
    return wheel


def dependency_wheels() -> Path:
    """A directory with wheels of kiln-runtime's dependencies (and theirs), fetched once and cached."""
    reqs = requirements()
    wheels = CACHE / "wheels"
    stamp = wheels / ("ok-" + "-".join(r.replace("==", "_") for r in reqs))
    if stamp.exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                           "--only-binary", ":all:", "-d", str(wheels), *reqs],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise Unavailable(f"cannot download {', '.join(reqs)} (offline?): {proc.stderr.strip()[-300:]}")
    stamp.touch()
    return wheels


def make_venv(path: Path, wheel: Path, wheels: Path) -> Path:
    """A fresh venv at ``path`` with only ``wheel`` and its dependencies installed; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                           "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"installing kiln-runtime offline failed:\n{proc.stderr[-3000:]}")
    return python


def site_packages(python: Path) -> Path:
    """The venv's site-packages directory."""
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60, cwd=tempfile.gettempdir())
    return Path(out.stdout.strip())


def installed(python: Path) -> dict[str, str]:
    """Distribution name -> version, of everything installed in the venv."""
    code = "import importlib.metadata as m; print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         cwd=tempfile.gettempdir())  # (the checkout's kiln_compiler.egg-info is not the venv's)
    return dict(line.split("==", 1) for line in out.stdout.split())


def du(path: Path) -> int:
    """Bytes in the files under ``path`` (what ``du --apparent-size`` counts)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def cold_start(python: Path, artifact: Path, inputs: Path, runs: int = 5) -> list[float]:
    """Wall seconds of a fresh ``python -c`` that loads ``artifact`` and runs it once, ``runs`` times."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:  # (and a cwd without the repo's kiln in it)
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([str(python), "-c", RUN_SCRIPT, str(artifact), str(inputs), str(Path(tmp) / "out.npz")],
                           cwd=tmp, check=True, capture_output=True, timeout=300)
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str]) -> None:
    """Build the deploy venv; print its size and the cold start of each (artifact, inputs) pair."""
    with tempfile.TemporaryDirectory(prefix="kiln-deploy-") as tmp:
        wheel = build_wheel(Path(tmp) / "dist")
        python = make_venv(Path(tmp) / "venv", wheel, dependency_wheels())
        sp = site_packages(python)
        kiln_bytes = du(sp / "kiln") + du(next(sp.glob("kiln_runtime-*.dist-info")))
        print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
        print("installed: " + ", ".join(f"{k}=={v}" for k, v in sorted(installed(python).items())))
        print(f"site-packages: {du(sp) / 1e6:.1f} MB, of which kiln-runtime {kiln_bytes / 1e6:.1f} MB "
              f"(libtvm_runtime.so {(sp / 'kiln/runtime/lib/libtvm_runtime.so').stat().st_size / 1e6:.1f} MB)")
        for artifact, inputs in zip(argv[::2], argv[1::2]):
            times = cold_start(python, Path(artifact).resolve(), Path(inputs).resolve())
            print(f"cold start {Path(artifact).name}: median {statistics.median(times):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main(sys.argv[1:])
