"""The ``.kiln`` artifact: one zip file, verified before anything in it is used.

Members (exactly these; nothing else is accepted):

- ``manifest.json``: schema version, kiln and TVM versions, target (kind, mcpu, required
  CPU features or CUDA arch), input and output signature (names, dtypes, shapes with
  symbolic dims by name), every weight's dtype and shape, sha256 of the source model, the
  passes applied, tuning and quantization info, and the sha256 of every other member;
- the compiled library (``model.so``) and the weights (``weights.safetensors``); a CUDA
  artifact also holds its kernels (``kernels.cu``, ``kernels.fatbin``);
- ``signature.json``, when the artifact is signed (:mod:`kiln.runtime.signing`): an ed25519
  signature over the manifest's exact bytes, which hold every other member's hash.

:func:`write_artifact` writes atomically (a temp file, then a rename), so a failed compile
never leaves a half-written file or clobbers an existing one; its layout is canonical (sorted
members, stored, fixed timestamps), so the same content gives the same bytes.
:func:`read_artifact` checks, before a caller may load any native code: member names (no
paths, no duplicates) and the exact member set, the schema, every member's hash, the weights
(a safetensors header that fits its member, each tensor's dtype and shape as the manifest
says), the signature under the trust policy, that the file is byte for byte the canonical
encoding of what it holds, and (for loading) the TVM version and the host's CPU features.
Each refusal is one line. Loading a shared library runs its code: only after all of that.

This module imports neither onnx nor the TVM compiler.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.cpu import host_cpu_features, mcpu_features
from kiln.runtime.signing import SIGNATURE, Signer, SignatureError, sign, trusted_keys, verify

SCHEMA_VERSION = 2  # 2: exact member set, weight signatures in the manifest, canonical layout, signatures
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
CUDA_SOURCE = "kernels.cu"
CUDA_FATBIN = "kernels.fatbin"
#: The members an artifact of each target kind holds, besides the manifest and a signature.
MEMBERS: dict[str, frozenset[str]] = {
    "cpu": frozenset({LIBRARY, WEIGHTS}),
    "cuda": frozenset({LIBRARY, WEIGHTS, CUDA_SOURCE, CUDA_FATBIN}),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: safetensors dtype names and numpy's
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
                       "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


class ArtifactError(KilnError):
    """An artifact is missing, malformed, tampered with, or made for another host."""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: str | os.PathLike, manifest: Mapping[str, Any], members: Mapping[str, bytes], *,
                   sign_key: str | os.PathLike | None = None, signer: str = "") -> Path:
    """Write an artifact atomically; ``manifest["members"]`` is filled in with the members' hashes.

    With ``sign_key`` (an ed25519 private key file) the manifest is signed, by ``signer``.
    """
    path = Path(path)
    if MANIFEST in members or SIGNATURE in members:
        raise ValueError(f"'{MANIFEST}' and '{SIGNATURE}' are written by write_artifact itself")
    full = dict(manifest)
    full["schema_version"] = SCHEMA_VERSION
    full["members"] = {name: sha256(data) for name, data in sorted(members.items())}
    manifest_bytes = json.dumps(full, indent=2, sort_keys=True).encode()
    entries = {MANIFEST: manifest_bytes, **members}
    if sign_key is not None:
        entries[SIGNATURE] = sign(manifest_bytes, sign_key, signer)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_encode(entries))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encode(entries: Mapping[str, bytes]) -> bytes:
    """The canonical zip of ``entries``: the manifest first, then the rest sorted by name; stored,
    not deflated (float weights barely compress, and deflating them is slow); fixed timestamps
    and modes, so the same entries always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(entries, key=lambda n: (n != MANIFEST, n)):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, entries[name])
    return buf.getvalue()


@dataclass
class Artifact:
    """A verified artifact: its manifest, member bytes, weights, and signer (if signed)."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    signer: Signer | None = None

    def member(self, name: str) -> bytes:
        return self.members[name]


def read_artifact(path: str | os.PathLike, *, check_host: bool = True,
                  trusted: Iterable[str | os.PathLike | bytes] | str | os.PathLike | None = None) -> Artifact:
    """Open and verify an artifact; raise ``ArtifactError`` naming the first problem.

    With ``check_host`` (the default) the TVM version and CPU features must fit this machine;
    ``kiln inspect`` reads artifacts without that check. ``trusted`` is the trust policy: public
    key files, folders of them, or raw keys (default: ``KILN_TRUSTED_KEYS``; none: no policy).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact")
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            _check_names(path, names)
            if MANIFEST not in names:
                raise ArtifactError(f"{path}: not a kiln artifact (no {MANIFEST})")
            entries = {n: zf.read(n) for n in names}
    except zipfile.BadZipFile as e:
        what = "a member is corrupt" if "CRC" in str(e) or "header" in str(e).lower() else "not a zip file, or truncated"
        raise ArtifactError(f"{path}: not a kiln artifact ({what})") from None
    except (zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable artifact: {' '.join(str(e).split())}") from None
    manifest_bytes = entries.pop(MANIFEST)
    signature = entries.pop(SIGNATURE, None)
    try:
        manifest = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: the manifest is not valid JSON; the artifact is corrupt") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: the manifest is not a JSON object; the artifact is corrupt")
    _verify(path, manifest, entries)
    weights = _verify_weights(path, manifest, entries[WEIGHTS])
    try:
        signer = verify(str(path), manifest_bytes, signature, trusted_keys(trusted))
    except SignatureError as e:
        raise ArtifactError(str(e)) from None
    canonical = {MANIFEST: manifest_bytes, **entries, **({SIGNATURE: signature} if signature is not None else {})}
    if _encode(canonical) != data:
        raise ArtifactError(f"{path}: the file is not kiln's canonical layout of its members (its zip headers or "
                            f"padding were changed); the artifact was tampered with")
    if check_host:
        check_host_compatible(path, manifest)
    return Artifact(path, manifest, entries, weights, signer)


