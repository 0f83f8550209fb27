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
from kiln.errors import InputError
from helpers import f32, make_model, ort_outputs

SEQ, BATCH, WIDTH, HIDDEN = 3, 2, 4, 5
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _rnn_model(op: str, direction: str, *, bias: bool, initial: bool, seq=SEQ, batch=BATCH, hidden=HIDDEN,
               lens: bool = False, peepholes: bool = False, weights_as_inputs: bool = False, scale: float = 0.5,
               **attrs):
    """One RNN/GRU/LSTM node with seeded weights; X, the initial states and sequence_lens are graph inputs.

    ``seq`` and ``batch`` may be names (symbolic dims); with ``layout=1`` X and the states are batch first.
    """
    rng = np.random.default_rng(len(op) + len(direction))
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    arrays = {"W": rng.standard_normal((dirs, gates * hidden, WIDTH)) * scale,
              "R": rng.standard_normal((dirs, gates * hidden, hidden)) * scale}
    if bias:
        arrays["B"] = rng.standard_normal((dirs, 2 * gates * hidden)) * scale
    if peepholes:
        arrays["P"] = rng.standard_normal((dirs, 3 * hidden)) * scale
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]
    first = attrs.get("layout", 0)
    inputs = [f32("X", [batch, seq, WIDTH] if first else [seq, batch, WIDTH])]
    if weights_as_inputs:  # W and R computed at run time: fed, not constants
        inputs += [f32(i.name, list(i.dims)) for i in inits[:2]]
        inits = inits[2:]
    ins = ["X", "W", "R", "B" if bias else "", "lens" if lens else ""]
    if lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [batch]))
    state = [batch, dirs, hidden] if first else [dirs, batch, hidden]
    ins += ["", ""]
    if initial:
        ins[5] = "h0"
        inputs.append(f32("h0", state))
        if op == "LSTM":
            ins[6] = "c0"
            inputs.append(f32("c0", state))
    if peepholes:
        ins.append("P")
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, ins[:8 if peepholes else 7 if op == "LSTM" else 6], outs, hidden_size=hidden,
                            direction=direction, **attrs)
    return make_model([node], inputs, [f32(o, None) for o in outs], inits)


