"""Real models from PyPI wheels (and onnx's light models with random weights):
inspect, verify, ONNX round trip and the evaluator, all against onnxruntime."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest

import kiln
from kiln.check import compare
from kiln.cli import main
from kiln.ir import Evaluator, Graph
from models import MODELS, make_inputs, model_path
from helpers import ort_outputs

ALL = list(MODELS)
# The models whose evaluator results the foundation must match (all models are run).
EVALUATOR_MODELS = ALL


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    """onnxruntime's outputs on the original file, plus the logits feeding a final Softmax."""
    g = kiln.load(model_path(name))
    with_logits = _expose_softmax_inputs(g)
    return ort_outputs(kiln.to_onnx(with_logits), make_inputs(name))


def _expose_softmax_inputs(g: Graph) -> Graph:
    """Add the input of each Softmax that produces a graph output to the graph's outputs.

    A saturated softmax hides almost any error; its logits do not.
    """
    for out in list(g.outputs):
        node = out.producer
        if node is not None and node.op_type == "Softmax" and node.input(0) not in g.outputs:
            g.outputs.append(node.input(0))
    return g


@pytest.mark.parametrize("name", ALL)
def test_inspect(name, real_model, capsys):
    path = real_model(name)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "MACs:" in text and "parameters:" in text
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in report["inputs"]] == list(MODELS[name].inputs)
    assert report["nodes"] > 10 and report["parameters"]["count"] > 10_000


@pytest.mark.parametrize("name", ALL)
def test_round_trip_matches_the_original(name, real_model):
    path = real_model(name)
    g = kiln.load(path)
    g.verify()
    model = kiln.to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    feeds = make_inputs(name)
    cmp = compare("round trip", ort_outputs(model, feeds), ort_outputs(str(path), feeds), rtol=1e-6, atol=0.0)
    assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("name", EVALUATOR_MODELS)
