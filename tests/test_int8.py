"""kiln's int8 VNNI conv kernel: exact against numpy's integer arithmetic, and really VNNI."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.codegen.int8 import LANES, conv_int8, schedule_conv_nchwc_int8
from kiln.ir.kiln_ops import pack_qconv_weight as pack_conv_weight, unpack_qconv_weight
from kiln.codegen.target import cpu_target
from kiln.runtime.artifact import host_cpu_features

TARGET = cpu_target()
pytestmark = pytest.mark.skipif("avx512_vnni" not in host_cpu_features(), reason="the host CPU has no AVX-512 VNNI")


def _blocked(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // LANES, LANES, h, w).transpose(0, 1, 3, 4, 2))


def _reference(x, w, bias, scale, strides, pads, xzp, yzp, relu):
    """The conv in int64 on NCHW arrays, then the requantize step in float32 (round half to even)."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    xp = np.full((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]), xzp, np.int64)
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    oh = (xp.shape[2] - r) // strides[0] + 1
    ow = (xp.shape[3] - s) // strides[1] + 1
    acc = np.zeros((n, k, oh, ow), np.int64)
    for dy in range(r):
        for dx in range(s):
            patch = xp[:, :, dy:dy + strides[0] * oh:strides[0], dx:dx + strides[1] * ow:strides[1]]
            acc += np.einsum("nchw,kc->nkhw", patch, w[:, :, dy, dx].astype(np.int64))
    acc += bias[None, :k, None, None]
    if scale is None:
        return acc.astype(np.int32)
    q = np.rint(acc.astype(np.float32) * scale[None, :k, None, None]).astype(np.int64) + yzp
    return np.clip(q, yzp if relu else 0, 255).astype(np.uint8)


def _build(shape_x, w_packed_shape, k, with_scale, **kw):
    import tvm
    from tvm import s_tir, te

    x = te.placeholder(shape_x, "uint8", name="x")
    w = te.placeholder(w_packed_shape, "int8", name="w")
    b = te.placeholder((k,), "int32", name="bias")
    sc = te.placeholder((k,), "float32", name="scale") if with_scale else None
    out = conv_int8(x, w, b, sc, **kw)
    func = te.create_prim_func([x, w, b, *([sc] if with_scale else []), out])
    sch = s_tir.Schedule(func)
    schedule_conv_nchwc_int8(sch)
    lib = tvm.compile(sch.mod, target=tvm.target.Target(dict(TARGET.tvm)))
    return lib, [int(d) for d in out.shape], str(out.dtype)


CASES = {
    "3x3 pad 1": dict(c=32, k=32, hw=14, ks=3, strides=(1, 1), pads=(1, 1, 1, 1)),
    "1x1": dict(c=64, k=32, hw=7, ks=1, strides=(1, 1), pads=(0, 0, 0, 0)),
    "3x3 stride 2": dict(c=16, k=48, hw=28, ks=3, strides=(2, 2), pads=(1, 1, 1, 1)),
}


@pytest.mark.parametrize("requant", [False, True], ids=["int32", "uint8"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_conv_is_exact(case, requant):
    import tvm

    p = CASES[case]
    rng = np.random.default_rng(len(case))
    c, k, hw, ks = p["c"], p["k"], p["hw"], p["ks"]
    x = rng.integers(0, 256, (1, c, hw, hw), dtype=np.uint8)
    w = rng.integers(-127, 128, (k, c, ks, ks), dtype=np.int8)
    bias = rng.integers(-5000, 5000, k, dtype=np.int32)
    scale = (rng.random(k, dtype=np.float32) * 2e-4 + 1e-5).astype(np.float32) if requant else None
    xzp, yzp = 3, 17
    kw = dict(strides=p["strides"], pads=p["pads"], x_zero_point=xzp, y_zero_point=yzp, relu=requant)
    packed = pack_conv_weight(w)
    lib, out_shape, dtype = _build((1, c // LANES, hw, hw, LANES), packed.shape, k, requant, **kw)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (_blocked(x), packed, bias, *([scale] if requant else []))]
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype), dev)
    lib(*args, out)
    got = out.numpy()
    want = _blocked(_reference(x, w, bias, scale, kw["strides"], kw["pads"], xzp, yzp, kw["relu"]))
    if requant:  # float32 products may land on the other side of a .5 than numpy's: one step at most
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert (got == want).mean() > 0.999
    else:
        np.testing.assert_array_equal(got, want)


def test_the_kernel_runs_on_vnni_instructions():
    lib, _, _ = _build((1, 2, 14, 14, LANES), pack_conv_weight(np.ones((32, 32, 3, 3), np.int8)).shape, 32, True,
                       strides=(1, 1), pads=(1, 1, 1, 1))
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= 14  # one per accumulator of the 7 x 2 tile, unrolled
    assert "vroundss" not in asm  # the requantize epilogue stays vectorised


def test_weights_are_packed_for_the_instruction():
    w = np.arange(20 * 24 * 3 * 3, dtype=np.int64).reshape(20, 24, 3, 3).astype(np.int8)
    p = pack_conv_weight(w)
    assert p.shape == (2, 2, 3, 3, 4, 16, 4)
    full = np.zeros((32, 32, 3, 3), np.int8)
    full[:20, :24] = w
    np.testing.assert_array_equal(unpack_qconv_weight(p), full)
    for ko, co, r, s, g, ki, ci in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 1, 3, 15, 3), (1, 0, 1, 2, 2, 3, 1)]:
        assert p[ko, co, r, s, g, ki, ci] == full[ko * 16 + ki, co * 16 + g * 4 + ci, r, s]


