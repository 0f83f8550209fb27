"""Generate kiln's bundled example: a small residual CNN, written with ``onnx.helper``.

    python examples/make_tiny_cnn.py [OUT.onnx]

The weights come from a fixed seed, so the file is the same byte for byte on
every run (a test checks this against the committed ``examples/tiny_cnn.onnx``).
The batch dim is symbolic (``N``); images are 3x64x64; there are 10 classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).with_name("tiny_cnn.onnx")


def build(seed: int = 0) -> onnx.ModelProto:
    """The example model: conv-bn-relu stem, a strided conv, a residual block, pooling and a classifier."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        arr = rng.uniform(-1, 1, size=shape) * np.sqrt(6.0 / fan_in)
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def bn(x: str, channels: int, name: str) -> str:
        params = {
            "scale": rng.uniform(0.5, 1.5, channels), "bias": rng.uniform(-0.1, 0.1, channels),
            "mean": rng.uniform(-0.1, 0.1, channels), "var": rng.uniform(0.5, 1.5, channels),
        }
        names = []
        for key, arr in params.items():
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}.{key}"))
            names.append(f"{name}.{key}")
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    def conv_bn_relu(x: str, cin: int, cout: int, name: str, stride: int = 1, relu: bool = True) -> str:
        w = weight(f"{name}.weight", cout, cin, 3, 3)
        nodes.append(helper.make_node(
            "Conv", [x, w], [f"{name}.conv"], name=f"{name}.conv",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride],
        ))
        y = bn(f"{name}.conv", cout, f"{name}.bn")
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"{name}.relu"], name=f"{name}.relu"))
            return f"{name}.relu"
        return y

    x = conv_bn_relu("input", 3, 16, "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    x = conv_bn_relu("pool", 16, 32, "down", stride=2)
    y = conv_bn_relu(x, 32, 32, "block.a")
    y = conv_bn_relu(y, 32, 32, "block.b", relu=False)
    nodes.append(helper.make_node("Add", [x, y], ["block.add"], name="block.add"))
    nodes.append(helper.make_node("Relu", ["block.add"], ["block.relu"], name="block.relu"))
    nodes.append(helper.make_node("GlobalAveragePool", ["block.relu"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1))
    w = weight("fc.weight", 10, 32)
    inits.append(numpy_helper.from_array(rng.uniform(-0.1, 0.1, 10).astype(np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["flat", w, "fc.bias"], ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))

    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-examples")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.write_bytes(build().SerializeToString())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)
