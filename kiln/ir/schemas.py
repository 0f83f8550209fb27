"""Op schemas and op support.

Standard ops (the ``ai.onnx`` and ``ai.onnx.ml`` domains) are checked against
onnx's own schemas. kiln's own ops (the ``kiln`` domain) are declared here with
:func:`register_kiln_op`, which records their signature and the numpy function
the evaluator runs.

"Supported" means kiln can evaluate the op: onnx's reference implementation
has it (directly or through the op's function body), or it is a registered
kiln op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import onnx.defs
from onnx.reference.ops import load_op as _load_std_op
from onnx.reference.ops.aionnxml import load_op as _load_ml_op

from kiln.ir.types import DEFAULT_DOMAIN, KILN_DOMAIN, Attr, AttrType

if TYPE_CHECKING:
    from kiln.ir.core import Node

ML_DOMAIN = "ai.onnx.ml"


@dataclass(frozen=True)
class KilnOp:
    """The schema of an op in the ``kiln`` domain, with its numpy implementation.

    ``impl(*inputs, **attrs)`` returns a tuple of arrays, one per output.
    ``attrs`` maps attribute names to their type and default (``None``: required).
    ``infer(node)``, when given, returns ``(dtype, shape)`` per output for shape
    inference. ``decompose(op, node, inputs, opset)``, when given, builds the op
    from standard ONNX ops; export writes it as a local function so that other
    runtimes can run the op.
    """

    name: str
    impl: Callable[..., tuple]
    num_inputs: tuple[int, int]
    num_outputs: tuple[int, int] = (1, 1)
    attrs: dict[str, tuple[AttrType, object]] = field(default_factory=dict)
    doc: str = ""
    infer: Callable[[Node], list[tuple]] | None = None
    decompose: Callable[..., list] | None = None
    validate: Callable[[Node], list[str]] | None = None


KILN_OPS: dict[str, KilnOp] = {}


def register_kiln_op(
    name: str,
    *,
    inputs: tuple[int, int],
    outputs: tuple[int, int] = (1, 1),
    attrs: dict[str, tuple[AttrType, object]] | None = None,
    infer: Callable[[Node], list[tuple]] | None = None,
    decompose: Callable[..., list] | None = None,
    validate: Callable[[Node], list[str]] | None = None,
) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """Decorator: declare ``kiln::name`` with the decorated numpy function as its semantics."""

    def wrap(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        if name in KILN_OPS and KILN_OPS[name].impl is not fn:
            raise ValueError(f"kiln op '{name}' is registered twice")
        KILN_OPS[name] = KilnOp(name, fn, inputs, outputs, dict(attrs or {}), (fn.__doc__ or "").strip(), infer,
                                decompose, validate)
        return fn

    return wrap


def onnx_schema(domain: str, op_type: str, version: int) -> onnx.defs.OpSchema | None:
    """onnx's schema for a standard op at an opset version, or None."""
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except (onnx.defs.SchemaError, TypeError, OverflowError):  # no schema; or a version no int64 holds
        return None


#: Ops whose onnx reference kernels start at a later opset than the op, because the newer kernel
#: also computes the older definition: DequantizeLinear 10 and 13 are opset 19's on the types
#: they allow (int8, uint8, int32; per tensor or per axis). onnx 1.23 has kernels from 19 only,
#: and onnxruntime's quantizer writes QDQ models at opset 13 to 17.
REFERENCE_FROM: dict[str, int] = {"DequantizeLinear": 19}


def reference_version(domain: str, op_type: str, version: int) -> int:
    """The opset whose onnx reference kernel evaluates ``op_type`` at ``version``."""
    return max(version, REFERENCE_FROM.get(op_type, 0)) if domain == DEFAULT_DOMAIN else version


#: Standard ops onnx's reference has no kernel for, which kiln's evaluator implements itself
#: (``kiln.ir.interpreter.STANDARD_OVERRIDES`` holds their classes).
EVALUATED_BY_KILN = frozenset({"GlobalLpPool", "MaxRoiPool"})


@functools.lru_cache(maxsize=None)
def is_supported(domain: str, op_type: str, version: int) -> bool:
    """True if kiln can evaluate ``domain::op_type`` at opset ``version``."""
    if domain == KILN_DOMAIN:
        return op_type in KILN_OPS
    if domain not in (DEFAULT_DOMAIN, ML_DOMAIN):
        return False
    schema = onnx_schema(domain, op_type, version)
    if schema is None:
        return False
    if domain == DEFAULT_DOMAIN and op_type in EVALUATED_BY_KILN:
        return True
    try:
        (_load_ml_op if domain == ML_DOMAIN else _load_std_op)(domain, op_type,
                                                               reference_version(domain, op_type, version))
        return True
    except Exception:  # noqa: BLE001 - onnx raises several types for "no kernel"
        # ops defined by a function body are expanded by the reference evaluator
        return bool(schema.has_function or schema.has_context_dependent_function)


