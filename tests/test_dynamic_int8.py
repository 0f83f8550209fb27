"""Dynamic int8: the DynQDense kernel is exact against integer arithmetic on every path (VNNI, AVX2
vpmaddubsw for 7-bit weights, AVX2 int16 pairs for 8-bit ones), kiln's quantize-dynamic pass keeps a
model close to float, and models onnxruntime's quantize_dynamic wrote compile onto the same kernels
and match onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import kiln
import kiln.runtime
from helpers import f32, make_model, ort_outputs
from kiln.ir import DType, Evaluator
from kiln.ir.kiln_ops import dyn_qdense, pack_qdense_weight
from kiln.passes import PassManager
from kiln.passes.quantize import QuantizeDynamic
from kiln.passes.rules import example_graph
from kiln.runtime.artifact import host_cpu_features
from test_transformers import FEEDS, tiny_models  # noqa: F401 - the fixture

AVX2 = "avx2" in host_cpu_features()
pytestmark = pytest.mark.skipif(not AVX2, reason="kiln's int8 kernels need AVX2 or AVX-512 VNNI")


def _dense_graph(w: np.ndarray, shape: tuple, ws: np.ndarray, bias: np.ndarray | None):
    n = w.shape[0]
    wp = pack_qdense_weight(w)
    npad = wp.shape[0] * 16
    wsum = np.zeros(npad, np.int32)
    wsum[:n] = w.astype(np.int64).sum(axis=1)
    scale = np.zeros(npad, np.float32)
    scale[:n] = ws
    b = None if bias is None else np.pad(bias, (0, npad - n)).astype(np.float32)

    def build(op, x):
        extra = [] if b is None else [op.constant(b)]
        return op.kiln.DynQDense(x, op.constant(wp), op.constant(wsum), op.constant(scale), *extra, n=n)

    return example_graph("dyn_qdense", {"x": (DType.FLOAT32, shape)}, build, opset=17), (wp, wsum, scale, b)


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("shape", [(6, 40), (2, 5, 64), ("batch", 12)])
def test_dyn_qdense_kernel_is_exact(tmp_path, bits, shape):
    """8-bit weights take the int16 pairs kernel without VNNI, 7-bit ones vpmaddubsw: both exact."""
    rng = np.random.default_rng(bits)
    k = shape[-1]
    n = 20
    top = 2 ** (bits - 1)
    w = rng.integers(-top + (bits == 8), top, (n, k)).astype(np.int8)
    w[0, :] = -top + (bits == 8)  # the extreme weights, where vpmaddubsw would saturate at 8 bits
    g, (wp, wsum, scale, b) = _dense_graph(w, shape, rng.random(n).astype(np.float32) * 1e-2,
                                           rng.standard_normal(n).astype(np.float32))
    kiln.compile(g, tmp_path / "d.kiln")
    model = kiln.runtime.load(tmp_path / "d.kiln")
    for rows in (1, 7):
        full = tuple(rows if isinstance(d, str) else d for d in shape)
        x = rng.standard_normal(full).astype(np.float32) * 3
        x.reshape(-1)[0] = 10.0  # the largest input quantizes to 255
        got = model.run({"x": x})[model.outputs[0].name]
        want = dyn_qdense(x, wp, wsum, scale, b, n=n)[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        if not isinstance(shape[0], str):
            break


def _mlp(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """MatMul + Add, a Gemm with transB, and an activation x activation MatMul that stays float."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], transB=1),
             helper.make_node("Transpose", ["y"], ["yt"], perm=[1, 0]),
             helper.make_node("MatMul", ["y", "yt"], ["gram"])]
    model = make_model(nodes, [f32("x", [8, 64])], [f32("y", [8, 32]), f32("gram", [8, 8])], inits)
    return model, {"x": rng.standard_normal((8, 64)).astype(np.float32)}


@pytest.mark.parametrize("bits", [8, 7])
def test_quantize_dynamic_pass_stays_close_to_float_and_compiles_to_its_numbers(tmp_path, bits):
    model, feeds = _mlp()
    g = kiln.load(model)
    q = QuantizeDynamic(weight_bits=bits)
    g, _ = PassManager([q], max_iterations=1).run(g)
    g.verify()
    assert sorted(q.layers) == sorted(n.name for n in kiln.load(model).nodes if n.op_type in ("Gemm",)
                                      or (n.op_type == "MatMul" and n.inputs[1].is_constant))
    assert q.kept_float == {}  # the gram MatMul reads no constant weights, so it is no candidate
    assert {v.name for v in g.outputs} == {"y", "gram"}
    want = ort_outputs(model, feeds)
    ours = Evaluator(g).run(feeds, ["y", "gram"])
    cos = float(np.dot(ours["y"].ravel(), want["y"].ravel())
                / np.linalg.norm(ours["y"]) / np.linalg.norm(want["y"]))
    assert cos > 0.999, cos
    res = kiln.compile(g, tmp_path / "q.kiln")
    kernels = [n for n in res.graph.nodes if n.op_type == "DynQDense"]
    assert len(kernels) == 2
    from kiln.ir.summary import node_macs

    assert sorted(node_macs(n).constant() for n in kernels) == [8 * 48 * 32, 8 * 64 * 48]
    got = kiln.runtime.load(tmp_path / "q.kiln").run(feeds)
    for name in ("y", "gram"):  # the compiled kernels compute what the quantized graph says, exactly
        np.testing.assert_allclose(got[name], ours[name], rtol=1e-5, atol=1e-4)


