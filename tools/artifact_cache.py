"""Caches of compiled artifacts kept between runs (the node suite's, the conformance sweep's): one
folder per version of kiln's code, so that a change to kiln starts a new folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def code_key() -> str:
    """sha256 of every file under kiln/ (path and bytes) and of the TVM version."""
    h = hashlib.sha256(metadata.version("apache-tvm").encode())
    root = REPO / "kiln"
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def cache_dir(root: Path, stale_days: float = 2) -> Path:
    """This code's folder under ``root``; folders of other code versions no run used for ``stale_days`` are removed."""
    here = root / code_key()[:32]
    here.mkdir(parents=True, exist_ok=True)
    os.utime(here)
    for other in root.iterdir():
        if other.is_dir() and other != here and time.time() - other.stat().st_mtime > stale_days * 86400:
            shutil.rmtree(other, ignore_errors=True)
    return here
