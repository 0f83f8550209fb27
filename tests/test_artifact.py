"""The .kiln artifact format: atomic canonical writes, strict verification, signatures, and the
tamper matrix: every tampered artifact is refused in one line, before any native code loads."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import kiln.runtime
from kiln.cli import main
from kiln.runtime.artifact import (
    MANIFEST, SCHEMA_VERSION, ArtifactError, _encode, describe, installed_tvm_version, read_artifact, sha256,
    sign_artifact, weight_signature, write_artifact,
)
from kiln.runtime.cpu import host_cpu_features
from kiln.runtime.signing import SIGNATURE, generate_key, load_public_key

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
MEMBERS = {"model.so": b"\x7fELF fake library bytes" * 10, "weights.safetensors": save_safetensors(WEIGHTS)}


def _manifest(**overrides):
    m = {
        "kiln_version": "0.1.0", "tvm_version": installed_tvm_version(),
        "target": {"kind": "cpu", "mcpu": "x86-64", "cpu_features": sorted(host_cpu_features() & {"sse2"})},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 4]}],
        "params": list(WEIGHTS), "weights": weight_signature(WEIGHTS),
        "source": {"name": "m.onnx", "sha256": "ab" * 32}, "passes": ["fold-constants", "dce"],
    }
    m.update(overrides)
    return m


def _entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rebuilt(data: bytes, edit) -> bytes:
    """The artifact with ``edit(manifest, members)`` applied and every hash made consistent again
    (what an attacker who understands the format would write)."""
    entries = _entries(data)
    manifest = json.loads(entries.pop(MANIFEST))
    entries.pop(SIGNATURE, None)
    edit(manifest, entries)
    manifest["members"] = {n: sha256(d) for n, d in sorted(entries.items())}
    return _encode({MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(), **entries})


def test_round_trip_and_canonical_bytes(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    art = read_artifact(path)
    assert art.members == MEMBERS and set(art.weights) == set(WEIGHTS)
    np.testing.assert_array_equal(art.weights["w"], WEIGHTS["w"])
    assert art.manifest["schema_version"] == SCHEMA_VERSION and set(art.manifest["members"]) == set(MEMBERS)
    assert [p.name for p in tmp_path.iterdir()] == ["m.kiln"]  # no temp file left behind
    assert write_artifact(tmp_path / "n.kiln", _manifest(), MEMBERS).read_bytes() == path.read_bytes()
    text = describe(art.manifest)
    assert "x: float32[N,3,8,8]" in text and "member model.so" in text and "signature: none" in text


def test_a_failed_write_leaves_the_old_artifact(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_artifact(path, _manifest(), {**MEMBERS, MANIFEST: b"{}"})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_another_tvm_version_or_schema_is_refused(tmp_path):
    path = write_artifact(tmp_path / "m.kiln", _manifest(tvm_version="0.1.0"), MEMBERS)
    with pytest.raises(ArtifactError, match="built with TVM 0.1.0"):
        read_artifact(path)
    path.write_bytes(_rebuilt(write_artifact(tmp_path / "n.kiln", _manifest(), MEMBERS).read_bytes(),
                              lambda m, e: m.update(schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(ArtifactError, match=f"schema version {SCHEMA_VERSION + 1}, this kiln reads version"):
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


def test_kiln_inspect_prints_an_artifacts_manifest_and_its_signer(tmp_path, capsys):
    path = write_artifact(tmp_path / "m.kiln", _manifest(), MEMBERS)
    assert main(["inspect", str(path)]) == 0
    assert "x: float32[N,3,8,8]" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passes"] == ["fold-constants", "dce"] and report["signature"] is None
    key, pub = generate_key(tmp_path / "release.pem")
    assert main(["sign", str(path), "--key", str(key), "--signer", "release-bot"]) == 0
    assert "signed" in capsys.readouterr().out
    assert main(["inspect", str(path)]) == 0
    assert "signed by: release-bot (ed25519:" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature"]["signer"] == "release-bot"


def test_keys_are_never_overwritten(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k.pem")]) == 0
    before = (tmp_path / "k.pem").read_bytes()
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    assert main(["keygen", str(tmp_path / "k.pem")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "k.pem").read_bytes() == before


# =========================================================================== the tamper matrix, on a real artifact


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tiny_cnn compiled at a static shape, a key pair that signed a copy, and a stranger's key."""
    import kiln

    d = tmp_path_factory.mktemp("artifact")
    plain = d / "plain.kiln"
    kiln.compile(EXAMPLE, plain, input_shapes={"input": (1, 3, 64, 64)})
    key, pub = generate_key(d / "owner.pem")
    other_key, other_pub = generate_key(d / "stranger.pem")
    signed = sign_artifact(plain, key, "owner", output=d / "signed.kiln").path
    return {"plain": plain.read_bytes(), "signed": signed.read_bytes(), "key": key, "pub": pub,
            "other_key": other_key, "other_pub": other_pub, "dir": d}


