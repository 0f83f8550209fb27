"""kiln's own int8 quantizer: the quantize pass, observers, sensitivity, budgets, and the CLI.

Tolerances are stated in quantization steps: a conv whose input is quantized with step
``sx`` and weights with step ``sw[k]`` can move output k by at most
``sum|w| * sx/2 + sum|x| * sw[k]/2 + (bias step)/2`` (plus float rounding), so the tests
check that bound element by element rather than a loose relative tolerance.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.quantize import Budget, Observer, QuantizeError, QuantizeOptions, QuantizeSession, compare
from kiln.cli import main
from kiln.codegen.target import cpu_target
from kiln.ir import DType, evaluate, load, to_onnx
from kiln.passes.manager import get_pass
from kiln.passes.quantize import (
    QParams, Quantize, fake_quant_model, quantizable_layers, quantized_tensors, weight_quantization,
)
from kiln.runtime.artifact import host_cpu_features

VNNI = "avx512_vnni" in host_cpu_features()


def _model(path: Path, *, outlier: bool = False, seed: int = 0) -> Path:
    """conv1-relu-maxpool-conv2-relu-conv3 + residual add-relu, then conv4-relu, GAP and a Gemm.

    With ``outlier``, conv2's channel 0 carries a bias of 400 (a wide range on conv3's input)
    that conv3 barely reads: quantizing conv3's input crushes its other channels.
    """
    rng = np.random.default_rng(seed)

    def w(*s, sc=0.2):
        return rng.normal(0, sc, s).astype(np.float32)

    b2 = w(16, sc=0.1)
    w3 = w(16, 16, 1, 1, sc=0.3)
    if outlier:
        b2[0] = 400.0
        w3[:, 0] = 1e-4
    inits = {"w1": w(16, 3, 3, 3), "b1": w(16), "w2": w(16, 16, 3, 3, sc=0.1), "b2": b2, "w3": w3, "b3": w(16),
             "w4": w(32, 16, 3, 3, sc=0.1), "b4": w(32), "wf": w(10, 32), "bf": w(10)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             n("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"), n("Relu", ["c2"], ["r2"]),
             n("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             n("Add", ["c3", "p1"], ["a"], name="add"), n("Relu", ["a"], ["ra"]),
             n("Conv", ["ra", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv4"),
             n("Relu", ["c4"], ["r4"]), n("GlobalAveragePool", ["r4"], ["g"]), n("Flatten", ["g"], ["f"]),
             n("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 24, 24])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def _samples(path: Path, count: int, seed: int = 1) -> Path:
    np.savez(path, x=np.random.default_rng(seed).normal(0, 1, (count, 3, 24, 24)).astype(np.float32))
    return path


def _ort(graph_or_model, feeds: dict) -> list[np.ndarray]:
    model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else to_onnx(graph_or_model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # plain float Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _one_conv(seed: int = 0, dead: bool = False):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (8, 6, 3, 3)).astype(np.float32)
    w[3] *= 20  # one channel with a much wider range: per-channel scales matter
    b = rng.normal(0, 1, 8).astype(np.float32)
    if dead:  # near-zero weights and a large bias (a folded BatchNorm): the bias would overflow int32
        w[5] *= 1e-8
        b[5] = 40.0
    # the conv's output goes to a pool (no layer reads it), so the conv quantizes it itself
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 7, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 7, 7])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w, b


# ----------------------------------------------------------------------------- the pass


@pytest.mark.parametrize("per_channel, dead", [(True, False), (False, False), (True, True)])
def test_quantized_conv_is_within_its_step_bound(per_channel, dead):
    """Per element, |int8 conv - float conv| stays inside the bound the steps allow, through onnxruntime."""
    model, w, b = _one_conv(dead=dead)
    x = np.random.default_rng(3).normal(0.5, 1, (1, 6, 7, 7)).astype(np.float32)
    graph = load(model)
    want = _ort(model, {"x": x})[0]
    q = Quantize(ranges={"x": (float(x.min()), float(x.max())), "c": (float(want.min()), float(want.max()))},
                 per_channel=per_channel)
    q.run(graph)
    assert sorted(n.op_type for n in graph.nodes).count("DequantizeLinear") == 4  # x, w, b and the output
    got = _ort(graph, {"x": x})[0]
    sx, sy = q.params["x"].scale, q.params["c"].scale
    _, ws = weight_quantization(w, per_channel=per_channel, bias=b, x_scale=sx)
    bias_q = next(v for v in graph.constants.values() if v.dtype.name == "INT32" and v.numpy().size == 8).numpy()
    assert np.abs(bias_q.astype(np.int64)).max() <= 2**30  # fits int32 with room for the zero-point fold
    sw = np.broadcast_to(ws, (8,)).reshape(1, 8, 1, 1)
    ones = np.ones_like(w[:1])
    import onnx.reference

    def conv(a, k):
        m = helper.make_model(helper.make_graph(
            [helper.make_node("Conv", ["a", "k"], ["o"], pads=[1, 1, 1, 1])], "c",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("k", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        return onnx.reference.ReferenceEvaluator(m).run(None, {"a": a, "k": k})[0]

    abs_w_sum = conv(np.ones_like(x), np.abs(w))  # sum |w| over each output's receptive field
    abs_x_sum = conv(np.abs(x) + sx, np.repeat(ones, 8, axis=0))  # sum |x| (+ one step of slack)
    bound = abs_w_sum * sx / 2 + abs_x_sum * sw / 2 + sx * sw / 2 + sy / 2 + 1e-4 * np.abs(want) + 1e-5
    err = np.abs(got - want)
    assert (err <= bound).all(), f"worst excess {(err - bound).max()}"
    assert err.max() > 0  # the quantized graph is not the float one


def test_relu_is_absorbed_and_maxpool_shares_its_input_scale(tmp_path):
    graph = load(_model(tmp_path / "m.onnx"))
    layers = quantizable_layers(graph)
    assert [(ly.name, ly.kind) for ly in layers] == [("conv1", "conv"), ("conv2", "conv"), ("conv3", "conv"),
                                                     ("add", "add"), ("conv4", "conv"), ("fc", "dense")]
    assert [ly.output.name if ly.output else None for ly in layers] == ["r1", None, None, None, "r4", None]  # pools
    names = [v.name for v in quantized_tensors(graph, layers)]
    assert names == ["x", "r1", "p1", "r2", "c3", "ra", "r4", "g", "f"]  # r1 joins p1 through the MaxPool
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 24, 24)).astype(np.float32)
    values = [evaluate(graph, {"x": x[i:i + 1]}, names) for i in range(4)]
    ranges = {n: (min(float(v[n].min()) for v in values), max(float(v[n].max()) for v in values)) for n in names}
    q = Quantize(ranges=ranges)
    float_graph = load(_model(tmp_path / "m.onnx"))
    q.run(graph)
    get_pass("dce").run(graph)
    assert q.params["r1"] == q.params["p1"] and q.params["r1"].zero_point == 0
    assert q.params["r1"].scale >= ranges["p1"][1] / 255 - 1e-9  # the shared range covers both
    assert not any(n.op_type == "Relu" for n in graph.nodes)  # every Relu became uint8's saturation at 0
    got = _ort(graph, {"x": x[:1]})[0]
    want = _ort(float_graph, {"x": x[:1]})[0]
    (acc,) = compare([{"y": want}], [{"y": got}], ["y"])
    assert acc.cosine > 0.999 and acc.max_abs_error > 0


def test_keep_float_leaves_a_layer_and_its_reads_in_float(tmp_path):
    """A layer kept in float reads float inputs; the conv producing them (through ops that pass values
    through) has no requantize left and stays float too, but reads its own input quantized, so the
    rest stays int8."""
    graph = load(_model(tmp_path / "m.onnx"))
    names = [v.name for v in quantized_tensors(graph, quantizable_layers(graph))]
    q = Quantize(ranges={n: (-1.0, 4.0) for n in names}, keep_float=frozenset({"conv3"}))
    assert [ly.name for ly in q.plan(graph)[0]] == ["conv1", "add", "conv4", "fc"]
    q.run(graph)
    node = {n.name: n for n in graph.nodes}
    assert node["conv3"].inputs[0].producer.op_type == "Relu"  # reads r2 in float
    for name in ("conv2", "conv3"):
        assert node[name].inputs[1].is_constant and node[name].inputs[1].dtype.name == "FLOAT32"
    for name in ("conv1", "conv4"):
        assert node[name].inputs[1].producer.op_type == "DequantizeLinear"


def test_activation_params():
    assert QParams.from_range(0, 2.55) == QParams(np.float32(0.01), 0)
    p = QParams.from_range(-1, 3)
    assert p.zero_point == 64 and abs(p.scale - 4 / 255) < 1e-9
    assert QParams.from_range(-2, 1, symmetric=True) == QParams(float(np.float32(2 / 127)), 128)
    assert QParams.from_range(0.5, 2, symmetric=True).zero_point == 0  # widened to hold 0
    assert QParams.from_range(0, 0) == QParams(1.0, 0)


def test_fake_quant_model_matches_float_and_quantized_graphs(tmp_path):
    path = _model(tmp_path / "m.onnx")
    session = QuantizeSession(str(path), QuantizeOptions(str(_samples(tmp_path / "c.npz", 6)), observer="evaluator"),
                              cpu_target())
    session.prepare()
    session.calibrate()
    q = Quantize(ranges=session.ranges)
    layers, params = q.plan(session.graph)
    gated, mask = fake_quant_model(session.graph, layers, params)
    x = session.held_out[0]["x"]
    want_float = evaluate(session.graph, {"x": x})["y"]
    want_int8 = evaluate(session.quantized_graph(), {"x": x})["y"]
    off = evaluate(gated, {"x": x, mask: np.zeros(len(layers), np.float32)})["y"]
    on = evaluate(gated, {"x": x, mask: np.ones(len(layers), np.float32)})["y"]
    np.testing.assert_array_equal(off, want_float)
    np.testing.assert_allclose(on, want_int8, rtol=1e-4, atol=1e-4)
    assert np.abs(on - off).max() > 1e-3
    session.close()


# ----------------------------------------------------------------------------- observers


def test_observer_methods():
    rng = np.random.default_rng(0)
    data = np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)
    data[:3] = 50.0  # three outliers
    obs = Observer()
    obs.see_range(data)
    obs.see_histogram(data)
    assert obs.range("minmax") == (float(data.min()), 50.0)
    lo, hi = obs.range("percentile")
    assert lo == float(data.min()) and 3.5 < hi < 5.0  # 99.99% of |N(0,1)| lies below ~3.9
    lo, hi = obs.range("entropy")
    assert 2.0 < hi < 20.0  # clipped well below the outliers
    signed = rng.normal(0, 1, 100_000).astype(np.float32)
    obs = Observer()
    obs.see_range(signed)
    obs.see_histogram(signed)
    lo, hi = obs.range("entropy")
    assert lo < -1 and hi > 1 and lo >= signed.min() and hi <= signed.max()


def test_compare_and_budget():
    ref = [{"y": np.array([[1.0, 2.0, 3.0]])}, {"y": np.array([[3.0, 2.0, 1.0]])}]
    got = [{"y": np.array([[1.0, 2.0, 3.1]])}, {"y": np.array([[1.0, 2.0, 3.0]])}]
    (r,) = compare(ref, got, ["y"])
    assert r.argmax_agreement == 0.5 and abs(r.max_abs_error - 2.0) < 1e-12
    assert Budget.parse("argmax>=99%") == Budget("argmax", 0.99)
    assert Budget.parse("cosine >= 0.999").holds([r]) is False
    for bad in ("accuracy>=1", "argmax>=150%", "cosine"):
        with pytest.raises(QuantizeError):
            Budget.parse(bad)


# ----------------------------------------------------------------------------- the CLI


def _manifest(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("manifest.json"))


@pytest.mark.skipif(not VNNI, reason="the host CPU has no AVX-512 VNNI")
def test_compile_quantize_int8_runs_vnni_kernels(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_int8 import _disassembly

    model = _model(tmp_path / "m.onnx")
    out = tmp_path / "m_int8.kiln"
    calib = _samples(tmp_path / "calib.npz", 12)
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--calib-method", "percentile"]) == 0
    text = capsys.readouterr().out
    assert "int8: 6 of 6 layers in 5 int8 kernels" in text  # 4 convs (the add runs in conv3) and the Gemm and "held-out samples" in text and "cosine" in text
    q = _manifest(out)["quantization"]
    assert q["calibration"]["method"] == "percentile" and q["calibration"]["samples"] == 9
    assert q["calibration"]["held_out_samples"] == 3
    assert q["layers"] == {"conv1": "int8", "conv2": "int8", "conv3": "int8", "add": "int8", "conv4": "int8",
                           "fc": "int8"}
    assert "per output channel" in q["scheme"]["weights"]
    assert q["accuracy"]["y"]["cosine"] > 0.999
    asm = _disassembly(out, tmp_path)
    assert asm.count("vpdpbusd") >= 5
    assert "<qdense" in asm  # the classifier runs as kiln's int8 dense kernel
    # the artifact against onnxruntime running the same QDQ graph in float: one step of the last
    # quantized tensor, carried through the average pool and the Gemm, bounds the difference
    import kiln.runtime

    session = QuantizeSession(str(model), QuantizeOptions(str(calib), method="percentile", observer="evaluator"),
                              cpu_target())
    session.prepare()
    session.calibrate()
    qgraph = session.quantized_graph()
    wf = numpy_helper.to_array(next(i for i in onnx.load(model).graph.initializer if i.name == "wf"))
    s_last = max(p.scale for p in session.params.values())
    art = kiln.runtime.load(out)
    for feeds in session.held_out:
        got = art.run(feeds)["y"]
        want = _ort(qgraph, feeds)[0]
        assert np.abs(got - want).max() <= s_last * np.abs(wf).sum(axis=1).max()
    session.close()


def test_sensitivity_ranks_the_outlier_layer_first_and_the_budget_keeps_it(tmp_path, capsys):
    model = _model(tmp_path / "m.onnx", outlier=True)
    out = tmp_path / "m_int8.kiln"
    calib = _samples(tmp_path / "calib.npz", 16)
    rc = main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
               "--sensitivity", "--accuracy-budget", "cosine>=0.999"])
    text = capsys.readouterr().out
    assert rc == 0, text
    q = _manifest(out)["quantization"]
    assert q["sensitivity"][0]["layer"] == "conv3"
    assert q["sensitivity"][0]["error"] > 10 * q["sensitivity"][1]["error"]
    # conv2's output is read only by conv3: with conv3 in float, conv2 has no requantize and stays float too
    assert q["kept_float"]["conv3"] == "accuracy budget" and set(q["kept_float"]) == {"conv2", "conv3"}
    assert q["layers"]["conv3"] == "fp32" and q["layers"]["conv2"] == "fp32" and q["layers"]["conv1"] == "int8"
    assert q["accuracy"]["y"]["cosine"] >= 0.999
    assert "kept in float: conv3 (accuracy budget)" in text
    # without the budget, the outlier costs accuracy: the budget was needed
    assert main(["compile", str(model), "-o", str(tmp_path / "all.kiln"), "--quantize", "int8", "--calib",
                 str(calib)]) == 0
    assert _manifest(tmp_path / "all.kiln")["quantization"]["accuracy"]["y"]["cosine"] < 0.999


def test_exclude_keeps_named_layers_in_float(tmp_path, capsys):
    model = _model(tmp_path / "m.onnx")
    out = tmp_path / "m_int8.kiln"
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib",
                 str(_samples(tmp_path / "c.npz", 8)), "--exclude", "conv1,add", "--no-per-channel"]) == 0
    q = _manifest(out)["quantization"]
    # only the (float) add reads conv3's output: conv3 has no requantize and ends in float too, though
    # it still reads its input quantized, so conv2 stays int8
    assert q["layers"] == {"conv1": "fp32", "conv2": "int8", "conv3": "fp32", "add": "fp32", "conv4": "int8",
                           "fc": "int8"}
    assert q["kept_float"]["conv1"] == "--exclude" and q["kept_float"]["add"] == "--exclude"
    assert q["kept_float"]["conv3"].startswith("its output stays float")
    assert "per tensor" in q["scheme"]["weights"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantization: int8 in 3 of 6 layers (minmax calibration on 6 samples)" in text
    assert "kept in float: conv1 (--exclude)" in text and "y: cosine" in text




@pytest.mark.parametrize("extra, message", [
    ([], "needs --calib"),
    (["--calib", "{wrong}"], "no array for input(s) x"),
    (["--calib", "{calib}", "--exclude", "nope"], "--exclude nope: no quantizable layer"),
    (["--calib", "{calib}", "--accuracy-budget", "speed>=1"], "accuracy budget 'speed>=1'"),
    (["--calib", "{short}"], "sample has shape [1, 3, 20, 20]; the model takes [1, 3, 24, 24]"),
])
def test_quantize_refusals_are_one_line(tmp_path, capsys, extra, message):
    model = _model(tmp_path / "m.onnx")
    files = {"calib": _samples(tmp_path / "c.npz", 4), "wrong": tmp_path / "w.npz", "short": tmp_path / "s.npz"}
    np.savez(files["wrong"], image=np.zeros((4, 3, 24, 24), np.float32))
    np.savez(files["short"], x=np.zeros((4, 3, 20, 20), np.float32))
    args = [a.format(**files) for a in extra]
    out = tmp_path / "out.kiln"
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[kiln] ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and message in lines[0], lines
    assert not out.exists()


def test_already_quantized_model_is_refused(tmp_path, capsys):
    model = _model(tmp_path / "m.onnx")
    calib = _samples(tmp_path / "c.npz", 8)
    assert main(["compile", str(model), "-o", str(tmp_path / "a.kiln"), "--quantize", "int8", "--calib", str(calib)]) == 0
    capsys.readouterr()
    session = QuantizeSession(str(model), QuantizeOptions(str(calib), observer="evaluator"), cpu_target())
    session.prepare()
    session.calibrate()
    onnx.save(to_onnx(session.quantized_graph()), tmp_path / "qdq.onnx")
    session.close()
    assert main(["compile", str(tmp_path / "qdq.onnx"), "-o", str(tmp_path / "b.kiln"), "--quantize", "int8",
                 "--calib", str(calib)]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.skipif(not VNNI, reason="the host CPU has no AVX-512 VNNI")
def test_light_resnet50_int8_from_real_photographs(real_model, tmp_path, capsys):
    """The light ResNet-50 (its logits: the random-weight softmax saturates to one class), calibrated
    on crops of real photographs and checked on crops of other photographs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from calib_images import calibration_sets

    m = onnx.load(real_model("light_resnet50"))
    softmax = next(n for n in m.graph.node if n.op_type == "Softmax")
    m.graph.node.remove(softmax)
    m.graph.output[0].name = softmax.input[0]
    onnx.save(m, tmp_path / "r50_logits.onnx")
    cal, ev = calibration_sets(224, calib=8, held_out=8)
    np.savez(tmp_path / "calib.npz", **{"gpu_0/data_0": cal})
    np.savez(tmp_path / "eval.npz", **{"gpu_0/data_0": ev})
    out = tmp_path / "r50_int8.kiln"
    assert main(["compile", str(tmp_path / "r50_logits.onnx"), "-o", str(out), "--quantize", "int8", "--calib",
                 str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz")]) == 0
    capsys.readouterr()
    q = _manifest(out)["quantization"]
    assert list(q["layers"].values()).count("int8") == 70  # 53 convs, 16 residual adds and the classifier
    assert q["int8_kernels"] == 54  # the adds run in their convs' write-back
    assert q["calibration"]["observer"] == "compiled"
    (acc,) = q["accuracy"].values()
    assert acc["cosine"] > 0.999 and acc["argmax_agreement"] == 1.0


@pytest.mark.skipif(not VNNI, reason="the host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("form", ["silu", "hardswish", "hardswish-hardsigmoid", "sigmoid"])
def test_activation_write_back_compiles_to_one_kernel_and_matches(form, tmp_path):
    """An activation between int8 convs runs in the conv's write-back: compiled, it matches the
    unfused QDQ graph within one output step (float32 activations may round a half step apart)."""
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.passes import PassManager
    from kiln.passes.layout import QACTIVATION_RULES
    from kiln.passes.pipeline import passes_for

    rule = next(r for r in QACTIVATION_RULES if r.name == f"qblocked-conv-{form}")
    graph = rule.example()
    x = np.random.default_rng(5).normal(0, 1, (1, 24, 7, 7)).astype(np.float32)
    want = evaluate(graph, {"x": x})
    optimized, report = PassManager(passes_for("O3", block=16)).run(graph.clone())
    assert report.rule_counts().get(rule.name) == 1
    convs = [n for n in optimized.nodes if n.op_type == "QBlockedConv"]
    assert len(convs) == 1 and convs[0].attr("activation")
    assert not any(n.op_type in ("Sigmoid", "HardSwish", "HardSigmoid", "Mul") for n in optimized.nodes)
    build(optimized, tmp_path / "a.kiln")
    got = kiln.runtime.load(tmp_path / "a.kiln").run({"x": x})
    (name,) = want
    diff = np.abs(got[name] - want[name])
    assert diff.max() <= 0.0301 and (diff > 0).mean() < 0.01


def test_a_symbolic_batch_is_calibrated_and_compiled_once(tmp_path, capsys):
    m = onnx.load(_model(tmp_path / "m.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(m, tmp_path / "sym.onnx")
    out = tmp_path / "s.kiln"
    assert main(["compile", str(tmp_path / "sym.onnx"), "-o", str(out), "--quantize", "int8", "--calib",
                 str(_samples(tmp_path / "c.npz", 6))]) == 0
    import kiln.runtime

    art = kiln.runtime.load(out)
    x = np.random.default_rng(2).normal(0, 1, (3, 3, 24, 24)).astype(np.float32)
    batched = art.run({"x": x})["y"]
    one = np.concatenate([art.run({"x": x[i:i + 1]})["y"] for i in range(3)])
    np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not VNNI, reason="the host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("m, k, n, bias", [(1, 2048, 1000, True), (3, 64, 32, False), (2, 36, 20, True)])
def test_int8_dense_kernel_matches_its_semantics(m, k, n, bias, tmp_path):
    """kiln::QDense compiled (VNNI, tensorized) against its numpy definition: the integer sums are
    exact, the float32 scale and bias may differ by a fused multiply-add's rounding."""
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.ir.kiln_ops import pack_qdense_weight, qdense
    from kiln.passes.rules import example_graph

    rng = np.random.default_rng(m * k + n)
    npad = -(-n // 16) * 16
    w = pack_qdense_weight(rng.integers(-127, 128, (n, k)).astype(np.int8))
    c = rng.integers(-50_000, 50_000, npad).astype(np.int32)
    s = (rng.random(npad) * 1e-3).astype(np.float32)
    b = rng.standard_normal(npad).astype(np.float32)

    def build_graph(op, x):
        consts = [op.constant(w), op.constant(c), op.constant(s)] + ([op.constant(b)] if bias else [])
        return op.kiln.QDense(x, *consts, n=n)

    graph = example_graph("qdense", {"x": (DType.UINT8, (m, k))}, build_graph)
    build(graph, tmp_path / "d.kiln")
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    (want,) = qdense(x, w, c, s, b if bias else None, n=n)
    got = next(iter(kiln.runtime.load(tmp_path / "d.kiln").run({"x": x}).values()))
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_int8 import _disassembly

    import re

    funcs = re.split(r"\n(?=[0-9a-f]+ <)", _disassembly(tmp_path / "d.kiln", tmp_path))
    assert any("<qdense_compute_" in f.split("\n")[0] and "vpdpbusd" in f for f in funcs)  # tensorized, not fallback


def test_a_residual_add_after_a_fused_activation_is_not_folded():
    """The write-back adds the residual before its activation; an add that follows the activation
    must stay outside, or the order of the two would change."""
    from kiln.passes.layout import INT8_BLOCK, QRESIDUAL_RULES, example_qconv
    from kiln.passes.rules import example_graph

    def build(op, x, z):  # an int8 conv ending in SiLU -> DQ -> Add(DQ(z)) -> Q
        xq = op.kiln.ToBlocked(op.QuantizeLinear(x, op.constant(np.float32(0.02)), op.constant(np.uint8(120))),
                               block=INT8_BLOCK)
        c = example_qconv(op, xq, np.random.default_rng(0), y_zero_point=40)  # the zero point the DQ reads
        c.producer.set_attr("activation", "SiLU")
        s, zp = op.constant(np.float32(0.03)), op.constant(np.uint8(40))
        total = op.Add(op.DequantizeLinear(c, s, zp), op.DequantizeLinear(z, s, zp))
        return op.QuantizeLinear(total, op.constant(np.float32(0.05)), op.constant(np.uint8(30)))

    graph = example_graph("act_then_add", {"x": (DType.FLOAT32, (1, 24, 7, 7)), "z": (DType.UINT8, (1, 2, 7, 7, 16))},
                          build, opset=21)
    add = next(r for r in QRESIDUAL_RULES if r.name == "qblocked-conv-add")
    attempt = add.try_match(graph.outputs[0].producer)
    assert "already ends in an activation" in getattr(attempt, "reason", "")
