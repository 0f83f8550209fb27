"""The attention kernel (kiln::Attention, made by the transformer fusion): a tile of query rows through
QK^T, softmax and P·V at a time. Compiled and compared with onnxruntime on the unfused graph, over the
shapes and masks exporters write: static and symbolic sequences, head dims that do not fill a
vector, masks broadcast over heads and rows, fully masked rows."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.runtime
from helpers import f32, make_model, ort_outputs

CASES = {  # name: (q/k/v shape [B, H, S, D], mask shape or None, rows of the mask set to -inf)
    "bert-base head": ((1, 12, 128, 64), (1, 1, 1, 128), 0),
    "odd sizes": ((2, 3, 37, 20), (2, 1, 37, 37), 0),
    "no mask": ((1, 2, 50, 32), None, 0),
    "a causal 2-D mask with fully masked rows": ((1, 4, 24, 16), (24, 24), 3),
    "symbolic sequence": ((1, 2, "S", 64), (1, 1, 1, "S"), 0),
    # static counts the tiles do not divide are padded: ViT-B/16's 197 tokens, a Swin window's 49
    "vit 197 tokens": ((1, 12, 197, 64), None, 0),
    "swin window of 49 with a mask": ((4, 3, 49, 32), (4, 1, 49, 49), 2),
    # beyond 512 keys: Q.Kt (a key count the vectors do not divide), softmax and P.V as three kernels
    "long sequence": ((1, 2, 600, 24), (1, 1, 1, 600), 0),
    "long sequence with fully masked rows": ((1, 2, 520, 16), (520, 520), 5),
}


def _model(shape, mask_shape):
    b, h, s, d = shape
    kt = helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])
    nodes = [kt, helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "c"], ["sc"])]
    last = "sc"
    if mask_shape is not None:
        nodes.append(helper.make_node("Add", ["sc", "mask"], ["scm"]))
        last = "scm"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    inputs = [f32(n, list(shape)) for n in ("q", "k", "v")] + ([f32("mask", list(mask_shape))] if mask_shape else [])
    c = numpy_helper.from_array(np.array(1 / np.sqrt(d if isinstance(d, int) else 64), np.float32), "c")
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [c], opset=17)


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_kernel_matches_onnxruntime(tmp_path, caplog, case):
    shape, mask_shape, masked_rows = CASES[case]
    model = _model(shape, mask_shape)
    path = tmp_path / "m.kiln"
    graph = kiln.load(model.SerializeToString())
    with caplog.at_level(logging.DEBUG, logger="kiln.schedule"):
        kiln.compile(graph, path)
    assert "kiln::Attention" in {n.qualified_op for n in kiln.optimize(kiln.load(model.SerializeToString()))[0].nodes}
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]  # its schedules applied
    runtime = kiln.runtime.load(path)
    rng = np.random.default_rng(0)
    for s in ((shape[2],) if isinstance(shape[2], int) else (7, 130)):
        dims = [s if not isinstance(x, int) else x for x in shape]
        feeds = {n: rng.standard_normal(dims).astype(np.float32) for n in ("q", "k", "v")}
        if mask_shape is not None:
            mdims = [s if not isinstance(x, int) else x for x in mask_shape]
            mask = np.where(rng.random(mdims) < 0.2, -np.inf, 0.0).astype(np.float32)
            if masked_rows:
                mask[:masked_rows] = -np.inf  # every key masked: softmax gives NaN rows, as onnxruntime does
            feeds["mask"] = mask
        got, want = runtime.run(feeds)["y"], ort_outputs(model, feeds)["y"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert np.isnan(got).sum() == np.isnan(want).sum()
