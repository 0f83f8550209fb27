"""Reading ``.npz`` files of named arrays (inputs, samples), for the compiler and the runtime alike."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from kiln.errors import KilnError


def read_npz(path: str | os.PathLike, error: type[KilnError] = KilnError, what: str = "") -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name (no pickles); ``error`` in one line for a missing or unreadable
    file, or a single .npy array. ``what`` describes the file in that line (``of samples``)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive of arrays keyed by input name")
        with data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise error(f"{p}: not a readable .npz file{' ' + what if what else ''} ({e})") from None
