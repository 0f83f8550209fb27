"""Loading and saving models: ONNX files <-> kiln ``Graph``, with shape inference.

:func:`load` reads the file, checks every op is supported *before* doing any other
work, upgrades old opsets on request, inlines foreign local functions, converts the
proto (:mod:`kiln.ir.serde`: external data loaded lazily, after checking that it is
there; initializers and ``Constant`` nodes become constants; topological order
restored, raising on a cycle or an undefined value), infers dtypes and shapes
(:mod:`kiln.ir.shape_inference`) and validates every node (:mod:`kiln.ir.validate`: onnx's
checker, then kiln's per-op constraints), all before any pass runs. ``ConstantOfShape`` nodes stay nodes: folding them
is for the constant-folding pass to decide.

:func:`save_onnx` writes a graph atomically, with external data when it is large.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

from kiln.errors import ModelLoadError, UnsupportedOpError
from kiln.ir import schemas
from kiln.ir.contrib import import_contrib_ops
from kiln.ir.proto import walk_nodes
from kiln.ir.core import KILN_DOMAIN, Graph, normalize_domain
from kiln.ir.dtypes import DType
from kiln.ir.serde import KILN_OPSET_VERSION, from_onnx, opset_of, to_onnx
from kiln.ir.shape_inference import infer_shapes as _infer_shapes
from kiln.ir.shape_inference import pin_contracted_dims
from kiln.ir.validate import ModelValidationError, check_proto, validate_graph

# =========================================================================== reading


def read_model(source: str | os.PathLike | ModelProto | bytes) -> tuple[ModelProto, Path | None]:
    """Parse a model file (without external data) into a ``ModelProto``.

    Returns the proto and the directory external data is relative to.
    """
    if isinstance(source, ModelProto):
        return source, None
    if isinstance(source, bytes):
        return _parse(source, "<bytes>"), None
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    return _parse(data, str(path)), path.parent


def _parse(data: bytes, where: str) -> ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: file is empty, not an ONNX model")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        if _looks_like_text(data):
            raise ModelLoadError(f"{where}: this is a text file, not an ONNX model (protobuf)") from None
        raise ModelLoadError(
            f"{where}: not a valid ONNX protobuf; the file is truncated or corrupt ({len(data)} bytes)"
        ) from None
    if not model.HasField("graph") or model.ir_version <= 0:
        what = "a text file" if _looks_like_text(data) else "an ONNX model"
        raise ModelLoadError(f"{where}: not {what} with a graph (no ir_version or graph field); is it ONNX?")
    _check_text(model, where)
    _check_tensor_sizes(model, where)
    return model


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(1, len(text))


def _check_text(model: ModelProto, where: str) -> None:
    """Names and domains must be text: protobuf hands back bytes for invalid UTF-8."""
    for n in walk_nodes(model.graph):
        if not all(isinstance(t, str) for t in (n.op_type, n.domain, n.name, *n.input, *n.output)):
            raise ModelLoadError(f"{where}: a node's name, op type or values are not valid UTF-8; the file is corrupt")
    if not all(isinstance(o.domain, str) for o in model.opset_import):
        raise ModelLoadError(f"{where}: an opset domain is not valid UTF-8; the file is corrupt")


def _check_tensor_sizes(model: ModelProto, where: str) -> None:
    """A protobuf cut at a field boundary parses; its last tensor is then short."""
    for t in _all_initializers(model.graph):
        if t.data_location == TensorProto.EXTERNAL or not t.raw_data:
            continue
        try:
            item = DType.from_onnx(t.data_type).itemsize
        except KeyError:
            continue
        expected = int(np.prod(t.dims, dtype=np.int64)) * item
        if len(t.raw_data) != expected:
            raise ModelLoadError(
                f"{where}: initializer '{t.name}' holds {len(t.raw_data)} bytes but its shape needs "
                f"{expected}; the file is truncated or corrupt"
            )


def _all_initializers(g: GraphProto) -> Iterator[TensorProto]:
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _all_initializers(a.g)
            for sg in a.graphs:
                yield from _all_initializers(sg)


# =========================================================================== support


def unsupported_ops(model: ModelProto) -> dict[tuple[str, str], list[str]]:
    """Every ``(domain, op_type)`` kiln cannot evaluate, with the nodes that use it."""
    opset = opset_of(model)
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for n in walk_nodes(model.graph):
        domain = normalize_domain(n.domain)
        version = opset.get(domain, KILN_OPSET_VERSION if domain == KILN_DOMAIN else 0)
        if not schemas.is_supported(domain, n.op_type, version):
            found[(domain, n.op_type)].append(n.name or f"<unnamed #{len(found[(domain, n.op_type)])}>")
    return dict(found)


def format_unsupported(ops: dict[tuple[str, str], list[str]], where: str = "") -> str:
    """One line naming every unsupported op and (some of) its nodes."""
    parts = []
    for (domain, op), nodes in sorted(ops.items()):
        shown = ", ".join(nodes[:3]) + (f", +{len(nodes) - 3} more" if len(nodes) > 3 else "")
        parts.append(f"{domain or 'ai.onnx'}::{op} (nodes: {shown})")
    prefix = f"{where}: " if where else ""
    return f"{prefix}unsupported op(s): " + "; ".join(parts)


# =========================================================================== import


def load(
    source: str | os.PathLike | ModelProto | bytes,
    *,
    infer_shapes: bool = True,
    min_opset: int | None = None,
) -> Graph:
    """Import an ONNX model (a path, bytes or a ``ModelProto``) into a kiln ``Graph``.

    Raises ``UnsupportedOpError`` naming every op kiln cannot evaluate before
    doing any other work, and ``ModelLoadError``/``GraphError`` for files that
    are not valid ONNX. With ``min_opset``, a model below that ``ai.onnx`` opset is
    upgraded first by onnx's version converter (quantization needs per-axis
    QuantizeLinear, which opset 13 introduced).
    """
    graph, _ = load_with_report(source, infer_shapes=infer_shapes, allow_unsupported=False, min_opset=min_opset)
    return graph


def load_with_report(
    source: str | os.PathLike | ModelProto | bytes,
    *,
    infer_shapes: bool = True,
    allow_unsupported: bool = True,
    min_opset: int | None = None,
) -> tuple[Graph, dict[tuple[str, str], list[str]]]:
    """Like :func:`load`, but return the unsupported ops instead of raising (for ``kiln inspect``)."""
    model, base_dir = read_model(source)
    where = str(source) if isinstance(source, str | os.PathLike) else "<model>"
    model, refused = import_contrib_ops(model)  # onnxruntime's DynamicQuantizeLSTM as kiln's own ops
    unsupported = unsupported_ops(model)
    if unsupported and not allow_unsupported:
        why = f" (not imported: {'; '.join(refused)})" if refused else ""
        raise UnsupportedOpError(format_unsupported(unsupported, where) + why, unsupported)
    if min_opset and opset_of(model).get("", 0) < min_opset:
        model = _upgrade(model, min_opset, where)
    if model.functions:
        model = _inline_foreign_functions(model)
    check_proto(model, where)
    graph = from_onnx(model, base_dir=base_dir, where=where)
    validate_graph(graph, where)  # attributes first: shape inference divides by strides
    if infer_shapes:
        try:
            _infer_shapes(graph, model=model, check_types=True)
        except ModelValidationError as e:
            raise ModelValidationError(f"{where}: {e}") from None
        pin_contracted_dims(graph)
        validate_graph(graph, where)  # again, with the shapes inference found
    return graph, unsupported


def _upgrade(model: ModelProto, opset: int, where: str) -> ModelProto:
    """``model`` converted to ``ai.onnx`` ``opset`` by onnx's version converter."""
    from onnx import version_converter

    before = opset_of(model).get("", 0)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ModelLoadError(f"{where}: cannot upgrade the model from opset {before} to {opset}: "
                             f"{' '.join(str(e).split())[:200]}") from e


