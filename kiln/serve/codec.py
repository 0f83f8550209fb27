"""Request and response bodies of ``POST /v1/run``: JSON, npz and safetensors, checked against the signature.

- ``application/json``: ``{"inputs": {NAME: nested list}}`` in, ``{"outputs": {NAME: nested list}}``
  out. JSON carries no dtypes, so values are converted to the signature's: integers fit any
  numeric input, fractions only a float one, ``true``/``false`` only a bool one.
- ``application/x-npz`` (``numpy.savez``) and ``application/x-safetensors``: arrays by name,
  with their own dtypes, which must be the signature's. Neither format can carry pickles
  (npz is read with ``allow_pickle=False``).

The response has the request's format unless the ``Accept`` header names another one.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from kiln.errors import KilnError

JSON = "application/json"
NPZ = "application/x-npz"
SAFETENSORS = "application/x-safetensors"
FORMATS = (JSON, NPZ, SAFETENSORS)


class RequestError(KilnError):
    """A request the server refuses: ``status`` is the HTTP status code (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def signature_json(sigs: Sequence[Any]) -> list[dict[str, Any]]:
    """Signatures (``kiln.runtime.Signature``) as JSON: name, dtype and shape (symbolic dims by name)."""
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in sigs]


def signature_text(sigs: Sequence[Any]) -> str:
    """``x: float32[N,3,224,224], mask: int64[N,16]``."""
    return ", ".join(f"{s.name}: {s.dtype}[{','.join(str(d) for d in s.shape)}]" for s in sigs)


def media_type(header: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    return (header or "").split(";", 1)[0].strip().lower()


def response_format(request_format: str, accept: str | None) -> str:
    """The format to answer in: the first of ours that ``Accept`` names, else the request's."""
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in FORMATS:
            return kind
    return request_format


def decode(body: bytes, content_type: str, sigs: Sequence[Any]) -> dict[str, np.ndarray]:
    """The arrays a request body holds, by name (not yet checked against the signature)."""
    if content_type == JSON:
        return _from_json(body, sigs)
    if content_type == NPZ:
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("a single .npy array, not an .npz archive")
                return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise RequestError(400, f"the body is not a readable .npz archive ({_first_line(e)})") from None
    if content_type == SAFETENSORS:
        from safetensors.numpy import load

        try:
            return load(body)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
            raise RequestError(400, f"the body is not readable safetensors ({_first_line(e)})") from None
    raise RequestError(415, f"unsupported content type '{content_type or '(none)'}'; send one of {', '.join(FORMATS)}")


def _from_json(body: bytes, sigs: Sequence[Any]) -> dict[str, np.ndarray]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise RequestError(400, 'the JSON body must be {"inputs": {NAME: nested list}}')
    by_name = {s.name: s for s in sigs}
    out = {}
    for name, value in doc["inputs"].items():
        sig = by_name.get(name)
        out[name] = value if sig is None else _json_array(name, value, np.dtype(sig.dtype))  # unknown: check() says
    return out


def _json_array(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A JSON value as an array of ``dtype``, refusing ragged lists and values the dtype cannot hold."""
    try:
        raw = np.array(value)
    except ValueError:
        raise RequestError(400, f"input '{name}' is a ragged list, not a rectangular array") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(dtype)
    if kind not in "bif":
        raise RequestError(400, f"input '{name}' holds {'nested objects' if kind == 'O' else 'non-numbers'}; "
                                f"expected numbers of dtype {dtype.name}")
    if dtype.kind == "b" and kind != "b":
        raise RequestError(400, f"input '{name}' has numbers; its dtype is bool (send true/false)")
    if dtype.kind in "iu":
        if kind == "f":
            raise RequestError(400, f"input '{name}' has fractional numbers; its dtype is {dtype.name}")
        if kind == "b":
            raise RequestError(400, f"input '{name}' has true/false; its dtype is {dtype.name}")
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise RequestError(400, f"input '{name}' has values outside {dtype.name}'s range")
    if dtype.kind == "f" and kind == "b":
        raise RequestError(400, f"input '{name}' has true/false; its dtype is {dtype.name}")
    return raw.astype(dtype)


@dataclass(frozen=True)
class Checked:
    """A request's inputs after :func:`check`: in signature order, with the batch rows and the join key."""

    arrays: dict[str, np.ndarray]
    rows: int  # the leading dim, for a batchable model (1 otherwise)
    key: tuple  # requests with equal keys can be joined along dim 0


def check(feeds: Mapping[str, Any], sigs: Sequence[Any], batch_dim: str | None) -> Checked:
    """Check names, dtypes and shapes against the signature; a 400 names the expected one."""
    expected = signature_text(sigs)
    names = [s.name for s in sigs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unexpected {', '.join(unknown)}" if unknown else "") if x)
        raise RequestError(400, f"inputs do not match the model ({what}); expected {expected}")
    bound: dict[str, int] = {}
    arrays = {}
    for s in sigs:
        a = feeds[s.name]
        if a.dtype.name != s.dtype:
            raise RequestError(400, f"input '{s.name}' has dtype {a.dtype.name}; expected {expected}")
        fits = a.ndim == len(s.shape) and all(
            d == n if isinstance(d, int) else bound.setdefault(d, n) == n for d, n in zip(s.shape, a.shape))
        if not fits:
            raise RequestError(400, f"input '{s.name}' has shape {list(a.shape)}; expected {expected}")
        arrays[s.name] = a
    if batch_dim is None:
        return Checked(arrays, 1, ())
    return Checked(arrays, bound[batch_dim], tuple(a.shape[1:] for a in arrays.values()))


def encode(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """A response body holding ``outputs`` in ``fmt``."""
    if fmt == NPZ:
        buf = io.BytesIO()
        np.savez(buf, **outputs)
        return buf.getvalue()
    if fmt == SAFETENSORS:
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in outputs.items()})
    return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}}, separators=(",", ":")).encode()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
