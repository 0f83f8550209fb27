"""LinearAttention compiled through kiln, at symbolic batch and time, against onnx's reference
implementation (onnxruntime has no kernel for it yet); the node suite covers each update rule at
its fixed shapes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import kiln
import kiln.runtime
from kiln.codegen.build import build
from helpers import f32, make_model


@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
def test_linear_attention_at_symbolic_batch_and_time(tmp_path, rule):
    hq, hk, dk, dv = 4, 2, 3, 5
    inputs = [f32("q", ["b", "t", hq * dk]), f32("k", ["b", "t", hk * dk]), f32("v", ["b", "t", hk * dv]),
              f32("past", ["b", hk, dk, dv])]
    names = ["q", "k", "v", "past"]
    if rule in ("gated", "gated_delta"):
        inputs.append(f32("g", ["b", "t", hk * dk]))
    names.append("g" if rule in ("gated", "gated_delta") else "")
    if rule in ("delta", "gated_delta"):
        inputs.append(f32("beta", ["b", "t", hk]))
        names.append("beta")
    node = helper.make_node("LinearAttention", names, ["y", "state"], q_num_heads=hq, kv_num_heads=hk,
                            update_rule=rule)
    model = make_model([node], inputs, [f32("y", None), f32("state", None)], opset=27, ir_version=13)
    path = tmp_path / "m.kiln"
    build(kiln.load(model.SerializeToString()), path)
    compiled = kiln.runtime.load(path, threads=1)
    reference = ReferenceEvaluator(model)
    rng = np.random.default_rng(11)
    for b, t in ((1, 1), (2, 7)):
        feeds = {"q": rng.standard_normal((b, t, hq * dk), np.float32),
                 "k": rng.standard_normal((b, t, hk * dk), np.float32) * 0.5,
                 "v": rng.standard_normal((b, t, hk * dv), np.float32),
                 "past": rng.standard_normal((b, hk, dk, dv), np.float32)}
        if "g" in names:
            feeds["g"] = -rng.random((b, t, hk * dk), np.float32)
        if "beta" in names:
            feeds["beta"] = rng.random((b, t, hk), np.float32)
        got = compiled.run(feeds)
        want = dict(zip(["y", "state"], reference.run(None, feeds)))
        for name in ("y", "state"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} at b={b}, t={t}")