def _inline_foreign_functions(model: ModelProto) -> ModelProto:
    """Inline the model's local functions, except those that define kiln's own ops.

    A model kiln exported carries each fused ``kiln::`` op as a local function
    (so other runtimes can run it); kiln reads those nodes back as its own ops.
    """
    import onnx.inliner

    keep = [(f.domain, f.name) for f in model.functions if f.domain == KILN_DOMAIN and f.name in schemas.KILN_OPS]
    if not keep:
        return onnx.inliner.inline_local_functions(model)
    inlined = onnx.inliner.inline_selected_functions(model, keep, exclude=True)
    del inlined.functions[:]
    return inlined



# =========================================================================== export


def save_onnx(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``graph`` as an ONNX file.

    Weights go into a ``<name>.data`` file beside it when ``external_data`` is
    set, or when they would pass protobuf's 2 GB limit. The write is atomic:
    a failure never leaves a half-written file in place.
    """
    path = Path(path)
    model = to_onnx(graph)
    total = sum(v.const.nbytes for g in graph.walk_graphs() for v in g.constants.values() if v.const)
    if external_data is None:
        external_data = total > 1_800_000_000
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if external_data:
            onnx.save_model(
                model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                location=f"{path.name}.data", size_threshold=1024,
            )
        else:
            tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