def _disassembly(artifact, tmp_path) -> str:
    """objdump's disassembly of an artifact's compiled library."""
    import subprocess
    import zipfile

    lib = tmp_path / "model.so"
    with zipfile.ZipFile(artifact) as z:
        lib.write_bytes(z.read("model.so"))
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout


def _quantized_model():
    """float -> QuantizeLinear -> QLinearConv 3x3 (20 -> 24) -> QLinearConv 1x1 stride 2 (24 -> 40,
    per-channel weight scales) -> DequantizeLinear: what onnxruntime's QOperator quantizer emits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr), name)

    inits = [
        init("xs", np.float32(0.03)), init("xzp", np.uint8(128)),
        init("w1", rng.integers(-127, 128, (24, 20, 3, 3)).astype(np.int8)), init("ws1", np.float32(0.004)),
        init("wzp1", np.int8(0)), init("ys1", np.float32(0.08)), init("yzp1", np.uint8(90)),
        init("b1", rng.integers(-2000, 2000, 24).astype(np.int32)),
        init("w2", rng.integers(-127, 128, (40, 24, 1, 1)).astype(np.int8)),
        init("ws2", (rng.random(40) * 0.004 + 0.001).astype(np.float32)), init("wzp2", np.zeros(40, np.int8)),
        init("ys2", np.float32(0.05)), init("yzp2", np.uint8(110)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q"]),
        helper.make_node("QLinearConv", ["q", "xs", "xzp", "w1", "ws1", "wzp1", "ys1", "yzp1", "b1"], ["y1"],
                         pads=[1, 1, 1, 1]),
        helper.make_node("QLinearConv", ["y1", "ys1", "yzp1", "w2", "ws2", "wzp2", "ys2", "yzp2"], ["y2"],
                         strides=[2, 2]),
        helper.make_node("DequantizeLinear", ["y2", "ys2", "yzp2"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, 14, 14])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 40, 7, 7])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_qlinearconv_compiles_to_vnni_kernels_and_matches_onnxruntime(tmp_path):
    import onnx

    import kiln
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for
    from helpers import ort_outputs

    model = _quantized_model()
    src = tmp_path / "q.onnx"
    onnx.save(model, src)
    g, report = PassManager(passes_for("O3", block=TARGET.layout_block)).run(kiln.load(src))
    ops = [n.op_type for n in g.walk_nodes()]
    assert ops.count("QBlockedConv") == 2 and "QLinearConv" not in ops
    assert ops.count("ToBlocked") == 1 and ops.count("FromBlocked") == 1  # int8 between the convs
    out = tmp_path / "q.kiln"
    build(g, out, target=TARGET)
    x = np.random.default_rng(0).standard_normal((1, 20, 14, 14)).astype(np.float32) * 2
    got = kiln.runtime.load(out).run({"x": x})["out"]
    want = ort_outputs(model, {"x": x})["out"]
    step = 0.05  # the output's quantization step
    assert np.abs(got - want).max() <= step * 1.001
    assert (np.abs(got - want) < step / 2).mean() > 0.999
    assert "vpdpbusd" in _disassembly(out, tmp_path)  # int8 dot products, not float emulation


def _qdq_model(tmp_path):
    """A conv, then two convs added (a residual block), quantized by onnxruntime's quantize_static
    (QDQ, per channel, uint8 activations, int8 weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(11)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)

    inits = [weight("w1", 24, 20, 3, 3), weight("b1", 24), weight("w2", 40, 24, 1, 1), weight("b2", 40),
             weight("w3", 40, 24, 3, 3), weight("b3", 40)]
    # a residual block's shape: a strided 1x1 branch and a strided 3x3 branch, added, then ReLU
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2]),
             helper.make_node("Conv", ["r1", "w3", "b3"], ["c3"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "c3"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 7, 7])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32, qdq = tmp_path / "fp32.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, fp32)

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((1, 20, 14, 14)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(qdq), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq


def _output_step(qdq) -> float:
    """The quantization step of the model's output ``y`` (its QuantizeLinear scale)."""
    import onnx

    m = onnx.load(qdq)
    (step,) = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name == "y_scale"]
    return float(step)


