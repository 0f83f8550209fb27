"""The .kiln artifact format: atomic writes, and refusals before any native code loads."""

from __future__ import annotations

import json
import zipfile

import pytest

from kiln.runtime.artifact import (
    MANIFEST, SCHEMA_VERSION, ArtifactError, describe, host_cpu_features, installed_tvm_version, read_artifact,
    write_artifact,
)

MEMBERS = {"model.so": b"\x7fELF fake library bytes" * 10, "weights.safetensors": b"weights" * 50}


def _manifest(**overrides):
    m = {
        "kiln_version": "0.1.0", "tvm_version": installed_tvm_version(),
        "target": {"kind": "cpu", "mcpu": "x86-64", "cpu_features": sorted(host_cpu_features() & {"sse2"})},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 4]}],
        "source": {"name": "m.onnx", "sha256": "ab" * 32}, "passes": ["fold-constants", "dce"],
    }
    m.update(overrides)
    return m


def test_round_trip(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    art = read_artifact(path)
    assert art.members == MEMBERS
    assert art.manifest["schema_version"] == SCHEMA_VERSION and set(art.manifest["members"]) == set(MEMBERS)
    assert [p.name for p in tmp_path.iterdir()] == ["m.kiln"]  # no temp file left behind
    text = describe(art.manifest)
    assert "x: float32[N,3,8,8]" in text and "member model.so" in text


def test_a_failed_write_leaves_the_old_artifact(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_artifact(path, _manifest(), {**MEMBERS, MANIFEST: b"{}"})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def _rewrite(path, member, data):
    with zipfile.ZipFile(path) as zf:
        items = {n: zf.read(n) for n in zf.namelist()}
    items[member] = data
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in items.items():
            zf.writestr(n, d)


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_one_flipped_byte_in_any_member_is_refused(tmp_path, member):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    data = bytearray(MEMBERS[member])
    data[len(data) // 2] ^= 0x01
    _rewrite(path, member, bytes(data))
    with pytest.raises(ArtifactError, match=f"member '{member}' does not match its sha256"):
        read_artifact(path)


def test_a_flipped_byte_in_the_manifest_is_refused(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest["members"]["model.so"] = "0" * 64
    _rewrite(path, MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        read_artifact(path)
    _rewrite(path, MANIFEST, b"{not json")
    with pytest.raises(ArtifactError, match="manifest is not valid JSON"):
        read_artifact(path)


def test_unlisted_or_missing_members_are_refused(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    _rewrite(path, "extra.so", b"surprise")
    with pytest.raises(ArtifactError, match="member 'extra.so' is not listed"):
        read_artifact(path)


def test_a_missing_cpu_feature_is_refused(tmp_path):
    manifest = _manifest(target={"kind": "cpu", "mcpu": "future", "cpu_features": ["avx512_quantum"]})
    path = write_artifact(tmp_path / "m.kiln", manifest, MEMBERS)
    with pytest.raises(ArtifactError, match="CPU features this host lacks: avx512_quantum"):
        read_artifact(path)
    assert read_artifact(path, check_host=False).manifest["target"]["mcpu"] == "future"


def test_another_tvm_version_or_schema_is_refused(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(tvm_version="0.1.0"), MEMBERS)
    with pytest.raises(ArtifactError, match="built with TVM 0.1.0"):
        read_artifact(path)
    path = write_artifact(tmp_path / "n.kiln", _manifest(), MEMBERS)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest["schema_version"] = SCHEMA_VERSION + 1
    _rewrite(path, MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="schema version 2, this kiln reads version 1"):
        read_artifact(path)


@pytest.mark.parametrize("content, message", [
    (b"", "not a zip file, or truncated"),
    (b"plain text, not a zip\n", "not a zip file, or truncated"),
])
def test_not_an_artifact(tmp_path, content, message):
    p = tmp_path / "x.kiln"
    p.write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        read_artifact(p)
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_artifact(tmp_path / "absent.kiln")


def test_truncated_artifact(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        read_artifact(path)


def test_kiln_inspect_prints_an_artifacts_manifest(tmp_path, capsys):
    from kiln.cli import main

    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    assert main(["inspect", str(path)]) == 0
    assert "x: float32[N,3,8,8]" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passes"] == ["fold-constants", "dce"]
    _rewrite(path, "model.so", b"tampered")
    assert main(["inspect", str(path)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
