"""Channel groups, the exact dead-channel pass, structured pruning and the compression report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import f32, make_model, ort_outputs
from kiln.ir import evaluate, from_onnx, infer_shapes
from kiln.ir.summary import summarize
from kiln.passes import PassManager
from kiln.passes.channels import ChannelGraph
from kiln.passes.pipeline import FLOAT_PREP, passes_for
from kiln.passes.prune import DeadChannels, PruneError, prune_channels


def _t(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _graph(model: onnx.ModelProto):
    g = from_onnx(model)
    infer_shapes(g)
    return g


def _residual_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv -> BN -> relu -> 1x1 conv + residual -> relu -> padded 3x3 -> GAP -> Gemm, with planted channels:

    - channel 2: zero filters in both convs of the residual group, a bias that BN and ReLU make 0;
    - channel 5: zero filters, a bias that stays positive (6.3 after BN): read by the padded 3x3 conv,
      where a constant is not a constant at the borders, so it must stay;
    - channel 6 of the 3x3 conv's input: zero weights there, but the 1x1 conv reads it, so it stays.
    """
    rng = np.random.default_rng(seed)
    c = 8
    w1 = rng.standard_normal((c, 3, 3, 3)); w1[[2, 5]] = 0
    b1 = rng.standard_normal(c); b1[5] = 5.0; b1[2] = -0.867
    w2 = rng.standard_normal((c, c, 1, 1)); w2[[2, 5]] = 0
    w3 = rng.standard_normal((c, c, 3, 3)); w3[:, 6] = 0
    mean = rng.standard_normal(c); mean[2] = -0.575
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1),
    ]
    beta = rng.standard_normal(c); beta[2] = -0.178
    inits = [_t("w1", w1), _t("b1", b1), _t("w2", w2), _t("w3", w3), _t("wg", rng.standard_normal((5, c))),
             _t("bg", rng.standard_normal(5)), _t("g", rng.random(c) + 0.5), _t("be", beta), _t("m", mean),
             _t("v", rng.random(c) + 0.5)]
    model = make_model(nodes, [f32("x", [1, 3, 10, 10])], [f32("y", [1, 5])], inits)
    return model, {"x": rng.standard_normal((1, 3, 10, 10)).astype(np.float32)}


