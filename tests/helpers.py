"""Helpers the test modules share: small ONNX models built with onnx.helper, and onnxruntime's outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.ir.oracle import run_onnxruntime


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits), **kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def ort_outputs(model: onnx.ModelProto | bytes | str, feeds) -> dict[str, np.ndarray]:
    """onnxruntime's outputs, by name, for a model proto, serialized bytes or a path."""
    return run_onnxruntime(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
                           if not isinstance(model, bytes) else model, feeds)


def shape_chain_model() -> onnx.ModelProto:
    """x[2,3,4] reshaped by a Shape -> Gather -> Unsqueeze -> Concat chain to [2, -1]."""
    return make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
            helper.make_node("Unsqueeze", ["d", "axes"], ["d1"]),
            helper.make_node("Concat", ["d1", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [f32("x", [2, 3, 4])], [f32("y", None)],
        [numpy_helper.from_array(np.array(0, np.int64), "i"),
         numpy_helper.from_array(np.array([0], np.int64), "axes"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus1")],
    )


def speech_16k(text: str) -> np.ndarray:
    """``text`` spoken by espeak-ng (a Debian package; tools/system-deps.sh installs it), as float32 mono audio
    in [-1, 1] at 16 kHz: espeak-ng writes 22.05 kHz, resampled here by linear interpolation."""
    import io
    import subprocess
    import wave

    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    t = np.arange(int(len(x) * 16000 / rate)) / 16000
    return np.interp(t, np.arange(len(x)) / rate, x).astype(np.float32)