def test_a_qdq_model_from_onnxruntime_compiles_to_int8_kernels(tmp_path):
    """onnxruntime's own QDQ model: kiln runs its convs on VNNI and matches onnxruntime's int8 run."""
    import kiln
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for
    from helpers import ort_outputs

    qdq = _qdq_model(tmp_path)
    g, _ = PassManager(passes_for("O3", block=TARGET.layout_block)).run(kiln.load(qdq))
    ops = [n.op_type for n in g.walk_nodes()]
    assert ops.count("QBlockedConv") == 3 and "Conv" not in ops and "BlockedConv" not in ops, ops
    assert ops.count("ToBlocked") == 1 and ops.count("FromBlocked") == 1, ops  # one blocked region
    assert "Add" not in ops and "Relu" not in ops, ops  # the residual add and ReLU run in a conv's write-back
    assert sum(1 for n in g.walk_nodes() if n.op_type == "QBlockedConv" and n.input(4) is not None) == 1
    out = tmp_path / "q.kiln"
    build(g, out, target=TARGET)
    x = np.random.default_rng(1).standard_normal((1, 20, 14, 14)).astype(np.float32)
    got = kiln.runtime.load(out).run({"x": x})["y"]
    want = ort_outputs(str(qdq), {"x": x})["y"]  # onnxruntime runs the QDQ model on its int8 kernels
    step = _output_step(qdq)
    assert np.abs(got - want).max() <= step * 1.001
    assert (np.abs(got - want) < step / 2).mean() > 0.99
    assert "vpdpbusd" in _disassembly(out, tmp_path)


def test_int8_kernels_replay_from_a_tuning_database(tmp_path):
    """A database record of the VNNI conv (its trace tensorizes with kiln's intrinsic) applies on compile."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    import kiln
    import kiln.runtime
    from kiln.codegen.build import build
    from kiln.codegen.schedule import apply_default_schedule
    from kiln.codegen.tune import TuningDatabase, fused_module, tunable_kernels
    from kiln.passes import PassManager
    from kiln.passes.pipeline import passes_for
    from helpers import ort_outputs

    qdq = _qdq_model(tmp_path)
    g, _ = PassManager(passes_for("O3", block=TARGET.layout_block)).run(kiln.load(qdq))
    int8 = [k for k in tunable_kernels(fused_module(g, TARGET)) if k.name.startswith("qblocked_conv")]
    assert int8
    db = TuningDatabase(tmp_path / "db", create=True)
    target = tvm.target.Target(dict(TARGET.tvm))
    for k in int8:
        sch = s_tir.Schedule(k.mod)
        with target:
            apply_default_schedule(sch)
        assert "tensorize" in str(sch.trace)
        db.ms.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.ms.commit_workload(k.mod), [1e-5], target, ArgInfo.from_prim_func(k.mod["main"])))
    out = tmp_path / "q.kiln"
    build(g, out, target=TARGET, tuning_db=TuningDatabase(tmp_path / "db"))
    info = kiln.runtime.load(out).manifest["tuning_db"]
    assert info["kernels_from_database"] == sum(k.weight for k in int8) and info["kernels_tuned"] == 0
    x = np.random.default_rng(1).standard_normal((1, 20, 14, 14)).astype(np.float32)
    got = kiln.runtime.load(out).run({"x": x})["y"]
    step = _output_step(qdq)
    assert np.abs(got - ort_outputs(str(qdq), {"x": x})["y"]).max() <= step * 1.001
