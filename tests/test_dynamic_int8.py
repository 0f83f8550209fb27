"""Dynamic int8: the DynQDense kernel is exact against integer arithmetic on every path (VNNI, AVX2
vpmaddubsw for 7-bit weights, AVX2 int16 pairs for 8-bit ones), kiln's quantize-dynamic pass keeps a
model close to float, and models onnxruntime's quantize_dynamic wrote compile onto the same kernels
and match onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import kiln
import kiln.runtime
from helpers import f32, make_model, ort_outputs, speech_16k
from kiln.ir import DType, Evaluator, infer_shapes
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
    assert "dynamic int8: 12 of 12 layers in 12 int8 kernels" in text, text
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


# ------------------------------------------------------------------ recurrent layers (kiln::DynQRecurrence)


def _recurrent_model(op: str, *, dirs: int = 1, seq: int = 5, batch: int = 3, lbr: int = 0, layout: int = 0,
                     seq_lens: bool = False, peepholes: bool = False, **attrs):
    """One LSTM, GRU or RNN (H 32, input 24) with constant weights, its initial state an input; model and feeds."""
    rng = np.random.default_rng(0)
    H, width, G = 32, 24, {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    weights = {"W": (dirs, G * H, width), "R": (dirs, G * H, H), "B": (dirs, 2 * G * H)}
    if peepholes:
        weights["P"] = (dirs, 3 * H)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * (0.1 if n in "BP" else 0.3)).astype(np.float32), n)
             for n, s in weights.items()]
    state = [batch, dirs, H] if layout else [dirs, batch, H]
    ins = [f32("X", ["a", "b", width]), f32("h0", state)]
    names = ["X", "W", "R", "B", "sl" if seq_lens else "", "h0"]
    if op == "LSTM":
        names += ["", "P" if peepholes else ""]
    if seq_lens:
        ins.append(helper.make_tensor_value_info("sl", onnx.TensorProto.INT32, [batch]))
    outs = ["Y", "Yh"] + (["Yc"] if op == "LSTM" else [])
    attrs.update(hidden_size=H, direction="bidirectional" if dirs == 2 else "forward")
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, names, outs, **attrs)
    model = make_model([node], ins, [f32(o, None) for o in outs], inits, opset=14)
    feeds = {"X": rng.standard_normal([batch, seq, width] if layout else [seq, batch, width]).astype(np.float32),
             "h0": (rng.standard_normal(state) * 0.5).astype(np.float32)}
    if seq_lens:
        feeds["sl"] = np.array([seq, 0, seq - 2][:batch], np.int32)
    return model, feeds, outs


RECURRENT_CASES = {
    "lstm": ("LSTM", {}),
    "lstm-bidirectional-lengths": ("LSTM", dict(dirs=2, seq_lens=True)),
    "lstm-peepholes-clip-coupled": ("LSTM", dict(peepholes=True, clip=2.0, input_forget=1)),
    "gru": ("GRU", {}),
    "gru-linear-before-reset": ("GRU", dict(lbr=1)),
    "gru-batch-first-bidirectional": ("GRU", dict(layout=1, dirs=2, lbr=1)),  # onnx reference: no seq_lens
    "rnn-relu": ("RNN", dict(activations=["Relu"])),
    "lstm-one-row": ("LSTM", dict(batch=1, seq=7)),
}


@pytest.mark.parametrize("case", list(RECURRENT_CASES))
def test_dynamic_recurrence_stays_close_to_float_and_compiles_to_its_numbers(tmp_path, case):
    """quantize-dynamic turns the layer into a DynQDense projection and a DynQRecurrence: near the float layer
    (onnxruntime; for batch-first, which onnxruntime refuses, onnx's reference), and the compiled kernels
    compute what the quantized graph's reference says."""
    op, kw = RECURRENT_CASES[case]
    model, feeds, outs = _recurrent_model(op, **kw)
    want = (Evaluator(kiln.load(model)).run(feeds, outs) if kw.get("layout") else ort_outputs(model, feeds))
    g = kiln.load(model)
    q = QuantizeDynamic(weight_bits=7)
    g, _ = PassManager([q], max_iterations=1).run(g)
    g.verify()
    assert len(q.layers) == 1 and q.kept_float == {}
    ours = Evaluator(g).run(feeds, outs)
    for name in outs:  # states are tanh-bounded (relu: the RNN's within a few units): int8 moves them by < 0.06
        err = np.abs(ours[name] - want[name]).max()
        assert err < 0.06 * max(1.0, float(np.abs(want[name]).max())), (name, err)
    res = kiln.compile(g, tmp_path / "r.kiln")
    assert sorted(n.op_type for n in res.graph.nodes) == ["DynQDense", "DynQRecurrence"]
    got = kiln.runtime.load(tmp_path / "r.kiln").run(feeds)
    for name in outs:
        np.testing.assert_allclose(got[name], ours[name], rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("dirs", [1, 2])
def test_dynamic_lstm_matches_onnxruntime_dynamic_quantize_lstm(tmp_path, dirs):
    """The same int8 weights in onnxruntime's com.microsoft DynamicQuantizeLSTM give kiln's numbers: the input
    projection quantized per tensor and the hidden state at every step as DynamicQuantizeLinear does. One batch
    row (onnxruntime quantizes the state per chunk of rows its threads share out; kiln per row) and 7-bit
    weights (onnxruntime's AVX2 kernel saturates on 8-bit ones)."""
    from kiln.passes.quantize import dynamic_weight_quantization

    model, feeds, outs = _recurrent_model("LSTM", dirs=dirs, batch=1, seq=6)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w, r = init["W"], init["R"]
    gh, width, hidden = w.shape[1], w.shape[2], r.shape[2]
    wq, ws = dynamic_weight_quantization(w.reshape(dirs * gh, width).T, 7)
    rq, rs = dynamic_weight_quantization(r.reshape(dirs * gh, hidden).T, 7)
    consts = {"Wq": wq.reshape(width, dirs, gh).transpose(1, 0, 2), "Rq": rq.reshape(hidden, dirs, gh).transpose(1, 0, 2),
              "B": init["B"], "ws": ws.reshape(dirs, gh), "rs": rs.reshape(dirs, gh),
              "wz": np.zeros((dirs, gh), np.int8), "rz": np.zeros((dirs, gh), np.int8)}
    node = helper.make_node("DynamicQuantizeLSTM", ["X", "Wq", "Rq", "B", "", "h0", "", "", "ws", "wz", "rs", "rz"],
                            outs, domain="com.microsoft", hidden_size=hidden,
                            direction="bidirectional" if dirs == 2 else "forward")
    graph = helper.make_graph([node], "q", list(model.graph.input), list(model.graph.output),
                              [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in consts.items()])
    ort_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14),
                                                        helper.make_opsetid("com.microsoft", 1)])
    ort_model.ir_version = 8
    want = ort_outputs(ort_model, feeds)
    g = kiln.load(model)
    g, _ = PassManager([QuantizeDynamic(weight_bits=7, recurrent_weight_bits=7)], max_iterations=1).run(g)
    ours = Evaluator(g).run(feeds, outs)
    kiln.compile(g, tmp_path / "l.kiln")
    got = kiln.runtime.load(tmp_path / "l.kiln").run(feeds)
    for name in outs:
        np.testing.assert_allclose(ours[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dynamic_recurrence_counts_its_macs_like_the_float_layer():
    from kiln.ir.summary import node_macs

    model, _, _ = _recurrent_model("GRU", dirs=2)
    g = kiln.load(model)
    g.inputs[0].shape = (5, 3, 24)
    infer_shapes(g)
    before = sum(node_macs(n).constant() for n in g.nodes)
    assert before == 5 * 3 * 2 * 96 * (24 + 32)
    g, _ = PassManager([QuantizeDynamic()], max_iterations=1).run(g)
    after = sum((node_macs(n).constant() if node_macs(n) is not None else 0) for n in g.nodes)
    assert after == before


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng (Debian package) speaks the test audio")
def test_silero_vad_dynamic_int8_tracks_the_float_speech_probabilities(real_model, tmp_path):
    """silero-vad with its LSTM in int8 (projection and hidden-state products) gives the float model's speech
    probabilities within 0.02 over 50 chunks of real speech, each chunk 512 samples at 16 kHz after the 64 of
    context silero's own wrapper prepends, the state carried from chunk to chunk."""
    path = real_model("silero_vad")
    out = tmp_path / "vad.kiln"
    pins = ["--input-shape", "input=1x576", "--input-shape", "state=2x1x128", "--input-shape", "sr="]
    from kiln.cli import main

    assert main(["compile", str(path), "-o", str(out), "--quantize", "int8-dynamic", *pins]) == 0
    model = kiln.runtime.load(out)
    lstm = [n for n, v in model.manifest["quantization"]["layers"].items() if v == "int8"]
    assert len(lstm) == 1 and lstm[0].endswith("rnn/LSTM"), lstm  # the 16 kHz branch's (8 kHz needs 256 samples)
    audio = np.concatenate([np.zeros(4000, np.float32), speech_16k("Hello. The quick brown fox jumps over the lazy dog.")])
    audio = np.concatenate([np.zeros(64, np.float32), audio])
    sr = np.array(16000, np.int64)
    state_k = state_o = np.zeros((2, 1, 128), np.float32)
    got, want = [], []
    for i in range(50):
        x = audio[None, i * 512:(i + 1) * 512 + 64]
        k = model.run({"input": x, "state": state_k, "sr": sr})
        o = ort_outputs(str(path), {"input": x, "state": state_o, "sr": sr})
        state_k, state_o = k["stateN"], o["stateN"]
        got.append(float(k["output"].ravel()[0]))
        want.append(float(o["output"].ravel()[0]))
    got, want = np.array(got), np.array(want)
    assert want.min() < 0.1 and (want > 0.9).sum() >= 10, want  # the clip holds silence and speech
    assert np.abs(got - want).max() <= 0.02, np.abs(got - want).max()


@pytest.mark.parametrize("dirs", [1, 2])
def test_onnxruntime_dynamic_quantize_lstm_model_compiles_onto_kiln_kernels(tmp_path, dirs):
    """quantize_dynamic writes com.microsoft::DynamicQuantizeLSTM for an LSTM; kiln imports it as a DynQDense
    projection and a DynQRecurrence and matches onnxruntime (one batch row, 7-bit weights: see above)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, feeds, outs = _recurrent_model("LSTM", dirs=dirs, batch=1)
    onnx.save(model, tmp_path / "lstm.onnx")
    src = tmp_path / "lstm_q.onnx"
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(src), weight_type=QuantType.QInt8, reduce_range=True)
    assert [n.op_type for n in onnx.load(src).graph.node] == ["DynamicQuantizeLSTM"]
    res = kiln.compile(src, tmp_path / "lstm_q.kiln")
    assert sorted(n.op_type for n in res.graph.nodes) == ["DynQDense", "DynQRecurrence"]
    got = kiln.runtime.load(tmp_path / "lstm_q.kiln").run(feeds)
    want = ort_outputs(str(src), feeds)
    for name in outs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dynamic_quantize_lstm_with_run_time_weights_is_refused_in_one_line(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kiln.cli import main

    model, _, _ = _recurrent_model("LSTM", batch=1)
    onnx.save(model, tmp_path / "lstm.onnx")
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    q = onnx.load(tmp_path / "q.onnx")
    w = next(t for t in q.graph.initializer if t.name == q.graph.node[0].input[1])
    q.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    q.graph.initializer.remove(w)
    onnx.save(q, tmp_path / "q_runtime_w.onnx")
    assert main(["compile", str(tmp_path / "q_runtime_w.onnx"), "-o", str(tmp_path / "x.kiln")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[kiln]")]  # progress
    assert len(err) == 1 and "DynamicQuantizeLSTM" in err[0] and "its W must be an initializer" in err[0], err
