"""Per-image MSE between generated faces and ground truth, as the course grades it:
both PNGs read as 0-255 RGB, ``mean((a - b)^2)`` in float over every pixel and
channel; images are paired by file name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def image_mse(a: PathLike, b: PathLike) -> float:
    """MSE on 0-255 RGB pixels between two image files of the same size."""
    x, y = _read_rgb(Path(a)), _read_rgb(Path(b))
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
