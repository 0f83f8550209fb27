"""kiln's own ops: numpy semantics vs their standard-ONNX decomposition, and the round trip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kiln.check import compare
from kiln.ir import DType, evaluate, load, to_onnx
from kiln.ir.kiln_ops import ACTIVATION_ARITY, ACTIVATIONS
from kiln.ir.oracle import run_onnxruntime
from kiln.passes.rules import example_graph

PARAMS = {"Clip": (0.0, 6.0), "LeakyRelu": (0.1,), "HardSigmoid": (0.2, 0.5), "Gelu": (0.0,)}


def _conv_graph(act: str, params, opset: int, residual: bool):
    rng = np.random.default_rng(1)

    def build(op, x, *z):
        w = op.constant(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
        b = op.constant(rng.standard_normal(4).astype(np.float32))
        return op.kiln.FusedConv(x, w, b, z[0] if z else None, pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3],
                                 activation=act, activation_params=list(params))

    inputs = {"x": (DType.FLOAT32, (1, 3, 5, 5))}
    if residual:
        inputs["z"] = (DType.FLOAT32, (1, 4, 5, 5))
    return example_graph("fc", inputs, build, opset=opset)


@pytest.mark.parametrize("opset", [11, 17, 20])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_fused_conv_semantics_match_its_decomposition(act, opset):
    params = PARAMS.get(act, ())
    for residual in (False, True):
        g = _conv_graph(act, params, opset, residual)
        g.verify()
        rng = np.random.default_rng(2)
        feeds = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in g.inputs}
        model = to_onnx(g)
        onnx.checker.check_model(model, full_check=True)
        cmp = compare(act, evaluate(g, feeds), run_onnxruntime(model.SerializeToString(), feeds), 1e-5, 1e-6)
        assert cmp.passed, (act, opset, residual, cmp.max_abs)
        back = load(model)
        assert [n.qualified_op for n in back.nodes] == ["kiln::FusedConv"]
        assert back.nodes[0].attr("activation", "") == act


def test_gelu_tanh_form():
    g = _conv_graph("Gelu", (1.0,), 17, False)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 3, 5, 5)).astype(np.float32)}
    cmp = compare("gelu-tanh", evaluate(g, feeds), run_onnxruntime(to_onnx(g).SerializeToString(), feeds), 1e-5, 1e-6)
    assert cmp.passed


def test_fused_gemm_matches_its_decomposition():
    rng = np.random.default_rng(4)

    def build(op, a):
        return op.kiln.FusedGemm(a, op.constant(rng.standard_normal((6, 5)).astype(np.float32)),
                                 op.constant(rng.standard_normal(6).astype(np.float32)), transB=1, alpha=0.5, beta=2.0,
                                 activation="HardSigmoid", activation_params=[0.2, 0.5])

    g = example_graph("fg", {"a": (DType.FLOAT32, (3, 5))}, build)
    assert g.outputs[0].type_str() == "f32[3,6]"
    feeds = {"a": rng.standard_normal((3, 5)).astype(np.float32)}
    cmp = compare("gemm", evaluate(g, feeds), run_onnxruntime(to_onnx(g).SerializeToString(), feeds), 1e-5, 1e-6)
    assert cmp.passed


def test_activation_arity_is_checked_by_the_table():
    from kiln.ir.kiln_ops import check_activation

    assert check_activation("Clip", (0.0,)) == "activation Clip takes 2 parameter(s), got 1"
    assert check_activation("Nope", ()) == "unknown activation 'Nope'"
    assert all(check_activation(a, PARAMS.get(a, ())) == "" for a in ACTIVATIONS)
    assert set(ACTIVATION_ARITY) <= set(ACTIVATIONS)


def test_verify_rejects_a_bad_epilogue():
    from kiln.errors import VerifyError

    g = _conv_graph("Relu", (), 17, False)
    g.nodes[0].set_attr("activation", "Swoosh")
    with pytest.raises(VerifyError, match="unknown activation 'Swoosh'"):
        g.verify()
    g.nodes[0].set_attr("activation", "Clip")
    with pytest.raises(VerifyError, match="activation Clip takes 2 parameter"):
        g.verify()


def test_qblocked_conv_matches_its_decomposition():
    from kiln.passes import PassManager
    from kiln.passes.layout import QLINEARCONV_BLOCKED
    from kiln.passes.pipeline import passes_for

    g = QLINEARCONV_BLOCKED.example()
    g, _ = PassManager(passes_for("O3", block=16)).run(g)
    assert sum(1 for n in g.walk_nodes() if n.op_type == "QBlockedConv") == 1
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((1, 20, 9, 9)).astype(np.float32) * 2}
    model = to_onnx(g)  # kiln ops as functions: QBlockedConv is ConvInteger, Round, Max/Min and transforms
    onnx.checker.check_model(model, full_check=True)
    assert any(f.name.startswith("QBlockedConv") for f in model.functions)
    cmp = compare("qconv", evaluate(g, feeds), run_onnxruntime(model.SerializeToString(), feeds), 0, 1e-6)
    assert cmp.passed, cmp.max_abs
