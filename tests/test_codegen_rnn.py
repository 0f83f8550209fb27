"""Compiled LSTM, GRU and If (relax.If), and both silero-vad models, against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.runtime
from kiln.check import compare
from kiln.cli import main
from kiln.codegen.build import build
from kiln.codegen.lowering import CodegenError
from helpers import f32, make_model, ort_outputs

SEQ, BATCH, WIDTH, HIDDEN = 3, 2, 4, 5


def _rnn_model(op: str, direction: str, *, bias: bool, initial: bool, seq=SEQ, **attrs):
    """One LSTM/GRU node with seeded weights; X and the initial states are graph inputs."""
    rng = np.random.default_rng(len(op) + len(direction))
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, gates * HIDDEN, WIDTH)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((dirs, gates * HIDDEN, HIDDEN)) * 0.5).astype(np.float32), "R")]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 2 * gates * HIDDEN)) * 0.5).astype(np.float32), "B"))
    ins = ["X", "W", "R", "B" if bias else "", ""]
    inputs = [f32("X", [seq, BATCH, WIDTH])]
    if initial:
        ins.append("h0")
        inputs.append(f32("h0", [dirs, BATCH, HIDDEN]))
        if op == "LSTM":
            ins.append("c0")
            inputs.append(f32("c0", [dirs, BATCH, HIDDEN]))
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, ins, outs, hidden_size=HIDDEN, direction=direction, **attrs)
    return make_model([node], inputs, [f32(o, None) for o in outs], inits)


def _feeds(model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _compile_and_compare(model, tmp_path, feeds_list):
    out = tmp_path / "m.kiln"
    build(kiln.load(model), out)
    compiled = kiln.runtime.load(out)
    for feeds in feeds_list:
        got = compiled.run(feeds)
        cmp = compare("m", got, ort_outputs(model, feeds), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction,bias,initial", [
    ("forward", True, False), ("forward", False, True), ("reverse", True, True), ("bidirectional", True, True),
    ("bidirectional", False, False),
])
def test_rnn_compiles_and_matches_onnxruntime(op, direction, bias, initial, tmp_path):
    model = _rnn_model(op, direction, bias=bias, initial=initial)
    _compile_and_compare(model, tmp_path, [_feeds(model)])


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_linear_before_reset(direction, tmp_path):
    model = _rnn_model("GRU", direction, bias=True, initial=True, linear_before_reset=1)
    _compile_and_compare(model, tmp_path, [_feeds(model)])


def test_lstm_with_constant_full_sequence_lens(tmp_path):
    model = _rnn_model("LSTM", "forward", bias=True, initial=False)
    model.graph.node[0].input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.full(BATCH, SEQ, np.int32), "lens"))
    _compile_and_compare(model, tmp_path, [_feeds(model)])


@pytest.mark.parametrize("change,message", [
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("clip", 1.0)), "the 'clip' attribute"),
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Relu", "Tanh", "Tanh"])),
     "only the default activations"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_param", "T"),
     "the sequence length T must be static"),
])
def test_rnn_refusals_are_one_line_errors(change, message, tmp_path):
    model = _rnn_model("LSTM", "forward", bias=True, initial=False)
    change(model)
    with pytest.raises(CodegenError, match=message):
        build(kiln.load(model), tmp_path / "m.kiln")
    assert not list(tmp_path.iterdir())


def _if_model():
    """``y = If(flag, then: W @ x + Relu(x) (nested: If(flag2, ...)), else: -x)``; W lives in the branch."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    inner_then = helper.make_graph([helper.make_node("Sigmoid", ["m"], ["it"])], "it", [], [f32("it", None)])
    inner_else = helper.make_graph([helper.make_node("Tanh", ["x"], ["ie"])], "ie", [], [f32("ie", None)])
    then = helper.make_graph(
        [helper.make_node("MatMul", ["W", "x"], ["m"]), helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("If", ["flag2"], ["inner"], then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Add", ["inner", "r"], ["t"])],
        "then", [], [f32("t", None), f32("r", None)], initializer=[w])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"]), helper.make_node("Identity", ["x"], ["xi"])],
                              "else", [], [f32("e", None), f32("xi", None)])
    bool_in = [helper.make_tensor_value_info(n, TensorProto.BOOL, s) for n, s in (("flag", []), ("flag2", [1]))]
    nodes = [helper.make_node("Exp", ["x0"], ["x"]),
             helper.make_node("If", ["flag"], ["y", "z"], then_branch=then, else_branch=other)]
    return make_model(nodes, [f32("x0", [8, 8]), *bool_in], [f32("y", None), f32("z", None)])


def test_if_on_a_run_time_condition_compiles_to_relax_if(tmp_path):
    model = _if_model()
    x0 = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) * 0.3
    feeds = [{"x0": x0, "flag": np.array(a), "flag2": np.array([b])} for a in (True, False) for b in (True, False)]
    _compile_and_compare(model, tmp_path, feeds)