def _feeds(model, seed: int = 1, **dims: int) -> dict[str, np.ndarray]:
    """Seeded inputs; symbolic dims take their sizes from ``dims``, and sequence_lens runs from 0 to the sequence."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in i.type.tensor_type.shape.dim]
        if i.name == "lens":
            seq = dims.get("T", SEQ)
            out[i.name] = np.resize(np.array([0, seq, seq // 2, 1, seq], np.int32), shape)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _compile_and_compare(model, tmp_path, feeds_list, oracle=None, **build_kw):
    out = tmp_path / "m.kiln"
    build(kiln.load(model), out, **build_kw)
    compiled = kiln.runtime.load(out)
    for feeds in feeds_list:
        got = compiled.run(feeds)
        cmp = compare("m", got, (oracle or ort_outputs)(model, feeds), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs
    return out


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction,bias,initial", [
    ("forward", True, False), ("forward", False, True), ("reverse", True, True), ("bidirectional", True, True),
    ("bidirectional", False, False),
])
def test_rnn_compiles_and_matches_onnxruntime(op, direction, bias, initial, tmp_path):
    model = _rnn_model(op, direction, bias=bias, initial=initial)
    _compile_and_compare(model, tmp_path, [_feeds(model)])


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_symbolic_sequence_and_batch_with_run_time_sequence_lens(op, direction, tmp_path):
    """One artifact, no shape flags: two sequence lengths and two batches (a register tile of rows and a remainder),
    with lengths from 0 to the whole sequence given at run time."""
    model = _rnn_model(op, direction, bias=True, initial=True, seq="T", batch="N", lens=True)
    _compile_and_compare(model, tmp_path, [_feeds(model, T=3, N=2), _feeds(model, 2, T=9, N=7)])


@pytest.mark.parametrize("op,attrs", [
    ("GRU", {"linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1, "bias": False}),
    ("LSTM", {"clip": 0.7}),
    ("GRU", {"clip": 0.4}),
    ("LSTM", {"peepholes": True, "lens": True}),
    ("LSTM", {"input_forget": 1}),
    ("LSTM", {"activations": ["HardSigmoid", "Relu", "Tanh", "Sigmoid", "LeakyRelu", "ScaledTanh"],
              "activation_alpha": [0.3, 0.2, 0.9], "activation_beta": [0.4, 1.1]}),
    ("GRU", {"activations": ["Affine", "Elu", "Softsign", "Softplus"], "activation_alpha": [0.5, 0.7],
             "activation_beta": [0.1]}),
    ("RNN", {"activations": ["ThresholdedRelu", "Sigmoid"], "activation_alpha": [0.1]}),
])
def test_rnn_attributes_match_onnxruntime(op, attrs, tmp_path):
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    model = _rnn_model(op, "bidirectional", bias=bias, initial=True, seq="T", batch="N", **attrs)
    _compile_and_compare(model, tmp_path, [_feeds(model, T=4, N=5)])


def _transposed_oracle(layout0_model):
    """onnxruntime has no layout=1: its layout-0 twin on transposed inputs, the outputs transposed back."""

    def run(_model, feeds):
        f0 = {k: v.transpose(1, 0, 2) if v.ndim == 3 else v for k, v in feeds.items()}
        got = ort_outputs(layout0_model, f0)
        return {k: v.transpose(2, 0, 1, 3) if v.ndim == 4 else v.transpose(1, 0, 2) for k, v in got.items()}

    return run


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_batch_first_layout(op, tmp_path):
    model = _rnn_model(op, "bidirectional", bias=True, initial=True, seq="T", batch="N", lens=True, layout=1)
    twin = _rnn_model(op, "bidirectional", bias=True, initial=True, seq="T", batch="N", lens=True)
    _compile_and_compare(model, tmp_path, [_feeds(model, T=5, N=6)], oracle=_transposed_oracle(twin))


def test_weights_are_prepacked_once_at_compile_time(tmp_path):
    """Constant W and R are laid out for the kernels in the artifact: two kernels, no transposes per run."""
    from kiln.codegen.lowering import lower

    model = _rnn_model("LSTM", "forward", bias=True, initial=False)
    lowered = lower(kiln.load(model))
    kernels = sorted(gv.name_hint for gv in lowered.module.get_global_vars() if gv.name_hint != "main")
    assert kernels == ["lstm_projection", "lstm_recurrence"]
    assert {a.shape for a in lowered.weights.values()} == {(WIDTH, 4 * HIDDEN), (1, HIDDEN, 4 * HIDDEN)}


def test_weights_computed_at_run_time(tmp_path):
    model = _rnn_model("GRU", "bidirectional", bias=True, initial=True, weights_as_inputs=True)
    _compile_and_compare(model, tmp_path, [_feeds(model)])


def test_avx2_register_tiles(tmp_path):
    """The AVX2 target's smaller register tile over the batch (the host runs AVX2 code too)."""
    from kiln.codegen.target import cpu_target

    model = _rnn_model("LSTM", "forward", bias=True, initial=True, seq="T", batch="N", hidden=16)
    _compile_and_compare(model, tmp_path, [_feeds(model, T=4, N=7)], target=cpu_target(features={"avx2", "fma"}))


def test_inf_in_recurrence_weights_matches_onnxruntime(tmp_path):
    """0 * Inf makes a NaN gate at t=0; onnxruntime's sigmoid maps it to 1, and so does kiln's."""
    model = _rnn_model("LSTM", "forward", bias=True, initial=False)
    r = numpy_helper.to_array(model.graph.initializer[1]).copy()
    r[0, 3, 2] = np.inf
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(r, "R"))
    _compile_and_compare(model, tmp_path, [_feeds(model)])


def test_1000_step_lstm_matches_onnxruntime(tmp_path):
    """A sequence of 1,000 steps runs as a loop: the artifact is as small as for 10 steps, and it matches."""
    model = _rnn_model("LSTM", "bidirectional", bias=True, initial=True, seq=1000, batch=1, hidden=32, scale=0.2)
    _compile_and_compare(model, tmp_path, [_feeds(model)])


@pytest.mark.parametrize("change,message", [
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Gelu", "Tanh", "Tanh"])),
     "unknown activation 'gelu'"),
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Relu", "Tanh"])),
     "2 activations given, LSTM needs 3"),
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
        with pytest.raises(InputError, match=r"^If .* took a branch that cannot run at the compiled shapes: .*X must have 3"):
            model.run({"input": np.zeros((1, 512), np.float32), "state": np.zeros((2, 1, 128), np.float32),
                       "sr": np.array(8000, np.int64)})


def test_silero_at_256_samples_runs_both_sample_rates(real_model, tmp_path):
    """One artifact, both branches of silero-vad's If on sr compiled: 8 kHz and 16 kHz chunks of 256 samples."""
    path = real_model("silero_vad")
    model = _compile_silero("silero_vad", path, tmp_path, 256)
    for sr in (8000, 16000):
        _run_chunks(model, path, sr, 256)
