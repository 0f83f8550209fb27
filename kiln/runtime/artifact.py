"""The ``.kiln`` artifact: one zip file, verified before anything in it is used.

Members:

- ``manifest.json``: schema version, kiln and TVM versions, target (kind, mcpu,
  required CPU features or CUDA arch), input and output signature (names,
  dtypes, shapes with symbolic dims by name), sha256 of the source model, the
  passes applied, tuning and quantization info, and the sha256 of every other
  member;
- the compiled library (``model.so``) and the weights (``weights.safetensors``).

:func:`write_artifact` writes atomically (a temp file, then a rename), so a
failed compile never leaves a half-written file or clobbers an existing one.
:func:`read_artifact` checks the schema, every member's hash, the TVM version
and the host's CPU features, and refuses with a one-line reason. Only after
that may a caller load the library: loading a shared library runs its code.

This module imports neither onnx nor the TVM compiler.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from kiln.errors import KilnError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(KilnError):
    """An artifact is missing, malformed, tampered with, or made for another host."""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: str | os.PathLike, manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> Path:
    """Write an artifact atomically; ``manifest["members"]`` is filled in with the members' hashes."""
    path = Path(path)
    if MANIFEST in members:
        raise ValueError(f"'{MANIFEST}' is written by write_artifact itself")
    full = dict(manifest)
    full["schema_version"] = SCHEMA_VERSION
    full["members"] = {name: sha256(data) for name, data in sorted(members.items())}
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # stored, not deflated: float weights barely compress, and deflating them is slow. Every
        # entry gets the same fixed timestamp and mode, so the same members give the same bytes.
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_entry(MANIFEST), json.dumps(full, indent=2, sort_keys=True))
            for name, data in sorted(members.items()):
                zf.writestr(_entry(name), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


@dataclass
class Artifact:
    """A verified artifact: its manifest and member bytes."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]

    def member(self, name: str) -> bytes:
        return self.members[name]


def read_artifact(path: str | os.PathLike, *, check_host: bool = True) -> Artifact:
    """Open and verify an artifact; raise ``ArtifactError`` naming the first problem.

    With ``check_host`` (the default) the TVM version and CPU features must fit
    this machine; ``kiln inspect`` reads artifacts without that check.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if MANIFEST not in names:
                raise ArtifactError(f"{path}: not a kiln artifact (no {MANIFEST})")
            manifest = json.loads(zf.read(MANIFEST))
            members = {n: zf.read(n) for n in names if n != MANIFEST}
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a kiln artifact (not a zip file, or truncated)") from None
    except (zipfile.LargeZipFile, OSError, EOFError, zlib.error) as e:
        raise ArtifactError(f"{path}: unreadable artifact: {e}") from None
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: the manifest is not valid JSON; the artifact is corrupt") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: the manifest is not a JSON object; the artifact is corrupt")
    _verify(path, manifest, members)
    if check_host:
        check_host_compatible(path, manifest)
    return Artifact(path, manifest, members)


def _verify(path: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> None:
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: artifact schema version {version!r}, this kiln reads version {SCHEMA_VERSION}; recompile it"
        )
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{path}: the manifest lists no member hashes; the artifact is corrupt")
    extra = sorted(set(members) - set(listed))
    if extra:
        raise ArtifactError(f"{path}: member '{extra[0]}' is not listed in the manifest; the artifact was tampered with")
    for name, digest in sorted(listed.items()):
        if name not in members:
            raise ArtifactError(f"{path}: member '{name}' is missing; the artifact is incomplete")
        if sha256(members[name]) != digest:
            raise ArtifactError(f"{path}: member '{name}' does not match its sha256; the artifact was modified")


def installed_tvm_version() -> str | None:
    """The installed apache-tvm version, read from package metadata (no import)."""
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return None


def host_cpu_features() -> set[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo`` flags; empty if unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def check_host_compatible(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse an artifact built for a TVM version or CPU this host does not have."""
    built_with = manifest.get("tvm_version")
    installed = installed_tvm_version()
    if built_with and installed and built_with != installed:
        raise ArtifactError(f"{path}: built with TVM {built_with}, this host has TVM {installed}; recompile it")
    target = manifest.get("target") or {}
    if target.get("kind", "cpu") in ("cpu", "llvm"):
        needed = set(target.get("cpu_features") or ())
        missing = sorted(needed - host_cpu_features())
        if missing:
            raise ArtifactError(
                f"{path}: compiled for CPU features this host lacks: {', '.join(missing)}; "
                "recompile it on (or for) this machine"
            )


def describe(manifest: Mapping[str, Any]) -> str:
    """A readable summary of a manifest, for ``kiln inspect ARTIFACT``."""
    out = io.StringIO()
    target = manifest.get("target") or {}
    out.write(f"kiln artifact (schema {manifest.get('schema_version')}), built by kiln {manifest.get('kiln_version')} "
              f"with TVM {manifest.get('tvm_version')}\n")
    out.write(f"  target: {json.dumps(target, sort_keys=True)}\n")
    for kind in ("inputs", "outputs"):
        out.write(f"  {kind}:\n")
        for sig in manifest.get(kind, []):
            dims = ",".join(str(d) for d in sig.get("shape") or [])
            out.write(f"    {sig.get('name')}: {sig.get('dtype')}[{dims}]\n")
    source = manifest.get("source") or {}
    if source:
        out.write(f"  source: {source.get('name', '?')} (sha256 {str(source.get('sha256', ''))[:16]}...)\n")
    if manifest.get("passes"):
        out.write(f"  passes: {', '.join(manifest['passes'])}\n")
    quant = manifest.get("quantization")
    if isinstance(quant, dict):
        layers = quant.get("layers") or {}
        calib = quant.get("calibration") or {}
        int8 = sum(1 for v in layers.values() if v == "int8")
        out.write(f"  quantization: int8 in {int8} of {len(layers)} layers ({calib.get('method')} calibration on "
                  f"{calib.get('samples')} samples)\n")
        for name, why in (quant.get("kept_float") or {}).items():  # every one: inspect is the full view
            out.write(f"    kept in float: {name} ({why})\n")
        for name, acc in (quant.get("accuracy") or {}).items():
            agree = acc.get("argmax_agreement")
            out.write(f"    {name}: cosine {acc.get('cosine')}, max abs error {acc.get('max_abs_error')}"
                      f"{'' if agree is None else f', argmax agreement {agree}'} on {calib.get('held_out_samples')} "
                      f"held-out samples\n")
    for name, digest in sorted((manifest.get("members") or {}).items()):
        out.write(f"  member {name}: sha256 {digest[:16]}...\n")
    return out.getvalue().rstrip()
