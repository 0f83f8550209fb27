"""The PEP 517 build backend of kiln-runtime (see pyproject.toml beside this file).

It writes one wheel from the repository's kiln sources (the files ``[tool.kiln-runtime]
include`` names) and ``libtvm_runtime.so`` out of the installed apache-tvm, which it vendors
as ``kiln/runtime/lib/libtvm_runtime.so`` with TVM's license. The wheel's platform tags are
apache-tvm's, whose binary it carries. Only the standard library is used, so it builds with
``pip wheel --no-build-isolation`` in any environment that has the pinned apache-tvm. The
same sources give the same wheel, byte for byte (fixed timestamps, sorted members).
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LIBRARY = "kiln/runtime/lib/libtvm_runtime.so"
_DATE = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    """The wheel cannot be built here (no apache-tvm, or another version of it)."""


def _project() -> tuple[dict, dict]:
    data = tomllib.loads((HERE / "pyproject.toml").read_text())
    return data["project"], data["tool"]["kiln-runtime"]


def version() -> str:
    """kiln's version, from kiln/__init__.py (without importing it)."""
    m = re.search(r'^__version__ = "([^"]+)"', (ROOT / "kiln" / "__init__.py").read_text(), re.M)
    if m is None:
        raise BuildError("kiln/__init__.py has no __version__")
    return m.group(1)


def _tvm(requirement: str) -> tuple[Path, bytes | None, list[str]]:
    """The installed apache-tvm's runtime library, its license text, and its wheel's tags."""
    name, _, pinned = requirement.partition("==")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise BuildError(f"{name} is not installed here; kiln-runtime vendors its libtvm_runtime.so: "
                         f"build with pip wheel --no-build-isolation in kiln's own venv") from None
    if dist.version != pinned:
        raise BuildError(f"{name} {dist.version} is installed; kiln-runtime vendors {requirement}")
    lib = Path(str(dist.locate_file("tvm/lib/libtvm_runtime.so")))
    if not lib.is_file():
        raise BuildError(f"{lib}: missing from the installed {name}")
    license_text = None
    for f in dist.files or ():
        if f.name == "LICENSE" and f.parent.name == "licenses":
            license_text = Path(str(dist.locate_file(f))).read_bytes()
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    return lib, license_text, tags or ["py3-none-linux_x86_64"]


def _sources(include: list[str]) -> list[Path]:
    files: list[Path] = []
    for entry in include:
        p = ROOT / entry
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
        elif p.is_file():
            files.append(p)
        else:
            raise BuildError(f"{entry}: listed in [tool.kiln-runtime] include, but not in the repository")
    return files


def _metadata(project: dict, ver: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {ver}",
             f"Summary: {project['description']}", f"Requires-Python: {project['requires-python']}",
             f"License: {project['license']['text']}"]
    lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    return "\n".join(lines) + "\n"


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(wheel_directory: str | Path) -> Path:
    """Write the kiln-runtime wheel into ``wheel_directory``; its path."""
    project, tool = _project()
    ver = version()
    lib, license_text, tags = _tvm(tool["tvm"])
    members: dict[str, bytes] = {f.relative_to(ROOT).as_posix(): f.read_bytes() for f in _sources(tool["include"])}
    members[LIBRARY] = lib.read_bytes()
    dist_info = f"{project['name'].replace('-', '_')}-{ver}.dist-info"
    if license_text is not None:
        members[f"{dist_info}/licenses/TVM-LICENSE"] = license_text  # (libtvm_runtime.so is Apache TVM's)
    members[f"{dist_info}/METADATA"] = _metadata(project, ver).encode()
    members[f"{dist_info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: kiln-runtime backend\nRoot-Is-Purelib: false\n"
                                     + "".join(f"Tag: {t}\n" for t in tags)).encode()
    record = "".join(f"{name},{_digest(data)},{len(data)}\n" for name, data in sorted(members.items()))
    members[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    platforms = ".".join(sorted({t.split("-", 2)[2] for t in tags}))
    out = Path(wheel_directory) / f"{project['name'].replace('-', '_')}-{ver}-py3-none-{platforms}.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(members.items()):
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)
    tmp.replace(out)
    return out


# -- PEP 517 hooks -------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    """Nothing beyond the standard library."""
    return []


def build_wheel(wheel_directory: str, config_settings: dict | None = None, metadata_directory: str | None = None) -> str:
    """PEP 517: build the wheel; its file name."""
    return build(wheel_directory).name


def build_sdist(sdist_directory: str, config_settings: dict | None = None) -> str:
    """PEP 517: kiln-runtime has no sdist (its wheel carries a binary from apache-tvm's wheel)."""
    raise BuildError("kiln-runtime ships as a wheel only: pip wheel --no-build-isolation packaging/runtime")
