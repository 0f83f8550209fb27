"""Real photographs as calibration and evaluation inputs for image models.

scikit-image ships a few dozen real photographs (``skimage.data``). Calibration crops
come from one set of them and evaluation crops from the others, so that held-out inputs
are other pictures, not other crops of the calibration pictures. Each crop is a random
square of 30-100% of the picture's shorter side, resized (bilinear), sometimes mirrored,
and normalised with the ImageNet mean and standard deviation, in NCHW float32.

    python bench/calib_images.py --input data --size 224 --calib 32 --eval 64 --out DIR

writes ``DIR/calib.npz`` and ``DIR/eval.npz`` keyed by the input name, for
``kiln compile --quantize int8 --calib DIR/calib.npz --eval DIR/eval.npz``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: Photographs in skimage.data (synthetic images such as checkerboards are left out).
CALIB_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]
EVAL_PHOTOS = ["hubble_deep_field", "immunohistochemistry", "retina", "moon", "brick", "grass", "gravel", "clock",
               "page", "text", "cell"]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.uint8)


def crops(photos: list[str], count: int, size: int | tuple[int, int], seed: int, norm: str = "imagenet") -> np.ndarray:
    """``count`` NCHW crops of ``photos`` (round robin), shape ``[count, 3, H, W]``; ``norm`` is
    ``imagenet`` (mean/std) or ``unit`` (RGB in [0, 1], as YOLO models take it)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    images = [_photo(p) for p in photos]
    out = np.empty((count, 3, h, w), np.float32)
    for i in range(count):
        img = images[i % len(images)]
        side = min(img.shape[:2])
        s = int(side * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, img.shape[0] - s + 1), rng.integers(0, img.shape[1] - s + 1)
        crop = Image.fromarray(img[y:y + s, x:x + s]).resize((w, h), Image.BILINEAR)
        a = np.asarray(crop, np.float32) / 255
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = (a if norm == "unit" else (a - MEAN) / STD).transpose(2, 0, 1)
    return out


def calibration_sets(size: int | tuple[int, int], calib: int = 32, held_out: int = 64, seed: int = 0,
                     norm: str = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """Calibration and held-out image batches from disjoint photographs."""
    return crops(CALIB_PHOTOS, calib, size, seed, norm), crops(EVAL_PHOTOS, held_out, size, seed + 1, norm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="the model's image input name")
    p.add_argument("--size", default="224", help="H or HxW (default 224)")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", default="imagenet", choices=["imagenet", "unit"])
    p.add_argument("--out", required=True, help="directory for calib.npz and eval.npz")
    args = p.parse_args()
    size = tuple(int(d) for d in args.size.split("x")) if "x" in args.size else int(args.size)
    cal, ev = calibration_sets(size, args.calib, args.eval, args.seed, args.norm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calib.npz", **{args.input: cal})
    np.savez(out / "eval.npz", **{args.input: ev})
    print(f"wrote {out / 'calib.npz'} ({len(cal)} crops of {len(CALIB_PHOTOS)} photographs) and "
          f"{out / 'eval.npz'} ({len(ev)} crops of {len(EVAL_PHOTOS)} others)")


if __name__ == "__main__":
    main()
