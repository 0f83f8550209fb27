"""bf16 (``--precision bf16``): the BF16BlockedConv kernel computes exactly what its reference does
(inputs rounded to bf16 to nearest even, bf16 weights, float32 sums), on ``vdpbf16ps``; a compiled
model stays close to onnxruntime's float32 numbers; and the job refuses what it cannot do in one line."""

from __future__ import annotations

import json
import zipfile

import ml_dtypes
import numpy as np
import pytest
from onnx import helper, numpy_helper

import kiln
import kiln.runtime
from helpers import f32, make_model, ort_outputs
from kiln.cli import main
from kiln.ir.kiln_ops import bf16_round, pack_bf16_conv_weight, unpack_bf16_conv_weight
from kiln.passes.layout import pack_weight
from kiln.runtime.artifact import host_cpu_features
from test_int8 import _disassembly
from test_transformers import tiny_models  # noqa: F401 - the fixture

BF16 = "avx512_bf16" in host_cpu_features()
needs_bf16 = pytest.mark.skipif(not BF16, reason="the bf16 kernels need AVX-512 BF16")


def _conv_model(c_in: int = 32, c_out: int = 48, size: int = 13, stem: bool = True, seed: int = 3):
    """[stem 3 -> c_in 3x3 s2 +] conv c_in -> c_out 3x3 + ReLU -> conv 1x1 c_out -> c_out + the residual."""
    rng = np.random.default_rng(seed)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    nodes, inits = [], []
    x = "x"
    if stem:
        inits += [init("w0", rng.standard_normal((c_in, 3, 3, 3)) * 0.3), init("b0", rng.standard_normal(c_in))]
        nodes.append(helper.make_node("Conv", ["x", "w0", "b0"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2]))
        x = "s"
    inits += [init("w1", rng.standard_normal((c_out, c_in, 3, 3)) * 0.1), init("b1", rng.standard_normal(c_out)),
              init("w2", rng.standard_normal((c_out, c_out, 1, 1)) * 0.1), init("b2", rng.standard_normal(c_out))]
    nodes += [helper.make_node("Conv", [x, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
              helper.make_node("Add", ["c2", "r1"], ["y"])]
    in_shape = ["n", 3, 2 * size, 2 * size] if stem else ["n", c_in, size, size]
    return make_model(nodes, [f32("x", in_shape)], [f32("y", None)], inits)


def _compile_bf16(model, tmp_path, name: str):
    """``model`` written to ``tmp_path`` and compiled with ``precision="bf16"``: (result, loaded artifact)."""
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(model.SerializeToString())
    result = kiln.compile(src, tmp_path / f"{name}.kiln", precision="bf16")
    return result, kiln.runtime.load(tmp_path / f"{name}.kiln")


def _assert_near_float32(got: np.ndarray, ref: np.ndarray) -> None:
    """bf16's distance from float32 for a few layers: cosine over 0.9999, max error under 2% of the largest output."""
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.9999
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


def test_the_weight_packs_in_pairs_of_input_channels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 48, 3, 3)).astype(np.float32)
    p = pack_bf16_conv_weight(pack_weight(w, 16, 16, False))
    assert p.dtype == np.uint16 and p.shape == (2, 3, 3, 3, 8, 16, 2)
    np.testing.assert_array_equal(unpack_bf16_conv_weight(p), bf16_round(w))
    bits = p.view(ml_dtypes.bfloat16).astype(np.float32)
    for ko, ci, r, s, pair, lane, q in [(0, 0, 0, 0, 0, 0, 0), (1, 2, 2, 1, 7, 15, 1), (1, 0, 1, 2, 3, 4, 0)]:
        assert bits[ko, ci, r, s, pair, lane, q] == bf16_round(w[ko * 16 + lane, ci * 16 + pair * 2 + q, r, s])


@needs_bf16
def test_a_bf16_conv_computes_what_its_reference_does(tmp_path):
    # one conv on the model's input: the kernel and kiln's interpreter round the same inputs, so they
    # differ only in the order of the float32 sums (deeper, that order can move a value across a
    # bf16 rounding boundary of the next conv)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32) * 0.1
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["c"], ["y"])], [f32("x", ["n", 32, 13, 13])], [f32("y", None)],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(48).astype(
                           np.float32), "b")])
    result, m = _compile_bf16(model, tmp_path, "c")
    assert [n.op_type for n in result.graph.walk_nodes()].count("BF16BlockedConv") == 1
    for batch in (1, 3):  # a symbolic batch; width 13 is prime, and the register tile still divides it
        x = rng.standard_normal((batch, 32, 13, 13)).astype(np.float32)
        got = m.run({"x": x})["y"]
        np.testing.assert_allclose(got, kiln.evaluate(result.graph, {"x": x})["y"], rtol=1e-5, atol=1e-5)