def _check_names(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if not _NAME.fullmatch(name):
            raise ArtifactError(f"{path}: member name {name!r} is not a plain file name; the artifact was tampered with")
        if name in seen:
            raise ArtifactError(f"{path}: member '{name}' appears twice; the artifact was tampered with")
        seen.add(name)


def _verify(path: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> None:
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: artifact schema version {version!r}, this kiln reads version {SCHEMA_VERSION}; recompile it"
        )
    listed = manifest.get("members")
    if not isinstance(listed, dict) or not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in listed.values()):
        raise ArtifactError(f"{path}: the manifest lists no member hashes; the artifact is corrupt")
    kind = (manifest.get("target") or {}).get("kind") if isinstance(manifest.get("target"), dict) else None
    expected = MEMBERS.get(kind)  # type: ignore[arg-type]
    if expected is None:
        raise ArtifactError(f"{path}: the manifest's target kind {kind!r} is not cpu or cuda; the artifact is corrupt")
    for name in sorted(set(listed) | set(members)):
        if name not in expected:
            raise ArtifactError(f"{path}: member '{name}' is not part of a {kind} artifact; the artifact was "
                                f"tampered with")
    for name in sorted(expected):
        if name not in listed or name not in members:
            raise ArtifactError(f"{path}: member '{name}' is missing; the artifact is incomplete")
        if sha256(members[name]) != listed[name]:
            raise ArtifactError(f"{path}: member '{name}' does not match its sha256; the artifact was modified")


def _verify_weights(path: Path, manifest: Mapping[str, Any], data: bytes) -> dict[str, np.ndarray]:
    """The weights, after checking the safetensors header against the member and the manifest."""
    where = f"{path}: {WEIGHTS}"
    if len(data) < 8:
        raise ArtifactError(f"{where} is {len(data)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ArtifactError(f"{where}: its header says it is {n} bytes, but the member has {len(data) - 8} after it")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{where}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    declared = manifest.get("weights")
    params = manifest.get("params", [])
    if not isinstance(declared, dict) or not isinstance(params, list) or sorted(declared) != sorted(params):
        raise ArtifactError(f"{path}: the manifest's weights and params disagree; the artifact is corrupt")
    if sorted(header) != sorted(declared):
        extra, missing = sorted(set(header) - set(declared)), sorted(set(declared) - set(header))
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise ArtifactError(f"{where}: the tensors do not match the manifest ({what})")
    body = len(data) - 8 - n
    spans = []
    for name, entry in header.items():
        want = declared[name]
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}: tensor '{name}' has a malformed header entry") from None
        if dtype != want.get("dtype") or shape != list(want.get("shape", [])):
            raise ArtifactError(f"{where}: tensor '{name}' is {dtype}{shape}; the manifest says "
                                f"{want.get('dtype')}{want.get('shape')}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype if dtype != "bfloat16" else "uint16").itemsize
        if not 0 <= begin <= end <= body or end - begin != nbytes:
            raise ArtifactError(f"{where}: tensor '{name}' claims bytes {begin}..{end} of {body}; it needs {nbytes}")
        spans.append((begin, end))
    spans.sort()
    if any(a_end > b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:])):
        raise ArtifactError(f"{where}: tensors overlap in the file; the artifact was tampered with")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise ArtifactError(f"{where}: unreadable ({' '.join(str(e).split())})") from None


def sign_artifact(path: str | os.PathLike, key: str | os.PathLike, signer: str = "",
                  output: str | os.PathLike | None = None) -> Artifact:
    """Sign a verified artifact with an ed25519 private key: in place, or into ``output``.

    An existing signature is replaced. The members are checked first (no policy applies: the
    artifact is being signed, not loaded).
    """
    art = read_artifact(path, check_host=False, trusted=[])
    manifest = {k: v for k, v in art.manifest.items() if k not in ("schema_version", "members")}
    write_artifact(output or path, manifest, art.members, sign_key=key, signer=signer)
    return read_artifact(output or path, check_host=False, trusted=[])