def _dense_model(seed: int = 0):
    """MatMul + bias -> GELU-free FFN -> MatMul, and a concat of two convs read by a 1x1 conv.

    Planted: FFN column 3 has zero weights and bias 0.7 (a constant 0.7 after ReLU, folded into
    the second MatMul as an Add); conv A's channel 1 has zero filters and bias -2 (0 after ReLU,
    through the concat).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 12)); w1[:, 3] = 0
    b1 = rng.standard_normal(12); b1[3] = 0.7
    wa = rng.standard_normal((4, 3, 3, 3)); wa[1] = 0
    ba = rng.standard_normal(4); ba[1] = -2.0
    nodes = [
        helper.make_node("MatMul", ["t", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]), helper.make_node("MatMul", ["hr", "w2"], ["u"]),
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ca", "cb"], ["cc"], axis=1), helper.make_node("Relu", ["cc"], ["rc"]),
        helper.make_node("Conv", ["rc", "wc"], ["z"]),
    ]
    inits = [_t("w1", w1), _t("b1", b1), _t("w2", rng.standard_normal((12, 6))), _t("wa", wa), _t("ba", ba),
             _t("wb", rng.standard_normal((5, 3, 3, 3))), _t("wc", rng.standard_normal((2, 9, 1, 1)))]
    model = make_model(nodes, [f32("t", [2, 7, 16]), f32("x", [1, 3, 6, 6])], [f32("u", [2, 7, 6]),
                                                                              f32("z", [1, 2, 6, 6])], inits)
    feeds = {"t": rng.standard_normal((2, 7, 16)).astype(np.float32),
             "x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    return model, feeds


def _close(model: onnx.ModelProto, g, feeds) -> None:
    want = ort_outputs(model, feeds)
    got = evaluate(g, feeds)
    for name, ref in want.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_dead_channels_removes_exactly_the_planted_channels_and_keeps_the_numbers():
    model, feeds = _residual_model()
    g = _graph(model)
    result = DeadChannels().run(g)
    g.verify()
    assert result.changes == 1  # channel 2 only: 5 feeds a padded conv as a nonzero constant, 6 is read by the 1x1
    shapes = {v.name: v.shape for v in g.values()}
    assert shapes["r1"] == (1, 7, 10, 10) and shapes["c3"] == (1, 8, 10, 10)
    _close(model, g, feeds)


def test_dead_channels_folds_constants_into_dense_readers_and_follows_concats():
    model, feeds = _dense_model()
    g = _graph(model)
    result = DeadChannels().run(g)
    g.verify()
    assert result.changes == 2
    shapes = {v.name: v.shape for v in g.values()}
    assert shapes["hr"] == (2, 7, 11)  # the constant 0.7 went into an Add after the second MatMul
    assert shapes["ca"] == (1, 3, 6, 6) and shapes["cc"] == (1, 8, 6, 6)
    assert any(n.op_type == "Add" and n.outputs[0].name == "u" and n.input(0).producer.op_type == "MatMul"
               for n in g.nodes)
    _close(model, g, feeds)


def test_a_channel_a_graph_output_shows_is_never_removed():
    model, feeds = _residual_model()
    model.graph.output.append(helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, [1, 8, 10, 10]))
    g = _graph(model)
    assert DeadChannels().run(g).changes == 0
    pinned = [s.pinned for s in ChannelGraph(g).spaces if s.pinned]
    assert "graph output 'r1'" in pinned


def test_dead_channels_runs_at_O2_and_compiles_to_the_same_numbers(tmp_path):
    import kiln
    import kiln.runtime

    model, feeds = _residual_model()
    path = tmp_path / "planted.onnx"
    onnx.save(model, path)
    result = kiln.compile(str(path), tmp_path / "planted.kiln", level="O2")
    assert result.pipeline.stats["dead-channels"].changes == 1
    got = kiln.runtime.load(tmp_path / "planted.kiln").run(feeds)["y"]
    ref = ort_outputs(model, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    entry = result.compression
    assert entry["before"]["macs"] > entry["after"]["macs"] and entry["rate"]["macs"] > 0


def _unpadded_model(seed: int = 0):
    """1x1 convs with BN and a residual, then a dense head: every fold is exact."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i, (cin, cout) in enumerate([(16, 64), (64, 64), (64, 64)]):
        src = "x" if i == 0 else f"r{i - 1}"
        nodes += [helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        inits += [_t(f"w{i}", rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)), _t(f"b{i}", rng.standard_normal(cout))]
    nodes += [helper.make_node("Add", ["r2", "r0"], ["s"]), helper.make_node("GlobalAveragePool", ["s"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1)]
    inits.append(_t("wg", rng.standard_normal((10, 64))))
    return make_model(nodes, [f32("x", [1, 16, 5, 5])], [f32("y", [1, 10])], inits), \
        {"x": rng.standard_normal((1, 16, 5, 5)).astype(np.float32)}


def test_pruning_removes_the_least_important_channels_in_blocks_and_folds_them_exactly():
    from kiln.passes.channels import producer_importance
    from kiln.passes.prune import _zero_rows

    model, feeds = _unpadded_model()
    g = _graph(model)
    zeroed = _graph(model)
    report = prune_channels(g, 0.3, block=8)
    g.verify()
    assert report.groups == 2 and report.removed_channels > 0
    # the same channels, only zeroed (their biases left): removing them must change nothing more
    cg = ChannelGraph(zeroed)
    for s in cg.spaces:
        if s.producers and not s.pinned and s.size == 64:
            kept = {v.name: v.shape[1] for v in g.values() if v.shape and len(v.shape) == 4}
            keep = kept[s.values[0].name]
            assert keep % 8 == 0 and keep < 64
            mask = np.zeros(64, bool)
            mask[np.argsort(producer_importance(s), kind="stable")[:64 - keep]] = True
            _zero_rows(zeroed, s, mask)
    np.testing.assert_allclose(evaluate(g, feeds)["y"], evaluate(zeroed, feeds)["y"], rtol=1e-4, atol=1e-4)
    macs = summarize(g).total_macs.constant() / summarize(_graph(model)).total_macs.constant()
    assert abs((1 - macs) - 0.3) < 0.1


def test_pruning_refuses_a_bad_ratio_and_a_model_with_nothing_to_prune():
    model, _ = _residual_model()
    with pytest.raises(PruneError, match="between 0 and 1"):
        prune_channels(_graph(model), 1.5)
    with pytest.raises(PruneError, match="no channel group can be pruned"):
        prune_channels(_graph(model), 0.3, block=16)  # 8 channels: fewer than two blocks


def test_light_resnet50_pruned_by_30_percent_of_its_macs(tmp_path, capsys):
    from models import model_path
    from kiln.cli import main

    src = model_path("light_resnet50")
    g = _graph(onnx.load(src))
    g, _ = PassManager(passes_for(names=FLOAT_PREP)).run(g)
    report = prune_channels(g, 0.3)
    g.verify()
    assert abs(report.to_json()["planned_mac_rate"] - 0.3) < 0.03
    rng = np.random.default_rng(0)
    samples = tmp_path / "eval.npz"
    np.savez(samples, **{"gpu_0/data_0": rng.standard_normal((2, 1, 3, 224, 224)).astype(np.float32)})
    out = tmp_path / "pruned.kiln"
    assert main(["compile", str(src), "-o", str(out), "--prune-channels", "0.3", "--eval", str(samples)]) == 0
    text = capsys.readouterr().out
    assert "compression: " in text and "pruned " in text and "against the unpruned model on 2 samples" in text
    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    entry = manifest["compression"]
    assert 0.25 < entry["rate"]["macs"] < 0.35 and entry["pruning"]["groups"] > 30
    assert set(entry["accuracy"]) == {"gpu_0/softmax_1"}
    assert main(["inspect", str(out)]) == 0
    assert "compression: params" in capsys.readouterr().out


def _budget_case():
    """The 1x1 model folded as the pruning job folds it, and 8 samples."""
    model, _ = _unpadded_model(seed=1)
    g, _ = PassManager(passes_for(names=FLOAT_PREP)).run(_graph(model))
    rng = np.random.default_rng(3)
    return model, g, [{"x": rng.standard_normal((1, 16, 5, 5)).astype(np.float32)} for _ in range(8)]


def test_an_accuracy_budget_keeps_the_most_sensitive_groups_whole():
    from kiln.passes.prune import KEPT_FOR_ACCURACY, prunable_groups
    from kiln.quantize import Budget, PruneOptions
    from kiln.quantize.pruning import budgeted_exclusions

    _, g, samples = _budget_case()
    groups = prunable_groups(g, 16)
    assert len(groups) == 2  # the residual's channels (r0 and r2 tied by the add) and r1's
    loose = PruneOptions(0.3, budget=Budget("cosine", 0.0))
    kept, record = budgeted_exclusions(g, loose, 16, samples, lambda _: None)
    assert kept == frozenset() and record["budget_met"]
    uniform = record["uniform_score"]
    assert uniform < 0.9999  # pruning 30% of random weights moves the outputs
    tight = Budget("cosine", (uniform + 1) / 2)  # between pruning every group alike and not pruning
    kept, record = budgeted_exclusions(g, PruneOptions(0.3, budget=tight), 16, samples, lambda _: None)
    assert record["budget_met"] and record["score"] >= tight.value and kept
    sensitivity = record["sensitivity"]
    assert set(sensitivity) == set(groups)
    assert record["kept_whole"][0] == min(sensitivity, key=sensitivity.get)  # the most sensitive goes first
    # the groups left prune more, to keep the MAC target
    alike, whole = prune_channels(g.clone(), 0.3, block=16), prune_channels(g.clone(), 0.3, block=16, exclude=kept)
    assert len(kept) == len(groups) or whole.fraction > alike.fraction
    assert all(whole.skipped[name] == KEPT_FOR_ACCURACY for name in kept)


def test_a_pruning_budget_compiles_and_is_recorded(tmp_path, capsys):
    from kiln.cli import main

    model, _, samples = _budget_case()
    src, out, calib = tmp_path / "m.onnx", tmp_path / "m.kiln", tmp_path / "calib.npz"
    src.write_bytes(model.SerializeToString())
    np.savez(calib, x=np.stack([s["x"] for s in samples]))
    assert main(["compile", str(src), "-o", str(out), "--prune-channels", "0.3", "--accuracy-budget",
                 "cosine>=0.9999", "--calib", str(calib), "--eval", str(calib)]) == 0
    text = capsys.readouterr().out
    assert "accuracy budget cosine>=0.9999 on 8 samples" in text
    assert main(["inspect", str(out), "--json"]) == 0
    pruning = json.loads(capsys.readouterr().out)["compression"]["pruning"]
    assert pruning["budget_met"] and pruning["score"] >= 0.9999 and pruning["kept_whole"]
    # without samples to measure on, and without a job to steer: one line, exit 2
    assert main(["compile", str(src), "-o", str(tmp_path / "n.kiln"), "--prune-channels", "0.3",
                 "--accuracy-budget", "cosine>=0.99"]) == 2
    assert "needs --calib" in capsys.readouterr().err
    assert main(["compile", str(src), "-o", str(tmp_path / "n.kiln"), "--accuracy-budget", "cosine>=0.99"]) == 2
    assert "steers --quantize int8 or --prune-channels" in capsys.readouterr().err