@pytest.fixture()
def no_native_code(monkeypatch):
    """Fails the test if the runtime gets as far as loading native code."""
    def refuse():
        raise AssertionError("the library was about to be loaded")

    monkeypatch.setattr(kiln.runtime, "_ensure_tvm_runtime", refuse)


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << (offset % 8)
    return bytes(b)


def _lying_header(m, e):
    w = e["weights.safetensors"]
    (n,) = struct.unpack("<Q", w[:8])
    e["weights.safetensors"] = struct.pack("<Q", n + len(w)) + w[8:]


def _wrong_dtype(m, e):
    w = e["weights.safetensors"]
    (n,) = struct.unpack("<Q", w[:8])
    header = w[8:8 + n].replace(b'"F32"', b'"I32"', 1)
    e["weights.safetensors"] = w[:8] + header + w[8 + n:]


def _drop(name):
    def edit(m, e):
        e.pop(name)
    return edit


def _rename(m, e):
    e["lib.so"] = e.pop("model.so")


def _swap(m, e):
    e["model.so"], e["weights.safetensors"] = e["weights.safetensors"], e["model.so"]


def _add(name):
    def edit(m, e):
        e[name] = b"\x7fELF surprise"
    return edit


def _features(edit_list):
    def edit(m, e):
        m["target"]["cpu_features"] = edit_list(m["target"]["cpu_features"])
    return edit