@needs_bf16
def test_a_bf16_model_stays_near_float32(tmp_path):
    model = _conv_model()
    result, m = _compile_bf16(model, tmp_path, "m")
    ops = [n.op_type for n in result.graph.walk_nodes()]
    assert ops.count("BF16BlockedConv") == 2 and ops.count("BlockedConv") == 1  # the 3-channel stem stays float32
    rng = np.random.default_rng(1)
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, 26, 26)).astype(np.float32)
        _assert_near_float32(m.run({"x": x})["y"], ort_outputs(model, {"x": x})["y"])


@needs_bf16
def test_the_kernel_rounds_its_input_to_nearest_even(tmp_path):
    # a 1x1 conv by the identity: the output is the input as the kernel rounded it
    c = 16
    w = np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [f32("x", [1, c, 4, 4])], [f32("y", None)],
                       [numpy_helper.from_array(w, "w")])
    src = tmp_path / "id.onnx"
    src.write_bytes(model.SerializeToString())
    kiln.compile(src, tmp_path / "id.kiln", precision="bf16")
    base = np.array([1.0, -3.0, 1e-3, 7.5e4], np.float32).view(np.uint32)
    # exact ties (0x8000 below the kept bits) on even and odd kept bits, just above and below a tie
    low = np.array([0x8000, 0x18000, 0x7FFF, 0x8001], np.uint32)
    vals = ((base[:, None] & np.uint32(0xFFFE0000)) + low[None, :]).astype(np.uint32).view(np.float32).ravel()
    x = np.resize(vals, (1, c, 4, 4)).astype(np.float32)
    got = kiln.runtime.load(tmp_path / "id.kiln").run({"x": x})["y"]
    np.testing.assert_array_equal(got, bf16_round(x))


@needs_bf16
def test_the_kernel_runs_on_vdpbf16ps_and_the_manifest_says_bf16(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_conv_model(stem=False).SerializeToString())
    kiln.compile(src, tmp_path / "m.kiln", precision="bf16")
    assert "vdpbf16ps" in _disassembly(tmp_path / "m.kiln", tmp_path)
    with zipfile.ZipFile(tmp_path / "m.kiln") as z:
        manifest = json.loads(z.read("manifest.json"))
    assert "avx512_bf16" in manifest["target"]["cpu_features"]  # refused on a CPU without it
    assert manifest["target"]["precision"] == "bf16"
    assert manifest["precision"]["bf16_convs"] == 2 and manifest["precision"]["kept_float"] == {}


@needs_bf16
def test_eval_reports_the_accuracy_against_float32(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(_conv_model().SerializeToString())
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "s.npz", x=rng.standard_normal((3, 1, 3, 26, 26)).astype(np.float32))
    assert main(["compile", str(src), "-o", str(tmp_path / "m.kiln"), "--precision", "bf16",
                 "--eval", str(tmp_path / "s.npz")]) == 0
    out = capsys.readouterr().out
    assert "bf16: 2 convs and 0 dense layers on vdpbf16ps" in out and "1 kept in float32" in out
    with zipfile.ZipFile(tmp_path / "m.kiln") as z:
        record = json.loads(z.read("manifest.json"))["precision"]
    assert record["accuracy_samples"] == 3
    assert record["accuracy"]["y"]["cosine"] > 0.9999
    assert main(["inspect", str(tmp_path / "m.kiln")]) == 0
    shown = capsys.readouterr().out
    assert "precision: bf16 in 2 convs and 0 dense layers" in shown and "kept in float32:" in shown


def test_bf16_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(_conv_model().SerializeToString())
    out = str(tmp_path / "m.kiln")
    assert main(["compile", str(src), "-o", out, "--precision", "bf16", "--quantize", "int8-dynamic"]) == 2
    assert "does not combine" in capsys.readouterr().err
    haswell = json.dumps({"kind": "llvm", "mcpu": "haswell"})
    assert main(["compile", str(src), "-o", out, "--precision", "bf16", "--target", haswell]) == 2
    err = capsys.readouterr().err
    assert "AVX-512 BF16" in err and len(err.strip().splitlines()) == 1
    assert main(["compile", str(src), "-o", out, "--precision", "bf16", "--level", "O2"]) == 2
    assert "layout pass" in capsys.readouterr().err
    assert not (tmp_path / "m.kiln").exists()


