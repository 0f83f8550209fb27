"""Signed artifacts: an ed25519 signature over the manifest, inside the artifact itself.

The manifest holds the sha256 of every other member, so signing its exact bytes signs the
whole artifact. The signature is the member ``signature.json``::

    {"algorithm": "ed25519", "key_id": "ed25519:3f2a...", "signer": "release-bot",
     "public_key": "<base64 of the 32-byte key>", "signature": "<base64 of 64 bytes>"}

A trust policy is a set of public keys: given to :func:`kiln.runtime.load` as
``trusted_keys``, to ``kiln run --trust``, or through ``KILN_TRUSTED_KEYS`` (PEM public key
files, or folders of ``*.pub`` files, separated by ``os.pathsep``). With a policy, an unsigned artifact, a wrong
signature, or a key outside the policy is refused before anything in the artifact is used.
Without one, a signature that is present must still verify.

Keys are ordinary PEM files (``kiln keygen``, or ``openssl genpkey -algorithm ed25519``).
This module needs ``cryptography``, and imports it only when a signature is made or checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kiln.errors import KilnError

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
TRUST_ENV = "KILN_TRUSTED_KEYS"


class SignatureError(KilnError):
    """A key cannot be read, or an artifact's signature is missing, invalid or untrusted."""


@dataclass(frozen=True)
class Signer:
    """Who signed an artifact: the key's id (a fingerprint), its raw public key, and a name."""

    key_id: str
    public_key: bytes
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.key_id})" if self.name else self.key_id


def key_id(public_key: bytes) -> str:
    """The fingerprint kiln shows for a raw ed25519 public key."""
    return f"{ALGORITHM}:{hashlib.sha256(public_key).hexdigest()[:16]}"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a dependency of kiln
        raise SignatureError("signatures need the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def generate_key(path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write a new ed25519 private key (PEM, mode 0600) and its public key beside it (``.pub``).

    Refuses to overwrite an existing file.
    """
    serialization, ed25519 = _crypto()
    priv_path = Path(path)
    pub_path = Path(public_path) if public_path else priv_path.with_suffix(".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists; kiln does not overwrite keys")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise SignatureError(f"{p}: cannot read the {what}: {e.strerror or e}") from None


def load_private_key(path: str | os.PathLike) -> Any:
    """An ed25519 private key from a PEM file."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: kiln signs with ed25519 keys; this is a {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike) -> bytes:
    """The raw 32 bytes of an ed25519 public key from a PEM file."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: kiln verifies ed25519 keys; this is a {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_keys(spec: Iterable[str | os.PathLike | bytes] | str | os.PathLike | None) -> frozenset[bytes] | None:
    """A trust policy: raw public keys from PEM key files, folders of ``*.pub`` files, or raw
    32-byte keys. ``None`` falls back to ``KILN_TRUSTED_KEYS``; with neither, or with an empty list
    (how kiln rereads an artifact it has just written), there is no policy."""
    if spec is None:
        env = os.environ.get(TRUST_ENV, "").strip()
        if not env:
            return None
        spec = [p for p in env.split(os.pathsep) if p]
    if isinstance(spec, str | os.PathLike):
        spec = [spec]
    spec = list(spec)
    if not spec:
        return None
    keys: set[bytes] = set()
    for item in spec:
        if isinstance(item, bytes):
            if len(item) != 32:
                raise SignatureError("a raw ed25519 public key is 32 bytes")
            keys.add(item)
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix == ".pub" and f.is_file())
            if not files:
                raise SignatureError(f"{p}: no .pub public keys in this folder")
            keys.update(load_public_key(f) for f in files)
        else:
            keys.add(load_public_key(p))
    return frozenset(keys)


def sign(manifest_bytes: bytes, key_path: str | os.PathLike, signer: str = "") -> bytes:
    """The ``signature.json`` member for ``manifest_bytes``, signed with the key at ``key_path``."""
    serialization, _ = _crypto()
    key = load_private_key(key_path)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {"algorithm": ALGORITHM, "key_id": key_id(public), "signer": signer,
              "public_key": base64.b64encode(public).decode(),
              "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
    return json.dumps(record, indent=2, sort_keys=True).encode()


def verify(where: str, manifest_bytes: bytes, signature: bytes | None, trusted: frozenset[bytes] | None) -> Signer | None:
    """Check ``signature`` (the member's bytes, or None) over ``manifest_bytes`` under a trust policy.

    Returns the signer (None for an unsigned artifact without a policy); raises
    ``SignatureError`` with a one-line reason otherwise.
    """
    if signature is None:
        if trusted is not None:
            raise SignatureError(f"{where}: the artifact is not signed, and a trust policy is set "
                                 f"({len(trusted)} trusted key(s)); sign it with kiln sign --key")
        return None
    try:
        record = json.loads(signature)
        if record.get("algorithm") != ALGORITHM:
            raise SignatureError(f"{where}: signature algorithm {record.get('algorithm')!r}; kiln verifies {ALGORITHM}")
        public = base64.b64decode(record["public_key"], validate=True)
        sig = base64.b64decode(record["signature"], validate=True)
        name = str(record.get("signer") or "")
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SignatureError(f"{where}: {SIGNATURE} is malformed; the artifact was tampered with") from None
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(sig, manifest_bytes)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{where}: the signature does not match the manifest; the artifact was modified "
                             f"after it was signed") from None
    signer = Signer(key_id(public), public, name)
    if trusted is not None and public not in trusted:
        raise SignatureError(f"{where}: signed by {signer}, which is not among the {len(trusted)} trusted key(s)")
    return signer
