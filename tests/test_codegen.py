"""Codegen and the runtime on the bundled example: compile once, run, compare with onnxruntime."""

from __future__ import annotations

import re

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
import kiln.runtime
from kiln.check import compare
from kiln.cli import main
from kiln.codegen.build import build
from kiln.codegen.lowering import CodegenError
from kiln.errors import InputError
from kiln.passes import PassManager
from kiln.passes.pipeline import passes_for
from helpers import f32, make_model, ort_outputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    g, _ = PassManager(passes_for("O2")).run(kiln.load(EXAMPLE))
    out = tmp_path_factory.mktemp("kiln") / "tiny.kiln"
    build(g, out)
    return out


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_example_matches_onnxruntime(artifact, batch):
    model = kiln.runtime.load(artifact)
    got = model.run({"input": _x(batch)})
    cmp = compare("kiln vs ort", got, ort_outputs(str(EXAMPLE), {"input": _x(batch)}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_runtime_runs_without_the_compiler_or_onnx(artifact):
    code = (
        "import sys, numpy as np, kiln.runtime\n"
        f"m = kiln.runtime.load({str(artifact)!r})\n"
        "y = m.run({'input': np.zeros((2, 3, 64, 64), np.float32)})['probs']\n"
        "assert y.shape == (2, 10) and abs(float(y.sum()) - 2.0) < 1e-4\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('tvm', 'onnx'))\n"
        "print('modules:', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "modules: []" in proc.stdout


@pytest.mark.parametrize("feeds, message", [
    ({"image": np.zeros((1, 3, 64, 64), np.float32)}, "missing input; unexpected image"),
    ({"input": np.zeros((1, 3, 64, 64), np.float64)}, "dtype float64"),
    ({"input": np.zeros((1, 3, 32, 64), np.float32)}, r"shape \[1, 3, 32, 64\]"),
    ({"input": np.zeros((3, 64, 64), np.float32)}, r"shape \[3, 64, 64\]"),
])
def test_wrong_inputs_are_refused_with_the_signature(artifact, feeds, message):
    model = kiln.runtime.load(artifact)
    with pytest.raises(InputError, match=message) as err:
        model.run(feeds)
    assert "expected input: float32[N,3,64,64]" in str(err.value)


def test_concurrent_runs_from_several_threads(artifact):
    model = kiln.runtime.load(artifact)
    inputs = {b: _x(b, seed=b) for b in (1, 2, 3, 4)}
    expected = {b: ort_outputs(str(EXAMPLE), {"input": x})["probs"] for b, x in inputs.items()}
    errors: list[str] = []

    def work(b: int) -> None:
        for _ in range(15):
            y = model.run({"input": inputs[b]})["probs"]
            if not np.allclose(y, expected[b], rtol=1e-4, atol=1e-5):
                errors.append(f"batch {b}: max error {np.abs(y - expected[b]).max()}")

    threads = [threading.Thread(target=work, args=(b,)) for b in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unsupported_ops_are_listed_before_compiling(tmp_path):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Det", ["r"], ["u"], name="det")],
        [f32("x", [2, 5, 5])], [f32("u", None)],
    )
    with pytest.raises(CodegenError, match=r"kiln cannot compile these ops yet: Det \(nodes: det\)"):
        build(kiln.load(model), tmp_path / "x.kiln")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unknown_dims_need_a_bound(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [f32("x", ["?", 4])], [f32("y", None)])
    with pytest.raises(CodegenError, match=r"dims \[0\] are unknown; give them sizes with --input-shape x=1x4"):
        build(kiln.load(model), tmp_path / "x.kiln")


def test_unknown_dims_compile_as_symbols_with_no_shape_flags(tmp_path, capsys):
    """An unnamed, ``?`` or ``-1`` dim (as tf2onnx writes a batch) compiles as a symbol: the artifact
    runs at any size, the shape arithmetic on it runs at run time, and compile says which dims stayed
    symbolic and how to pin them."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    model = make_model([
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two"], ["nc"]),
        helper.make_node("Concat", ["nc", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["y"], axis=-1),
    ], [f32("x", [None, 3, "?", -1])], [f32("y", None)], [w, i64("zero", [0]), i64("two", [2]), i64("minus_one", [-1])])
    path = tmp_path / "unpinned.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "unpinned.kiln"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "symbolic dims: x[0] as x_0 (unnamed in the model), x[2] as x_2 (unnamed in the model), x[3] as x_3" in said
    assert "(--input-shape x=?x3x?x?, each ? a size)" in said
    compiled = kiln.runtime.load(out)
    assert [i.shape for i in compiled.inputs] == [("x_0", 3, "x_2", "x_3")]
    for shape in ((1, 3, 8, 8), (3, 3, 5, 11)):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        cmp = compare(f"x={shape}", compiled.run(feeds), ort_outputs(model, feeds), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs


def test_blocked_convs_with_symbolic_batch_and_height_match(tmp_path):
    """The blocked conv schedules under symbolic batch, height and width: a strided depthwise conv and
    a dense one, fused with their epilogues. Fusing the parallel loops before the register tile's
    write-back was placed once sized that tile from wrong bounds (batch 2 came out wrong)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    init = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)  # noqa: E731
    model = make_model([
        helper.make_node("Conv", ["x", "dw"], ["d"], pads=[1, 1, 1, 1], strides=[2, 1], group=16),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Conv", ["r", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["c", "c"], ["y"]),
    ], [f32("x", ["N", 16, "H", "W"])], [f32("y", None)], [init("dw", (16, 1, 3, 3)), init("w", (24, 16, 3, 3)), init("b", (24,))])
    from kiln.codegen.lowering import lower
    from kiln.codegen.schedule import schedule_func

    g, _ = PassManager(passes_for("O3", block=8)).run(kiln.load(model))
    kernels = [f for f in lower(g).module.functions.values() if f.attrs and "kiln.schedule" in f.attrs]
    assert {str(f.attrs["kiln.schedule"]) for f in kernels} == {"conv_nchwc", "depthwise_nchwc"}
    assert all(schedule_func(f) is not f for f in kernels)  # scheduled, not the unscheduled fallback
    path = tmp_path / "convs.onnx"
    path.write_bytes(model.SerializeToString())
    kiln.compile(path, tmp_path / "convs.kiln")
    compiled = kiln.runtime.load(tmp_path / "convs.kiln")
    for shape in ((2, 16, 48, 40), (3, 16, 13, 37), (1, 16, 8, 8)):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        cmp = compare(f"x={shape}", compiled.run(feeds), ort_outputs(model, feeds), rtol=1e-4, atol=1e-4)
        assert cmp.passed, cmp.max_abs


def test_cli_compile_and_run(tmp_path, capsys):
    out = tmp_path / "m.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out)]) == 0
    assert "kernels, target" in capsys.readouterr().out
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, input=_x(2))
    assert main(["run", str(out), "--inputs", str(inputs), "-o", str(outputs)]) == 0
    got = dict(np.load(outputs))
    cmp = compare("cli", got, ort_outputs(str(EXAMPLE), {"input": _x(2)}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs
    assert main(["compile", str(EXAMPLE), "-o", str(EXAMPLE)]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err


def test_cli_run_refuses_a_tampered_artifact(artifact, tmp_path, capsys):
    import zipfile

    bad = tmp_path / "bad.kiln"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = bytearray(zin.read(name))
            if name == "model.so":
                data[len(data) // 2] ^= 0xFF
            zout.writestr(name, bytes(data))
    np.savez(tmp_path / "in.npz", input=_x(1))
    assert main(["run", str(bad), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz")]) == 2
    assert "member 'model.so' does not match its sha256" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["yolov8n", "ocr_det"])
def test_real_models_compile_run_and_match(name, real_model, tmp_path):
    from models import MODELS, make_inputs

    path = real_model(name)
    out = tmp_path / f"{name}.kiln"
    pins = [arg for k, v in MODELS[name].inputs.items() for arg in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
    assert main(["compile", str(path), "-o", str(out), *pins]) == 0
    feeds = make_inputs(name)
    got = kiln.runtime.load(out).run(feeds)
    cmp = compare(name, got, ort_outputs(str(path), feeds), rtol=1e-3, atol=1e-4)
    assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("name", ["light_squeezenet", "light_resnet50", "light_densenet121"])
def test_light_models_compile_once_with_a_symbolic_batch(name, real_model, tmp_path):
    """Exported at batch 1, compiled with batch N, run at batch 1 and 4.

    onnxruntime refuses batch 4 on these models (their input is declared 1x3x224x224, and
    ResNet-50 reshapes to a hard-coded [1, 2048]), so each sample of the batch is compared
    with onnxruntime running that sample alone.
    """
    from models import MODELS

    path = real_model(name)
    (input_name, shape), = MODELS[name].inputs.items()
    out = tmp_path / f"{name}.kiln"
    assert main(["compile", str(path), "-o", str(out), "--input-shape", f"{input_name}=Nx{'x'.join(map(str, shape[1:]))}"]) == 0
    model = kiln.runtime.load(out)
    assert model.inputs[0].shape[0] == "N"
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)
        got = model.run({input_name: x})
        for i in range(batch):
            want = ort_outputs(str(path), {input_name: x[i:i + 1]})
            cmp = compare(f"batch {batch} sample {i}", {k: v[i:i + 1] for k, v in got.items()}, want, rtol=1e-3, atol=1e-4)
            assert cmp.passed, cmp.max_abs


def test_demo_script_runs():
    proc = subprocess.run([sys.executable, "examples/demo.py", "--rounds", "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max abs error vs onnxruntime" in proc.stdout and "median latency" in proc.stdout
    err = float(proc.stdout.split("max abs error vs onnxruntime ")[1].split()[0])
    assert err < 1e-4


@pytest.mark.parametrize("name", ["ocr_cls", "ocr_rec"])
def test_symbolic_width_compiles_once_and_runs_at_two_widths(name, real_model, tmp_path):
    """rapidocr's cls and rec models compiled with a named width W, run at two widths."""
    path = real_model(name)
    out = tmp_path / f"{name}.kiln"
    assert main(["compile", str(path), "-o", str(out), "--input-shape", "x=1x3x48xW"]) == 0
    model = kiln.runtime.load(out)
    assert model.inputs[0].shape == (1, 3, 48, "W")
    for width in (192, 320):
        x = np.random.default_rng(width).standard_normal((1, 3, 48, width)).astype(np.float32)
        cmp = compare(f"W={width}", model.run({"x": x}), ort_outputs(str(path), {"x": x}), rtol=1e-3, atol=1e-4)
        assert cmp.passed, cmp.max_abs


def test_cuda_artifact_builds_without_a_gpu(real_model, tmp_path):
    """A sm_90 artifact for the light ResNet-50: TVM's CUDA source, compiled to a fatbin by nvcc."""
    import shutil
    import zipfile

    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("nvcc is not installed: CUDA artifacts cannot be built here")
    path = real_model("light_resnet50")
    out = tmp_path / "r50_sm90.kiln"
    assert main(["compile", str(path), "-o", str(out), "--target", "cuda", "--arch", "sm_90"]) == 0
    from kiln.runtime.artifact import read_artifact

    art = read_artifact(out)
    assert art.manifest["target"]["kind"] == "cuda" and art.manifest["target"]["arch"] == "sm_90"
    assert b"__global__" in art.member("kernels.cu")
    assert len(art.member("kernels.fatbin")) > 1000
    with zipfile.ZipFile(out) as zf:
        assert {"kernels.cu", "kernels.fatbin", "model.so", "weights.safetensors"} <= set(zf.namelist())
    with pytest.raises(Exception, match="CUDA artifact"):
        kiln.runtime.load(out)


def test_cuda_needs_an_arch(capsys):
    assert main(["compile", str(EXAMPLE), "-o", "/tmp/never.kiln", "--target", "cuda"]) == 2
    assert "--target cuda needs --arch" in capsys.readouterr().err


def test_run_batch(artifact):
    model = kiln.runtime.load(artifact)
    batch = [{"input": _x(1, seed=s)} for s in range(3)]
    results = model.run_batch(batch)
    assert len(results) == 3
    for feeds, got in zip(batch, results):
        assert compare("batch", got, ort_outputs(str(EXAMPLE), feeds), rtol=1e-4, atol=1e-5).passed


def test_bench_alternates_engines_in_their_own_processes(tmp_path, capsys):
    import json
    import os

    out = tmp_path / "bench.json"
    assert main(["bench", str(EXAMPLE), "--against", "onnxruntime,openvino", "--batch", "2", "--rounds", "2",
                 "--iterations", "2", "--json", str(out), "--profile"]) == 0
    data = json.loads(out.read_text())
    assert set(data["engines"]) == {"kiln", "onnxruntime", "openvino"} and data["batch"] == 2
    pids = {e["pid"] for e in data["engines"].values()}
    assert len(pids) == 3 and os.getpid() not in pids  # each engine in its own process
    assert all(e["samples"] == 4 and e["median_ms"] > 0 for e in data["engines"].values())
    assert data["ratios"]["kiln/onnxruntime"] > 0 and data["ratios"]["kiln/openvino"] > 0 and data["cpu"]
    printed = capsys.readouterr().out
    assert "onnxruntime spinning off" in printed and "kiln per kernel" in printed
    kernels = {k["name"]: k for k in data["kernels"]}
    assert sum(1 for name in kernels if "conv" in name) >= 2 and all(k["ms"] > 0 for k in kernels.values())
    convs = [k for name, k in kernels.items() if "conv" in name]
    assert data["peak_gflops"] > 0 and all(k["gflops"] > 0 and k["peak_share"] > 0 for k in convs)
    assert "GFLOP/s" in printed and "of peak" in printed
    # an artifact given: its graph is re-derived from the model and its recorded passes, for the FLOPs
    art = tmp_path / "m.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(art)]) == 0
    assert main(["bench", str(EXAMPLE), "--artifact", str(art), "--rounds", "1", "--iterations", "1",
                 "--json", str(out), "--profile"]) == 0
    again = {k["name"]: k for k in json.loads(out.read_text())["kernels"]}
    assert all(again[name]["gflops"] > 0 for name in kernels if "conv" in name)
    assert main(["bench", str(EXAMPLE), "--against", "nosuch"]) == 2
    assert main(["bench", str(EXAMPLE), "--artifact", str(out), "--tune-db", str(tmp_path)]) == 2


def test_bench_runs_every_engine_on_the_feeds_given(tmp_path, capsys):
    import json

    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input=np.random.default_rng(3).standard_normal((3, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "bench.json"
    assert main(["bench", str(EXAMPLE), "--inputs", str(feeds), "--rounds", "1", "--iterations", "2",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["engines"]) == {"kiln", "onnxruntime"} and all(e["median_ms"] > 0 for e in data["engines"].values())
    assert main(["bench", str(EXAMPLE), "--inputs", str(feeds), "--batch", "2"]) == 2
    np.savez(feeds, nope=np.zeros(3, np.float32))
    capsys.readouterr()
    assert main(["bench", str(EXAMPLE), "--inputs", str(feeds), "--rounds", "1", "--iterations", "1"]) == 2
    assert "inputs do not match the model" in capsys.readouterr().err


def test_profile_times_every_kernel_of_a_run(artifact):
    model = kiln.runtime.load(artifact)
    rows = model.profile({"input": _x(2)}, runs=3)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and "(vm builtins)" in names
    assert [r.ms for r in rows] == sorted((r.ms for r in rows), reverse=True)
    convs = [r for r in rows if "conv" in r.name]
    assert len(convs) >= 2 and all(r.calls >= 1 for r in convs)
    with pytest.raises(InputError):
        model.profile({"input": _x(2)[:, :2]})


def test_compile_refuses_a_microsoft_op(tmp_path, capsys):
    model = make_model([helper.make_node("FusedGemm", ["x", "x"], ["y"], name="fg", domain="com.microsoft")],
                       [f32("x", [2, 2])], [f32("y", [2, 2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    src = tmp_path / "ms.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["compile", str(src), "-o", str(tmp_path / "ms.kiln")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kiln: error: ") and "com.microsoft::FusedGemm (nodes: fg)" in lines[-1]
    assert all(line.startswith("[kiln] ") for line in lines[:-1])  # the rest is the progress display
    assert not (tmp_path / "ms.kiln").exists()


def test_matmul_broadcasts_batch_dims_and_symbolic_sizes(tmp_path):
    """N-D MatMul: batch dims broadcast both ways (1 against 5, missing against 2), with a symbolic M."""
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [f32("a", [2, 1, "M", 4]), f32("b", [5, 4, 6])], [f32("y", None)])
    build(kiln.load(model), tmp_path / "mm.kiln")
    compiled = kiln.runtime.load(tmp_path / "mm.kiln")
    rng = np.random.default_rng(0)
    for m in (1, 3):
        feeds = {"a": rng.standard_normal((2, 1, m, 4)).astype(np.float32),
                 "b": rng.standard_normal((5, 4, 6)).astype(np.float32)}
        cmp = compare(f"M={m}", compiled.run(feeds), ort_outputs(model, feeds), rtol=1e-5, atol=1e-6)
        assert cmp.passed, cmp.max_abs


def test_shape_values_of_a_symbolic_dim_feed_kernels(tmp_path):
    """Shape and Size of an input with a symbolic batch, read as values (transformers' mask builder:
    ``arange(batch)``), in kernels fused with the ops that use them: the dim is the kernel's argument."""
    i64 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.INT64, shape)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Size", ["x"], ["size"]),
        helper.make_node("Reshape", ["n", "one_dim"], ["n1"]),
        helper.make_node("Mul", ["r", "n1"], ["rn"]),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("one_dim", TensorProto.INT64, [1], [1])]
    model = make_model(nodes, [f32("x", ["N", 4])], [i64("r", ["N"]), i64("size", []), i64("rn", ["N"])], inits)
    build(kiln.load(model), tmp_path / "shape.kiln")
    compiled = kiln.runtime.load(tmp_path / "shape.kiln")
    for n in (1, 5):
        feeds = {"x": np.zeros((n, 4), np.float32)}
        cmp = compare(f"N={n}", compiled.run(feeds), ort_outputs(model, feeds), rtol=0, atol=0)
        assert cmp.passed, cmp.max_abs


def test_o3_blocked_layout_compiles_and_matches_onnxruntime(tmp_path):
    """O3 on a small CNN: an RGB stem, a 3x3 conv, a depthwise conv, a residual add, a grouped conv
    that stays in NCHW, elementwise ops, a channel Concat, and a conv whose 10 output channels are
    padded to a block, through the blocked-layout kernels and their schedules."""
    from onnx import numpy_helper

    from kiln.codegen.lowering import lower
    from kiln.codegen.schedule import schedule_func

    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    model = make_model([
        helper.make_node("Conv", ["x", "w0"], ["s"], pads=[3, 3, 3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["s", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["d"], pads=[1, 1, 1, 1], group=32, strides=[2, 2]),
        helper.make_node("Conv", ["r", "w3"], ["g"], pads=[0, 0, 0, 0], group=2, strides=[2, 2]),
        helper.make_node("Add", ["d", "g"], ["s2"]),
        helper.make_node("Mul", ["s2", "half"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["sg"]),
        helper.make_node("Conv", ["sg", "w4"], ["h"]),  # 10 output channels: padded to one block of 16
        helper.make_node("Concat", ["sg", "s2"], ["y2"], axis=1),
    ], [f32("x", ["N", 3, 30, 30])], [f32("h", None), f32("y2", None)],
        [init("w0", (16, 3, 7, 7)), init("w1", (32, 16, 3, 3)), init("b1", (32,)), init("w2", (32, 1, 3, 3)),
         init("w3", (32, 16, 1, 1)), numpy_helper.from_array(np.array(0.5, np.float32), "half"),
         init("w4", (10, 32, 1, 1))])
    g, _ = PassManager(passes_for("O3", block=16)).run(kiln.load(model))
    ops = [n.op_type for n in g.nodes]
    assert ops.count("BlockedConv") == 5 and "Conv" not in ops  # the grouped conv too: 16 channels per group
    module = lower(g).module
    kinds = {str(f.attrs["kiln.schedule"]) for f in module.functions.values() if f.attrs and "kiln.schedule" in f.attrs}
    assert kinds == {"conv_nchwc", "depthwise_nchwc"}
    for f in module.functions.values():  # every kiln schedule applies (a failure would fall back silently)
        if f.attrs and "kiln.schedule" in f.attrs:
            assert schedule_func(f) is not f
    build(g, tmp_path / "o3.kiln")
    compiled = kiln.runtime.load(tmp_path / "o3.kiln")
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, 30, 30)).astype(np.float32)
        cmp = compare(f"batch {batch}", compiled.run({"x": x}), ort_outputs(model, {"x": x}), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("dilation,stride", [(2, 1), (4, 2), (3, 1)])
def test_o3_dilated_depthwise_runs_blocked_and_matches_onnxruntime(dilation, stride, tmp_path):
    """Atrous depthwise convs (DeepLab and LRASPP heads) stay in the blocked layout, with their schedule."""
    from onnx import numpy_helper

    rng = np.random.default_rng(dilation)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in (("w0", (32, 3, 3, 3)), ("wd", (32, 1, 3, 3)), ("bd", (32,)), ("w1", (16, 32, 3, 3)))]
    pad = dilation
    model = make_model([
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "wd", "bd"], ["d"], pads=[pad] * 4, dilations=[dilation, dilation],
                         strides=[stride, stride], group=32),
        helper.make_node("Relu", ["d"], ["r2"]),
        helper.make_node("Conv", ["r2", "w1"], ["y"], pads=[2, 2, 2, 2], dilations=[2, 2]),
    ], [f32("x", ["N", 3, 29, 29])], [f32("y", None)], inits)
    ops = _blocked_schedules_apply_and_match(model, {"conv_nchwc", "depthwise_nchwc"}, (3, 29, 29), rng, tmp_path)
    assert ops.count("BlockedConv") == 3


def _blocked_schedules_apply_and_match(model, kinds: set[str], sample: tuple[int, ...], rng, tmp_path) -> list[str]:
    """Optimize ``model`` at O3; check that its kiln schedules are ``kinds`` and all apply (a failure would
    fall back silently), then that it matches onnxruntime at batch 1 and 2. Returns the optimized op types."""
    from kiln.codegen.lowering import lower
    from kiln.codegen.schedule import schedule_func

    g, _ = PassManager(passes_for("O3", block=16)).run(kiln.load(model))
    scheduled = [f for f in lower(g).module.functions.values() if f.attrs and "kiln.schedule" in f.attrs]
    assert {str(f.attrs["kiln.schedule"]) for f in scheduled} == kinds
    assert all(schedule_func(f) is not f for f in scheduled)
    build(g, tmp_path / "blocked.kiln")
    compiled = kiln.runtime.load(tmp_path / "blocked.kiln")
    for batch in (1, 2):
        x = rng.standard_normal((batch, *sample)).astype(np.float32)
        cmp = compare(f"batch {batch}", compiled.run({"x": x}), ort_outputs(model, {"x": x}), rtol=1e-4, atol=1e-5)
        assert cmp.passed, cmp.max_abs
    return [n.op_type for n in g.nodes]


@pytest.mark.parametrize("group,width,dilation", [(2, 32, 1), (4, 16, 2), (3, 48, 3)])
def test_o3_grouped_convs_run_blocked_and_match_onnxruntime(group, width, dilation, tmp_path):
    """Grouped convs whose groups are whole blocks of 16 channels (ResNeXt- and RegNet-style, and
    dilated ones) run in the blocked layout with the conv schedule; so do groups of 8, two to a
    block; groups of 2 (eight to a block) stay NCHW."""
    from onnx import numpy_helper

    rng = np.random.default_rng(group)
    c = group * width
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in (("w0", (c, 3, 3, 3)), ("wg", (c, width, 3, 3)), ("bg", (c,)), ("w8", (c, 8, 1, 1)),
                          ("w2", (c, 2, 1, 1)))]
    model = make_model([
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "wg", "bg"], ["g"], pads=[dilation] * 4, dilations=[dilation, dilation],
                         group=group),
        helper.make_node("Add", ["g", "r"], ["s"]),
        helper.make_node("Relu", ["s"], ["t"]),
        helper.make_node("Conv", ["t", "w8"], ["u"], group=c // 8),  # 8 channels per group: two to a block
        helper.make_node("Conv", ["u", "w2"], ["y"], group=c // 2),  # 2 channels per group: stays NCHW
    ], [f32("x", ["N", 3, 13, 14])], [f32("y", None)], inits)
    ops = _blocked_schedules_apply_and_match(model, {"conv_nchwc"}, (3, 13, 14), rng, tmp_path)
    assert ops.count("BlockedConv") == 3 and ops.count("Conv") == 1


@pytest.mark.parametrize("width", [8, 4])
def test_o3_narrow_groups_merge_into_blocks_and_match_onnxruntime(width, tmp_path):
    """RegNet's 104 channels in groups of 8 (13 groups: the last block holds one group and padding),
    and ResNeXt-style groups of 4, merge into one-block groups with block-diagonal weights."""
    from onnx import numpy_helper

    from kiln.passes.layout import merge_group_weight

    rng = np.random.default_rng(width)
    c = 104
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in (("w0", (c, 3, 3, 3)), ("wg", (c, width, 3, 3)), ("bg", (c,)))]
    model = make_model([
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "wg", "bg"], ["g"], pads=[1, 1, 1, 1], strides=[2, 2], group=c // width),
        helper.make_node("Relu", ["g"], ["y"]),
    ], [f32("x", ["N", 3, 11, 12])], [f32("y", None)], inits)
    ops = _blocked_schedules_apply_and_match(model, {"conv_nchwc"}, (3, 11, 12), rng, tmp_path)
    assert ops.count("BlockedConv") == 2 and "Conv" not in ops
    merged = merge_group_weight(np.arange(2 * 3 * 4, dtype=np.float32).reshape(6, 2, 1, 2), 3, 2)
    assert merged.shape == (6, 4, 1, 2)
    np.testing.assert_array_equal(merged[2:4, :2], 0)  # group 1 sits in lanes 2-3 of its merged group
    np.testing.assert_array_equal(merged[2:4, 2:], np.arange(8, 16, dtype=np.float32).reshape(2, 2, 1, 2))


def test_o3_pooling_runs_blocked_and_matches_onnxruntime(tmp_path):
    """MaxPool, AveragePool (ceil mode) and GlobalAveragePool on a 24-channel conv output (padded to
    two blocks) stay in the blocked layout: 3-D pools with a lane window of 1, and a ReduceMean."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((24, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    model = make_model([
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c"], ["a"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
    ], [f32("x", [1, 3, 15, 15])], [f32("p", None), f32("a", None), f32("g", None)], [w])
    g, _ = PassManager(passes_for("O3", block=16)).run(kiln.load(model))
    assert [n.op_type for n in g.nodes].count("FromBlocked") == 3 and "GlobalAveragePool" not in [n.op_type for n in g.nodes]
    build(g, tmp_path / "pool.kiln")
    x = rng.standard_normal((1, 3, 15, 15)).astype(np.float32)
    cmp = compare("pools", kiln.runtime.load(tmp_path / "pool.kiln").run({"x": x}), ort_outputs(model, {"x": x}),
                  rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_a_stand_in_llvm_cpu_emits_no_instruction_its_cpu_lacks():
    """kiln builds znver4's code as icelake-server's: every ISA feature LLVM gives icelake-server,
    znver4 has too; what differs is tuning (and PCONFIG, a system instruction no compiler emits)."""
    import tvm
    from tvm.target import codegen

    from kiln.codegen.target import CODE_AS

    def features(cpu: str) -> set[str]:
        return set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))

    tuning = re.compile(r"^(fast-|slow-|no-bypass-|prefer-|tuning-|allow-light|macrofusion|branchfusion|"
                        r"idivq-to-divl|ermsb|sbb-dep-breaking|false-deps-|lea-|pad-short|use-)")
    for cpu, stand_in in CODE_AS.items():
        extra = {f for f in features(stand_in) - features(cpu) if not tuning.match(f)}
        assert extra <= {"pconfig"}, (cpu, stand_in, sorted(extra))


def test_an_llvm_cpu_name_is_chosen_for_its_own_vendor_only():
    """A Xeon with AMX hidden has every flag znver4 lists, but znver4 code (SSE4A, CLZERO) is not for it."""
    from kiln.codegen.target import choose_mcpu

    zen4_flags = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16"}
    assert choose_mcpu(zen4_flags, vendor="AuthenticAMD")[0] == "icelake-server"  # znver4's stand-in
    assert choose_mcpu(zen4_flags, vendor="GenuineIntel")[0] == "cooperlake"
    assert choose_mcpu(zen4_flags | {"amx_int8"}, vendor="GenuineIntel")[0] == "sapphirerapids"
    assert choose_mcpu({"avx2", "fma"}, vendor="AuthenticAMD")[0] == "haswell"  # Zen 3: no AVX-512
    assert choose_mcpu({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}, vendor="AuthenticAMD")[0] == "haswell"