def weight_signature(weights: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The manifest's ``weights`` entry: every weight's dtype and shape."""
    return {name: {"dtype": np.asarray(a).dtype.name, "shape": list(np.shape(a))} for name, a in weights.items()}


def installed_tvm_version() -> str | None:
    """The installed apache-tvm version, read from package metadata (no import)."""
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return None


def check_host_compatible(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse an artifact built for a TVM version or CPU this host does not have."""
    built_with = manifest.get("tvm_version")
    installed = installed_tvm_version()
    if built_with and installed and built_with != installed:
        raise ArtifactError(f"{path}: built with TVM {built_with}, this host has TVM {installed}; recompile it")
    target = manifest.get("target") or {}
    if target.get("kind", "cpu") in ("cpu", "llvm"):
        needed = set(target.get("cpu_features") or ())
        implied = mcpu_features(target.get("mcpu"))
        if implied is not None and not set(implied) <= needed:
            raise ArtifactError(f"{path}: its manifest lists fewer CPU features than its mcpu "
                                f"{target.get('mcpu')!r} needs ({', '.join(sorted(set(implied) - needed))}); "
                                f"the manifest was edited")
        missing = sorted(needed - host_cpu_features())
        if missing:
            raise ArtifactError(
                f"{path}: compiled for CPU features this host lacks: {', '.join(missing)}; "
                "recompile it on (or for) this machine"
            )


def _count(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}"
    return f"{n:g}{(' ' + unit) if unit else ''}"


def accuracy_lines(accuracy: dict[str, Any] | None, against: str) -> list[str]:
    """A manifest entry's per-output accuracy (cosine, max abs error, argmax agreement), one line each,
    ending with ``against`` (what it was measured against, and on how many samples)."""
    lines = []
    for name, acc in (accuracy or {}).items():
        agree = acc.get("argmax_agreement")
        lines.append(f"  {name}: cosine {acc.get('cosine')}, max abs error {acc.get('max_abs_error')}"
                     f"{'' if agree is None else f', argmax agreement {agree}'} {against}")
    return lines


def compression_line(entry: Mapping[str, Any]) -> str:
    """One line of a manifest's ``compression`` entry, for ``kiln compile`` and ``kiln inspect``."""
    b, a, r = entry["before"], entry["after"], entry["rate"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    at = "" if entry.get("macs_at") == "the static shapes" else f" (MACs at {entry.get('macs_at')})"
    return (f"compression: params {_count(b['params'])} -> {_count(a['params'])}, weights "
            f"{_count(b['weight_bytes'], 'B')} -> {_count(a['weight_bytes'], 'B')} ({pct(r['weight_bytes'])}), "
            f"MACs {_count(b['macs'])} -> {_count(a['macs'])} ({pct(r['macs'])}){at}")


def describe(manifest: Mapping[str, Any], signer: Signer | None = None) -> str:
    """A readable summary of a manifest (and who signed it), for ``kiln inspect ARTIFACT``."""
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
        if quant.get("dynamic"):
            out.write(f"  quantization: dynamic int8 in {int8} of {len(layers)} layers (activations quantized on "
                      f"every call; {quant.get('int8_kernels')} int8 kernels)\n")
            against = f"against the float model on {quant.get('accuracy_samples')} samples"
        else:
            out.write(f"  quantization: int8 in {int8} of {len(layers)} layers ({calib.get('method')} calibration "
                      f"on {calib.get('samples')} samples)\n")
            against = f"on {calib.get('held_out_samples')} held-out samples"
        for name, why in (quant.get("kept_float") or {}).items():  # every one: inspect is the full view
            out.write(f"    kept in float: {name} ({why})\n")
        for line in accuracy_lines(quant.get("accuracy"), against):
            out.write(f"  {line}\n")
    prec = manifest.get("precision")
    if isinstance(prec, dict):
        out.write(f"  precision: {prec.get('compute')} in {prec.get('bf16_convs')} convs and {prec.get('bf16_dense')} "
                  f"dense layers (bf16 inputs and weights, float32 sums)\n")
        for name, why in (prec.get("kept_float") or {}).items():
            out.write(f"    kept in float32: {name} ({why})\n")
        for line in accuracy_lines(prec.get("accuracy"), f"against the float model on {prec.get('accuracy_samples')} "
                                                          f"samples"):
            out.write(f"  {line}\n")
    comp = manifest.get("compression")
    if isinstance(comp, dict) and {"before", "after", "rate"} <= set(comp):
        out.write(f"  {compression_line(comp)}\n")
        prune = comp.get("pruning")
        if isinstance(prune, dict):
            out.write(f"    pruned {prune.get('removed_channels')} channels in {prune.get('groups')} channel groups "
                      f"({prune.get('norm')} importance)\n")
        for name, acc in ((comp.get("accuracy") or {}) if isinstance(comp.get("accuracy"), dict) else {}).items():
            out.write(f"    {name}: cosine {acc.get('cosine')}, max abs error {acc.get('max_abs_error')} against "
                      f"the uncompressed model\n")
    for name, digest in sorted((manifest.get("members") or {}).items()):
        out.write(f"  member {name}: sha256 {digest[:16]}...\n")
    out.write(f"  signed by: {signer} (ed25519; the signature verifies)\n" if signer else "  signature: none\n")
    return out.getvalue().rstrip()
