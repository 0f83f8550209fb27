"""kiln's differential conformance sweep: generated single-op graphs, compiled by kiln and compared
with onnxruntime.

For each ONNX op kiln lowers (``kiln.codegen.lowering.LOWERINGS``), the specs below
(:data:`SPECS`, one function per op family) build small ``onnx.helper`` graphs over the attribute
space the op's schema allows: its modes, optional inputs given or absent, per-tensor and per-axis
parameters, negative and empty axes, broadcast shapes, the dtypes the schema allows, and NaN and
Inf in inputs and in float attributes. Parameter inputs (axes, pads, bounds, scales, ...) are
tried both as constants (initializers, which kiln's passes may fold) and as graph inputs read at
run time. Each case is compiled by ``kiln.compile`` (O3, the default) and run by
``kiln.runtime``, and compared with onnxruntime on the same inputs:

- **match**: same output names, dtypes and shapes, and values within the tolerance of the dtype
  (exact for ints and bools; NaN where onnxruntime has NaN; float32 rtol 1e-4 atol 1e-5,
  float64 rtol 1e-7 atol 1e-9, unless the case states another tolerance and why);
- **mismatch**: kiln compiled and ran, and its numbers (or shapes, or dtypes) differ;
- **refused**: kiln declined with its one-line error (``KilnError``), the reason recorded;
- **internal**: any other exception (a Python error, a TVM error, a KilnError of several lines,
  a crashed worker process);
- **skipped**: onnxruntime itself refused the graph (not an ONNX op it implements at that
  opset or dtype), so there is nothing to compare with.

Commands (from the repository root)::

    .venv/bin/python tools/conformance.py                 # the full sweep; writes docs/conformance.md
    .venv/bin/python tools/conformance.py --ops Clip,Pad  # some ops; prints every case not matching
    .venv/bin/python tools/conformance.py --list          # the case names, without running them

``tests/test_conformance.py`` runs a seeded sample (:func:`sample`) in ``make test``. Compiled
artifacts (and compile errors) are cached under ``$KILN_CONFORMANCE_CACHE`` (default
``~/.cache/kiln/conformance``), keyed by the sha256 of the model bytes, in one folder per hash of
kiln's source and the TVM version: a change to kiln's code starts a new folder.

onnxruntime's oracle on this CPU: its u8 x s8 integer kernels (vpmaddubsw, no VNNI) saturate
int16 pair sums, so the quantized-conv and quantized-matmul specs keep int8 weights in
[-64, 63] or use int8 activations (``_qweights``); onnxruntime is exact then.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import artifact_cache  # noqa: E402 - beside this file

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "conformance.md"
CACHE = Path(os.environ.get("KILN_CONFORMANCE_CACHE", Path.home() / ".cache" / "kiln" / "conformance"))
ORT_MAX_OPSET = 26  # the newest ai.onnx opset onnxruntime 1.31 loads
STALE_DAYS = 2  # cache folders of other kiln code that no run used for this long are removed

#: numpy dtypes the sweep covers (float16 and bfloat16 are left out: narrow floats in codegen are separate work)
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int8)": np.int8,
          "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
          "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
          "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
F32, F64, I64, I32, U8, I8, BOOL = np.float32, np.float64, np.int64, np.int32, np.uint8, np.int8, np.bool_
#: The default tolerance of each float dtype, (rtol, atol).
TOLERANCE = {"float32": (1e-4, 1e-5), "float64": (1e-7, 1e-9)}
OUTCOMES = ("match", "mismatch", "internal", "refused", "skipped")


# =========================================================================== cases


@dataclass(frozen=True)
class In:
    """One input of a case: a graph input (read at run time) or a constant initializer; a list of
    arrays is a sequence input (``S``)."""

    array: Any  # np.ndarray, or list[np.ndarray] for a sequence
    const: bool = False
    elem: Any = None  # a sequence's element dtype


def S(*arrays: np.ndarray, dtype: Any = None) -> In:
    """A sequence graph input: a list of arrays of one dtype (``dtype`` when the list is empty)."""
    return In(list(arrays), False, np.dtype(dtype or arrays[0].dtype))


def X(a: Any, dtype: Any = None) -> In:
    """A graph input."""
    return In(np.asarray(a, dtype))


def C(a: Any, dtype: Any = None) -> In:
    """A constant (an initializer)."""
    return In(np.asarray(a, dtype), True)


@dataclass(frozen=True)
class P:
    """A parameter input: the case is made twice, with it as a constant and as a graph input."""

    array: np.ndarray


@dataclass
class Case:
    """One generated graph: a node (or a few) over named inputs, at one opset."""

    name: str
    op: str  # the op under test, "domain::Op" outside ai.onnx
    opset: int
    nodes: list[onnx.NodeProto]
    inputs: dict[str, In]
    outputs: list[str]
    tol: tuple[float, float, str] | None = None  # (rtol, atol, why) for float outputs
    domains: dict[str, int] = field(default_factory=dict)
    named: bool = False  # outputs declared with a named dim for each dim, as exporters write them

    def model(self, ranks: dict[str, tuple[int, Any]] | None = None) -> onnx.ModelProto:
        """The case as an ONNX model: output types as onnx's shape inference gives them; an output it
        cannot type takes its (dtype, rank) from ``ranks`` (what onnxruntime gave), with unknown dims."""
        ins = [helper.make_tensor_sequence_value_info(k, _np_tensor_type(v.elem), None) if isinstance(v.array, list) else
               helper.make_tensor_value_info(k, _np_tensor_type(v.array.dtype), list(v.array.shape))
               for k, v in self.inputs.items() if not v.const]
        inits = [numpy_helper.from_array(v.array, k) for k, v in self.inputs.items() if v.const]
        graph = helper.make_graph(self.nodes, self.name.replace("/", "_"), ins,
                                  [onnx.ValueInfoProto(name=o) for o in self.outputs], initializer=inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = (8 if self.opset <= 17 else 10 if self.opset <= ORT_MAX_OPSET else
                            helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            types = {vi.name: vi.type for vi in [*inferred.graph.output, *inferred.graph.value_info]}
        except Exception:  # noqa: BLE001 - onnx refuses the graph: leave the outputs untyped
            types = {}
        for vi in model.graph.output:
            t = types.get(vi.name)
            typed = t is not None and (t.HasField("tensor_type") and t.tensor_type.elem_type and
                                       t.tensor_type.HasField("shape") or t.HasField("sequence_type"))
            if self.named and ranks and vi.name in ranks and ranks[vi.name][1] is not None:
                elem, rank = ranks[vi.name]
                vi.type.CopyFrom(helper.make_tensor_type_proto(elem, [f"{vi.name}_d{k}" for k in range(rank)]))
            elif typed:  # (onnx's checker wants a tensor output's shape, when it has a type)
                vi.type.CopyFrom(t)
            elif ranks and vi.name in ranks and ranks[vi.name][1] is not None:
                elem, rank = ranks[vi.name]
                vi.type.CopyFrom(helper.make_tensor_type_proto(elem, [None] * rank))
        return model

    def feeds(self) -> dict[str, np.ndarray]:
        return {k: v.array for k, v in self.inputs.items() if not v.const}


def _np_tensor_type(dt: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


#: Ops whose onnxruntime result for NaN inputs depends on the order its vector kernels visit the
#: elements, not on the values alone: ReduceMax of [-inf, nan, 0, 1] is 0 (pairs (0, 2) and (1, 3)
#: are compared first, and ``std::max`` keeps its first operand against NaN), MaxPool and ArgMax
#: likewise, LogSoftmax in float64 gives finite numbers next to NaN, and TopK sorts with a compare
#: that NaN makes no strict weak order. The spec is silent, so these ops' special-value cases use
#: +Inf and -Inf only.
NAN_ORDER_DEPENDENT = {"ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "Hardmax", "LogSoftmax", "MaxPool",
                       "GlobalMaxPool", "TopK"}


#: Ops whose output shape their parameter inputs decide (see ``Gen.named``).
NAMED_OUTPUT_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Expand", "Tile", "Slice", "Pad", "Split", "TopK", "Compress",
                    "NonZero", "Range", "ConstantOfShape", "Resize", "CenterCropPad", "MaxUnpool", "OneHot",
                    "ReduceSum", "ReduceMean", "ReduceMax", "HannWindow", "NonMaxSuppression"}


class Gen:
    """Builds the cases of one op: ``g.case(...)`` records one (or two, for parameter inputs)."""

    def __init__(self, op: str):
        self.op = op
        self.rng = np.random.default_rng(zlib.crc32(op.encode()))
        self.cases: list[Case] = []
        # the op's output shape depends on its parameter inputs: each /r case also runs with the outputs
        # declared by dim names no input defines (/r/named), as exporters write them
        self.named = op in NAMED_OUTPUT_OPS

    # -- data
    def data(self, shape: Sequence[int], dt: Any = F32, lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
        """Random data: uniform floats in [lo, hi), ints in [lo, hi] clipped to the dtype, random bools."""
        dt = np.dtype(dt)
        if dt.kind == "b":
            return self.rng.random(shape) < 0.5
        if dt.kind in "iu":
            info = np.iinfo(dt)
            a, b = max(int(lo), int(info.min)), min(int(hi), int(info.max))
            return self.rng.integers(a, b + 1, size=shape).astype(dt)
        return self.rng.uniform(lo, hi, size=shape).astype(dt)

    def special(self, a: np.ndarray, nan: bool = True) -> np.ndarray:
        """A copy of float data with NaN, +Inf and -Inf (only the infinities without ``nan``) at seeded
        positions (ints are returned as they are)."""
        if a.dtype.kind != "f" or a.size < 3:
            return a
        out = a.copy().reshape(-1)
        pos = self.rng.choice(out.size, 3, replace=False)
        out[pos] = [np.nan if nan else np.inf, np.inf, -np.inf]
        return out.reshape(a.shape)

    # -- cases
    def case(self, label: str, inputs: Sequence[Any], attrs: dict[str, Any] | None = None, *, opset: int | None = None,
             outputs: int | Sequence[str] = 1, op: str | None = None, tol: tuple[float, float, str] | None = None,
             domain: str = "", domains: dict[str, int] | None = None, specials: bool = False) -> None:
        """The node ``op`` (this spec's op by default) over ``inputs`` (In, P, or None for an absent optional).

        With P inputs, two cases: all of them constants (``/c``) and all read at run time (``/r``).
        With ``specials``, also a case whose first input holds NaN, +Inf and -Inf (``/nan``); for the
        ops of :data:`NAN_ORDER_DEPENDENT`, +Inf and -Inf only (``/inf``).
        """
        op = op or self.op.split("::")[-1]
        opset = opset or latest(op, domain)
        has_param = any(isinstance(i, P) for i in inputs)
        for mode in ("c", "r") if has_param else ("",):
            ins = [None if i is None else In(i.array, mode == "c") if isinstance(i, P) else i for i in inputs]
            variants = [("", ins)]
            if specials and ins and ins[0] is not None and ins[0].array.dtype.kind == "f":
                nan = op not in NAN_ORDER_DEPENDENT
                variants.append(("nan" if nan else "inf", [In(self.special(ins[0].array, nan), ins[0].const), *ins[1:]]))
            if mode == "r" and self.named:
                variants.append(("named", ins))
            for tag, vins in variants:
                name = "/".join(x for x in (self.op, f"v{opset}", label, mode, tag) if x)
                self._add(name, op, opset, vins, attrs or {}, outputs, tol, domain, dict(domains or {}))
                self.cases[-1].named = tag == "named"

    def _add(self, name: str, op: str, opset: int, ins: list[In | None], attrs: dict[str, Any],
             outputs: int | Sequence[str], tol: Any, domain: str, domains: dict[str, int]) -> None:
        names = [f"i{k}" if i is not None else "" for k, i in enumerate(ins)]
        while names and not names[-1]:
            names.pop()
        outs = [f"y{k}" for k in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node = helper.make_node(op, names, outs, domain=domain or None, **attrs)
        if domain and domain not in domains:
            domains[domain] = latest(op, domain)
        self.cases.append(Case(name, self.op, opset, [node], {n: i for n, i in zip(names, ins) if i is not None},
                               [o for o in outs if o], tol, domains))

    def graph(self, label: str, nodes: list[onnx.NodeProto], inputs: dict[str, In], outputs: Sequence[str], *,
              opset: int | None = None, tol: tuple[float, float, str] | None = None) -> None:
        """A few-op case: ``nodes`` over named ``inputs``."""
        opset = opset or ORT_MAX_OPSET
        name = "/".join((self.op, f"v{opset}", label))
        self.cases.append(Case(name, self.op, opset, nodes, dict(inputs), list(outputs), tol))


@lru_cache(maxsize=None)
def latest(op: str, domain: str = "") -> int:
    """The newest opset (at most onnxruntime's) at which ``op`` has its current schema; its first one if newer."""
    versions = versions_of(op, domain)
    if domain:
        return versions[-1] if versions else 1
    usable = [v for v in versions if v <= ORT_MAX_OPSET]
    return ORT_MAX_OPSET if usable else (versions[0] if versions else ORT_MAX_OPSET)


@lru_cache(maxsize=None)
def versions_of(op: str, domain: str = "") -> list[int]:
    """The opsets at which ``op``'s schema changed."""
    return sorted({s.since_version for s in defs.get_all_schemas_with_history() if s.name == op and s.domain == domain})


def types(op: str, param: str = "T", opset: int | None = None, domain: str = "") -> list[Any]:
    """The numpy dtypes the op's schema allows for type parameter ``param`` (of those the sweep covers)."""
    schema = defs.get_schema(op, opset or latest(op, domain), domain)
    constraints = {tc.type_param_str: tc for tc in schema.type_constraints}
    tc = constraints.get(param) or next(iter(constraints.values()), None)  # Identity's is V, Not's T
    return [DTYPES[t] for t in tc.allowed_type_strs if t in DTYPES] if tc is not None else []


def _name(dt: Any) -> str:
    return np.dtype(dt).name


#: op -> its spec (a generator of cases); filled by @spec
SPECS: dict[str, Callable[[Gen], None]] = {}


def spec(*ops: str) -> Callable[[Callable[[Gen], None]], Callable[[Gen], None]]:
    """Register the decorated function as the spec of ``ops`` (``"domain::Op"`` outside ai.onnx)."""

    def register(fn: Callable[[Gen], None]) -> Callable[[Gen], None]:
        SPECS.update({op: fn for op in ops})
        return fn

    return register


# =========================================================================== running a case


@dataclass
class Result:
    """How one case came out: one of OUTCOMES, and the detail (the error, or what differs)."""

    name: str
    op: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0


def cache_dir() -> Path:
    """This code's folder of compiled cases (see ``artifact_cache``)."""
    return artifact_cache.cache_dir(CACHE, STALE_DAYS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def compiled(model_bytes: bytes, feeds: dict[str, Any] | None = None) -> tuple[Path | None, str, str]:
    """The artifact of a model, from the cache or compiled now: (path, "", "") or (None, outcome, message).
    A sequence input is pinned to the elements ``feeds`` gives it (as ``--input-shape s=2x4,2x1`` would)."""
    from kiln.errors import KilnError
    from kiln.ir import SequenceShape

    pins = {k: SequenceShape(tuple(np.shape(e) for e in v)) for k, v in (feeds or {}).items() if isinstance(v, list)}
    key = hashlib.sha256(model_bytes + repr(sorted((k, str(v)) for k, v in pins.items())).encode()).hexdigest()
    path, err = cache_dir() / f"{key}.kiln", cache_dir() / f"{key}.err"
    if path.exists():
        return path, "", ""
    if err.exists():
        outcome, _, message = err.read_text().partition("\t")
        return None, outcome, message
    fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
    os.close(fd)
    try:
        try:
            import kiln

            kiln.compile(kiln.load(model_bytes), tmp, input_shapes=pins or None)
        except Exception as e:  # noqa: BLE001 - every error is the case's result
            text = str(e).strip()
            one_line = isinstance(e, KilnError) and text and "\n" not in text
            outcome = "refused" if one_line else "internal"
            message = text if one_line else f"{type(e).__name__}: {_first_line(e)}"
            Path(tmp).write_text(f"{outcome}\t{message}")
            os.replace(tmp, err)
            return None, outcome, message
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, "", ""


def differs(got: dict[str, Any], want: dict[str, Any], tol: tuple[float, float, str] | None) -> str:
    """What differs between kiln's and onnxruntime's outputs ("" when they match); a sequence output
    is a list of arrays, compared element by element."""
    if set(got) != set(want):
        return f"outputs {sorted(got)}, onnxruntime gives {sorted(want)}"
    for name, w in want.items():
        if isinstance(w, list):
            g = got[name]
            if not isinstance(g, list) or len(g) != len(w):
                return f"{name}: {type(g).__name__} of {len(g)}, onnxruntime gives a sequence of {len(w)}"
            for k, (a, b) in enumerate(zip(g, w)):
                diff = differs({f"{name}[{k}]": a}, {f"{name}[{k}]": b}, tol)
                if diff:
                    return diff
            continue
        a = np.asarray(got[name])
        if a.dtype != w.dtype or a.shape != w.shape:
            return f"{name}: {a.dtype}{list(a.shape)}, onnxruntime gives {w.dtype}{list(w.shape)}"
        if w.dtype.kind == "f":
            rtol, atol = tol[:2] if tol else TOLERANCE[w.dtype.name]
            close = np.isclose(a, w, rtol=rtol, atol=atol, equal_nan=True) | (a == w)
            if not close.all():
                k = int(np.argmin(close.reshape(-1)))
                return (f"{name}: {int((~close).sum())} of {w.size} values differ, e.g. [{k}] "
                        f"{a.reshape(-1)[k]!r} vs {w.reshape(-1)[k]!r}")
        elif not np.array_equal(a, w):
            bad = a != w
            k = int(np.argmax(bad.reshape(-1)))
            return f"{name}: {int(bad.sum())} of {w.size} values differ, e.g. [{k}] {a.reshape(-1)[k]!r} vs {w.reshape(-1)[k]!r}"
    return ""


def oracle(model: bytes, feeds: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime's outputs, with its graph optimizations off: its kernels are the oracle, not its fusions
    (its Pad -> MaxPool fusion drops an explicit zero pad, so a window of negatives loses the 0 it must see)."""
    from kiln.ir.oracle import onnxruntime_session

    sess = onnxruntime_session(model, optimize=False)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dict(feeds))))


def _ranks(outputs: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """(onnx element type, rank) of each tensor output; rank None for a sequence."""
    return {k: (_np_tensor_type(v.dtype), v.ndim) if isinstance(v, np.ndarray) else (0, None) for k, v in outputs.items()}


def run_case(case: Case) -> Result:
    """Compile and run one case with kiln and compare it with onnxruntime."""
    from kiln.errors import KilnError

    t = time.perf_counter()

    def result(outcome: str, detail: str = "") -> Result:
        return Result(case.name, case.op, outcome, detail, time.perf_counter() - t)

    feeds = case.feeds()
    try:
        # onnxruntime runs outputs that onnx's inference leaves untyped; the model kiln gets declares
        # their dtypes and ranks (as an exporter would), and onnxruntime runs that model too
        first = oracle(case.model().SerializeToString(), feeds)
        model = case.model(_ranks(first)).SerializeToString()
        want = oracle(model, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime refuses: nothing to compare with
        return result("skipped", _first_line(e))
    path, outcome, message = compiled(model, feeds)
    if path is None:
        return result(outcome, message)
    try:
        import kiln.runtime

        got = kiln.runtime.load(path, threads=1).run(feeds)
    except KilnError as e:
        text = str(e).strip()
        return result("refused" if text and "\n" not in text else "internal", text or type(e).__name__)
    except Exception as e:  # noqa: BLE001 - a failure at run time is kiln's
        return result("internal", f"at run time: {type(e).__name__}: {_first_line(e)}")
    diff = differs(got, want, case.tol)
    return result("mismatch" if diff else "match", diff)


# =========================================================================== the specs: elementwise

#: Input ranges of the unary ops, wide enough to leave their domains (NaN there must match too).
_UNARY_RANGE = {"Acos": (-1.2, 1.2), "Asin": (-1.2, 1.2), "Atanh": (-1.2, 1.2), "Acosh": (0.5, 4.0),
                "Log": (-0.5, 5.0), "Sqrt": (-0.5, 5.0), "Exp": (-20.0, 20.0), "Tan": (-1.4, 1.4),
                "Sinh": (-5.0, 5.0), "Cosh": (-5.0, 5.0), "Softplus": (-20.0, 20.0), "Mish": (-20.0, 20.0)}
_UNARY = ["Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Cos", "Cosh", "Erf", "Exp", "Floor",
          "IsNaN", "Log", "Neg", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin", "Sinh", "Sqrt", "Tan", "Tanh",
          "Softplus", "Softsign", "Mish", "HardSwish", "Not", "BitwiseNot", "Identity"]


@spec(*_UNARY)
def _unary(g: Gen) -> None:
    op = g.op
    lo, hi = _UNARY_RANGE.get(op, (-4.0, 4.0))
    for dt in types(op):
        x = g.data((2, 3, 4), dt, lo, hi)
        if op == "Round" and dt in (F32, F64):
            x.reshape(-1)[:8] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -0.51]
        g.case(_name(dt), [X(x)], specials=True)
    dt = types(op)[0]
    g.case(f"{_name(dt)}/0d", [X(g.data((), dt, lo, hi))])
    g.case(f"{_name(dt)}/empty", [X(g.data((0, 3), dt, lo, hi))])


@spec("IsInf")
def _isinf(g: Gen) -> None:
    for dt in types("IsInf", "T1"):
        for pos, neg in ((1, 1), (1, 0), (0, 1), (0, 0)):
            g.case(f"{_name(dt)}/pos={pos},neg={neg}", [X(g.special(g.data((3, 4), dt)))],
                   {"detect_positive": pos, "detect_negative": neg})


_NAN = float("nan")
#: onnxruntime computes some float64 ops in float32 (Shrink with its float attributes, the signal
#: windows), so its float64 results carry float32 rounding: compared at float32's tolerance.
_F32_ATTRS = (1e-6, 1e-7, "onnxruntime computes this op's float64 result in float32")

#: Activations with float attributes: the attribute sets tried (NaN and Inf among them).
_ACTIVATIONS: dict[str, list[dict[str, Any]]] = {
    "Elu": [{}, {"alpha": 0.5}, {"alpha": _NAN}],
    "Selu": [{}, {"alpha": 2.0, "gamma": 3.0}, {"gamma": _NAN}],
    "Celu": [{}, {"alpha": 2.0}],
    "ThresholdedRelu": [{}, {"alpha": 0.5}, {"alpha": -1.0}, {"alpha": float("inf")}],
    "LeakyRelu": [{}, {"alpha": -0.5}, {"alpha": _NAN}],
    "HardSigmoid": [{}, {"alpha": 0.5, "beta": 0.2}, {"alpha": _NAN}],
    "Gelu": [{}, {"approximate": "tanh"}],
    "Shrink": [{}, {"bias": 1.5, "lambd": 1.0}, {"lambd": -1.0}],
    "Swish": [{}, {"alpha": 2.0}],
}


@spec(*_ACTIVATIONS)
def _activation(g: Gen) -> None:
    op = g.op
    for dt in types(op) or types(op, "T1"):
        for attrs in _ACTIVATIONS[op]:
            label = ",".join(f"{k}={v}" for k, v in attrs.items()) or "default"
            tol = _F32_ATTRS if dt == F64 and op == "Shrink" else None
            g.case(f"{_name(dt)}/{label}", [X(g.data((2, 3, 4), dt, -5, 5))], attrs, specials=True, tol=tol)


@spec("PRelu")
def _prelu(g: Gen) -> None:
    for dt in types("PRelu"):
        x = g.data((2, 3, 4, 5), dt, -5, 5)
        for shape in ((3, 1, 1), (5,), (1,), (), (2, 3, 4, 5)):
            g.case(f"{_name(dt)}/slope{list(shape)}", [X(x), P(g.data(shape, dt, -2, 2))], specials=True)


@spec("Clip")
def _clip(g: Gen) -> None:
    x = g.special(g.data((2, 3, 4), F32, -8, 8))
    for lo, hi in ((-1.0, 2.0), (None, 2.0), (-1.0, None), (None, None), (3.0, 1.0), (_NAN, 6.0), (0.0, _NAN),
                   (_NAN, _NAN), (-np.inf, np.inf)):
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        g.case(f"attrs/{lo},{hi}", [X(x)], attrs, opset=6)
        ins = [X(x), None if lo is None else P(np.array(lo, F32)), None if hi is None else P(np.array(hi, F32))]
        g.case(f"f32/{lo},{hi}", ins, opset=13)
    for dt in types("Clip", opset=13):
        if dt == F32:
            continue
        x = g.data((3, 4), dt, -100, 100)
        lo, hi = (np.array(-5, dt) if np.dtype(dt).kind != "u" else np.array(3, dt)), np.array(50, dt)
        g.case(f"{_name(dt)}", [X(x), P(lo), P(hi)], opset=13, specials=True)
        g.case(f"{_name(dt)}/hi-only", [X(x), None, P(hi)], opset=13)
    g.case("f32/opset11", [X(x), P(np.array(-1, F32)), P(np.array(1, F32))], opset=11)


_BINARY = ["Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
           "BitwiseAnd", "BitwiseOr", "BitwiseXor"]
#: Broadcasting pairs of shapes.
_BROADCASTS = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((2, 3), ()), ((1,), (2, 3)),
               ((0, 3), (1, 3))]


@spec(*_BINARY)
def _binary(g: Gen) -> None:
    op = g.op
    dts = types(op) or types(op, "T1")
    for dt in dts:
        for k, (sa, sb) in enumerate(_BROADCASTS):
            if k > 1 and dt != dts[0]:
                continue  # every dtype at two shapes, every shape at the first dtype
            a, b = g.data(sa, dt, -6, 6), g.data(sb, dt, -6, 6)
            if op == "Div" and np.dtype(dt).kind in "iu":
                b[b == 0] = 1  # integer division by zero is undefined behaviour
            g.case(f"{_name(dt)}/{list(sa)}x{list(sb)}", [X(a), X(b)], specials=op in ("Add", "Div", "Mul", "Less"))
    dt = dts[0]
    g.case(f"{_name(dt)}/const-b", [X(g.data((2, 3), dt, 1, 6)), C(g.data((3,), dt, 1, 6))])


@spec("Max", "Min", "Sum", "Mean")
def _variadic(g: Gen) -> None:
    op = g.op
    for dt in types(op):
        shapes = [((2, 3),), ((2, 3), (3,)), ((2, 1, 3), (4, 1), (3,))]
        for sh in shapes:
            ins = [X(g.data(s, dt, -6, 6)) for s in sh]
            g.case(f"{_name(dt)}/{len(sh)}in", ins, specials=dt == F32)


@spec("Mod")
def _mod(g: Gen) -> None:
    for dt in types("Mod"):
        a, b = g.data((3, 4), dt, -20, 20), g.data((3, 4), dt, -7, 7)
        b[b == 0] = 3
        for fmod in (0, 1):
            if fmod == 0 and np.dtype(dt).kind == "f":
                continue  # fmod=0 is for ints only
            g.case(f"{_name(dt)}/fmod={fmod}", [X(a), X(b)], {"fmod": fmod})
        g.case(f"{_name(dt)}/broadcast", [X(a), X(b[:1])], {"fmod": int(np.dtype(dt).kind == "f")})


@spec("Pow")
def _pow(g: Gen) -> None:
    for dt in types("Pow"):
        for et in types("Pow", "T1"):
            if dt not in (F32, F64) and et not in (F32, F64) and et != dt:
                continue
            base = g.data((3, 4), dt, -3, 3) if np.dtype(dt).kind != "u" else g.data((3, 4), dt, 0, 5)
            exp = g.data((4,), et, 0, 3)
            g.case(f"{_name(dt)}^{_name(et)}", [X(base), X(exp)], specials=dt == F32 and et == F32)


@spec("BitShift")
def _bitshift(g: Gen) -> None:
    for dt in types("BitShift"):
        bits = np.dtype(dt).itemsize * 8
        for d in ("LEFT", "RIGHT"):
            g.case(f"{_name(dt)}/{d}", [X(g.data((3, 4), dt, 0, 1000)), X(g.data((4,), dt, 0, bits - 1))], {"direction": d})


@spec("Where")
def _where(g: Gen) -> None:
    for dt in types("Where"):
        g.case(f"{_name(dt)}", [X(g.data((2, 3, 4), BOOL)), X(g.data((2, 3, 4), dt)), X(g.data((2, 3, 4), dt))])
    g.case("f32/broadcast", [X(g.data((3, 1), BOOL)), X(g.data((4,), F32)), X(g.data((2, 1, 1), F32))])
    g.case("f32/const-cond", [C(g.data((3, 4), BOOL)), X(g.data((3, 4), F32)), C(np.array(0, F32))])


@spec("Cast")
def _cast(g: Gen) -> None:
    src = types("Cast", "T1")
    for s in src:
        for d in types("Cast", "T2"):
            lo, hi = (-100, 300) if np.dtype(s).kind in "if" else (0, 300)
            x = g.data((3, 5), s, lo, hi)
            if np.dtype(s).kind == "f":
                x = np.round(x) if np.dtype(d).kind in "iu" else x
                if np.dtype(d).kind in "iu":  # out-of-range float -> int casts are undefined behaviour
                    info = np.iinfo(d)
                    x = np.clip(x, max(info.min, -1e9), min(info.max, 1e9)).astype(s)
            g.case(f"{_name(s)}->{_name(d)}", [X(x)], {"to": _np_tensor_type(d)},
                   specials=np.dtype(d).kind in "fb")


@spec("CastLike")
def _cast_like(g: Gen) -> None:
    for s, d in itertools.product([F32, I64, BOOL, U8], [F64, I32, BOOL, F32]):
        if s == d:
            continue
        x = np.round(g.data((3, 4), s, 0, 200)) if np.dtype(s).kind == "f" else g.data((3, 4), s, 0, 200)
        g.case(f"{_name(s)}->{_name(d)}", [X(x.astype(s)), X(np.zeros((2,), d))])


@spec("BitCast")
def _bitcast(g: Gen) -> None:
    for s, d in ((F32, I32), (I32, F32), (F64, I64), (U8, I8), (np.uint32, F32)):
        g.case(f"{_name(s)}->{_name(d)}", [X(g.data((3, 4), s, -50, 50))], {"to": _np_tensor_type(d)})


# =========================================================================== the specs: reductions and softmax

_REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceSumSquare"]


@spec(*_REDUCE)
def _reduce(g: Gen) -> None:
    op = g.op
    new = latest(op)  # axes as an input (18; ReduceSum 13)
    old = 11 if op != "ReduceSum" else 11
    positive = op in ("ReduceLogSum",)
    for dt in types(op, opset=new):
        if op == "ReduceLogSumExp" and np.dtype(dt).kind != "f":
            continue  # opset 28 drops its int types (exp and log are float ops); onnxruntime truncates each exp
        x = g.data((2, 3, 4), dt, 0.1 if positive else -3, 3)
        for axes, keep in (([1], 1), ([-1], 0), ([0, 2], 1), (None, 0), ([-3, -2, -1], 0)):
            if dt != F32 and axes not in ([1], None):
                continue
            label = f"{_name(dt)}/axes={axes},keep={keep}"
            ins = [X(x)] + ([P(np.array(axes, I64))] if axes is not None else [])
            g.case(label, ins, {"keepdims": keep}, opset=new, specials=dt == F32 and axes == [1])
            g.case(label, [X(x)], {"keepdims": keep, **({"axes": axes} if axes is not None else {})}, opset=old)
    x = g.data((2, 3), F32, 0.1, 3)
    for noop in (0, 1):
        g.case(f"f32/empty-axes,noop={noop}", [X(x), P(np.zeros((0,), I64))], {"noop_with_empty_axes": noop}, opset=new)
        g.case(f"f32/no-axes,noop={noop}", [X(x)], {"noop_with_empty_axes": noop}, opset=new)
    g.case("f32/empty-set", [X(np.zeros((2, 0, 3), F32))], {"axes": [1], "keepdims": 0}, opset=old)
    g.case("f32/0d", [X(np.array(1.5, F32))], {"keepdims": 1}, opset=new)


@spec("ArgMax", "ArgMin")
def _argreduce(g: Gen) -> None:
    for dt in types(g.op):
        x = g.data((3, 4, 2), dt, -2, 2)  # small ints: ties
        for axis, keep, last in ((0, 1, 0), (-1, 0, 0), (1, 1, 1), (-2, 0, 1)):
            g.case(f"{_name(dt)}/axis={axis},keep={keep},last={last}", [X(x)],
                   {"axis": axis, "keepdims": keep, "select_last_index": last}, specials=dt == F32 and axis == 0)
    g.case("f32/opset11", [X(g.data((3, 4), F32))], {"axis": 1}, opset=11)


@spec("Softmax", "LogSoftmax", "Hardmax")
def _softmax(g: Gen) -> None:
    for dt in types(g.op):
        x = g.data((2, 3, 4), dt, -5, 5)
        if g.op == "Hardmax":
            x = np.round(x)  # ties: the first maximum wins
        for axis in (-1, 0, 1):
            # onnxruntime's float64 LogSoftmax gives finite numbers next to NaN and -inf next to +inf
            specials = axis == -1 and not (g.op == "LogSoftmax" and dt == F64)
            g.case(f"{_name(dt)}/axis={axis}", [X(x)], {"axis": axis}, specials=specials)
        g.case(f"{_name(dt)}/opset11,axis=1", [X(x)], {"axis": 1}, opset=11)
    g.case("f32/large", [X(np.array([[1000.0, 0.0, -1000.0], [-np.inf, 0.0, 1.0]], F32))])


@spec("NegativeLogLikelihoodLoss")
def _nll(g: Gen) -> None:
    x = g.data((3, 5, 2), F32)
    t = g.data((3, 2), I64, 0, 4)
    t[0, 0] = 1
    w = g.data((5,), F32, 0.1, 2)
    for red in ("none", "sum", "mean"):
        g.case(f"{red}", [X(x), X(t)], {"reduction": red})
        g.case(f"{red}/weight", [X(x), X(t), P(w)], {"reduction": red})
        g.case(f"{red}/ignore", [X(x), X(t), X(w)], {"reduction": red, "ignore_index": 1})
    g.case("2d", [X(g.data((4, 3), F32)), X(g.data((4,), I64, 0, 2))], {"reduction": "mean"})


@spec("SoftmaxCrossEntropyLoss")
def _sce(g: Gen) -> None:
    x = g.data((3, 5, 2), F32)
    t = g.data((3, 2), I64, 0, 4)
    w = g.data((5,), F32, 0.1, 2)
    for red in ("none", "sum", "mean"):
        g.case(f"{red}", [X(x), X(t)], {"reduction": red})
        g.case(f"{red}/weight", [X(x), X(t), X(w)], {"reduction": red}, outputs=2)
        g.case(f"{red}/ignore", [X(x), X(t)], {"reduction": red, "ignore_index": 2})
    g.case("f64", [X(g.data((4, 3), F64)), X(g.data((4,), I64, 0, 2))], {"reduction": "mean"})


# =========================================================================== the specs: shapes


@spec("Reshape")
def _reshape(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for shape in ([4, 6], [-1], [0, -1], [2, 0, 2, 2], [24, 1], [-1, 2, 3], [1, 1, 24]):
        g.case(f"{shape}", [X(x), P(np.array(shape, I64))])
    g.case("allowzero", [X(np.zeros((0, 3), F32)), P(np.array([3, 0], I64))], {"allowzero": 1})
    g.case("allowzero=0", [X(x), P(np.array([0, 12], I64))], {"allowzero": 0})
    for dt in (I64, BOOL, U8, F64):
        g.case(f"{_name(dt)}", [X(g.data((2, 6), dt)), C(np.array([3, -1], I64))])


@spec("Squeeze")
def _squeeze(g: Gen) -> None:
    x = g.data((1, 3, 1, 4), F32)
    for axes in ([0], [-2], [0, 2], None):
        g.case(f"axes={axes}", [X(x)] + ([P(np.array(axes, I64))] if axes is not None else []), opset=13)
        g.case(f"axes={axes}", [X(x)], {"axes": axes} if axes is not None else {}, opset=11)
    g.case("i64/0d", [X(g.data((1,), I64))], opset=13)


@spec("Unsqueeze")
def _unsqueeze(g: Gen) -> None:
    x = g.data((3, 4), F32)
    for axes in ([0], [-1], [0, 3], [1, -1], [2, 0]):
        g.case(f"axes={axes}", [X(x), P(np.array(axes, I64))], opset=13)
        g.case(f"axes={axes}", [X(x)], {"axes": axes}, opset=11)
    g.case("0d", [X(np.array(2.0, F32)), P(np.array([0], I64))], opset=13)


@spec("Flatten")
def _flatten(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for axis in (0, 1, 2, 3, -1, -3):
        g.case(f"axis={axis}", [X(x)], {"axis": axis})
    g.case("i64", [X(g.data((2, 3), I64))], {"axis": 1})


@spec("Transpose")
def _transpose(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for perm in (None, [0, 2, 1], [2, 0, 1], [1, 0, 2]):
        g.case(f"perm={perm}", [X(x)], {"perm": perm} if perm else {})
    g.case("bool/4d", [X(g.data((2, 1, 3, 2), BOOL))], {"perm": [3, 1, 0, 2]})


@spec("Concat")
def _concat(g: Gen) -> None:
    for axis in (0, 1, -1):
        shapes = [(2, 3, 4)] * 3
        shapes = [tuple(d + k if j == axis % 3 else d for j, d in enumerate(s)) for k, s in enumerate(shapes)]
        g.case(f"axis={axis}", [X(g.data(s, F32)) for s in shapes], {"axis": axis})
    g.case("empty-part", [X(g.data((2, 3), F32)), X(np.zeros((0, 3), F32))], {"axis": 0})
    g.case("i64/const", [X(g.data((2,), I64)), C(np.array([7], I64))], {"axis": 0})
    g.case("one", [X(g.data((2, 3), F32))], {"axis": 1})


@spec("Split")
def _split(g: Gen) -> None:
    x = g.data((6, 4), F32)
    g.case("even", [X(x)], {"axis": 0}, outputs=3, opset=13)
    g.case("sizes", [X(x), P(np.array([1, 2, 3], I64))], {"axis": 0}, outputs=3, opset=13)
    g.case("sizes/-1", [X(x), P(np.array([3, 1], I64))], {"axis": -1}, outputs=2, opset=13)
    g.case("zero-part", [X(x), P(np.array([0, 6], I64))], {"axis": 0}, outputs=2, opset=13)
    g.case("attr", [X(x)], {"axis": 1, "split": [1, 3]}, outputs=2, opset=11)
    g.case("num_outputs", [X(g.data((7, 2), F32))], {"axis": 0, "num_outputs": 3}, outputs=3, opset=18)
    g.case("one", [X(x)], {"axis": 0}, outputs=1, opset=13)
    # a part no one reads (onnxruntime 1.31 crashes on a Split output named "", so the part is named but unused)
    g.graph("unused-part", [helper.make_node("Split", ["x", "s"], ["y0", "y1", "y2"], axis=1)],
            {"x": X(g.data((2, 6), F32)), "s": C(np.array([1, 2, 3], I64))}, ["y0", "y2"], opset=13)


@spec("Shape")
def _shape(g: Gen) -> None:
    x = g.data((2, 3, 4, 5), F32)
    g.case("all", [X(x)])
    for start, end in ((1, None), (0, -1), (-3, 3), (2, 1), (-10, 10)):
        attrs = {"start": start, **({"end": end} if end is not None else {})}
        g.case(f"start={start},end={end}", [X(x)], attrs)
    g.case("0d", [X(np.array(1.0, F32))])


@spec("Size")
def _size(g: Gen) -> None:
    g.case("3d", [X(g.data((2, 3, 4), F32))])
    g.case("empty", [X(np.zeros((2, 0), F32))])
    g.case("0d", [X(np.array(True))])


@spec("Expand")
def _expand(g: Gen) -> None:
    for xs, shape in (((3, 1), [2, 3, 4]), ((3, 1), [1, 1]), ((1,), [5]), ((2, 1, 4), [3, 1]), ((), [2, 2])):
        g.case(f"{list(xs)}->{shape}", [X(g.data(xs, F32)), P(np.array(shape, I64))])
    g.case("i64", [X(g.data((2, 1), I64)), C(np.array([2, 3], I64))])


@spec("Tile")
def _tile(g: Gen) -> None:
    x = g.data((2, 3), F32)
    for reps in ([1, 1], [2, 3], [3, 1], [1, 0]):
        g.case(f"reps={reps}", [X(x), P(np.array(reps, I64))])
    g.case("3d/bool", [X(g.data((1, 2, 2), BOOL)), P(np.array([2, 1, 2], I64))])


@spec("Slice")
def _slice(g: Gen) -> None:
    x = g.data((4, 5, 6), F32)
    big = np.iinfo(np.int64).max
    for starts, ends, axes, steps in (([1], [3], None, None), ([0, 1], [2, -1], [0, 2], None),
                                      ([-1], [-big], [1], [-1]), ([0], [big], [-1], [2]), ([5], [1], [2], [-2]),
                                      ([3, 0, 1], [1, 5, 5], [0, 1, 2], [-1, 2, 3]), ([2], [2], [0], None),
                                      ([-100], [100], [1], None)):
        ins = [X(x), P(np.array(starts, I64)), P(np.array(ends, I64))]
        if axes is not None or steps is not None:
            ins.append(P(np.array(axes if axes is not None else list(range(len(starts))), I64)))
        if steps is not None:
            ins.append(P(np.array(steps, I64)))
        g.case(f"{starts}:{ends}:{axes}:{steps}", ins)
    g.case("attrs", [X(x)], {"starts": [1, -3], "ends": [3, 100], "axes": [0, 2]}, opset=1)
    g.case("i32-indices", [X(x), P(np.array([1], I32)), P(np.array([3], I32)), P(np.array([1], I32))])


@spec("Pad")
def _pad(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for mode in ("constant", "reflect", "edge", "wrap"):
        for pads in ([0, 1, 2, 0, 2, 1], [1, 0, 0, 0, 0, 3], [0, -1, 1, 0, 1, -2]):
            if mode != "constant" and min(pads) < 0:
                continue
            g.case(f"{mode}/{pads}", [X(x), P(np.array(pads, I64))], {"mode": mode})
        g.case(f"{mode}/axes", [X(x), P(np.array([1, 2, 2, 1], I64)), None, P(np.array([-1, 1], I64))],
               {"mode": mode}, opset=18)
    g.case("constant/value", [X(x), P(np.array([1, 1, 1, 1, 1, 1], I64)), P(np.array(2.5, F32))])
    g.case("constant/nan", [X(x), C(np.array([0, 1, 0, 0, 1, 0], I64)), C(np.array(np.nan, F32))])
    g.case("attrs", [X(x)], {"pads": [0, 1, 1, 0, 1, 1], "mode": "reflect"}, opset=2)
    g.case("attrs/value", [X(x)], {"pads": [1, 0, 0, 1, 0, 0], "value": -1.5}, opset=2)
    for dt in (I64, U8, BOOL):
        g.case(f"{_name(dt)}", [X(g.data((3, 3), dt)), C(np.array([1, 1, 0, 2], I64))], {"mode": "constant"})


@spec("DepthToSpace", "SpaceToDepth")
def _depth_space(g: Gen) -> None:
    for b in (2, 3):
        shape = (1, 2 * b * b, 2, 3) if g.op == "DepthToSpace" else (2, 3, 2 * b, b)
        for mode in ("DCR", "CRD") if g.op == "DepthToSpace" else ("",):
            g.case(f"b={b}/{mode or 'default'}", [X(g.data(shape, F32))], {"blocksize": b, **({"mode": mode} if mode else {})})
    g.case("i64", [X(g.data((1, 4, 2, 2), I64))], {"blocksize": 2})


@spec("CenterCropPad")
def _center_crop_pad(g: Gen) -> None:
    x = g.data((4, 5, 3), F32)
    for shape, axes in (([2, 7, 3], None), ([5, 2], [0, 1]), ([6], [-2]), ([3, 3], [1, 0])):
        g.case(f"{shape}/axes={axes}", [X(x), P(np.array(shape, I64))], {"axes": axes} if axes else {})


@spec("Dropout")
def _dropout(g: Gen) -> None:
    x = g.data((3, 4), F32)
    g.case("inference", [X(x)])
    g.case("mask", [X(x)], outputs=2)
    g.case("ratio", [X(x), C(np.array(0.3, F32))], outputs=2)
    g.case("training=false", [X(x), C(np.array(0.5, F32)), P(np.array(False))], outputs=2)
    g.case("opset10/mask", [X(x)], {"ratio": 0.2}, opset=10, outputs=2)


# =========================================================================== the specs: indexing


@spec("Gather")
def _gather(g: Gen) -> None:
    x = g.data((4, 5, 3), F32)
    for axis in (0, 1, -1):
        n = x.shape[axis]
        for ishape in ((), (2,), (2, 3)):
            idx = g.data(ishape, I64, -n, n - 1)
            g.case(f"axis={axis}/idx{list(ishape)}", [X(x), P(idx)], {"axis": axis})
    g.case("i32-idx", [X(x), X(np.array([[0, -1], [3, 2]], I32))], {"axis": 0})
    for dt in (I64, BOOL, U8):
        g.case(f"{_name(dt)}", [X(g.data((3, 4), dt)), C(np.array([2, 0], I64))], {"axis": 1})


@spec("GatherElements")
def _gather_elements(g: Gen) -> None:
    x = g.data((3, 4), F32)
    for axis in (0, 1, -1):
        n = x.shape[axis]
        idx = g.data((2, 4) if axis == 0 else (3, 2), I64, -n, n - 1)
        g.case(f"axis={axis}", [X(x), P(idx)], {"axis": axis})
    g.case("i32/3d", [X(g.data((2, 3, 2), F32)), X(g.data((2, 3, 2), I32, 0, 2))], {"axis": 1})


@spec("GatherND")
def _gather_nd(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    g.case("m=1", [X(x), P(np.array([[1], [0]], I64))])
    g.case("m=2", [X(x), P(np.array([[1, -1], [0, 2]], I64))])
    g.case("m=3", [X(x), P(np.array([[[1, 2, 3]], [[0, 0, -1]]], I64))])
    g.case("batch_dims=1", [X(x), P(np.array([[2], [0]], I64))], {"batch_dims": 1})
    g.case("batch_dims=1/m=2", [X(x), P(np.array([[[2, 3]], [[0, 1]]], I64))], {"batch_dims": 1})
    g.case("i64-data", [X(g.data((3, 3), I64)), C(np.array([[2, 1]], I64))])


@spec("ScatterElements")
def _scatter_elements(g: Gen) -> None:
    x = g.data((3, 4), F32)
    for red in ("none", "add", "mul", "max", "min"):
        for axis in (0, -1):
            idx = np.array([[0, 2, 1, 1], [2, 0, 0, 2]], I64) if axis == 0 else np.array([[1, 3], [0, -1], [2, 2]], I64)
            if red == "none":  # duplicates are undefined without a reduction
                idx = np.array([[0, 2, 1, 1], [2, 0, 0, 2]], I64) if axis == 0 else np.array([[1, 3], [0, -1], [2, 0]], I64)
            upd = g.data(idx.shape, F32)
            g.case(f"{red}/axis={axis}", [X(x), P(idx), X(upd)], {"axis": axis, "reduction": red})
    g.case("i64", [X(g.data((3, 3), I64)), C(np.array([[1, 0, 2]], I64)), X(g.data((1, 3), I64))], {"axis": 0})


@spec("ScatterND")
def _scatter_nd(g: Gen) -> None:
    x = g.data((4, 3, 2), F32)
    for red in ("none", "add", "mul", "max", "min"):
        idx = np.array([[1], [3]], I64) if red == "none" else np.array([[1], [3], [1]], I64)
        g.case(f"{red}/rows", [X(x), P(idx), X(g.data((len(idx), 3, 2), F32))], {"reduction": red})
        g.case(f"{red}/elements", [X(x), P(np.array([[0, 1, 1], [3, 2, 0]], I64)), X(g.data((2,), F32))],
               {"reduction": red})
    g.case("negative", [X(x), C(np.array([[-1, 0]], I64)), X(g.data((1, 2), F32))])


@spec("TensorScatter")
def _tensor_scatter(g: Gen) -> None:
    cache = g.data((2, 3, 5, 4), F32)
    upd = g.data((2, 3, 2, 4), F32)
    for mode in ("linear", "circular"):
        g.case(f"{mode}", [X(cache), X(upd), P(np.array([1, 3], I64))], {"mode": mode, "axis": 2})
        g.case(f"{mode}/no-index", [X(cache), X(upd)], {"mode": mode, "axis": -2})


@spec("OneHot")
def _one_hot(g: Gen) -> None:
    idx = np.array([[0, 2, -1], [1, 5, -4]], I64)
    for axis in (-1, 0, 1):
        g.case(f"axis={axis}", [X(idx), C(np.array(4, I64)), P(np.array([0.5, 2.0], F32))], {"axis": axis})
    g.case("f32-indices", [X(np.array([0.0, 1.7, 3.0], F32)), C(np.array([5], F32)), C(np.array([0, 1], I64))])
    g.case("runtime-depth", [X(idx), X(np.array(4, I64)), C(np.array([0, 1], I32))])


@spec("Trilu")
def _trilu(g: Gen) -> None:
    x = g.data((2, 3, 5), F32)
    for upper in (0, 1):
        g.case(f"upper={upper}", [X(x)], {"upper": upper})
        for k in (-1, 2, 7):
            g.case(f"upper={upper}/k={k}", [X(x), P(np.array(k, I64))], {"upper": upper})
    g.case("i64", [X(g.data((4, 4), I64))], {"upper": 1})


@spec("CumSum", "CumProd")
def _cumulative(g: Gen) -> None:
    for dt in types(g.op):
        x = g.data((3, 4), dt, -3, 3)
        for axis in (0, -1):
            for ex, rev in ((0, 0), (1, 0), (0, 1), (1, 1)):
                if dt != F32 and (ex, rev) != (0, 0):
                    continue
                g.case(f"{_name(dt)}/axis={axis},exclusive={ex},reverse={rev}", [X(x), P(np.array(axis, I64))],
                       {"exclusive": ex, "reverse": rev}, specials=dt == F32 and ex == 0 and rev == 0)


@spec("TopK")
def _topk(g: Gen) -> None:
    for dt in types("TopK"):
        x = g.data((3, 6), dt, -4, 4)  # ints: ties, lower index first
        for k, axis, largest in ((2, -1, 1), (3, 0, 0), (6, 1, 1), (0, 1, 1)):
            g.case(f"{_name(dt)}/k={k},axis={axis},largest={largest}", [X(x), P(np.array([k], I64))],
                   {"axis": axis, "largest": largest}, outputs=2)
    g.case("opset1", [X(g.data((3, 6), F32))], {"k": 2}, opset=1, outputs=2)


@spec("Compress")
def _compress(g: Gen) -> None:
    x = g.data((3, 4), F32)
    for axis in (None, 0, 1, -1):
        n = x.size if axis is None else x.shape[axis]
        for cond in (g.data((n,), BOOL), np.zeros(n, bool), np.ones(2, bool)):
            g.case(f"axis={axis}/{int(cond.sum())}of{len(cond)}", [X(x), P(cond)], {"axis": axis} if axis is not None else {})


@spec("NonZero")
def _nonzero(g: Gen) -> None:
    for dt in (F32, I64, BOOL, U8, I32):
        g.case(f"{_name(dt)}/2d", [X(g.data((3, 4), dt, -1, 1))])
    g.case("f32/1d", [X(np.array([0, 1.5, 0, -2, 0], F32))])
    g.case("f32/3d", [X(g.data((2, 2, 3), I64, 0, 1).astype(F32))])
    g.case("f32/none", [X(np.zeros((2, 3), F32))])
    g.case("f32/all", [X(np.ones((2, 3), F32))])
    g.case("f32/nan", [X(np.array([np.nan, 0.0, -0.0, np.inf], F32))])
    g.case("f32/0d", [X(np.array(3.0, F32))])
    g.case("f32/empty", [X(np.zeros((0, 3), F32))])


@spec("ReverseSequence")
def _reverse_sequence(g: Gen) -> None:
    x = g.data((4, 3, 2), F32)
    g.case("time0", [X(x), P(np.array([4, 1, 2], I64))], {"time_axis": 0, "batch_axis": 1})
    g.case("time1", [X(np.swapaxes(x, 0, 1).copy()), P(np.array([3, 0, 4], I64))], {"time_axis": 1, "batch_axis": 0})


@spec("ai.onnx.ml::ArrayFeatureExtractor")
def _array_feature_extractor(g: Gen) -> None:
    g.case("2d", [X(g.data((3, 5), F32)), P(np.array([0, 4, 2], I64))], domain="ai.onnx.ml")
    g.case("i64/1d", [X(g.data((5,), I64)), C(np.array([1], I64))], domain="ai.onnx.ml")


@spec("ai.onnx.ml::Binarizer")
def _binarizer(g: Gen) -> None:
    for th in (0.0, 0.5, -1.0):
        g.case(f"threshold={th}", [X(g.data((3, 4), F32))], {"threshold": th}, domain="ai.onnx.ml", specials=True)


# =========================================================================== the specs: generators


@spec("ConstantOfShape")
def _constant_of_shape(g: Gen) -> None:
    for shape in ([2, 3], [0], []):
        g.case(f"default/{shape}", [P(np.array(shape, I64))])
    for dt, v in ((F32, 1.5), (I64, -7), (BOOL, True), (F64, np.nan), (U8, 9), (I32, 3)):
        t = numpy_helper.from_array(np.array([v], dt), "value")
        g.case(f"{_name(dt)}={v}", [P(np.array([3, 2], I64))], {"value": t})


@spec("EyeLike")
def _eye_like(g: Gen) -> None:
    for k in (0, 1, -2, 7):
        g.case(f"k={k}", [X(g.data((3, 4), F32))], {"k": k})
    g.case("to-i64", [X(g.data((4, 3), F32))], {"dtype": TensorProto.INT64, "k": 1})
    g.case("i32", [X(g.data((3, 3), I32))])


@spec("Range")
def _range(g: Gen) -> None:
    for dt, (a, b, d) in ((F32, (0.5, 4.0, 0.75)), (I64, (10, -3, -4)), (I32, (0, 5, 1)), (F64, (-1.0, 1.0, 0.3)),
                          (I64, (3, 3, 1)), (F32, (1.0, 0.0, 1.0))):
        g.case(f"{_name(dt)}/{a},{b},{d}", [P(np.array(a, dt)), P(np.array(b, dt)), P(np.array(d, dt))])


@spec("HannWindow", "HammingWindow", "BlackmanWindow")
def _window(g: Gen) -> None:
    for n in (1, 5, 8):
        for periodic in (0, 1):
            g.case(f"n={n},periodic={periodic}", [P(np.array(n, I64))], {"periodic": periodic})
    g.case("f64", [C(np.array(6, I32))], {"output_datatype": TensorProto.DOUBLE}, tol=_F32_ATTRS)


#: DFT and STFT: kiln's direct transform sums in another order than onnxruntime's FFT, which itself
#: differs from numpy's by up to 2e-5 on these unit-scale signals
_DIRECT_TRANSFORM = (1e-4, 1e-4, "a direct transform sums in another order than onnxruntime's FFT")


@spec("DFT")
def _dft(g: Gen) -> None:
    tol = _DIRECT_TRANSFORM
    for inverse in (0, 1):
        for onesided in (0, 1):
            if inverse and onesided:
                continue  # onnx leaves a one-sided inverse undefined
            for last in (1, 2):
                g.case(f"inverse={inverse},onesided={onesided},last={last}", [X(g.data((2, 8, last), F32))],
                       {"inverse": inverse, "onesided": onesided}, tol=tol)
    x = g.data((1, 6, 2), F32)
    for n in (4, 10):
        g.case(f"dft_length={n}", [X(x), P(np.array(n, I64))], tol=tol)
    g.case("axis-input", [X(g.data((2, 5, 3, 1), F32)), None, P(np.array(-3, I64))], tol=tol)
    g.case("opset17/axis", [X(g.data((2, 5, 3, 2), F32))], {"axis": 1}, opset=17, tol=tol)


@spec("STFT")
def _stft(g: Gen) -> None:
    tol = _DIRECT_TRANSFORM
    x = g.data((1, 32, 1), F32)
    window = np.hanning(8).astype(F32)
    g.case("window", [X(x), P(np.array(4, I64)), P(window)], tol=tol)
    g.case("length", [X(x), P(np.array(5, I64)), None, P(np.array(7, I64))], tol=tol)
    g.case("two-sided", [X(x), C(np.array(4, I64)), C(window)], {"onesided": 0}, tol=tol)
    g.case("complex", [X(g.data((2, 20, 2), F32)), C(np.array(3, I64)), None, C(np.array(6, I64))],
           {"onesided": 0}, tol=tol)


@spec("Col2Im")
def _col2im(g: Gen) -> None:
    g.case("2d", [X(g.data((1, 2 * 4, 12), F32)), P(np.array([4, 5], I64)), P(np.array([2, 2], I64))])
    g.case("2d/strides,pads,dilations", [X(g.data((2, 3 * 4, 6), F32)), P(np.array([5, 6], I64)),
                                         P(np.array([2, 2], I64))],
           {"strides": [2, 2], "pads": [1, 0, 1, 1], "dilations": [2, 1]})
    g.case("3d", [X(g.data((1, 8, 8), F32)), C(np.array([3, 3, 3], I64)), C(np.array([2, 2, 2], I64))])


@spec("Upsample")
def _upsample(g: Gen) -> None:
    x = g.data((1, 2, 3, 4), F32)
    for mode in ("nearest", "linear"):
        g.case(f"{mode}", [X(x), P(np.array([1, 1, 2, 1.5], F32))], {"mode": mode}, opset=9)
    g.case("opset7", [X(x)], {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 3.0]}, opset=7)


# =========================================================================== the specs: convolutions and matmuls


def _qweights(g: Gen, shape: Sequence[int]) -> np.ndarray:
    """int8 weights in [-64, 63]: onnxruntime's u8 x s8 kernels on CPUs without VNNI (vpmaddubsw) saturate int16
    pair sums with full-range weights and are then off by many steps; with 7-bit weights they are exact."""
    return g.data(shape, I8, -64, 63)


@spec("Conv")
def _conv(g: Gen) -> None:
    for dt in types("Conv"):
        x, w, b = g.data((1, 4, 7, 6), dt), g.data((6, 4, 3, 3), dt), g.data((6,), dt)
        g.case(f"{_name(dt)}/3x3", [X(x), C(w), C(b)], {"pads": [1, 1, 1, 1]})
    x = g.data((2, 4, 7, 6), F32)
    for attrs, wshape in (({}, (3, 4, 1, 1)), ({"strides": [2, 1], "pads": [1, 0, 2, 1]}, (3, 4, 3, 2)),
                          ({"dilations": [2, 2]}, (5, 4, 2, 2)), ({"group": 2}, (4, 2, 3, 3)),
                          ({"group": 4, "pads": [1, 1, 1, 1]}, (8, 1, 3, 3)), ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 4, 3, 3)),
                          ({"auto_pad": "SAME_LOWER"}, (3, 4, 2, 2)), ({"auto_pad": "VALID", "strides": [1, 2]}, (3, 4, 3, 3))):
        label = ",".join(f"{k}={v}" for k, v in attrs.items()) or "1x1"
        g.case(label, [X(x), C(g.data(wshape, F32))], attrs)
    g.case("runtime-weights", [X(x), X(g.data((3, 4, 3, 3), F32)), X(g.data((3,), F32))])
    g.case("1d", [X(g.data((1, 3, 9), F32)), C(g.data((2, 3, 3), F32)), C(g.data((2,), F32))], {"strides": [2]})
    g.case("3d", [X(g.data((1, 2, 4, 5, 3), F32)), C(g.data((2, 2, 2, 3, 2), F32))], {"pads": [0, 1, 1, 1, 0, 0]})
    g.case("nan", [X(g.special(g.data((1, 2, 5, 5), F32))), C(g.data((2, 2, 3, 3), F32))])


@spec("ConvTranspose")
def _conv_transpose(g: Gen) -> None:
    x = g.data((1, 4, 4, 3), F32)
    for attrs, wshape in (({}, (4, 2, 3, 3)), ({"strides": [2, 2]}, (4, 3, 3, 3)),
                          ({"strides": [2, 1], "pads": [1, 0, 1, 1], "output_padding": [1, 0]}, (4, 2, 3, 2)),
                          ({"group": 2}, (4, 1, 2, 2)), ({"dilations": [2, 1]}, (4, 2, 2, 2)),
                          ({"strides": [2, 2], "output_shape": [9, 7]}, (4, 2, 3, 3)),
                          ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (4, 2, 3, 3))):
        label = ",".join(f"{k}={v}" for k, v in attrs.items()) or "default"
        g.case(label, [X(x), C(g.data(wshape, F32))], attrs)
    g.case("bias", [X(x), C(g.data((4, 3, 2, 2), F32)), C(g.data((3,), F32))])
    g.case("1d", [X(g.data((1, 2, 5), F32)), C(g.data((2, 3, 3), F32))], {"strides": [3]})


@spec("ConvInteger")
def _conv_integer(g: Gen) -> None:
    x = g.data((1, 3, 5, 5), U8, 0, 255)
    w = _qweights(g, (2, 3, 3, 3)).astype(U8) + 64  # uint8 weights too, around a zero point of 64
    g.case("u8", [X(x), C(w)])
    g.case("u8/zp", [X(x), C(w), C(np.array(7, U8)), C(np.array(64, U8))], {"pads": [1, 1, 1, 1]})
    g.case("i8", [X(g.data((1, 3, 5, 5), I8, -128, 127)), C(_qweights(g, (2, 3, 3, 3)))])


@spec("QLinearConv")
def _qlinear_conv(g: Gen) -> None:
    for xt in (U8, I8):
        x = g.data((1, 4, 6, 6), xt, -128, 255)
        w = _qweights(g, (3, 4, 3, 3))
        xz = np.array(100 if xt == U8 else -5, xt)
        yz = np.array(128 if xt == U8 else 3, xt)
        ins = [X(x), C(np.array(0.05, F32)), C(xz), C(w), C(np.array(0.02, F32)), C(np.array(0, I8)),
               C(np.array(0.1, F32)), C(yz)]
        g.case(f"{_name(xt)}/per-tensor", ins, {"pads": [1, 1, 1, 1]})
        per_axis = list(ins)
        per_axis[4], per_axis[5] = C(g.data((3,), F32, 0.01, 0.05)), C(np.zeros(3, I8))
        g.case(f"{_name(xt)}/per-axis", per_axis + [C(g.data((3,), I32, -500, 500))], {"strides": [2, 2]})


@spec("MatMul")
def _matmul(g: Gen) -> None:
    for dt in types("MatMul"):
        g.case(f"{_name(dt)}/2d", [X(g.data((3, 4), dt)), X(g.data((4, 5), dt))])
    for sa, sb in (((2, 3, 4), (4, 5)), ((4,), (4, 3)), ((3, 4), (4,)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4,)),
                   ((1, 3, 4), (2, 4, 3))):
        g.case(f"{list(sa)}@{list(sb)}", [X(g.data(sa, F32)), P(g.data(sb, F32))])


@spec("MatMulInteger")
def _matmul_integer(g: Gen) -> None:
    a = g.data((3, 4), U8, 0, 255)
    b = _qweights(g, (4, 5))
    g.case("u8s8", [X(a), C(b)])
    g.case("u8s8/zp", [X(a), C(b), C(np.array(12, U8)), C(np.array(3, I8))])
    g.case("u8u8/per-column-zp", [X(a), X(g.data((4, 5), U8, 0, 255)), C(np.array(12, U8)), C(g.data((5,), U8, 0, 255))])
    g.case("s8s8/batched", [X(g.data((2, 3, 4), I8, -128, 127)), C(g.data((4, 2), I8, -128, 127))])


@spec("QLinearMatMul")
def _qlinear_matmul(g: Gen) -> None:
    for at in (U8, I8):
        a = g.data((2, 3, 4), at, -128, 255)
        ins = [X(a), C(np.array(0.05, F32)), C(np.array(7 if at == U8 else -3, at)), C(_qweights(g, (4, 5))),
               C(np.array(0.02, F32)), C(np.array(0, I8)), C(np.array(0.1, F32)), C(np.array(9 if at == U8 else 2, at))]
        g.case(f"{_name(at)}", ins)


@spec("Gemm")
def _gemm(g: Gen) -> None:
    for dt in types("Gemm"):
        if np.dtype(dt).kind != "f":
            continue
        g.case(f"{_name(dt)}", [X(g.data((3, 4), dt)), C(g.data((4, 5), dt)), C(g.data((5,), dt))])
    a, bt = g.data((4, 3), F32), g.data((5, 4), F32)
    for attrs in ({"transA": 1, "transB": 1}, {"alpha": 0.5, "beta": 2.0, "transA": 1, "transB": 1},
                  {"transA": 1, "transB": 1, "beta": _NAN}):
        g.case(",".join(f"{k}={v}" for k, v in attrs.items()), [X(a), P(bt), P(g.data((3, 1), F32))], attrs)
    g.case("no-c", [X(a), C(bt)], {"transA": 1, "transB": 1})
    g.case("c-scalar", [X(g.data((3, 4), F32)), X(g.data((4, 2), F32)), X(np.array(1.5, F32))])


@spec("Einsum")
def _einsum(g: Gen) -> None:
    for eq, shapes in (("ij,jk->ik", [(2, 3), (3, 4)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 4)]), ("ij->ji", [(2, 3)]),
                       ("ii->i", [(3, 3)]), ("ij->", [(2, 3)]), ("i,i->", [(4,), (4,)]), ("i,j->ij", [(2,), (3,)]),
                       ("...ij,...jk->...ik", [(2, 2, 3), (3, 2)]), ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)])):
        g.case(eq, [X(g.data(s, F32)) for s in shapes], {"equation": eq})


# =========================================================================== the specs: pools


@spec("MaxPool", "AveragePool")
def _pool(g: Gen) -> None:
    avg = g.op == "AveragePool"
    x = g.data((1, 2, 7, 6), F32)
    for attrs in ({"kernel_shape": [2, 2]}, {"kernel_shape": [3, 3], "strides": [2, 2]},
                  {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1]}, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
                  {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
                  {"kernel_shape": [3, 3], "auto_pad": "SAME_LOWER"}, {"kernel_shape": [2, 3], "dilations": [2, 1]}):
        label = ",".join(f"{k}={v}" for k, v in attrs.items())
        if avg and "dilations" in attrs:
            continue
        g.case(label, [X(x)], attrs, specials="pads" in attrs)
        if avg and "pads" in attrs or "ceil_mode" in attrs and avg:
            g.case(label + ",count_include_pad", [X(x)], {**attrs, "count_include_pad": 1})
    g.case("1d", [X(g.data((1, 3, 9), F32))], {"kernel_shape": [3], "strides": [2]})
    g.case("3d", [X(g.data((1, 1, 4, 5, 4), F32))], {"kernel_shape": [2, 2, 2]})
    if avg:
        g.case("f64", [X(g.data((1, 1, 4, 4), F64))], {"kernel_shape": [2, 2]})
        return
    for dt in (I8, U8, F64):
        g.case(f"{_name(dt)}", [X(g.data((1, 2, 5, 5), dt, -100, 100))], {"kernel_shape": [2, 2]})
    for order in (0, 1):
        g.case(f"indices/storage_order={order}", [X(x)], {"kernel_shape": [2, 2], "strides": [2, 1], "storage_order": order},
               outputs=2)
    g.case("indices/pads", [X(x)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, outputs=2)


@spec("LpPool")
def _lp_pool(g: Gen) -> None:
    x = g.data((1, 2, 6, 5), F32)
    for p in (1, 2, 3):
        g.case(f"p={p}", [X(x)], {"kernel_shape": [2, 2], "p": p})
    g.case("pads,strides", [X(x)], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    g.case("1d", [X(g.data((1, 2, 7), F32))], {"kernel_shape": [3], "p": 2})


@spec("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(g: Gen) -> None:
    for shape in ((1, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 4), (2, 3)):
        for dt in types(g.op):
            # GlobalLpPool: onnxruntime implements opset 2's
            g.case(f"{_name(dt)}/{list(shape)}", [X(g.data(shape, dt))], specials=len(shape) == 4 and dt == F32,
                   opset=2 if g.op == "GlobalLpPool" else None)
    if g.op == "GlobalLpPool":
        for p in (1, 3):
            g.case(f"p={p}", [X(g.data((1, 2, 3, 3), F32))], {"p": p}, opset=2)


@spec("MaxUnpool")
def _max_unpool(g: Gen) -> None:
    for kernel, strides, pads, out in (([2, 2], [2, 2], None, None), ([2, 2], [2, 2], None, [7, 6]),
                                       ([3, 3], [2, 2], [1, 1, 1, 1], None), ([2, 2], [1, 1], None, None),
                                       ([3, 2], [3, 2], None, None), ([2, 2], [2, 2], [1, 0, 0, 1], None),
                                       ([3, 3], [3, 3], None, [7, 8]), ([2, 3], [2, 1], [0, 1, 1, 0], None),
                                       ([2, 2], [1, 1], None, [8, 7])):
        h, w = 6, 6
        oh = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1 if pads else (h - kernel[0]) // strides[0] + 1
        ow = (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1 if pads else (w - kernel[1]) // strides[1] + 1
        dh = (oh - 1) * strides[0] + kernel[0] - (pads[0] + pads[2] if pads else 0)
        dw = (ow - 1) * strides[1] + kernel[1] - (pads[1] + pads[3] if pads else 0)
        size = [dh, dw] if out is None else out
        x = g.data((1, 2, oh, ow), F32)
        # each channel's indices: distinct flat positions in that channel's plane of the output
        plane = size[0] * size[1]
        idx = np.stack([g.rng.choice(plane, oh * ow, replace=False) + c * plane for c in range(2)])
        idx = idx.reshape(1, 2, oh, ow).astype(I64)
        attrs = {"kernel_shape": kernel, "strides": strides, **({"pads": pads} if pads else {})}
        ins = [X(x), X(idx)] + ([P(np.array([1, 2, *out], I64))] if out else [])
        g.case(f"k={kernel},s={strides},p={pads},out={out}", ins, attrs)


# =========================================================================== the specs: normalisations


@spec("BatchNormalization")
def _batch_norm(g: Gen) -> None:
    x = g.data((2, 3, 4, 2), F32)
    s, b, m, v = g.data((3,), F32), g.data((3,), F32), g.data((3,), F32), g.data((3,), F32, 0.1, 2)
    for eps in (1e-5, 0.5, _NAN, 0.0):
        for opset in (9, 14, 15):
            g.case(f"eps={eps}", [X(x), P(s), P(b), P(m), P(v)], {"epsilon": eps}, opset=opset, specials=eps == 1e-5)
    g.case("2d", [X(g.data((4, 3), F32)), C(s), C(b), C(m), C(v)])
    g.case("f64", [X(g.data((2, 3, 2), F64)), C(s.astype(F64)), C(b.astype(F64)), C(m.astype(F64)), C(v.astype(F64))])
    g.case("zero-variance", [X(x), C(s), C(b), C(m), C(np.zeros(3, F32))], {"epsilon": 0.0})


@spec("LayerNormalization")
def _layer_norm(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for axis in (-1, 1, 0, -2):
        shape = x.shape[axis % 3:]
        g.case(f"axis={axis}", [X(x), P(g.data(shape, F32)), P(g.data(shape, F32))], {"axis": axis})
    g.case("no-bias", [X(x), C(g.data((4,), F32))], {"epsilon": 0.1})
    g.case("mean,invstd", [X(x), C(g.data((4,), F32)), C(g.data((4,), F32))], outputs=3)
    g.case("eps=nan", [X(x), C(g.data((4,), F32))], {"epsilon": _NAN})
    g.case("f64", [X(g.data((2, 5), F64)), C(g.data((5,), F64))])
    g.case("nan", [X(g.special(x)), C(g.data((4,), F32))])


@spec("InstanceNormalization")
def _instance_norm(g: Gen) -> None:
    for shape in ((2, 3, 4, 5), (1, 2, 6)):
        c = shape[1]
        g.case(f"{list(shape)}", [X(g.data(shape, F32)), P(g.data((c,), F32)), P(g.data((c,), F32))])
    g.case("eps", [X(g.data((1, 2, 3, 3), F32)), C(np.ones(2, F32)), C(np.zeros(2, F32))], {"epsilon": 0.5})


@spec("GroupNormalization")
def _group_norm(g: Gen) -> None:
    x = g.data((2, 4, 3, 2), F32)
    for groups in (1, 2, 4):
        g.case(f"groups={groups}", [X(x), P(g.data((4,), F32)), P(g.data((4,), F32))], {"num_groups": groups}, opset=21)
    g.case("opset18", [X(x), C(g.data((2,), F32)), C(g.data((2,), F32))], {"num_groups": 2}, opset=18)
    g.case("eps", [X(g.data((1, 6, 4), F32)), C(g.data((6,), F32)), C(g.data((6,), F32))], {"num_groups": 3, "epsilon": 0.2},
           opset=21)


@spec("LRN")
def _lrn(g: Gen) -> None:
    x = g.data((1, 5, 3, 3), F32)
    for attrs in ({"size": 3}, {"size": 2, "alpha": 0.01, "beta": 0.5, "bias": 2.0}, {"size": 5}):
        g.case(",".join(f"{k}={v}" for k, v in attrs.items()), [X(x)], attrs)


@spec("MeanVarianceNormalization")
def _mvn(g: Gen) -> None:
    x = g.data((2, 3, 4, 2), F32)
    for axes in (None, [1], [0, 1, 2, 3], [2, 3]):
        g.case(f"axes={axes}", [X(x)], {"axes": axes} if axes else {})


@spec("RMSNormalization")
def _rms_norm(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for axis in (-1, 1):
        g.case(f"axis={axis}", [X(x), P(g.data(x.shape[axis % 3:], F32))], {"axis": axis})
    g.case("eps", [X(x), C(g.data((4,), F32))], {"epsilon": 0.3})


@spec("LpNormalization")
def _lp_norm(g: Gen) -> None:
    x = g.data((2, 3, 4), F32)
    for p, axis in ((2, -1), (1, 1), (2, 0)):
        g.case(f"p={p},axis={axis}", [X(x)], {"p": p, "axis": axis})
    g.case("zeros", [X(np.zeros((2, 3), F32))], {"p": 2, "axis": 1})


# =========================================================================== the specs: quantization


@spec("QuantizeLinear")
def _quantize(g: Gen) -> None:
    x = g.data((1, 3, 4, 4), F32, -100, 100)
    for opset in (10, 13, 19, 21):
        for out in (U8, I8):
            zp = np.array(128 if out == U8 else -3, out)
            g.case(f"{_name(out)}/scalar", [X(x), P(np.array(0.5, F32)), P(zp)], opset=opset)
            g.case(f"{_name(out)}/shape[1]", [X(x), P(np.array([0.5], F32)), P(zp.reshape(1))], opset=opset)
            g.case(f"{_name(out)}/no-zp", [X(x), P(np.array(0.7, F32))], opset=opset)
            if opset >= 13:
                g.case(f"{_name(out)}/per-axis", [X(x), P(g.data((3,), F32, 0.2, 2)), P(g.data((3,), out, 0, 20))],
                       opset=opset)
                g.case(f"{_name(out)}/per-axis,axis=-1", [X(x), P(g.data((4,), F32, 0.2, 2)), P(g.data((4,), out, 0, 20))],
                       {"axis": -1}, opset=opset)
    g.case("nan", [X(g.special(x)), C(np.array(0.5, F32)), C(np.array(10, U8))], opset=13)
    g.case("i32-input", [X(g.data((3, 4), I32, -1000, 1000)), C(np.array(4.0, F32)), C(np.array(0, I8))], opset=13)
    g.case("blocked", [X(g.data((2, 6), F32, -50, 50)), C(g.data((2, 3), F32, 0.2, 2)), C(g.data((2, 3), I8, -5, 5))],
           {"axis": 1, "block_size": 2}, opset=21)
    g.case("u16", [X(x), C(np.array(0.01, F32)), C(np.array(30000, np.uint16))], opset=21)


@spec("DequantizeLinear")
def _dequantize(g: Gen) -> None:
    for opset in (10, 13, 19, 21):
        for xt in (U8, I8, I32):
            x = g.data((1, 3, 4, 4), xt, -1000, 1000)
            zp = np.array(9, xt)
            g.case(f"{_name(xt)}/scalar", [X(x), P(np.array(0.5, F32)), P(zp)], opset=opset)
            g.case(f"{_name(xt)}/shape[1]", [X(x), P(np.array([0.5], F32)), P(zp.reshape(1))], opset=opset)
            g.case(f"{_name(xt)}/no-zp", [X(x), P(np.array(0.25, F32))], opset=opset)
            if opset >= 13:
                g.case(f"{_name(xt)}/per-axis", [X(x), P(g.data((3,), F32, 0.1, 1)), P(g.data((3,), xt, 0, 20))],
                       opset=opset)
    g.case("blocked", [X(g.data((2, 6), I8, -100, 100)), C(g.data((2, 3), F32, 0.2, 2)), C(g.data((2, 3), I8, -5, 5))],
           {"axis": 1, "block_size": 2}, opset=21)


@spec("DynamicQuantizeLinear")
def _dynamic_quantize(g: Gen) -> None:
    for lo, hi in ((-3, 3), (0.5, 4), (-6, -1)):
        g.case(f"[{lo},{hi}]", [X(g.data((3, 4), F32, lo, hi))], outputs=3)
    g.case("zeros", [X(np.zeros((2, 2), F32))], outputs=3)


# =========================================================================== the specs: images


@spec("Resize")
def _resize(g: Gen) -> None:
    x = g.data((1, 2, 4, 5), F32)
    empty = np.zeros((0,), F32)
    scales = np.array([1, 1, 1.5, 0.6], F32)
    sizes = np.array([1, 2, 3, 7], I64)
    for mode in ("nearest", "linear", "cubic"):
        for ctm in ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric"):
            g.case(f"{mode}/{ctm}/scales", [X(x), None, P(scales)], {"mode": mode, "coordinate_transformation_mode": ctm})
            g.case(f"{mode}/{ctm}/sizes", [X(x), None, None, P(sizes)], {"mode": mode, "coordinate_transformation_mode": ctm})
        roi = np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 0.7], F32)
        g.case(f"{mode}/tf_crop_and_resize", [X(x), P(roi), None, C(sizes)],
               {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": -2.0})
        g.case(f"{mode}/tf_crop_and_resize/outside", [X(x), P(np.array([0, 0, -0.3, 0.4, 1, 1, 1.2, 1.5], F32)), None,
                                                     C(sizes)],
               {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize"})
        g.case(f"{mode}/opset11-empty-roi", [X(x), C(empty), P(scales)], {"mode": mode}, opset=11)
    crop = {"coordinate_transformation_mode": "tf_crop_and_resize"}
    roi = np.array([0, 0, 0.1, 0.3, 1, 1, 0.8, 0.9], F32)
    for mode in ("nearest", "linear"):
        g.case(f"{mode}/tf_crop_and_resize/scales", [X(x), P(roi), P(np.array([1, 1, 1.5, 0.8], F32))],
               {"mode": mode, **crop})
        g.case(f"{mode}/tf_crop_and_resize/axes", [X(x), P(np.array([0.2, 0.1, 0.9, 0.7], F32)), None,
                                                   P(np.array([3, 6], I64))], {"mode": mode, "axes": [2, 3], **crop})
        for opset in (11, 13):
            g.case(f"{mode}/tf_crop_and_resize", [X(x), P(roi), C(empty), C(np.array([1, 2, 5, 3], I64))],
                   {"mode": mode, **crop}, opset=opset)
    for nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        g.case(f"nearest/{nm}", [X(x), None, C(np.array([1, 1, 1.7, 2.3], F32))], {"mode": "nearest", "nearest_mode": nm})
    g.case("cubic/a=-0.5,exclude", [X(x), None, C(scales)], {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1})
    for policy in ("not_larger", "not_smaller"):
        g.case(f"linear/{policy}", [X(x), None, None, P(np.array([3, 8], I64))],
               {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": policy})
    g.case("linear/axes", [X(x), None, P(np.array([2.0, 0.5], F32))], {"mode": "linear", "axes": [-1, 2]})
    g.case("opset10", [X(x), C(np.array([1, 1, 2, 2], F32))], {"mode": "nearest"}, opset=10)
    g.case("u8/nearest", [X(g.data((1, 1, 3, 3), U8, 0, 255)), None, C(np.array([1, 1, 2, 2], F32))], {"mode": "nearest"})


@spec("GridSample")
def _grid_sample(g: Gen) -> None:
    x = g.data((1, 2, 4, 5), F32)
    grid = g.data((1, 3, 2, 2), F32, -1.3, 1.3)
    for mode in ("linear", "nearest", "cubic"):
        for pad in ("zeros", "border", "reflection"):
            for align in (0, 1):
                g.case(f"{mode}/{pad}/align={align}", [X(x), P(grid)],
                       {"mode": mode, "padding_mode": pad, "align_corners": align})
    g.case("opset16/bilinear", [X(x), X(grid)], {"mode": "bilinear"}, opset=16)
    g.case("3d", [X(g.data((1, 1, 3, 4, 3), F32)), X(g.data((1, 2, 2, 2, 3), F32, -1, 1))], {"mode": "linear"})


@spec("AffineGrid")
def _affine_grid(g: Gen) -> None:
    for align in (0, 1):
        g.case(f"2d/align={align}", [X(g.data((2, 2, 3), F32)), C(np.array([2, 3, 4, 5], I64))], {"align_corners": align})
        g.case(f"3d/align={align}", [X(g.data((1, 3, 4), F32)), C(np.array([1, 1, 2, 3, 2], I64))], {"align_corners": align})


# =========================================================================== the specs: attention, recurrences, control flow


@spec("Attention")
def _attention(g: Gen) -> None:
    q, k, v = g.data((1, 2, 3, 4), F32), g.data((1, 2, 5, 4), F32), g.data((1, 2, 5, 4), F32)
    g.case("4d", [X(q), X(k), X(v)])
    g.case("4d/causal", [X(q), X(k), X(v)], {"is_causal": 1})
    g.case("4d/scale,softcap", [X(q), X(k), X(v)], {"scale": 0.3, "softcap": 2.0})
    g.case("4d/bool-mask", [X(q), X(k), X(v), P(g.data((3, 5), BOOL))])
    g.case("4d/float-mask", [X(q), X(k), X(v), P(g.data((1, 1, 3, 5), F32))])
    g.case("gqa", [X(g.data((1, 4, 3, 4), F32)), X(k), X(v)])
    g.case("3d", [X(g.data((1, 3, 8), F32)), X(g.data((1, 5, 8), F32)), X(g.data((1, 5, 8), F32))],
           {"q_num_heads": 2, "kv_num_heads": 2})
    g.case("past", [X(q), X(g.data((1, 2, 2, 4), F32)), X(g.data((1, 2, 2, 4), F32)), None,
                    X(g.data((1, 2, 3, 4), F32)), X(g.data((1, 2, 3, 4), F32))], outputs=3)


@spec("RotaryEmbedding")
def _rotary(g: Gen) -> None:
    x = g.data((1, 2, 3, 4), F32)
    cos, sin = g.data((5, 2), F32), g.data((5, 2), F32)
    for inter in (0, 1):
        g.case(f"interleaved={inter}", [X(x), P(cos), P(sin), P(np.array([[0, 3, 1]], I64))], {"interleaved": inter})
    g.case("no-positions", [X(x), X(g.data((1, 3, 2), F32)), X(g.data((1, 3, 2), F32))])
    g.case("3d", [X(g.data((1, 3, 8), F32)), C(cos), C(sin), C(np.array([[1, 2, 4]], I64))], {"num_heads": 2})
    g.case("partial", [X(g.data((1, 2, 3, 6), F32)), C(cos), C(sin), C(np.array([[0, 1, 2]], I64))],
           {"rotary_embedding_dim": 4})


@spec("LSTM", "GRU", "RNN")
def _recurrent(g: Gen) -> None:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[g.op]
    s, b, i, h = 3, 2, 4, 3
    for dirs, direction in ((1, "forward"), (1, "reverse"), (2, "bidirectional")):
        w = g.data((dirs, gates * h, i), F32, -0.5, 0.5)
        r = g.data((dirs, gates * h, h), F32, -0.5, 0.5)
        bias = g.data((dirs, 2 * gates * h), F32, -0.5, 0.5)
        outs = 3 if g.op == "LSTM" else 2
        g.case(f"{direction}", [X(g.data((s, b, i), F32)), C(w), C(r), C(bias)], {"hidden_size": h, "direction": direction},
               outputs=outs)
        lens = np.array([s, 0], np.int32) if direction != "forward" else np.array([1, s], np.int32)
        g.case(f"{direction}-run-time-lens", [X(g.data((s, b, i), F32)), C(w), C(r), C(bias), X(lens)],
               {"hidden_size": h, "direction": direction}, outputs=outs)
    w = g.data((1, gates * h, i), F32, -0.5, 0.5)
    r = g.data((1, gates * h, h), F32, -0.5, 0.5)
    extra = {"linear_before_reset": 1} if g.op == "GRU" else {}
    g.case("initial-state", [X(g.data((s, b, i), F32)), C(w), C(r), None, None, X(g.data((1, b, h), F32))],
           {"hidden_size": h, **extra}, outputs=2)
    g.case("layout=1", [X(g.data((b, s, i), F32)), C(w), C(r)], {"hidden_size": h, "layout": 1}, outputs=2)
    g.case("clip", [X(g.data((s, b, i), F32)), C(w), C(r)], {"hidden_size": h, "clip": 0.3}, outputs=2)
    acts = {"LSTM": ["HardSigmoid", "Elu", "Softsign"], "GRU": ["LeakyRelu", "ScaledTanh"], "RNN": ["Affine"]}[g.op]
    g.case("activations", [X(g.data((s, b, i), F32)), C(w), C(r)],
           {"hidden_size": h, "activations": acts, "activation_alpha": [0.3, 0.6], "activation_beta": [0.2]}, outputs=2)
    if g.op == "LSTM":
        g.case("peepholes", [X(g.data((s, b, i), F32)), C(w), C(r), None, None, None, None,
                             C(g.data((1, 3 * h), F32, -0.5, 0.5))], {"hidden_size": h}, outputs=3)
        g.case("input_forget", [X(g.data((s, b, i), F32)), C(w), C(r)], {"hidden_size": h, "input_forget": 1},
               outputs=2)


@spec("LinearAttention")
def _linear_attention(g: Gen) -> None:
    # (onnxruntime has no kernel for it yet: these cases are skipped until it has one)
    hq, hk, dk, dv = 4, 2, 3, 5
    q, k, v = g.data((1, 4, hq * dk), F32), g.data((1, 4, hk * dk), F32, -1, 1), g.data((1, 4, hk * dv), F32)
    past = X(g.data((1, hk, dk, dv), F32))
    heads = {"q_num_heads": hq, "kv_num_heads": hk}
    gate, beta = X(g.data((1, 4, hk * dk), F32, -1, 0)), X(g.data((1, 4, hk), F32, 0, 1))
    g.case("linear", [X(q), X(k), X(v), past], {**heads, "update_rule": "linear"}, outputs=2)
    g.case("gated", [X(q), X(k), X(v), past, gate], {**heads, "update_rule": "gated"}, outputs=2)
    g.case("delta", [X(q), X(k), X(v), past, None, beta], {**heads, "update_rule": "delta"}, outputs=2)
    g.case("gated_delta", [X(q), X(k), X(v), past, gate, beta], {**heads, "update_rule": "gated_delta"}, outputs=2)


@spec("If")
def _if(g: Gen) -> None:
    def branch(name: str, op: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 3])
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [], [out])

    x = g.data((2, 3), F32)
    for cond in (True, False):
        node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg"))
        g.graph(f"cond={cond}", [node], {"c": X(np.array(cond)), "x": X(x)}, ["y"])


@spec("Loop")
def _loop(g: Gen) -> None:
    """A run-time trip count and condition, a carried value, scan outputs and an outer read."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT), helper.make_node("Mul", ["h", "x"], ["hx"]),
         helper.make_node("Add", ["hx", "fi"], ["h2"]), helper.make_node("ReduceSum", ["h2"], ["s"], keepdims=0),
         helper.make_node("Less", ["s", "limit"], ["c2"])],
        "body", [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []), vi("h", TensorProto.FLOAT, [2, 3])],
        [vi("c2", TensorProto.BOOL, []), vi("h2", TensorProto.FLOAT, [2, 3]), vi("s", TensorProto.FLOAT, [])])
    h, x = g.data((2, 3), F32), g.data((2, 3), F32, 0.5, 1.0)
    for m, limit in ((0, 1e9), (4, 1e9), (9, 3.0)):
        node = helper.make_node("Loop", ["m", "", "h0"], ["h_end", "sums"], body=body)
        g.graph(f"trip={m}/limit={limit:g}", [node], {"m": X(np.array(m, np.int64)), "h0": X(h), "x": X(x),
                                                        "limit": X(np.array(limit, np.float32))}, ["h_end", "sums"])
    node = helper.make_node("Loop", ["", "go", "h0"], ["h_end", "sums_unread"], body=body)
    g.graph("while", [node], {"go": X(np.array(True)), "h0": X(h), "x": X(x), "limit": X(np.array(3.0, np.float32))},
            ["h_end"])


@spec("Scan")
def _scan(g: Gen) -> None:
    """A running sum over the sequence, with scan axes and directions."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "xt"], ["acc2"]), helper.make_node("Mul", ["acc2", "xt"], ["y"])],
        "body", [vi("acc", TensorProto.FLOAT, [3]), vi("xt", TensorProto.FLOAT, [3])],
        [vi("acc2", TensorProto.FLOAT, [3]), vi("y", TensorProto.FLOAT, [3])])
    for axis, rev, out_axis, out_rev in ((0, 0, 0, 0), (1, 1, 0, 0), (0, 0, 1, 1)):
        x = g.data((4, 3) if axis == 0 else (3, 4), F32)
        node = helper.make_node("Scan", ["acc0", "x"], ["acc_end", "ys"], body=body, num_scan_inputs=1,
                                scan_input_axes=[axis], scan_input_directions=[rev], scan_output_axes=[out_axis],
                                scan_output_directions=[out_rev])
        g.graph(f"axis={axis}/reverse={rev}/out_axis={out_axis}/out_reverse={out_rev}", [node],
                {"acc0": X(g.data((3,), F32)), "x": X(x)}, ["acc_end", "ys"])


@spec("optional")
def _optional(g: Gen) -> None:
    """Optional, OptionalHasElement and OptionalGetElement, on optionals made in the graph and on plain tensors."""
    x = g.data((2, 3), F32)
    tensor_type = helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])
    present = helper.make_node("Optional", ["x"], ["o"])
    absent = helper.make_node("Optional", [], ["o"], type=tensor_type)
    g.graph("has/present", [present, helper.make_node("OptionalHasElement", ["o"], ["y"])], {"x": X(x)}, ["y"])
    g.graph("has/absent", [absent, helper.make_node("OptionalHasElement", ["o"], ["y"]),
                           helper.make_node("Identity", ["x"], ["z"])], {"x": X(x)}, ["y", "z"])
    g.graph("get", [present, helper.make_node("OptionalGetElement", ["o"], ["y"])], {"x": X(x)}, ["y"])
    g.graph("has/tensor", [helper.make_node("OptionalHasElement", ["x"], ["y"])], {"x": X(x)}, ["y"])
    g.graph("get/tensor", [helper.make_node("OptionalGetElement", ["x"], ["y"])], {"x": X(x)}, ["y"])
    g.graph("has/missing-input", [helper.make_node("OptionalHasElement", [""], ["y"]),
                                  helper.make_node("Identity", ["x"], ["z"])], {"x": X(x)}, ["y", "z"])


# =========================================================================== the specs: data-dependent shapes, detection, sequences


@spec("Unique")
def _unique(g: Gen) -> None:
    x = g.data((3, 4), F32, -2, 2).round()
    for sorted_ in (1, 0):
        g.case(f"flat/sorted={sorted_}", [X(x)], {"sorted": sorted_}, outputs=4)
        for axis in (0, 1, -1):
            xa = np.concatenate([x, x[:1]], 0) if axis == 0 else np.concatenate([x, x[:, :1]], 1)
            g.case(f"axis={axis}/sorted={sorted_}", [X(xa)], {"sorted": sorted_, "axis": axis}, outputs=4)
    g.case("one-output", [X(g.data((6,), I64, 0, 3))], outputs=1)
    g.case("i64/3d,axis=1", [X(np.array([[[1, 1], [0, 1], [1, 1]], [[2, 2], [0, 0], [2, 2]]], I64))], {"axis": 1},
           outputs=4)
    g.case("empty", [X(np.zeros((0,), F32))], outputs=4)
    # infinities and signed zeros (NaN is left out: onnxruntime orders elements with <, which NaN breaks)
    g.case("inf,-0", [X(np.array([1.0, -np.inf, 1.0, np.inf, -0.0, 0.0, np.inf], F32))], outputs=4)


def _boxes(g: Gen, n: int, center: bool = False) -> np.ndarray:
    """n boxes, several overlapping, as [y1, x1, y2, x2] (or [xc, yc, w, h] with ``center``)."""
    lo = g.data((n, 2), F32, 0, 6)
    size = g.data((n, 2), F32, 1, 4)
    if center:
        return np.concatenate([lo + size / 2, size], 1)[:, [1, 0, 3, 2]].astype(F32)
    corners = np.concatenate([lo, lo + size], 1)
    flip = g.rng.random(n) < 0.2  # some corners given in the other order
    corners[flip] = corners[flip][:, [2, 3, 0, 1]]
    return corners.astype(F32)


@spec("NonMaxSuppression")
def _nms(g: Gen) -> None:
    for batches, classes, n in ((1, 1, 6), (2, 3, 5)):
        boxes = np.stack([_boxes(g, n) for _ in range(batches)])
        scores = g.data((batches, classes, n), F32, 0, 1)
        base = f"b={batches},c={classes},n={n}"
        g.case(f"{base}/defaults", [X(boxes), X(scores)])
        for k, iou, st in ((3, 0.5, None), (2, 0.3, 0.4), (10, 0.0, 0.0), (0, 0.5, None), (4, 1.0, 0.9)):
            ins = [X(boxes), X(scores), P(np.array([k], I64)), P(np.array([iou], F32))]
            ins += [P(np.array([st], F32))] if st is not None else []
            g.case(f"{base}/k={k},iou={iou},score={st}", ins)
    boxes = _boxes(g, 6, center=True)[None]
    g.case("center_point_box", [X(boxes), X(g.data((1, 2, 6), F32, 0, 1)), C(np.array([3], I64)), C(np.array([0.4], F32))],
           {"center_point_box": 1})
    same = np.repeat(np.array([[[0, 0, 1, 1]]], F32), 4, 1)
    g.case("identical-boxes", [X(same), X(np.full((1, 1, 4), 0.5, F32)), C(np.array([3], I64)), C(np.array([0.5], F32))])


@spec("RoiAlign")
def _roi_align(g: Gen) -> None:
    x = g.data((2, 3, 6, 5), F32)
    rois = np.array([[0.5, 0.5, 3.5, 4.2], [1.0, 0.0, 4.0, 3.0], [0.0, 1.5, 2.0, 5.5]], F32)
    idx = np.array([0, 1, 1], I64)
    for mode in ("avg", "max"):
        for ctm in ("half_pixel", "output_half_pixel"):
            for ratio in (0, 2):
                g.case(f"{mode}/{ctm}/ratio={ratio}", [X(x), P(rois), P(idx)],
                       {"mode": mode, "coordinate_transformation_mode": ctm, "sampling_ratio": ratio,
                        "output_height": 2, "output_width": 3, "spatial_scale": 0.8}, opset=16)  # onnxruntime: 16
    g.case("opset10", [X(x), C(rois), C(idx)], {"output_height": 3, "output_width": 2}, opset=10)


@spec("MaxRoiPool")
def _max_roi_pool(g: Gen) -> None:
    x = g.data((2, 3, 6, 5), F32)
    rois = np.array([[0, 0.5, 0.5, 3.5, 4.2], [1, 1.0, 0.0, 4.0, 3.0], [1, 0.0, 1.0, 9.0, 9.0]], F32)
    for shape, scale in (([2, 2], 1.0), ([3, 1], 0.5), ([1, 1], 2.0)):
        g.case(f"pooled={shape},scale={scale}", [X(x), P(rois)], {"pooled_shape": shape, "spatial_scale": scale},
               opset=1)  # onnxruntime implements opset 1's


def _seq_graph(g: Gen, label: str, nodes: list[onnx.NodeProto], inputs: dict[str, In], outputs: Sequence[str]) -> None:
    g.graph(label, nodes, inputs, outputs, opset=17)


@spec("sequences")
def _sequences(g: Gen) -> None:
    """The sequence ops (SplitToSequence, ConcatFromSequence, SequenceConstruct/At/Insert/Erase/Length/Empty) inside
    graphs, and sequences as graph inputs and outputs."""
    x = g.data((6, 4), F32)
    n = helper.make_node
    _seq_graph(g, "split-concat", [n("SplitToSequence", ["x"], ["s"], axis=0), n("ConcatFromSequence", ["s"], ["y"], axis=0)],
               {"x": X(x)}, ["y"])
    _seq_graph(g, "split-sizes-concat-new-axis", [n("SplitToSequence", ["x", "sp"], ["s"], axis=1),
                                                  n("ConcatFromSequence", ["s"], ["y"], axis=0, new_axis=1)],
               {"x": X(x), "sp": C(np.array(2, I64))}, ["y"])
    _seq_graph(g, "split-list-keepdims=0", [n("SplitToSequence", ["x"], ["s"], axis=1, keepdims=0),
                                            n("ConcatFromSequence", ["s"], ["y"], axis=-1, new_axis=1)],
               {"x": X(x)}, ["y"])
    _seq_graph(g, "split-at", [n("SplitToSequence", ["x", "sp"], ["s"], axis=0), n("SequenceAt", ["s", "i"], ["y"])],
               {"x": X(x), "sp": C(np.array([1, 2, 3], I64)), "i": C(np.array(-1, I64))}, ["y"])
    _seq_graph(g, "construct-at-runtime-index", [n("SequenceConstruct", ["a", "b", "c"], ["s"]),
                                                 n("SequenceAt", ["s", "i"], ["y"])],
               {"a": X(x), "b": X(x * 2), "c": X(x - 1), "i": X(np.array(1, I64))}, ["y"])
    _seq_graph(g, "construct-insert-concat", [n("SequenceConstruct", ["a", "b"], ["s"]),
                                              n("SequenceInsert", ["s", "c", "i"], ["t"]),
                                              n("ConcatFromSequence", ["t"], ["y"], axis=1)],
               {"a": X(x), "b": X(x[:, :2].copy()), "c": X(x[:, :1].copy()), "i": C(np.array(1, I64))}, ["y"])
    _seq_graph(g, "construct-insert-end-erase", [n("SequenceConstruct", ["a", "b"], ["s"]), n("SequenceInsert", ["s", "c"], ["t"]),
                                                 n("SequenceErase", ["t", "i"], ["u"]),
                                                 n("ConcatFromSequence", ["u"], ["y"], axis=0)],
               {"a": X(x), "b": X(x + 1), "c": X(x[:2].copy()), "i": C(np.array(0, I64))}, ["y"])
    _seq_graph(g, "erase-last-length", [n("SequenceConstruct", ["a", "b", "c"], ["s"]), n("SequenceErase", ["s"], ["t"]),
                                        n("SequenceLength", ["t"], ["y"]), n("ConcatFromSequence", ["t"], ["z"], axis=0)],
               {"a": X(x), "b": X(x), "c": X(x)}, ["y", "z"])
    empty = n("SequenceEmpty", [], ["e"], dtype=TensorProto.FLOAT)
    _seq_graph(g, "empty-insert", [empty, n("SequenceInsert", ["e", "a"], ["s"]), n("SequenceInsert", ["s", "b"], ["t"]),
                                   n("ConcatFromSequence", ["t"], ["y"], axis=0)], {"a": X(x), "b": X(x)}, ["y"])
    _seq_graph(g, "sequence-output", [n("SplitToSequence", ["x"], ["s"], axis=0, keepdims=0)], {"x": X(x[:3].copy())}, ["s"])
    _seq_graph(g, "sequence-input-concat", [n("ConcatFromSequence", ["s"], ["y"], axis=1)],
               {"s": S(x, x[:, :1].copy(), x[:, :3].copy())}, ["y"])
    _seq_graph(g, "sequence-input-at-length", [n("SequenceAt", ["s", "i"], ["y"]), n("SequenceLength", ["s"], ["z"])],
               {"s": S(x, x[:3].copy()), "i": X(np.array(-1, I64))}, ["y", "z"])
    _seq_graph(g, "sequence-input-at-runtime-index", [n("SequenceAt", ["s", "i"], ["y"])],
               {"s": S(x, x + 1, x * 2), "i": X(np.array(-2, I64))}, ["y"])
    _seq_graph(g, "sequence-input-insert-output", [n("SequenceInsert", ["s", "a", "i"], ["y"])],
               {"s": S(x, x + 1), "a": X(x[:1].copy()), "i": C(np.array(0, I64))}, ["y"])
    _seq_graph(g, "sequence-input-empty", [n("SequenceLength", ["s"], ["y"])], {"s": S(dtype=F32)}, ["y"])


@spec("CausalConvWithState")
def _causal_conv(g: Gen) -> None:
    x, w = g.data((1, 3, 6), F32), g.data((3, 1, 3), F32)
    g.case("depthwise", [X(x), C(w), C(g.data((3,), F32)), X(g.data((1, 3, 2), F32))], {"group": 3}, outputs=2)


@spec("SwiGLU")
def _swiglu(g: Gen) -> None:
    g.case("default", [X(g.data((2, 8), F32))])


# =========================================================================== few-op graphs: what kiln's passes fuse


@spec("fusions")
def _fusions(g: Gen) -> None:
    """Few-op graphs of the shapes kiln's passes rewrite (conv epilogues, folded BatchNorm and pads,
    MatMul+Add, LayerNorm, Gelu and attention from their parts), compared end to end."""
    n = helper.make_node
    x = g.data((1, 8, 6, 5), F32)
    w, b = C(g.data((8, 8, 3, 3), F32, -0.3, 0.3)), C(g.data((8,), F32))
    conv = n("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])
    for act, extra, inits in (("Relu", {}, {}), ("LeakyRelu", {"alpha": 0.2}, {}), ("Sigmoid", {}, {}),
                              ("HardSigmoid", {}, {}), ("Clip", {}, {"lo": C(np.array(0, F32)), "hi": C(np.array(6, F32))}),
                              ("Clip", {}, {"lo": C(np.array(np.nan, F32)), "hi": C(np.array(1, F32))}), ("Tanh", {}, {})):
        ins = ["c", *inits]
        label = f"conv-{act}" + ("-nan" if any(np.isnan(v.array).any() for v in inits.values()) else "")
        g.graph(label, [conv, n(act, ins, ["y"], **extra)], {"x": X(x), "w": w, "b": b, **inits}, ["y"])
    g.graph("conv-nan-input-relu", [conv, n("Relu", ["c"], ["y"])], {"x": X(g.special(x)), "w": w, "b": b}, ["y"])
    g.graph("conv-silu", [conv, n("Sigmoid", ["c"], ["s"]), n("Mul", ["c", "s"], ["y"])], {"x": X(x), "w": w, "b": b}, ["y"])
    bn = [C(g.data((8,), F32)), C(g.data((8,), F32)), C(g.data((8,), F32)), C(g.data((8,), F32, 0.1, 1))]
    g.graph("conv-bn-relu", [conv, n("BatchNormalization", ["c", "s", "bb", "m", "v"], ["d"]), n("Relu", ["d"], ["y"])],
            {"x": X(x), "w": w, "b": b, **dict(zip(["s", "bb", "m", "v"], bn))}, ["y"])
    g.graph("conv-bn-nan-eps", [conv, n("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], epsilon=_NAN)],
            {"x": X(x), "w": w, "b": b, **dict(zip(["s", "bb", "m", "v"], bn))}, ["y"])
    g.graph("conv-add-relu", [conv, n("Add", ["c", "z"], ["d"]), n("Relu", ["d"], ["y"])],
            {"x": X(x), "w": w, "b": b, "z": X(g.data((1, 8, 6, 5), F32))}, ["y"])
    g.graph("conv-mul-const", [conv, n("Mul", ["c", "k"], ["y"])],
            {"x": X(x), "w": w, "b": b, "k": C(g.data((1, 8, 1, 1), F32))}, ["y"])
    g.graph("pad-conv", [n("Pad", ["x", "p"], ["xp"]), n("Conv", ["xp", "w", "b"], ["y"])],
            {"x": X(x), "p": C(np.array([0, 0, 1, 2, 0, 0, 1, 0], I64)), "w": w, "b": b}, ["y"])
    g.graph("pad-maxpool", [n("Pad", ["x", "p"], ["xp"]), n("MaxPool", ["xp"], ["y"], kernel_shape=[3, 3])],
            {"x": X(x), "p": C(np.array([0, 0, 1, 1, 0, 0, 1, 1], I64))}, ["y"])
    g.graph("conv-maxpool-blocked", [conv, n("Relu", ["c"], ["r"]), n("MaxPool", ["r"], ["y"], kernel_shape=[2, 2],
                                                                         strides=[2, 2])],
            {"x": X(x), "w": w, "b": b}, ["y"])
    g.graph("gemm-relu", [n("Gemm", ["a", "gw", "gb"], ["c"], transB=1), n("Relu", ["c"], ["y"])],
            {"a": X(g.data((3, 16), F32)), "gw": C(g.data((8, 16), F32)), "gb": C(g.data((8,), F32))}, ["y"])
    g.graph("matmul-add", [n("MatMul", ["a", "mw"], ["c"]), n("Add", ["c", "mb"], ["y"])],
            {"a": X(g.data((2, 3, 16), F32)), "mw": C(g.data((16, 8), F32)), "mb": C(g.data((8,), F32))}, ["y"])
    h = g.data((2, 5, 8), F32)
    g.graph("layernorm-parts", [n("ReduceMean", ["h"], ["mu"], axes=[-1]), n("Sub", ["h", "mu"], ["d"]),
                                n("Mul", ["d", "d"], ["d2"]), n("ReduceMean", ["d2"], ["var"], axes=[-1]),
                                n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["d", "sd"], ["nrm"]),
                                n("Mul", ["nrm", "gam"], ["sc"]), n("Add", ["sc", "bet"], ["y"])],
            {"h": X(h), "eps": C(np.array(1e-5, F32)), "gam": C(g.data((8,), F32)), "bet": C(g.data((8,), F32))}, ["y"],
            opset=17)
    g.graph("gelu-parts", [n("Div", ["h", "r2"], ["q"]), n("Erf", ["q"], ["e"]), n("Add", ["e", "one"], ["e1"]),
                           n("Mul", ["h", "e1"], ["m"]), n("Mul", ["m", "half"], ["y"])],
            {"h": X(h), "r2": C(np.array(np.sqrt(2), F32)), "one": C(np.array(1, F32)), "half": C(np.array(0.5, F32))}, ["y"])
    q, k, v = g.data((1, 2, 4, 8), F32), g.data((1, 2, 8, 6), F32), g.data((1, 2, 6, 8), F32)
    g.graph("attention-parts", [n("MatMul", ["q", "kt"], ["s"]), n("Mul", ["s", "sc"], ["ss"]),
                                n("Add", ["ss", "mask"], ["sm"]), n("Softmax", ["sm"], ["p"], axis=-1),
                                n("MatMul", ["p", "v"], ["y"])],
            {"q": X(q), "kt": X(k), "v": X(v), "sc": C(np.array(0.35, F32)), "mask": X(g.data((1, 1, 4, 6), F32))}, ["y"])
    g.graph("transpose-pair", [n("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]), n("Transpose", ["t"], ["y"], perm=[0, 3, 1, 2])],
            {"x": X(x)}, ["y"])
    g.graph("shape-chain-reshape", [n("Shape", ["x"], ["s"]), n("Gather", ["s", "i"], ["d"], axis=0),
                                    n("Unsqueeze", ["d", "ax"], ["d1"]), n("Concat", ["d1", "m1"], ["shape"], axis=0),
                                    n("Reshape", ["x", "shape"], ["y"])],
            {"x": X(x), "i": C(np.array(1, I64)), "ax": C(np.array([0], I64)), "m1": C(np.array([-1], I64))}, ["y"])


# =========================================================================== the sweep


def lowered_ops() -> list[str]:
    """The ops of kiln's lowering table outside kiln's own domain (kiln's fused ops come from its passes)."""
    from kiln.codegen.lowering import LOWERINGS

    return sorted(f"{d}::{o}" if d else o for d, o in LOWERINGS if d != "kiln")


def ops_in(cases: Sequence[Case]) -> set[str]:
    """The ops the nodes of ``cases`` use (subgraphs left out)."""
    return {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for c in cases for n in c.nodes}


def all_cases(ops: Sequence[str] | None = None) -> list[Case]:
    """Every case of the specs (of ``ops`` only, when given), in a fixed order."""
    out: list[Case] = []
    seen: set[str] = set()
    for op, fn in SPECS.items():
        if ops is not None and op not in ops:
            continue
        g = Gen(op)
        fn(g)
        for c in g.cases:
            if c.name in seen:
                raise ValueError(f"two cases are named {c.name}")
            seen.add(c.name)
            out.append(c)
    return out


def sample(seed: int = 0, per_op: int = 1) -> list[Case]:
    """A seeded sample: ``per_op`` cases of each spec (the seed picks which)."""
    by_op: dict[str, list[Case]] = defaultdict(list)
    for c in all_cases():
        by_op[c.op].append(c)
    rng = np.random.default_rng(seed)
    out = []
    for op in sorted(by_op):
        cases = by_op[op]
        out += [cases[i] for i in sorted(rng.choice(len(cases), min(per_op, len(cases)), replace=False))]
    return out


def _quiet() -> None:
    """Worker processes: no warnings, and no native log lines (onnxruntime's, TVM's) on the terminal."""
    import warnings

    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except ImportError:
        pass


def _worker(conn: Any) -> None:
    """A worker process: runs the cases it is sent, one at a time, until it is sent None."""
    _quiet()
    while True:
        case = conn.recv()
        if case is None:
            return
        try:
            result = run_case(case)
        except Exception as e:  # noqa: BLE001 - a failure of the harness around the case is reported as internal
            result = Result(case.name, case.op, "internal", f"{type(e).__name__}: {_first_line(e)}")
        conn.send(result)


def sweep(cases: Sequence[Case], jobs: int = 2, progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Run ``cases`` in ``jobs`` worker processes. A worker that dies (a segfault in native code) is
    replaced, and its case is tried once more alone; a second crash is the case's internal error."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    todo = list(reversed(cases))
    retry: list[Case] = []
    results: dict[str, Result] = {}
    workers: dict[Any, tuple[Any, Case | None]] = {}  # connection -> (process, its case)

    def start() -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        workers[parent] = (proc, None)

    def feed(conn: Any) -> None:
        proc, _ = workers[conn]
        if todo:
            case = todo.pop()
        elif retry and all(c is None for _, c in workers.values()):
            case = retry.pop()  # crashed cases run again with no other case beside them
        else:
            workers[conn] = (proc, None)
            return
        conn.send(case)
        workers[conn] = (proc, case)

    def record(r: Result) -> None:
        results[r.name] = r
        if progress:
            progress(r)

    for _ in range(max(1, min(jobs, len(cases)))):
        start()
    for conn in list(workers):
        feed(conn)
    retried: set[str] = set()
    while any(c is not None for _, c in workers.values()):
        for conn in wait([c for c, (_, case) in workers.items() if case is not None]):
            proc, case = workers[conn]
            try:
                record(conn.recv())
            except (EOFError, OSError):  # the worker died with the case
                proc.join()
                del workers[conn]
                if case.name in retried:
                    record(Result(case.name, case.op, "internal",
                                  f"the worker process crashed (exit code {proc.exitcode}: a fault in native code)"))
                else:
                    retried.add(case.name)
                    retry.append(case)
                start()
                for c in [c for c, (_, k) in workers.items() if k is None]:
                    feed(c)
                continue
            feed(conn)
        for conn in [c for c, (_, k) in workers.items() if k is None]:
            feed(conn)
    for conn, (proc, _) in workers.items():
        conn.send(None)
        proc.join(timeout=10)
    return [results[c.name] for c in cases]


def report(results: Sequence[Result], seconds: float) -> str:
    """docs/conformance.md: the counts, the refusals by op and reason, and every case that is not a match."""
    import platform

    counts = Counter(r.outcome for r in results)
    by_op: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_op[r.op][r.outcome] += 1
    lines = [
        "# Conformance: kiln's compiled output against onnxruntime",
        "",
        "Written by `tools/conformance.py` (the full sweep: `.venv/bin/python tools/conformance.py`); do not edit by hand.",
        "The generator builds single-op graphs (and a few few-op graphs of the shapes kiln's passes fuse) over each",
        "op's attribute space, compiles each with `kiln.compile` (O3) and compares `kiln.runtime`'s outputs with",
        "onnxruntime's on the same inputs: exact for ints and bools, float32 rtol 1e-4 atol 1e-5, float64 rtol 1e-7",
        "atol 1e-9, NaN where onnxruntime has NaN (cases with another tolerance say why in the generator). Parameter",
        "inputs are tried as constants (`/c`) and as graph inputs read at run time (`/r`); `/nan` cases put NaN, +Inf",
        "and -Inf in the first input. float16 and bfloat16 are not covered. `tests/test_conformance.py` runs a seeded",
        "sample of one case per spec in `make test`.",
        "",
        f"Last full sweep: {len(results)} cases in {seconds / 60:.1f} min on {_cpu_model()} "
        f"(onnxruntime {metadata.version('onnxruntime')}, onnx {onnx.__version__}, Python {platform.python_version()}).",
        "",
        "| outcome | cases |",
        "|---|---|",
        *[f"| {o} | {counts.get(o, 0)} |" for o in OUTCOMES],
        "",
        "- **match**: kiln's outputs equal onnxruntime's (names, dtypes, shapes, values within tolerance).",
        "- **mismatch**: kiln compiled and ran and gave other numbers, shapes or dtypes (a silent wrong result).",
        "- **internal**: an error that is not kiln's one-line refusal (a Python or TVM exception, a crash).",
        "- **refused**: kiln declined with its one-line error; the reasons are below.",
        "- **skipped**: onnxruntime itself refused the graph (an op, opset or dtype it does not implement).",
        "",
        "## By op",
        "",
        "| op | cases | match | mismatch | internal | refused | skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in sorted(by_op):
        c = by_op[op]
        lines.append(f"| {op} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |")
    for title, outcome in (("Silent mismatches", "mismatch"), ("Internal errors", "internal")):
        bad = [r for r in results if r.outcome == outcome]
        lines += ["", f"## {title} ({len(bad)})", ""]
        lines += [f"- `{r.name}`: {r.detail}" for r in bad] or ["None."]
    lines += ["", "## Refusals by op", "", "Each reason once per op, with the number of cases it refused.", ""]
    refusals: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        if r.outcome == "refused":
            refusals[r.op][_generic(r.detail)] += 1
    for op in sorted(refusals):
        for reason, n in refusals[op].most_common():
            lines.append(f"- **{op}** ({n}): {reason}")
    if not refusals:
        lines.append("None.")
    lines += ["", "## Skipped (onnxruntime refused the graph), by op", ""]
    skips: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        if r.outcome == "skipped":
            skips[r.op][_generic(r.detail)] += 1
    for op in sorted(skips):
        lines.append(f"- **{op}** ({sum(skips[op].values())}): " + "; ".join(reason for reason, _ in skips[op].most_common(2)))
    missing = sorted(set(lowered_ops()) - ops_in(all_cases()))
    lines += ["", "## Ops kiln lowers without a spec here", "", ", ".join(missing) if missing else "None.", ""]
    return "\n".join(lines)


def _generic(detail: str) -> str:
    """A refusal or skip reason without the node's name, so that equal reasons group."""
    import re

    text = re.sub(r"node '?[^ ]*'? \(([A-Za-z]+)\)", r"node (\1)", detail)
    text = re.sub(r"\(nodes: [^)]*\)", "", text)
    text = re.sub(r"/onnxruntime_src/[^ ]* ", "", text)
    return text[:240]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    import platform

    return platform.processor() or "an unknown CPU"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the full sweep (writing docs/conformance.md), or some ops with their details."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", help="comma-separated specs to run (default: all, and docs/conformance.md is written)")
    ap.add_argument("--match", help="run only the cases whose name contains this text")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--list", action="store_true", help="list the case names and exit")
    ap.add_argument("--out", type=Path, default=None, help=f"where the report goes (default {DOC.relative_to(REPO)} "
                                                           "for a full sweep, none otherwise)")
    args = ap.parse_args(argv)
    ops = args.ops.split(",") if args.ops else None
    unknown = sorted(set(ops or ()) - set(SPECS))
    if unknown:
        print(f"no spec for {', '.join(unknown)}; specs: {', '.join(sorted(SPECS))}", file=sys.stderr)
        return 2
    cases = [c for c in all_cases(ops) if not args.match or args.match in c.name]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    t = time.perf_counter()
    done = Counter()

    def progress(r: Result) -> None:
        done[r.outcome] += 1
        if r.outcome in ("mismatch", "internal") or ops is not None and r.outcome == "refused":
            print(f"{r.outcome:8} {r.name}: {r.detail}", flush=True)
        n = sum(done.values())
        if n % 100 == 0:
            print(f"[{n}/{len(cases)}] " + ", ".join(f"{k} {v}" for k, v in done.most_common()), file=sys.stderr, flush=True)

    results = sweep(cases, args.jobs, progress)
    seconds = time.perf_counter() - t
    print(", ".join(f"{o} {done.get(o, 0)}" for o in OUTCOMES) + f"; {len(cases)} cases in {seconds:.0f} s")
    out = args.out or (DOC if ops is None and not args.match else None)
    if out is not None:
        out.write_text(report(results, seconds))
        print(f"wrote {out}")
    return 0 if done.get("mismatch", 0) == 0 and done.get("internal", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