def test_evaluator_matches_onnxruntime(name, real_model):
    real_model(name)
    g = _expose_softmax_inputs(kiln.load(model_path(name)))
    want = reference(name)
    got = Evaluator(g).run(make_inputs(name))
    assert set(got) == set(want)
    outputs = [v.name for v in kiln.load(model_path(name)).outputs]
    cmp = compare("evaluator", {k: got[k] for k in outputs}, {k: want[k] for k in outputs}, rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs
    # The logits behind a final Softmax: their magnitude can reach 1e5, where float32's
    # spacing alone is ~1e-2, so they are held to fp32-level agreement in relative L2 norm.
    for k in set(got) - set(outputs):
        rel = np.linalg.norm(got[k].astype(np.float64) - want[k]) / np.linalg.norm(want[k].astype(np.float64))
        assert rel <= 1e-5, (k, rel)


def test_light_models_have_random_weights(real_model):
    """The ConstantOfShape fills were replaced: no weight is a constant fill any more."""
    g = kiln.load(real_model("light_resnet50"))
    assert not [n for n in g.nodes if n.op_type == "ConstantOfShape"]
    w = g.nodes[0].input(1).numpy()
    assert w.std() > 0.01 and len(set(w.ravel()[:100].tolist())) > 50


def test_cls_model_unknown_dims_are_distinct(real_model):
    g = kiln.load(real_model("ocr_cls"))
    (x,) = g.inputs
    assert x.shape is not None and x.shape[1] == 3
    symbols = [d for d in x.shape if isinstance(d, str)]
    assert len(symbols) == 3 and len(set(symbols)) == 3  # -1 batch and two different "?" dims


def test_silero_subgraphs_are_imported(real_model):
    g = kiln.load(real_model("silero_vad"))
    assert sum(1 for _ in g.walk_graphs()) > 25
    assert any(n.op_type == "LSTM" for n in g.walk_nodes())
    g.verify()


@pytest.mark.parametrize("name", ALL)
def test_o2_pipeline_keeps_the_numbers(name, real_model):
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for

    path = real_model(name)
    g, report = PassManager(passes_for("O2"), verify_each=True).run(kiln.load(path))
    assert report.nodes_after <= report.nodes_before
    feeds = make_inputs(name)
    cmp = compare("O2", ort_outputs(kiln.to_onnx(g), feeds), ort_outputs(str(path), feeds), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs
    assert not [n for n in g.walk_nodes() if n.op_type == "BatchNormalization"]  # every BN folds
    fired = report.rule_counts()
    expected = {  # rules that must fire on each model, and how often at least
        "light_resnet50": {"conv-bn": 53, "conv-residual-sum": 16, "fused-conv-relu": 16},
        "light_densenet121": {"conv-bn": 59, "bn-affine": 62},
        "yolov8n": {"conv-silu": 57},
        "ocr_rec": {"layernorm-square": 5, "attention-scaled-q": 2},
        "ocr_det": {"conv-hardsigmoid": 10},
    }.get(name, {})
    for rule_name, count in expected.items():
        assert fired.get(rule_name, 0) >= count, (rule_name, fired)


STATIC_SHAPE_MODELS = ["yolov8n", "ocr_rec", "ocr_det", "ocr_cls", "light_resnet50", "light_squeezenet",
                       "light_densenet121"]


@pytest.mark.parametrize("name", STATIC_SHAPE_MODELS)
def test_shape_computations_fold_away_at_static_shapes(name, real_model):
    """With every input pinned, O2 leaves no shape arithmetic: no Shape/Size/Range/ConstantOfShape,
    and no node that computes integer tensors."""
    from kiln.ir import set_input_shapes
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for

    path = real_model(name)
    g = kiln.load(path)
    set_input_shapes(g, dict(MODELS[name].inputs))
    g, _ = PassManager(passes_for("O2"), verify_each=True).run(g)
    leftovers = [n.label() for n in g.walk_nodes()
                 if n.op_type in ("Shape", "Size", "Range", "ConstantOfShape")
                 or all(o.dtype is not None and o.dtype.is_integer for o in n.outputs if o.name)]
    assert leftovers == []
    feeds = make_inputs(name)
    cmp = compare("static O2", ort_outputs(kiln.to_onnx(g), feeds), ort_outputs(str(path), feeds), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_optimize_cli_report_on_yolov8n(real_model, tmp_path, capsys):
    path = real_model("yolov8n")
    out, report = tmp_path / "y.onnx", tmp_path / "report.json"
    assert main(["optimize", str(path), "-o", str(out), "--level", "O2", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["rules"]["conv-silu"] == 57
    assert data["nodes"]["after"] < data["nodes"]["before"]
    assert "conv-silu x57" in capsys.readouterr().out
    feeds = make_inputs("yolov8n")
    cmp = compare("cli O2", ort_outputs(str(out), feeds), ort_outputs(str(path), feeds), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


#: models whose inputs have unknown dims, and two sizes each to run one artifact at
UNPINNED = {
    "ocr_cls": [(1, 3, 48, 192), (3, 3, 48, 100)],
    "ocr_rec": [(1, 3, 48, 320), (2, 3, 48, 160)],  # a text recogniser: the sequence follows the width
    "ocr_det": [(1, 3, 320, 320), (2, 3, 160, 224)],  # an FPN detector: upsampled by 2x, 4x, 8x and added
}


@pytest.mark.parametrize("name", sorted(UNPINNED))
def test_unpinned_models_compile_with_no_shape_flags_and_match_at_two_sizes(name, real_model, tmp_path, capsys):
    """Paddle-exported models (-1 batch, "?" height and width) compile once with no --input-shape, and
    the one artifact matches onnxruntime at two sizes of every symbolic dim."""
    import kiln.runtime

    path = real_model(name)
    out = tmp_path / f"{name}.kiln"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "symbolic dims: x[0] as" in said and "x[3] as" in said
    compiled = kiln.runtime.load(out)
    rng = np.random.default_rng(0)
    for shape in UNPINNED[name]:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        cmp = compare(f"{name} at {shape}", compiled.run(feeds), ort_outputs(str(path), feeds), rtol=1e-3, atol=1e-4)
        assert cmp.passed, cmp.max_abs
