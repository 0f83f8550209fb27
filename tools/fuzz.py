"""A fuzzing campaign for kiln: structure-aware mutations of ONNX models, run through import ->
passes -> compile -> run, and classified against onnxruntime.

    python tools/fuzz.py --cases 10000 [--seed 0] [--workers 2] [--timeout 120] [--report docs/reliability.md]

Seeds are small graphs of each op family (built here with onnx.helper), the bundled example,
and the light real models when they are in the model cache. Each case applies one to three
mutations to a seed: op types, attributes (values, NaN and Inf, missing and unknown ones),
dims, dtypes, initializers (shapes, payloads, dtypes), opsets, domains, input names (empty,
dangling, cyclic), outputs, and raw byte flips of the serialized model.

Every case runs in a worker process (so a crash is seen as a signal, and a hang as a timeout)
and gets one outcome:

- ``refused``: kiln refused it with a one-line error (a KilnError), as the CLI exits 2;
- ``match``: kiln and onnxruntime both ran it and agree;
- ``both refuse``: counted under refused, when onnxruntime refused it too;
- ``accepted, onnxruntime refuses``: kiln ran a model onnxruntime refuses (listed, with both reasons);
- ``mismatch``: both ran it and the outputs differ;
- ``internal``: kiln raised something other than a KilnError;
- ``crash``: the worker died of a signal; ``hang``: it passed the timeout.

The pytest sample (tests/test_fuzz.py) runs a few hundred seeded cases through the same code.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("refused", "match", "accepted, onnxruntime refuses", "mismatch", "internal", "crash", "hang")


# =========================================================================== seeds


def _f(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _c(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "seed", inputs, outputs, initializer=list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def seed_models() -> dict[str, onnx.ModelProto]:
    """The seeds: one small graph per op family, the bundled example, light models if cached."""
    r = np.random.default_rng(0)
    w = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    seeds = {
        "conv-bn-relu": _model(
            [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-5, name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")],
            [_f("x", [1, 3, 8, 8])], [_f("y", [1, 4, 8, 8])],
            [_c("w", w(4, 3, 3, 3)), _c("b", w(4)), _c("s", np.abs(w(4)) + 0.5), _c("bb", w(4)), _c("m", w(4)),
             _c("v", np.abs(w(4)) + 0.5)]),
        "pools": _model(
            [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="mp"),
             helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="ap"),
             helper.make_node("GlobalAveragePool", ["q"], ["y"], name="gap")],
            [_f("x", [1, 4, 8, 8])], [_f("y", [1, 4, 1, 1])]),
        "gemm-softmax": _model(
            [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, alpha=1.0, beta=1.0, name="gemm"),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1, name="sm")],
            [_f("x", [2, 6])], [_f("y", [2, 5])], [_c("w", w(5, 6)), _c("b", w(5))]),
        "matmul-add-gelu": _model(
            [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Erf", ["a"], ["e"], name="erf"),
             helper.make_node("Mul", ["a", "e"], ["y"], name="mul")],
            [_f("x", [2, 3, 4])], [_f("y", [2, 3, 5])], [_c("w", w(4, 5)), _c("b", w(5))]),
        "reduce-norm": _model(
            [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1, name="mean"),
             helper.make_node("Sub", ["x", "m"], ["d"], name="sub"),
             helper.make_node("LayerNormalization", ["d", "g", "be"], ["y"], axis=-1, epsilon=1e-5, name="ln")],
            [_f("x", [2, 3, 8])], [_f("y", [2, 3, 8])], [_c("g", w(8)), _c("be", w(8))]),
        "shape-ops": _model(
            [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="tr"),
             helper.make_node("Reshape", ["t", "shape"], ["r"], name="rs"),
             helper.make_node("Concat", ["r", "r"], ["cc"], axis=1, name="cat"),
             helper.make_node("Slice", ["cc", "st", "en", "ax"], ["sl"], name="slice"),
             helper.make_node("Gather", ["sl", "idx"], ["y"], axis=1, name="gather")],
            [_f("x", [2, 3, 4])], [_f("y", None)],
            [_c("shape", np.array([2, -1], np.int64)), _c("st", np.array([1], np.int64)),
             _c("en", np.array([20], np.int64)), _c("ax", np.array([1], np.int64)),
             _c("idx", np.array([0, 2, 1], np.int64))]),
        "pad-resize": _model(
            [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"),
             helper.make_node("Resize", ["p", "", "scales"], ["y"], mode="linear", name="resize")],
            [_f("x", [1, 2, 4, 4])], [_f("y", None)],
            [_c("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), _c("scales", np.array([1, 1, 2, 2], np.float32))]),
        "lstm": _model(
            [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "h"], hidden_size=3, name="lstm")],
            [_f("x", [4, 1, 2])], [_f("y", None), _f("h", None)],
            [_c("W", w(1, 12, 2) * 0.5), _c("R", w(1, 12, 3) * 0.5), _c("B", w(1, 24) * 0.1)]),
        "where-clip-cast": _model(
            [helper.make_node("Greater", ["x", "zero"], ["g"], name="gt"),
             helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Where", ["g", "c", "x"], ["wh"], name="where"),
             helper.make_node("Cast", ["wh"], ["y"], to=TensorProto.FLOAT16, name="cast")],
            [_f("x", [3, 4])], [_f("y", [3, 4], TensorProto.FLOAT16)],
            [_c("zero", np.array(0, np.float32)), _c("lo", np.array(-0.5, np.float32)), _c("hi", np.array(0.5, np.float32))]),
        "if": _if_seed(),
    }
    seeds["tiny_cnn"] = onnx.load(str(REPO / "examples" / "tiny_cnn.onnx"))
    seeds["light_squeezenet"] = onnx.load(str(_light_model("light_squeezenet")))
    return seeds


def _light_model(name: str) -> Path:
    """onnx's bundled light model ``name``, with random weights (cached by tests/models.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.models import model_path

    return model_path(name)


