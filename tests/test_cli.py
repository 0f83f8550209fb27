"""The ``kiln`` command line: reports, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from kiln.cli import main
from helpers import f32, make_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
KILN = [sys.executable, "-m", "kiln.cli"]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(KILN + args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def microsoft_model(tmp_path) -> Path:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("FusedGemm", ["r", "r"], ["y"], name="fused", domain="com.microsoft")],
        [f32("x", [2, 2])], [f32("y", [2, 2])],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    p = tmp_path / "ms.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def test_inspect_text_report(capsys):
    assert main(["inspect", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "input: f32[N,3,64,64]" in out and "probs: f32[N,10]" in out
    assert "Conv                4" in out
    assert "parameters: 24.2 K" in out
    # MACs of the convs: stem 3*16*9*64*64 + down 16*32*9*16*16 + 2 * 32*32*9*16*16, per image
    convs = 3 * 16 * 9 * 64 * 64 + 16 * 32 * 9 * 16 * 16 + 2 * 32 * 32 * 9 * 16 * 16
    assert f"Conv: {convs / 1e6:.3g} M·N" in out
    assert "opsets: ai.onnx 17" in out


def test_inspect_json_report(capsys):
    assert main(["inspect", str(EXAMPLE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 3, 64, 64]}]
    assert report["ops"]["Conv"] == 4
    assert report["parameters"]["count"] == 24250  # 432+64 + 4608+128 + 2*(9216+128) + 330
    assert report["macs"]["Gemm"] == [{"coeff": 320, "dims": ["N"]}]
    assert report["opsets"] == {"ai.onnx": 17}
    assert report["cannot_evaluate"] == [] and report["cannot_compile"] == []


def test_inspect_lists_unsupported_ops_and_exits_2(microsoft_model, capsys):
    assert main(["inspect", str(microsoft_model)]) == 2
    captured = capsys.readouterr()
    assert "ops kiln cannot evaluate" in captured.out and "com.microsoft::FusedGemm" in captured.out
    err = captured.err.strip()
    assert err.count("\n") == 0
    assert err.startswith("kiln: error: ") and "com.microsoft::FusedGemm (nodes: fused)" in err


def test_inspect_says_what_cannot_compile_apart_from_what_cannot_evaluate(tmp_path, capsys):
    # Det: onnx's reference evaluates it, kiln has no lowering for it yet
    model = make_model([helper.make_node("Det", ["x"], ["y"], name="det")], [f32("x", [2, 3, 3])], [f32("y", None)],
                       opset=17)
    src = _write(model, tmp_path / "det.onnx")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "ops kiln cannot compile yet" in out and "ai.onnx::Det  (1 nodes: det)" in out
    assert "cannot evaluate" not in out
    assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cannot_compile"] == [{"domain": "ai.onnx", "op": "Det", "nodes": ["det"]}]
    assert report["cannot_evaluate"] == []


@pytest.mark.parametrize("make_file, expected", [
    (lambda p: p.write_text("hello\nworld\n"), "text file, not an ONNX model"),
    (lambda p: p.write_bytes(EXAMPLE.read_bytes()[:40_000]), "truncated or corrupt"),
    (lambda p: None, "no such file"),
])
def test_bad_files_get_one_line_errors(tmp_path, capsys, make_file, expected):
    p = tmp_path / "model.onnx"
    make_file(p)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and str(p) in err
    assert "Traceback" not in err


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    p = tmp_path / "model.onnx"
    p.write_text("not a model")
    assert main(["inspect", str(p), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_check_passes_on_the_example(capsys):
    assert main(["check", str(EXAMPLE), "--input-shape", "input=2x3x64x64"]) == 0
    out = capsys.readouterr().out
    assert "ONNX round trip vs original (onnxruntime): ok" in out
    assert "kiln evaluator vs onnxruntime: ok" in out
    assert "input[2, 3, 64, 64]" in out


def test_check_needs_sizes_for_symbolic_dims(capsys):
    assert main(["check", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "symbolic dims; give sizes with --input-shape input=1x3x64x64" in err


def test_check_refuses_a_contradicting_shape(capsys):
    assert main(["check", str(EXAMPLE), "--input-shape", "input=1x4x64x64"]) == 2
    assert "the model says f32[N,3,64,64]" in capsys.readouterr().err


def test_check_with_npz_inputs(tmp_path, capsys):
    npz = tmp_path / "in.npz"
    np.savez(npz, input=np.zeros((1, 3, 64, 64), np.float32))
    assert main(["check", str(EXAMPLE), "--inputs", str(npz)]) == 0
    np.savez(npz, wrong=np.zeros((1, 3, 64, 64), np.float32))
    assert main(["check", str(EXAMPLE), "--inputs", str(npz)]) == 2
    assert "inputs do not match" in capsys.readouterr().err


def test_console_script_acceptance_errors(tmp_path, microsoft_model):
    """The acceptance cases through the real CLI process: truncated, text, com.microsoft."""
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(EXAMPLE.read_bytes()[:50_000])
    text = tmp_path / "readme.onnx"
    text.write_text("# just some notes\n")
    for path in (truncated, text, microsoft_model):
        proc = run_cli(["inspect", str(path)])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kiln: error: "), proc.stderr


def test_console_script_runs_inspect():
    proc = run_cli(["inspect", str(EXAMPLE), "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["graph"] == "tiny_cnn"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().out


def _write(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("case, expected", [
    ("cycle", "has a cycle"),
    ("undefined", "reads 'ghost', which nothing in the graph defines"),
    ("external", "external data file 'w.bin' for initializer 'w' is missing"),
])
def test_graph_and_data_errors_are_one_line(tmp_path, capsys, case, expected):
    if case == "cycle":
        model = make_model([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                            helper.make_node("Relu", ["a"], ["b"], name="n2")], [f32("x", [2])], [f32("b", [2])])
        path = _write(model, tmp_path / "m.onnx")
    elif case == "undefined":
        model = make_model([helper.make_node("Relu", ["ghost"], ["y"], name="r")], [f32("x", [2])], [f32("y", [2])])
        path = _write(model, tmp_path / "m.onnx")
    else:
        import onnx
        from onnx import numpy_helper

        w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
        model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [f32("x", [1, 16])], [f32("y", [1, 16])], [w])
        path = tmp_path / "m.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
        (tmp_path / "w.bin").unlink()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err


def test_optimize_writes_a_model_that_matches(tmp_path, capsys):
    out, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    assert main(["optimize", str(EXAMPLE), "-o", str(out), "--report", str(report), "--explain", "conv-bn",
                 "--verify-each"]) == 0
    text = capsys.readouterr().out
    assert "18 -> 9 nodes" in text and "conv-bn x4" in text and "conv-residual x1" in text
    assert "rule 'conv-bn' fired 4 time(s)" in text
    data = json.loads(report.read_text())
    assert data["rules"] == {"conv-bn": 4, "conv-relu": 3, "conv-residual": 1, "fused-conv-relu": 1}
    assert data["nodes"] == {"before": 18, "after": 9}
    assert set(data["passes"]) == {"qdq", "fold-constants", "inline-if", "simplify", "cse", "dce", "dead-channels", "fuse-conv",
                                 "fuse-transformer", "fuse-gemm"}
    assert main(["check", str(out), "--input-shape", "input=3x3x64x64"]) == 0


def test_optimize_explains_a_near_miss(tmp_path, capsys):
    from onnx import numpy_helper

    c = 4
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 1, 1)).astype(np.float32), "w")] + [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), n) for n in ("b", "m", "v")]
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]),
         helper.make_node("BatchNormalization", ["y", "scale", "b", "m", "v"], ["z"], name="bn")],
        [f32("x", [1, 3, 4, 4]), f32("scale", [c])], [f32("z", [1, c, 4, 4])], inits,
    )
    src = _write(model, tmp_path / "m.onnx")
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--explain", "conv-bn"]) == 0
    out = capsys.readouterr().out
    # from the run itself: the pass that saw the miss is named
    assert ("rule 'conv-bn' did not fire in pass 'fuse-conv'; nearest miss in pass 'fuse-conv' at 'bn' "
            "(BatchNormalization): check failed: the BN scale %scale is not a constant") in out


@pytest.mark.parametrize("args, message", [
    (["--passes", "nope"], "no pass named 'nope'"),
    (["--level", "O7"], "no optimisation level 'O7'"),
    (["--explain", "nope"], "no rule named 'nope'"),
])
def test_optimize_usage_errors(tmp_path, capsys, args, message):
    assert main(["optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    assert message in capsys.readouterr().err


def test_optimize_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    assert main(["optimize", str(src), "-o", str(src)]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert src.read_bytes() == EXAMPLE.read_bytes()


def test_optimize_with_pinned_input_shape(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(EXAMPLE), "-o", str(out), "--input-shape", "input=2x3x64x64"]) == 0
    import kiln

    assert kiln.load(out).inputs[0].shape == (2, 3, 64, 64)
    assert main(["optimize", str(EXAMPLE), "-o", str(out), "--input-shape", "input=2x4x64x64"]) == 2
    assert "does not fit it" in capsys.readouterr().err
    assert main(["optimize", str(EXAMPLE), "-o", str(out), "--input-shape", "nope=1x3x64x64"]) == 2
    assert "no graph input named 'nope'" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly():
    """``kiln inspect MODEL | head``: the reader goes away before kiln writes."""
    kiln_bin = Path(sys.executable).with_name("kiln")
    proc = subprocess.Popen([str(kiln_bin), "inspect", str(EXAMPLE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == ""


def test_a_compression_flag_without_its_job_is_refused(tmp_path, capsys):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [1, 4])], [f32("y", [1, 4])])
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 1, 4), np.float32))
    out = str(tmp_path / "m.kiln")
    assert main(["compile", str(src), "-o", out, "--eval", str(tmp_path / "s.npz")]) == 2
    assert "--eval reports the accuracy of" in capsys.readouterr().err
    assert main(["compile", str(src), "-o", out, "--calib", str(tmp_path / "s.npz")]) == 2
    assert "--calib gives --quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "m.kiln").exists()