def _duplicate_member(data: bytes) -> bytes:
    entries = _entries(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in entries.items():
            zf.writestr(n, d)
        zf.writestr("model.so", b"\x7fELF second copy")
    return buf.getvalue()


def _path_member(data: bytes) -> bytes:
    entries = _entries(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in entries.items():
            zf.writestr(n, d)
        zf.writestr("../../escape.so", b"\x7fELF escape")
    return buf.getvalue()


TAMPERS = {
    "truncated to 99%": (lambda c: c["plain"][: len(c["plain"]) * 99 // 100], "not a kiln artifact"),
    "truncated to half": (lambda c: c["plain"][: len(c["plain"]) // 2], "not a kiln artifact"),
    "truncated by one byte": (lambda c: c["plain"][:-1], "not a kiln artifact"),
    "member added (hashes consistent)": (lambda c: _rebuilt(c["plain"], _add("extra.so")),
                                         "member 'extra.so' is not part of a cpu artifact"),
    "member with a path name": (lambda c: _path_member(c["plain"]), "is not a plain file name"),
    "member twice": (lambda c: _duplicate_member(c["plain"]), "appears twice"),
    "weights dropped (hashes consistent)": (lambda c: _rebuilt(c["plain"], _drop("weights.safetensors")),
                                            "member 'weights.safetensors' is missing"),
    "library renamed (hashes consistent)": (lambda c: _rebuilt(c["plain"], _rename), "'lib.so' is not part of"),
    "members swapped (hashes consistent)": (lambda c: _rebuilt(c["plain"], _swap), "weights.safetensors"),
    "safetensors header lies about its length": (lambda c: _rebuilt(c["plain"], _lying_header),
                                                 "its header says it is"),
    "a weight's dtype changed": (lambda c: _rebuilt(c["plain"], _wrong_dtype), "the manifest says float32"),
    "TVM version edited": (lambda c: _rebuilt(c["plain"], lambda m, e: m.update(tvm_version="0.9.0")),
                           "built with TVM 0.9.0"),
    "schema edited": (lambda c: _rebuilt(c["plain"], lambda m, e: m.update(schema_version=1)),
                      "schema version 1, this kiln reads version"),
    "CPU features removed": (lambda c: _rebuilt(c["plain"], _features(lambda f: f[:-1])),  # any host's mcpu
                             "fewer CPU features than its mcpu"),
    "CPU feature added": (lambda c: _rebuilt(c["plain"], _features(lambda f: [*f, "avx512_quantum"])),
                          "CPU features this host lacks: avx512_quantum"),
    "unsigned under a trust policy": (lambda c: c["plain"], "is not signed, and a trust policy is set"),
    "signed by an untrusted key": (lambda c: sign_artifact_bytes(c, c["other_key"]), "not among the 1 trusted"),
    "manifest edited after signing": (lambda c: _edited_after_signing(c), "does not match the manifest"),
}


def sign_artifact_bytes(c, key) -> bytes:
    src, dst = c["dir"] / "to_sign.kiln", c["dir"] / "resigned.kiln"
    src.write_bytes(c["plain"])
    return sign_artifact(src, key, "stranger", output=dst).path.read_bytes()


def _edited_after_signing(c) -> bytes:
    entries = _entries(c["signed"])
    manifest = json.loads(entries[MANIFEST])
    manifest["passes"] = ["nothing to see here"]
    entries[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return _encode(entries)


def _run_refused(tmp_path, capsys, data: bytes, message: str, trust: Path | None) -> None:
    art = tmp_path / "t.kiln"
    art.write_bytes(data)
    np.savez(tmp_path / "in.npz", input=np.zeros((1, 3, 64, 64), np.float32))
    code = main(["run", str(art), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"),
                 *(["--trust", str(trust)] if trust else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kiln: error: ") and "internal error" not in err
    assert message in err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_artifacts_are_refused_before_loading(compiled, tmp_path, capsys, no_native_code, name):
    make, message = TAMPERS[name]
    # the signature cases run under a policy trusting the owner's key; the others without one, so that
    # the check each is about is the one that refuses it
    policy = compiled["pub"] if "sign" in name else None
    _run_refused(tmp_path, capsys, make(compiled), message, policy)


def test_bit_flips_at_100_offsets_are_all_refused(compiled, tmp_path, no_native_code):
    data = compiled["plain"]
    offsets = sorted({int(o) for o in np.random.default_rng(0).integers(0, len(data), 100)} | {0, 30, len(data) - 1})
    for offset in offsets:
        p = tmp_path / "f.kiln"
        p.write_bytes(_flip(data, offset))
        with pytest.raises(ArtifactError):
            read_artifact(p, trusted=[])
    assert len(offsets) >= 100


def test_the_signed_artifact_loads_under_its_policy_and_runs(compiled, tmp_path, capsys, monkeypatch):
    art = tmp_path / "s.kiln"
    art.write_bytes(compiled["signed"])
    model = kiln.runtime.load(art, trusted_keys=[compiled["pub"]])
    assert model.signer.name == "owner" and model.signer.public_key == load_public_key(compiled["pub"])
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    plain = tmp_path / "p.kiln"
    plain.write_bytes(compiled["plain"])
    a, b = model.run({"input": x}), kiln.runtime.load(plain).run({"input": x})
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a folder of keys, and the environment variable, are policies too
    monkeypatch.setenv("KILN_TRUSTED_KEYS", str(compiled["dir"]))
    assert kiln.runtime.load(art).signer.name == "owner"
    with pytest.raises(ArtifactError, match="is not signed, and a trust policy is set"):
        kiln.runtime.load(plain)
    monkeypatch.setenv("KILN_TRUSTED_KEYS", str(compiled["other_pub"]))
    with pytest.raises(ArtifactError, match="not among the 1 trusted key"):
        kiln.runtime.load(art)
    monkeypatch.delenv("KILN_TRUSTED_KEYS")
    assert kiln.runtime.load(art).signer.name == "owner"  # without a policy a valid signature still verifies


def test_compile_sign_flag(compiled, tmp_path, capsys):
    out = tmp_path / "c.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--input-shape", "input=1x3x64x64",
                 "--sign", str(compiled["key"]), "--signer", "ci"]) == 0
    assert "signed by ci (ed25519:" in capsys.readouterr().out
    assert read_artifact(out, trusted=[compiled["pub"]]).signer.name == "ci"