def test_loop_is_refused_by_name(tmp_path):
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c2"]), helper.make_node("Neg", ["v"], ["v2"])],
                             "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                      helper.make_tensor_value_info("c", TensorProto.BOOL, []), f32("v", [2])],
                             [helper.make_tensor_value_info("c2", TensorProto.BOOL, []), f32("v2", [2])])
    model = make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body, name="loop")],
                       [f32("x", [2])], [f32("y", [2])], [numpy_helper.from_array(np.array(3, np.int64), "n")])
    with pytest.raises(CodegenError, match=r"kiln cannot compile these ops yet: Loop \(nodes: loop\)"):
        build(kiln.load(model), tmp_path / "m.kiln")


def test_silero_helper_ops_compile_and_match(tmp_path):
    """1-D Conv (groups, strides, asymmetric pads), Pad (reflect, edge, constant), Gather, ReduceMean and Not."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 2, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 3], np.int64), "pads"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([2, -1], np.int64), "idx")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, strides=[2], pads=[1, 2]),
        helper.make_node("Pad", ["c", "pads"], ["pr"], mode="reflect"),
        helper.make_node("Pad", ["c", "pads"], ["pe"], mode="edge"),
        helper.make_node("Pad", ["c", "pads"], ["pc"]),
        helper.make_node("Gather", ["pr", "one"], ["g0"], axis=1),
        helper.make_node("Gather", ["pe", "idx"], ["g1"], axis=2),
        helper.make_node("ReduceMean", ["pc"], ["m"], axes=[1, 2], keepdims=1),
        helper.make_node("Not", ["flag"], ["nf"]),
    ]
    model = make_model(nodes, [f32("x", [2, 4, 9]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [3])],
                       [f32(o, None) for o in ("g0", "g1", "m")] +
                       [helper.make_tensor_value_info("nf", TensorProto.BOOL, None)], inits, opset=13)
    feeds = {"x": rng.standard_normal((2, 4, 9)).astype(np.float32), "flag": np.array([True, False, True])}
    _compile_and_compare(model, tmp_path, [feeds])


# ------------------------------------------------------------------ silero-vad


def _compile_silero(name, path, tmp_path, samples: int):
    out = tmp_path / f"{name}_{samples}.kiln"
    pins = ["--input-shape", f"input=1x{samples}", "--input-shape", "state=2x1x128", "--input-shape", "sr="]
    assert main(["compile", str(path), "-o", str(out), *pins]) == 0
    return kiln.runtime.load(out)


def _run_chunks(model, path, sr: int, samples: int, chunks: int = 3):
    """Three chunks in a row, each fed the state the last one returned (kiln's own, onnxruntime's own)."""
    rng = np.random.default_rng(sr + samples)
    state_k = state_o = np.zeros((2, 1, 128), np.float32)
    for _ in range(chunks):
        x = (rng.standard_normal((1, samples)) * 0.3).astype(np.float32)
        got = model.run({"input": x, "state": state_k, "sr": np.array(sr, np.int64)})
        want = ort_outputs(str(path), {"input": x, "state": state_o, "sr": np.array(sr, np.int64)})
        cmp = compare("silero", got, want, rtol=1e-3, atol=1e-4)
        assert cmp.passed, cmp.max_abs
        state_k, state_o = got["stateN"], want["stateN"]


@pytest.mark.parametrize("name", ["silero_vad_op15", "silero_vad"])
def test_silero_compiles_and_its_state_carries_over_chunks(name, real_model, tmp_path):
    path = real_model(name)
    model = _compile_silero(name, path, tmp_path, 512)
    _run_chunks(model, path, 16000, 512)
    if name == "silero_vad":  # the 8 kHz branch needs 256 samples; at 512 it fails at run time, as in onnxruntime
        with pytest.raises(RuntimeError, match=r"took a branch that cannot run at the compiled shapes: .*X must have 3"):
            model.run({"input": np.zeros((1, 512), np.float32), "state": np.zeros((2, 1, 128), np.float32),
                       "sr": np.array(8000, np.int64)})


def test_silero_at_256_samples_runs_both_sample_rates(real_model, tmp_path):
    """One artifact, both branches of silero-vad's If on sr compiled: 8 kHz and 16 kHz chunks of 256 samples."""
    path = real_model("silero_vad")
    model = _compile_silero("silero_vad", path, tmp_path, 256)
    for sr in (8000, 16000):
        _run_chunks(model, path, sr, 256)
