"""int8 figures for one image model: kiln's own quantizer against onnxruntime's.

    python bench/int8.py MODEL.onnx --input NAME [--size 224] [--budget argmax>=0.99] [--out DIR]

1. real-photograph calibration (32) and held-out (64) inputs (``bench/calib_images.py``);
2. ``kiln compile --quantize int8`` with them (accuracy against the float model printed);
3. onnxruntime's ``quantize_static`` on the same calibration inputs: QDQ, per channel,
   uint8 activations and int8 weights, after its ``quant_pre_process``;
4. ``kiln bench`` of kiln's int8 artifact against onnxruntime fp32, then against
   onnxruntime int8 (each engine in its own process, alternating rounds, medians).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calib_images import calibration_sets  # noqa: E402


def ort_int8(model: Path, calib: np.ndarray, name: str, out: Path) -> Path:
    """onnxruntime's static QDQ quantization of ``model`` on ``calib`` (per channel)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    import onnx
    from onnx import version_converter

    m = onnx.load(str(model))
    up = out / "ort_opset13.onnx"
    if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
        m = version_converter.convert_version(m, 13)  # per-channel QDQ needs opset 13
    onnx.save(m, str(up))
    pre = out / "ort_pre.onnx"
    quant_pre_process(str(up), str(pre), skip_symbolic_shape=True)
    dst = out / "ort_int8.onnx"
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--input", required=True)
    p.add_argument("--size", default="224", help="H or HxW of the crops")
    p.add_argument("--norm", default="imagenet", choices=["imagenet", "unit"], help="input normalisation")
    p.add_argument("--input-shape", help="NAME=DxDxD, passed to kiln compile and kiln bench")
    p.add_argument("--no-ort-int8", action="store_true", help="skip onnxruntime's quantizer")
    p.add_argument("--budget", help="kiln's --accuracy-budget")
    p.add_argument("--method", default="minmax")
    p.add_argument("--out", default="int8-bench")
    p.add_argument("--reuse", action="store_true", help="keep an int8 artifact already in --out")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iterations", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(d) for d in args.size.split("x")) if "x" in args.size else int(args.size)
    cal, ev = calibration_sets(size, norm=args.norm)
    np.savez(out / "calib.npz", **{args.input: cal})
    np.savez(out / "eval.npz", **{args.input: ev})
    kiln = [sys.executable, "-m", "kiln.cli"]
    artifact = out / "kiln_int8.kiln"
    cmd = [*kiln, "compile", args.model, "-o", str(artifact), "--quantize", "int8", "--calib",
           str(out / "calib.npz"), "--eval", str(out / "eval.npz"), "--calib-method", args.method]
    pins = ["--input-shape", args.input_shape] if args.input_shape else []
    cmd += pins
    if args.budget:
        cmd += ["--accuracy-budget", args.budget, "--sensitivity"]
    if not (artifact.exists() and args.reuse):
        subprocess.run(cmd, check=True)
    timing = ["--rounds", str(args.rounds), "--iterations", str(args.iterations), *pins]
    print("\n# kiln int8 vs onnxruntime fp32")
    subprocess.run([*kiln, "bench", args.model, "--artifact", str(artifact), *timing], check=True)
    if args.no_ort_int8:
        return
    ort_model = ort_int8(Path(args.model), cal, args.input, out)
    print("\n# kiln int8 vs onnxruntime int8 (quantize_static, QDQ, per channel, same calibration inputs)")
    subprocess.run([*kiln, "bench", str(ort_model), "--artifact", str(artifact), *timing], check=True)


if __name__ == "__main__":
    main()