def test_onnxruntime_quantize_dynamic_model_compiles_onto_kiln_kernels(tiny_models, tmp_path):  # noqa: F811
    """quantize_dynamic's DynamicQuantizeLinear + MatMulInteger become DynQDense, and match onnxruntime.

    ``reduce_range`` gives 7-bit weights: onnxruntime's AVX2 kernel (vpmaddubsw) saturates on
    8-bit ones, where kiln is exact, so only 7-bit weights give one right answer on every x86 CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = tmp_path / "bert_q.onnx"
    quantize_dynamic(str(tiny_models / "bert.onnx"), str(src), weight_type=QuantType.QInt8, reduce_range=True)
    res = kiln.compile(src, tmp_path / "bert_q.kiln")
    ops = [n.op_type for n in res.graph.nodes]
    assert ops.count("DynQDense") == 12 and "MatMulInteger" not in ops, ops
    got = kiln.runtime.load(tmp_path / "bert_q.kiln").run(FEEDS["bert"])
    want = ort_outputs(str(src), FEEDS["bert"])
    np.testing.assert_allclose(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-4)


def test_cli_int8_dynamic_on_a_bert_with_symbolic_dims(tiny_models, tmp_path, capsys):  # noqa: F811
    from kiln.cli import main

    src = tiny_models / "bert_dynamic.onnx"
    rng = np.random.default_rng(0)
    samples = tmp_path / "eval.npz"
    np.savez(samples, input_ids=rng.integers(0, 128, (3, 2, 16)).astype(np.int64),
             attention_mask=np.ones((3, 2, 16), np.int64))
    out = tmp_path / "bert.kiln"
    assert main(["compile", str(src), "-o", str(out), "--quantize", "int8-dynamic", "--eval", str(samples)]) == 0
    text = capsys.readouterr().out
    assert "dynamic int8: 12 of 12 dense layers in 12 int8 kernels" in text, text
    assert main(["inspect", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["quantization"]
    assert record["dynamic"] and record["accuracy"]["hidden"]["cosine"] >= 0.99, record
    compiled = kiln.runtime.load(out)
    for batch, seq in ((1, 5), (3, 40)):  # any size of the symbolic dims
        feeds = {"input_ids": rng.integers(0, 128, (batch, seq)).astype(np.int64),
                 "attention_mask": np.ones((batch, seq), np.int64)}
        got, want = compiled.run(feeds)["hidden"], ort_outputs(str(src), feeds)["hidden"]
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.99, (batch, seq, cos)
    # bad requests: one line and exit 2
    assert main(["compile", str(src), "-o", str(tmp_path / "x.kiln"), "--quantize", "int8-dynamic",
                 "--calib", str(samples)]) == 2
    from onnxruntime.quantization import quantize_dynamic

    qsrc = tmp_path / "q.onnx"
    quantize_dynamic(str(tiny_models / "bert.onnx"), str(qsrc))
    assert main(["compile", str(qsrc), "-o", str(tmp_path / "y.kiln"), "--quantize", "int8-dynamic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "already quantized" in err[-1], err


def _kernel_asm(mcpu: str, pairs: bool) -> str:
    import tvm
    from tvm import s_tir, te

    from kiln.codegen import int8

    m, k, n = 8, 64, 32
    xq, sc, zp = te.placeholder((m, k), "uint8"), te.placeholder((), "float32"), te.placeholder((), "uint8")
    w = te.placeholder((n // 16, k // 4, 16, 4), "int8")
    wsum, ws = te.placeholder((n,), "int32"), te.placeholder((n,), "float32")
    y = int8.dense_int8_dynamic(xq, sc, zp, w, wsum, ws, None, n, pairs)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([xq, sc, zp, w, wsum, ws, y])}))
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    with target:
        int8.schedule_dense_int8_dynamic(sch)
    lib = tvm.compile(sch.mod, target=target)
    for mod in (lib.mod, *lib.mod.imports):
        try:
            return mod.inspect_source("asm")
        except Exception:  # noqa: BLE001 - a module without assembly
            continue
    raise AssertionError("no assembly")


@pytest.mark.parametrize("mcpu,pairs,want,unwanted", [
    ("icelake-server", False, "vpdpbusd", "vpmaddubsw"),  # built, not run: the host need not have VNNI
    ("haswell", False, "vpmaddubsw", "vpdpbusd"),
    ("haswell", True, "vpmaddwd", "vpmaddubsw"),
])
def test_dyn_qdense_schedules_emit_their_instruction(mcpu, pairs, want, unwanted):
    asm = _kernel_asm(mcpu, pairs)
    assert want in asm and unwanted not in asm