def _if_seed() -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [_f("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_f("e", [2, 3])])
    return _model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
                   helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
                   helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if")],
                  [_f("x", [2, 3])], [_f("y", [2, 3])], [_c("zero", np.array(0, np.float32))])


# =========================================================================== mutations

_OPS = ["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log", "Sqrt", "Add", "Sub", "Mul", "Div", "Pow", "Max",
        "Min", "Conv", "MaxPool", "AveragePool", "Gemm", "MatMul", "Softmax", "Transpose", "Reshape", "Concat",
        "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice", "ReduceMean", "ReduceSum", "Identity", "Cast", "Clip",
        "LeakyRelu", "BatchNormalization", "Pad", "Where", "Equal", "Not", "Floor", "Expand", "Tile", "Split",
        "ArgMax", "TopK", "CumSum", "Erf", "HardSigmoid", "Elu", "Shape", "Size", "Range", "ConstantOfShape"]
_INTS = [0, -1, 1, 2, 3, 7, -7, 64, 2**31 - 1, -(2**31)]
_FLOATS = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e30, 1e-30, 0.5]
_STRINGS = ["", "linear", "nearest", "cubic", "reflect", "edge", "constant", "SAME_UPPER", "VALID", "garbage"]
_ATTR_NAMES = ["axis", "axes", "keepdims", "alpha", "beta", "epsilon", "group", "pads", "strides", "kernel_shape",
               "dilations", "perm", "mode", "to", "transA", "transB", "auto_pad", "ceil_mode", "split", "k", "fmod"]
_DTYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
           TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16]