def check_node(node: Node, opset: dict[str, int]) -> list[str]:
    """Schema problems of one node, as readable strings (empty if it fits)."""
    if node.domain == KILN_DOMAIN:
        return _check_kiln(node)
    if node.domain not in opset:
        return [f"domain '{node.domain or 'ai.onnx'}' is not in the model's opset imports"]
    schema = onnx_schema(node.domain, node.op_type, opset[node.domain])
    if schema is None:
        return [f"no schema for {node.qualified_op} at opset {opset[node.domain]}"]
    problems: list[str] = []
    n_in = len(node.inputs)
    while n_in and node.inputs[n_in - 1] is None:
        n_in -= 1
    if not schema.min_input <= n_in <= schema.max_input:
        problems.append(f"has {n_in} inputs, schema allows {schema.min_input}..{schema.max_input}")
    if not schema.min_output <= len(node.outputs) <= schema.max_output:
        problems.append(
            f"has {len(node.outputs)} outputs, schema allows {schema.min_output}..{schema.max_output}"
        )
    for name, a in node.attrs.items():
        spec = schema.attributes.get(name)
        if spec is None:
            problems.append(f"unknown attribute '{name}'")
        elif spec.type.value != a.type.value:
            problems.append(f"attribute '{name}' is {a.type.name}, schema wants {spec.type.name}")
    for name, spec in schema.attributes.items():
        if spec.required and name not in node.attrs:
            problems.append(f"missing required attribute '{name}'")
    return problems


def coerce_attrs(domain: str, op_type: str, attrs: dict[str, Any], version: int | None = None) -> dict[str, Attr]:
    """Typed attributes for a new node: each value gets the type its op schema declares.

    Plain Python values are ambiguous (``[]`` or ``[0, 6]`` for a FLOATS
    attribute); the schema decides. ``None`` values are dropped. Names the
    schema does not know keep their inferred type (``verify()`` reports them).
    """
    declared: dict[str, AttrType] = {}
    if domain == KILN_DOMAIN and op_type in KILN_OPS:
        declared = {k: t for k, (t, _) in KILN_OPS[op_type].attrs.items()}
    elif domain in (DEFAULT_DOMAIN, ML_DOMAIN):
        schema = onnx_schema(domain, op_type, version or onnx.defs.onnx_opset_version())
        if schema is not None:
            declared = {k: AttrType(a.type.value) for k, a in schema.attributes.items() if a.type.value in _ATTR_TYPES}
    out: dict[str, Attr] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, Attr):
            out[k] = v
            continue
        t = declared.get(k)
        if t is AttrType.FLOATS:
            out[k] = Attr.floats(v)
        elif t is AttrType.INTS:
            out[k] = Attr.ints(v)
        elif t is AttrType.STRINGS:
            out[k] = Attr.strings(v)
        elif t is AttrType.FLOAT:
            out[k] = Attr.float(v)
        elif t is AttrType.INT:
            out[k] = Attr.int(v)
        else:
            out[k] = Attr.infer(v)
    return out


_ATTR_TYPES = {t.value for t in AttrType}


def _check_kiln(node: Node) -> list[str]:
    op = KILN_OPS.get(node.op_type)
    if op is None:
        return [f"no kiln op named '{node.op_type}'"]
    problems = []
    lo, hi = op.num_inputs
    if not lo <= len(node.inputs) <= hi:
        problems.append(f"has {len(node.inputs)} inputs, kiln::{op.name} takes {lo}..{hi}")
    lo, hi = op.num_outputs
    if not lo <= len(node.outputs) <= hi:
        problems.append(f"has {len(node.outputs)} outputs, kiln::{op.name} gives {lo}..{hi}")
    for name, a in node.attrs.items():
        spec = op.attrs.get(name)
        if spec is None:
            problems.append(f"unknown attribute '{name}'")
        elif spec[0] is not a.type:
            problems.append(f"attribute '{name}' is {a.type.name}, kiln::{op.name} wants {spec[0].name}")
    for name, (_, default) in op.attrs.items():
        if default is None and name not in node.attrs:
            problems.append(f"missing required attribute '{name}'")
    if op.validate is not None and not problems:
        problems.extend(op.validate(node))
    return problems
