"""The ONNX backend node suite's cases and comparisons, shared by the evaluator, round-trip and
codegen suites (``test_node_suite.py``, ``test_node_suite_codegen.py``)."""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper



XFAIL_FILE = Path(__file__).with_name("node_suite_xfail.txt")
MODES = ("eval", "roundtrip")

#: float, int, uint and bool element types; everything else (strings, float8, int4, ...) is left out.
_FLOAT_CODES = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}
_INT_CODES = {
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}
SUPPORTED_CODES = _FLOAT_CODES | _INT_CODES | {TensorProto.BOOL}

#: Cases whose expected outputs are literals typed with 4 decimals (not computed): they differ from
#: the exact result (and from onnx's reference and onnxruntime, which agree with each other) by up
#: to 7e-5, a relative 3e-4. They are compared at the suite's own tolerance, rtol 1e-3.
FOUR_DECIMAL_LITERALS = {
    "test_averagepool_2d_ceil_last_window_starts_on_pad",
    "test_gridsample_bicubic",
    "test_roialign_aligned_false",
    "test_roialign_aligned_true",
}

#: Ops whose outputs are random draws. The spec does not make them reproducible across
#: implementations, even with a seed (the suite drew its expected values from numpy's global
#: generator; onnx's reference uses its own RandomState, unseeded unless ``seed`` is set). The
#: values of such a case are not comparable, so only shape, dtype and support are checked:
#: a strict xfail would pass by chance (about 0.4% per run for test_bernoulli).
RANDOM_OPS = {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}

#: How many cases the filter keeps with onnx 1.23.2 (1,665 of 1,884); a filter bug moves it out of range.
EXPECTED_CASES = (1620, 1710)


# =========================================================================== the cases


@dataclass(frozen=True, eq=False)
class NodeCase:
    name: str
    model_dir: str | None
    _model: onnx.ModelProto | None
    _data_sets: tuple | None

    @cached_property
    def model(self) -> onnx.ModelProto:
        if self._model is not None:
            return self._model
        return onnx.load(os.path.join(self.model_dir, "model.onnx"))

    @cached_property
    def model_bytes(self) -> bytes:
        return self.model.SerializeToString()

    @cached_property
    def is_random(self) -> bool:
        return not RANDOM_OPS.isdisjoint(_op_types(self.model.graph))

    @property
    def source(self) -> str | bytes:
        """What ``kiln.ir.load`` reads: the file when there is one, else the serialized model."""
        if self.model_dir is not None:
            return os.path.join(self.model_dir, "model.onnx")
        return self.model_bytes

    @cached_property
    def input_names(self) -> list[str]:
        inits = {t.name for t in self.model.graph.initializer}
        return [vi.name for vi in self.model.graph.input if vi.name not in inits]

    @cached_property
    def data_sets(self) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
        if self._data_sets is not None:
            return [([_array(x) for x in ins], [_array(x) for x in outs]) for ins, outs in self._data_sets]
        sets = []
        for d in sorted(glob.glob(os.path.join(self.model_dir, "test_data_set_*"))):
            ins = [_read_pb(p) for p in _numbered(d, "input")]
            outs = [_read_pb(p) for p in _numbered(d, "output")]
            sets.append((ins, outs))
        return sets

    def feeds(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        assert len(inputs) == len(self.input_names), f"{self.name}: data set does not match the model's inputs"
        return dict(zip(self.input_names, inputs))


def _numbered(d: str, kind: str) -> list[str]:
    paths = glob.glob(os.path.join(d, f"{kind}_*.pb"))
    return sorted(paths, key=lambda p: int(Path(p).stem.split("_")[-1]))


def _read_pb(path: str) -> np.ndarray:
    t = TensorProto()
    t.ParseFromString(Path(path).read_bytes())
    return numpy_helper.to_array(t)


def _array(x) -> np.ndarray:
    if isinstance(x, TensorProto):
        return numpy_helper.to_array(x)
    return np.asarray(x)


def _op_types(g: onnx.GraphProto):
    for n in g.node:
        yield n.op_type
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _op_types(a.g)
            for sg in a.graphs:
                yield from _op_types(sg)


def _plain_tensors_only(model: onnx.ModelProto) -> bool:
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.type.WhichOneof("value") != "tensor_type":
            return False
        if vi.type.tensor_type.elem_type not in SUPPORTED_CODES:
            return False
    return True


def _load_cases() -> list[NodeCase]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow on purpose while building data
        raw = load_model_tests(kind="node")
    cases = []
    for c in raw:
        model = c.model if c.model is not None else onnx.load(os.path.join(c.model_dir, "model.onnx"))
        if _plain_tensors_only(model):
            cases.append(NodeCase(c.name, c.model_dir, model, tuple(c.data_sets) if c.data_sets else None))
    return cases


CASES = _load_cases()
CASE_NAMES = [c.name for c in CASES]


# =========================================================================== the xfail list


@dataclass(frozen=True)
class Known:
    mode: str
    case: str
    reason: str
    line: int


def read_xfails(path: Path = XFAIL_FILE) -> list[Known]:
    """Parse ``<mode> <case>  # <reason>`` lines; ``#`` starts a comment line."""
    entries = []
    if not path.exists():
        return entries
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body, _, reason = line.partition("#")
        fields = body.split()
        entries.append(Known(fields[0] if fields else "", fields[1] if len(fields) > 1 else "", reason.strip(), i))
        if len(fields) != 2:
            entries[-1] = Known("<malformed>", line, reason.strip(), i)
    return entries


XFAILS = read_xfails()
_XFAIL_BY_KEY = {(k.mode, k.case): k.reason for k in XFAILS}


def xfail_reason(mode: str, case: str) -> str | None:
    """The listed reason a case is expected to fail in ``mode``, or None."""
    return _XFAIL_BY_KEY.get((mode, case))


def check_random_draw(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """A random op's output: same shape and dtype, and 0/1 where the expected draw is 0/1 (Bernoulli)."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    if np.isin(expected, [0, 1]).all():
        assert np.isin(got, [0, 1]).all(), f"{what}: a Bernoulli draw holds values other than 0 and 1"
    else:
        assert np.isfinite(got.astype(np.float64)).all(), f"{what}: the random draw is not finite"


def compare(got: np.ndarray, expected: np.ndarray, what: str, *, rtol: float, atol: float,
             narrow_rtol: float, narrow_atol: float, check_dtype: bool = True) -> None:
    got = np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    if check_dtype:
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    kind = expected.dtype
    if kind in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        np.testing.assert_allclose(
            got.astype(np.float32), expected.astype(np.float32), rtol=narrow_rtol, atol=narrow_atol,
            equal_nan=True, err_msg=what,
        )
    elif kind.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)
    else:  # ints, uints, bool: exact
        np.testing.assert_array_equal(got, expected, err_msg=what)


# =========================================================================== the tests


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