def _all_nodes(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = list(g.node)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _all_nodes(a.g)
    return out


def _m_op_type(m: onnx.ModelProto, r: random.Random) -> str:
    n = r.choice(_all_nodes(m.graph))
    old, n.op_type = n.op_type, r.choice(_OPS)
    return f"op type of {n.name or old}: {old} -> {n.op_type}"


def _m_attribute(m: onnx.ModelProto, r: random.Random) -> str:
    n = r.choice(_all_nodes(m.graph))
    plain = [a for a in n.attribute if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
    if plain and r.random() < 0.7:
        a = r.choice(plain)
        if a.type == onnx.AttributeProto.INT:
            a.i = r.choice(_INTS)
            v: Any = a.i
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = r.choice(_FLOATS)
            v = a.f
        elif a.type == onnx.AttributeProto.INTS:
            vals = list(a.ints)
            if vals and r.random() < 0.6:
                vals[r.randrange(len(vals))] = r.choice(_INTS)
            elif vals:
                vals.pop(r.randrange(len(vals)))
            else:
                vals.append(r.choice(_INTS))
            del a.ints[:]
            a.ints.extend(vals)
            v = vals
        elif a.type == onnx.AttributeProto.STRING:
            a.s = r.choice(_STRINGS).encode()
            v = a.s
        else:
            n.attribute.remove(a)
            return f"dropped attribute {a.name} of {n.name}"
        return f"attribute {a.name} of {n.name} = {v}"
    if plain and r.random() < 0.5:
        a = r.choice(plain)
        n.attribute.remove(a)
        return f"dropped attribute {a.name} of {n.name}"
    name = r.choice(_ATTR_NAMES)
    kept = [a for a in n.attribute if a.name != name]
    del n.attribute[:]
    n.attribute.extend(kept)
    value = r.choice([r.choice(_INTS), r.choice(_FLOATS), [r.choice(_INTS) for _ in range(r.randint(0, 4))],
                      r.choice(_STRINGS)])
    n.attribute.append(helper.make_attribute(name, value))
    return f"set attribute {name} of {n.name} = {value}"


def _m_dims(m: onnx.ModelProto, r: random.Random) -> str:
    vis = [*m.graph.input, *m.graph.output, *m.graph.value_info]
    vis = [v for v in vis if v.type.tensor_type.HasField("shape") and v.type.tensor_type.shape.dim]
    if not vis:
        return "no dims to change"
    v = r.choice(vis)
    d = r.choice(v.type.tensor_type.shape.dim)
    choice = r.choice([0, 1, 2, 5, 1 << 20, -1, "N", "?"])
    if isinstance(choice, int):
        d.dim_value = choice
    else:
        d.dim_param = choice
    return f"a dim of {v.name} -> {choice}"


def _m_dtype(m: onnx.ModelProto, r: random.Random) -> str:
    if m.graph.initializer and r.random() < 0.5:
        t = r.choice(m.graph.initializer)
        t.data_type = r.choice(_DTYPES)
        return f"initializer {t.name} dtype -> {t.data_type}"
    v = r.choice([*m.graph.input, *m.graph.output])
    v.type.tensor_type.elem_type = r.choice(_DTYPES)
    return f"{v.name} dtype -> {v.type.tensor_type.elem_type}"


def _m_initializer(m: onnx.ModelProto, r: random.Random) -> str:
    if not m.graph.initializer:
        return "no initializer"
    t = r.choice(m.graph.initializer)
    k = r.randrange(4)
    if k == 0 and t.dims:
        t.dims[r.randrange(len(t.dims))] = r.choice([0, 1, 3, 100])
        return f"initializer {t.name} dims -> {list(t.dims)}"
    if k == 1:
        try:
            a = numpy_helper.to_array(t).copy()
        except Exception:  # noqa: BLE001
            return "unreadable initializer left alone"
        if a.size and a.dtype.kind == "f":
            a.reshape(-1)[r.randrange(a.size)] = r.choice(_FLOATS)
        elif a.size and a.dtype.kind in "iu":
            a.reshape(-1)[r.randrange(a.size)] = r.choice([0, -1, 2**31 - 1, 100])
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        return f"a value of initializer {t.name} changed"
    if k == 2:
        m.graph.initializer.remove(t)
        return f"initializer {t.name} removed"
    dup = copy.deepcopy(t)
    m.graph.initializer.append(dup)
    return f"initializer {t.name} duplicated"


def _m_opset(m: onnx.ModelProto, r: random.Random) -> str:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = r.choice([1, 6, 7, 9, 10, 11, 12, 13, 15, 18, 21, 23, 30])
            return f"opset -> {o.version}"
    return "no default opset"


def _m_domain(m: onnx.ModelProto, r: random.Random) -> str:
    n = r.choice(_all_nodes(m.graph))
    n.domain = r.choice(["com.microsoft", "kiln", "ai.onnx.ml", "foo.bar"])
    return f"domain of {n.name} -> {n.domain}"


def _m_names(m: onnx.ModelProto, r: random.Random) -> str:
    nodes = list(m.graph.node)
    n = r.choice(nodes)
    if not n.input:
        return "node without inputs"
    i = r.randrange(len(n.input))
    k = r.randrange(4)
    if k == 0:
        n.input[i] = ""
        return f"input {i} of {n.name} -> ''"
    if k == 1:
        n.input[i] = "dangling_value"
        return f"input {i} of {n.name} -> dangling"
    if k == 2:
        later = [o for o in nodes[nodes.index(n):] for o in o.output]
        n.input[i] = r.choice(later)
        return f"input {i} of {n.name} -> {n.input[i]} (a cycle or self-reference)"
    if len(n.input) > 1:
        j = r.randrange(len(n.input))
        n.input[i], n.input[j] = n.input[j], n.input[i]
        return f"inputs {i} and {j} of {n.name} swapped"
    return "single input left alone"


def _m_outputs(m: onnx.ModelProto, r: random.Random) -> str:
    k = r.randrange(3)
    if k == 0 and len(m.graph.node) > 1:
        a, b = r.sample(list(m.graph.node), 2)
        if a.output and b.output:
            b.output[0] = a.output[0]
            return f"{b.name} writes {a.output[0]} too"
    if k == 1 and m.graph.output:
        m.graph.output[0].name = "never_defined"
        return "graph output renamed to an undefined value"
    n = r.choice(list(m.graph.node))
    m.graph.node.remove(n)
    return f"node {n.name} removed"


def _m_bytes(data: bytes, r: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    flips = r.randint(1, 8)
    for _ in range(flips):
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)
    return bytes(b), f"{flips} byte flip(s)"


MUTATIONS: list[Callable[[onnx.ModelProto, random.Random], str]] = [
    _m_op_type, _m_attribute, _m_attribute, _m_dims, _m_dtype, _m_initializer, _m_opset, _m_domain, _m_names,
    _m_outputs,
]


@dataclass
class Case:
    """One fuzz case: its number, seed model, mutations, and the model bytes."""

    index: int
    seed: str
    mutations: list[str]
    data: bytes


def make_cases(count: int, seed: int = 0, seeds: dict[str, onnx.ModelProto] | None = None) -> list[Case]:
    """``count`` seeded cases: each a seed model with one to three mutations (1 in 8 a byte flip)."""
    seeds = seeds or seed_models()
    names = sorted(seeds)
    cases = []
    for i in range(count):
        r = random.Random(seed * 1_000_003 + i)
        name = r.choice(names)
        m = copy.deepcopy(seeds[name])
        done = []
        for _ in range(r.randint(1, 3)):
            try:
                done.append(r.choice(MUTATIONS)(m, r))
            except Exception as e:  # noqa: BLE001 - a mutation that does not apply to this model
                done.append(f"(mutation skipped: {type(e).__name__})")
        try:
            data = m.SerializeToString()
        except Exception as e:  # noqa: BLE001 - a mutation made the proto unserializable
            data, _ = b"", done.append(f"(unserializable: {type(e).__name__})")
        if data and r.random() < 0.125:
            data, what = _m_bytes(data, r)
            done.append(what)
        cases.append(Case(i, name, done, data))
    return cases


# =========================================================================== running one case


@dataclass
class Outcome:
    """What one case did."""

    index: int
    seed: str
    mutations: list[str]
    outcome: str
    kiln: str = ""  # kiln's error, or "ran"
    onnxruntime: str = ""  # onnxruntime's error, or "ran"
    max_error: float | None = None
    seconds: float = 0.0
    stage: str = ""  # where kiln stopped: import, compile, run


def _feeds(data: bytes) -> dict[str, np.ndarray] | None:
    """Seeded inputs from the model's declared input types (unknown dims: 2); None if not plain tensors."""
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:  # noqa: BLE001 - a corrupt model: neither engine gets inputs
        return None
    inits = {t.name for t in m.graph.initializer}
    r = np.random.default_rng(0)
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:  # noqa: BLE001
            return None
        if dt.kind not in "fiub" or not tt.HasField("shape"):
            return None
        shape = [d.dim_value if d.HasField("dim_value") and 0 <= d.dim_value <= 64 else 2 for d in tt.shape.dim]
        if dt.kind == "f":
            feeds[vi.name] = r.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[vi.name] = r.random(shape) > 0.5
        else:
            feeds[vi.name] = r.integers(0, 3, shape).astype(dt)
    return feeds


def _ort(data: bytes, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str]:
    """onnxruntime's outputs (None if it refuses) and its word. A run that fails in a node that
    onnxruntime's own graph optimizer made (its fused ``gemm_input_reshape`` on an empty dim, say)
    is retried with the optimizer off: the model is what is judged, not the rewrite."""
    import onnxruntime as ort

    def run(level: Any) -> dict[str, np.ndarray]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds)))

    try:
        return run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), "ran"
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many types
        first = " ".join(str(e).split())
        first = first if len(first) <= 400 else f"{first[:200]} ... {first[-200:]}"  # its reason is often at the end
    if "Non-zero status code returned while running" not in first:
        return None, first
    try:
        return run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), "ran"
    except Exception:  # noqa: BLE001
        return None, first


