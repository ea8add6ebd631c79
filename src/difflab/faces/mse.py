"""Per-image MSE between generated faces and ground truth, as the course grades it:
both PNGs read as 0-255 RGB, ``mean((a - b)^2)`` in float over every pixel and
channel; images are paired by file name."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from difflab.io import PathLike, list_images, open_rgb


def _images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in list_images(folder)}


def image_mse(a: PathLike, b: PathLike) -> float:
    """MSE on 0-255 RGB pixels between two image files of the same size."""
    x, y = np.asarray(open_rgb(a), dtype=np.float64), np.asarray(open_rgb(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"size mismatch: {a} is {x.shape[1]}x{x.shape[0]}, {b} is {y.shape[1]}x{y.shape[0]}")
    return float(np.mean((x - y) ** 2))


def folder_mse(out_dir: PathLike, gt_dir: PathLike) -> dict[str, float]:
    """MSE for every ground-truth image against the same file name in ``out_dir``.

    Every ground-truth image must have a counterpart (extra generated files are ignored).
    """
    out_dir, gt_dir = Path(out_dir), Path(gt_dir)
    gt, out = _images(gt_dir), _images(out_dir)
    if not gt:
        raise ValueError(f"{gt_dir}: no ground-truth images (*.png, *.jpg) in this folder")
    missing = [n for n in gt if n not in out]
    if missing:
        raise ValueError(f"{out_dir}: no generated image for {len(missing)} ground-truth file(s): {', '.join(missing[:10])}")
    return {name: image_mse(out[name], path) for name, path in gt.items()}