def test_the_dense_weight_packs_in_pairs_of_inputs():
    from kiln.ir.kiln_ops import pack_bf16_dense_weight, unpack_bf16_dense_weight

    w = np.random.default_rng(4).standard_normal((41, 20)).astype(np.float32)  # K odd, N under a block
    p = pack_bf16_dense_weight(w)
    assert p.shape == (2, 21, 16, 2)
    full = np.zeros((42, 32), np.float32)
    full[:41, :20] = bf16_round(w)
    np.testing.assert_array_equal(unpack_bf16_dense_weight(p), full)


def _mlp_model(k: int = 64, hidden: int = 96, seed: int = 6):
    """rows [n, s, k] -> MatMul + bias + GELU (erf) -> MatMul + bias -> + the input (a transformer's MLP)."""
    rng = np.random.default_rng(seed)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    inits = [init("w1", rng.standard_normal((k, hidden)) * 0.1), init("b1", rng.standard_normal(hidden) * 0.1),
             init("w2", rng.standard_normal((hidden, k)) * 0.1), init("b2", rng.standard_normal(k) * 0.1),
             init("half", 0.5), init("one", 1.0), init("rsqrt2", 1 / np.sqrt(2))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Mul", ["h", "rsqrt2"], ["hs"]), helper.make_node("Erf", ["hs"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["he"]),
             helper.make_node("Mul", ["he", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["o"]),
             helper.make_node("Add", ["o", "x"], ["y"])]
    return make_model(nodes, [f32("x", ["n", "s", k])], [f32("y", None)], inits)


@needs_bf16
def test_a_bf16_dense_layer_computes_what_its_reference_does(tmp_path):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((70, 40)).astype(np.float32) * 0.1  # K even but not a block, N padded to 48
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [f32("x", ["m", 70])], [f32("y", None)],
                       [numpy_helper.from_array(w, "w")])
    result, m = _compile_bf16(model, tmp_path, "d")
    assert [n.op_type for n in result.graph.walk_nodes()].count("BF16Dense") == 1
    for rows in (1, 7, 64):  # a symbolic M: one row per tile
        x = rng.standard_normal((rows, 70)).astype(np.float32)
        np.testing.assert_allclose(m.run({"x": x})["y"], kiln.evaluate(result.graph, {"x": x})["y"],
                                   rtol=1e-5, atol=1e-5)


@needs_bf16
def test_a_bf16_mlp_stays_near_float32_and_runs_on_vdpbf16ps(tmp_path):
    model = _mlp_model()
    result, m = _compile_bf16(model, tmp_path, "mlp")
    assert [n.op_type for n in result.graph.walk_nodes()].count("BF16Dense") == 2
    assert result.precision["bf16_dense"] == 2 and result.precision["kept_float"] == {}
    assert "vdpbf16ps" in _disassembly(tmp_path / "mlp.kiln", tmp_path)
    rng = np.random.default_rng(9)
    for shape in ((1, 16, 64), (3, 5, 64)):  # symbolic batch and sequence
        x = rng.standard_normal(shape).astype(np.float32)
        _assert_near_float32(m.run({"x": x})["y"], ort_outputs(model, {"x": x})["y"])


@needs_bf16
def test_a_tiny_bert_from_torchs_exporter_compiles_in_bf16(tiny_models, tmp_path):
    from test_transformers import FEEDS

    path = tiny_models / "bert.onnx"
    result = kiln.compile(path, tmp_path / "bert.kiln", precision="bf16")
    assert result.precision["bf16_dense"] >= 8  # Q, K, V, output and two MLP products per layer, 2 layers
    feeds = FEEDS["bert"]
    got = kiln.runtime.load(tmp_path / "bert.kiln").run(feeds)
    ref = ort_outputs(str(path), feeds)
    for name, r in ref.items():
        g = got[name].astype(np.float64).ravel()
        cos = float(g @ r.ravel() / np.linalg.norm(g) / np.linalg.norm(r))
        assert cos > 0.999, (name, cos)