def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, float("inf")
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        x, y = a.astype(np.float64), b.astype(np.float64)
        same_nan = np.isnan(x) == np.isnan(y)
        fin = ~np.isnan(x) & ~np.isnan(y)
        err = float(np.max(np.abs(x[fin] - y[fin]), initial=0.0)) if fin.any() else 0.0
        inf_ok = np.all((x[fin] == y[fin]) | (np.isfinite(x[fin]) & np.isfinite(y[fin])))
        half = np.float16 in (a.dtype, b.dtype)
        tol = (1e-2 * np.abs(y[fin]) + 1e-2) if half else (1e-3 * np.abs(y[fin]) + 1e-4)
        finite = np.isfinite(x[fin]) & np.isfinite(y[fin])
        close = np.abs(x[fin] - y[fin])[finite] <= tol[finite]
        return bool(same_nan.all() and inf_ok and close.all()), err
    return bool(np.array_equal(a, b)), 0.0 if np.array_equal(a, b) else float("inf")


def run_kiln(data: bytes, feeds: dict[str, np.ndarray] | None, workdir: str) -> dict[str, Any]:
    """kiln's part of a case: import, compile, run; the fields of an :class:`Outcome` (``got``: outputs)."""
    import kiln
    import kiln.runtime
    from kiln.errors import KilnError

    path = os.path.join(workdir, "case.onnx")
    Path(path).write_bytes(data)
    stage = "import"
    try:
        graph = kiln.load(path)
        stage = "compile"
        art = os.path.join(workdir, "case.kiln")
        kiln.compile(graph, art, threads=1)
        stage = "run"
        if feeds is None:
            raise KilnError("kiln compiled a model whose inputs the harness cannot feed")
        got = kiln.runtime.load(art, threads=1, trusted_keys=[]).run(feeds)
    except KilnError as e:  # the CLI prints it as one line, with exit code 2
        return {"kiln": " ".join(str(e).split())[:300] or type(e).__name__, "stage": stage, "outcome": "refused"}
    except Exception as e:  # noqa: BLE001 - what the campaign is looking for
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename.split('/kiln/')[-1]}:{tb[-1].lineno}" if tb else "?"
        return {"kiln": f"{type(e).__name__}: {' '.join(str(e).split())[:240]} at {where}", "stage": stage,
                "outcome": "internal"}
    return {"kiln": "ran", "stage": "ran", "got": got}


def judge(res: dict[str, Any], ort_out: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The outcome of a case once both engines have run (``res`` is kiln's part)."""
    got = res.pop("got", None)
    if got is None:
        return res
    if ort_out is None:
        res["outcome"] = "accepted, onnxruntime refuses"
        return res
    worst, ok = 0.0, set(got) == set(ort_out)
    for name, ref in ort_out.items():
        if name in got:
            good, err = _close(got[name], ref)
            ok &= good
            worst = max(worst, err)
    res.update(outcome="match" if ok else "mismatch", max_error=worst)
    return res


def _die() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


_PROBES: dict[bytes, Callable[[], None]] = {b"__crash__": _die, b"__hang__": lambda: time.sleep(3600)}


def _worker(conn: Any, workdir: str) -> None:
    """Runs cases: kiln first (its fields are sent at once), then onnxruntime, which has crashed on
    some valid models; a worker that dies after kiln's part is onnxruntime's crash, not kiln's."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    while True:
        data = conn.recv()
        if data is None:
            return
        if data in _PROBES:  # the harness's own self-test (tests/test_fuzz.py): die, or stall
            _PROBES[data]()
        start = time.perf_counter()
        try:
            feeds = _feeds(data) if data else None
            res = run_kiln(data, feeds, workdir)
            conn.send(("kiln", {k: v for k, v in res.items() if k != "got"}))
            ort_out, ort_msg = _ort(data, feeds) if feeds is not None else (None, "not plain tensor inputs")
            res = judge(res, ort_out)
            res.update(onnxruntime=ort_msg, seconds=time.perf_counter() - start)
            conn.send(("done", res))
        except Exception as e:  # noqa: BLE001 - the harness's own failure: report it, never call it a crash
            conn.send(("done", {"outcome": "internal", "kiln": f"harness: {type(e).__name__}: {e}",
                                "stage": "harness"}))


class Pool:
    """Worker processes that run cases; a dead worker is a crash, a slow one a hang (it is killed)."""

    def __init__(self, workers: int, timeout: float):
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="kiln-fuzz-")
        self.slots = [self._start(i) for i in range(workers)]

    def _start(self, i: int) -> dict[str, Any]:
        parent, child = self.ctx.Pipe()
        d = os.path.join(self.tmp.name, f"w{i}")
        os.makedirs(d, exist_ok=True)
        proc = self.ctx.Process(target=_worker, args=(child, d), daemon=True)
        proc.start()
        return {"proc": proc, "conn": parent, "case": None, "t0": 0.0, "i": i, "kiln": None}

    def run(self, cases: list[Case], on_result: Callable[[Outcome], None]) -> None:
        pending = list(reversed(cases))
        busy = 0
        while pending or busy:
            for slot in self.slots:
                if slot["case"] is None and pending:
                    case = pending.pop()
                    slot.update(case=case, t0=time.monotonic(), kiln=None)
                    slot["conn"].send(case.data)
                    busy += 1
            time.sleep(0.005)
            for k, slot in enumerate(self.slots):
                case = slot["case"]
                if case is None:
                    continue
                base = Outcome(case.index, case.seed, case.mutations, "")
                done = None
                while slot["conn"].poll():
                    try:
                        kind, fields = slot["conn"].recv()
                    except (EOFError, OSError):
                        break
                    if kind == "kiln":
                        slot["kiln"] = fields
                    else:
                        done = fields
                        break
                if done is not None:
                    on_result(Outcome(**{**asdict(base), **done}))
                    slot["case"] = None
                    busy -= 1
                    continue
                if not slot["proc"].is_alive():
                    code = slot["proc"].exitcode
                    if slot["kiln"] is not None:  # kiln finished: onnxruntime took the worker down
                        part = dict(slot["kiln"])
                        if part.get("outcome") is None:
                            part["outcome"] = "accepted, onnxruntime refuses"
                        on_result(Outcome(**{**asdict(base), **part, "onnxruntime": f"crashed (exit code {code})"}))
                    else:
                        on_result(Outcome(**{**asdict(base), "outcome": "crash",
                                             "kiln": f"the worker died in kiln (exit code {code})"}))
                elif time.monotonic() - slot["t0"] > self.timeout:
                    slot["proc"].kill()
                    slot["proc"].join()
                    on_result(Outcome(**{**asdict(base), "outcome": "hang", "kiln": f"no answer in {self.timeout:.0f} s"}))
                else:
                    continue
                busy -= 1
                self.slots[k] = self._start(slot["i"])

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            slot["proc"].join(timeout=10)
            if slot["proc"].is_alive():
                slot["proc"].kill()
        self.tmp.cleanup()


def campaign(count: int, *, seed: int = 0, workers: int = 2, timeout: float = 120.0,
             progress: Callable[[int, collections.Counter, Outcome], None] | None = None) -> list[Outcome]:
    """Run ``count`` seeded cases; every outcome, in case order."""
    cases = make_cases(count, seed)
    results: list[Outcome] = []
    counts: collections.Counter = collections.Counter()
    pool = Pool(workers, timeout)

    def record(o: Outcome) -> None:
        results.append(o)
        counts[o.outcome] += 1
        if progress is not None:
            progress(len(results), counts, o)

    try:
        pool.run(cases, record)
    finally:
        pool.close()
    return sorted(results, key=lambda o: o.index)


# =========================================================================== the report


#: Models kiln runs that onnxruntime refuses, each with why kiln is right to run it: a pattern in
#: onnxruntime's message, and the reason.
VALID_THOUGH_ONNXRUNTIME_REFUSES = {
    "Could not find an implementation for": "valid ONNX at that opset; onnxruntime has no kernel for the op's older "
                                            "versions (it implements opsets from 7), kiln runs the op as the spec says",
    "crashed": "onnxruntime crashed on a model that is valid ONNX (an absent optional input, such as "
               "LayerNormalization's bias)",
    "ensure the pre-allocated shapes match the expected output shapes": "an If branch declares a static output shape that its body "
                                                     "does not compute for this input; ONNX takes declared shapes as "
                                                     "hints, and kiln runs the shape the branch computes, as it does "
                                                     "for graph outputs (onnxruntime enforces it inside If only)",
}


def why_valid(outcome: Outcome) -> str | None:
    """The documented reason kiln runs a model onnxruntime refuses, or None."""
    return next((why for pattern, why in VALID_THOUGH_ONNXRUNTIME_REFUSES.items() if pattern in outcome.onnxruntime),
                None)



MARK_BEGIN, MARK_END = "<!-- fuzz campaign: begin -->", "<!-- fuzz campaign: end -->"


def summarize(results: list[Outcome], command: str, cpu: str, seconds: float) -> str:
    """The campaign's section of docs/reliability.md: counts, and every case that needs a word."""
    counts = collections.Counter(o.outcome for o in results)
    both = sum(1 for o in results if o.outcome == "refused" and o.onnxruntime != "ran")
    lines = [MARK_BEGIN, "", f"`{command}` on {cpu}: {len(results)} cases in {seconds / 60:.0f} min.", "",
             "| outcome | cases |", "|---|---|"]
    for name in OUTCOMES:
        extra = f" ({both} of them refused by onnxruntime too)" if name == "refused" else ""
        lines.append(f"| {name} | {counts.get(name, 0)}{extra} |")
    stages = collections.Counter(o.stage for o in results if o.outcome == "refused")
    lines += ["", "Where kiln refused: " + ", ".join(f"{k or '?'} {v}" for k, v in sorted(stages.items())) + "."]
    for title, pick in (("Accepted where onnxruntime refuses", "accepted, onnxruntime refuses"),
                        ("Mismatches", "mismatch"), ("Internal errors", "internal"), ("Crashes", "crash"),
                        ("Hangs", "hang")):
        hits = [o for o in results if o.outcome == pick]
        if not hits:
            continue
        lines += ["", f"### {title} ({len(hits)})", ""]
        if pick == "accepted, onnxruntime refuses":  # one row per reason, with its cases
            reasons = collections.defaultdict(list)
            for o in hits:
                reasons[why_valid(o) or "NO STATED REASON: " + o.onnxruntime].append(o)
            for why, cases in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"- {len(cases)} case(s), {why}: " + ", ".join(
                    f"{o.index} ({o.seed}: {'; '.join(o.mutations)})" for o in cases[:12]) +
                    (f", and {len(cases) - 12} more" if len(cases) > 12 else ""))
            continue
        for o in hits[:60]:
            lines.append(f"- case {o.index} ({o.seed}: {'; '.join(o.mutations)}): kiln: {o.kiln}; "
                         f"onnxruntime: {o.onnxruntime}")
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_report(path: Path, section: str) -> None:
    """Replace the campaign section of ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kiln's fuzzing campaign")
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--report", type=Path, help="write the counts into this markdown file (docs/reliability.md)")
    parser.add_argument("--json", type=Path, help="write every outcome as JSON")
    parser.add_argument("--log", type=Path, help="append each outcome to this file as one JSON line, as it comes")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tools"))
    from soak import cpu_model

    t = time.perf_counter()

    log = args.log.open("a") if args.log else None

    def show(done: int, counts: collections.Counter, last: Outcome) -> None:
        if log is not None:
            log.write(json.dumps(asdict(last)) + "\n")
            log.flush()
        if done % 50 == 0 or done == args.cases:
            print(f"[fuzz] {done}/{args.cases}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                  file=sys.stderr, flush=True)

    results = campaign(args.cases, seed=args.seed, workers=args.workers, timeout=args.timeout, progress=show)
    seconds = time.perf_counter() - t
    command = f"python tools/fuzz.py --cases {args.cases} --seed {args.seed} --workers {args.workers}"
    section = summarize(results, command, cpu_model(), seconds)
    print(section)
    if args.report:
        write_report(args.report, section)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in results], indent=1))
    bad = sum(1 for o in results if o.outcome in ("mismatch", "internal", "crash", "hang")
              or o.outcome == "accepted, onnxruntime refuses" and why_valid(o) is None)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
