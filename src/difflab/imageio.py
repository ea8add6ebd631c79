"""Tensor <-> PNG, with torchvision ``save_image`` rounding, grids, atomic writes.

``save_image`` semantics: a float image in [0, 1] becomes
``uint8(clamp(x * 255 + 0.5, 0, 255))`` (round half up, then truncate).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

PathLike = Union[str, os.PathLike]


def to_uint8(img: Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, C] uint8 with save_image rounding (C = 1 or 3)."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a [C, H, W] image with C in (1, 3), got shape {tuple(img.shape)}")
    arr = img.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def from_uint8(arr: np.ndarray) -> Tensor:
    """[H, W, C] uint8 -> [C, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float().div_(255)


def minmax_normalize(x: Tensor) -> Tensor:
    """Per-image min-max normalisation of a [B, C, H, W] batch to [0, 1]."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp(min=1e-12)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash or exception inside the block leaves ``path`` untouched and removes the
    temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_png(img: Tensor, path: PathLike) -> None:
    """Write one [C, H, W] image in [0, 1] as an 8-bit PNG, atomically."""
    arr = to_uint8(img)
    mode = "L" if arr.shape[2] == 1 else "RGB"
    pil = Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def load_png(path: PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as [3, H, W] float in [0, 1]; optionally check its (H, W)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read image {path}: {e}") from None
    if size is not None and arr.shape[:2] != tuple(size):
        raise ValueError(f"image {path} has size {arr.shape[0]}x{arr.shape[1]}, expected {size[0]}x{size[1]}")
    return from_uint8(arr)


def make_grid(images: Union[Tensor, Sequence[Tensor]], nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """Tile a [B, C, H, W] batch into one [C, H', W'] image, ``nrow`` images per row,
    with ``padding`` pixels of ``pad_value`` around every tile (torchvision's layout)."""
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    if images.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = int(math.ceil(b / ncol))
    H, W = h + padding, w + padding
    grid = images.new_full((c, nrows * H + padding, ncol * W + padding), pad_value)
    for k in range(b):
        r, col = divmod(k, ncol)
        grid[:, r * H + padding : r * H + padding + h, col * W + padding : col * W + padding + w] = images[k]
    return grid


def save_grid(images: Union[Tensor, Sequence[Tensor]], path: PathLike, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> None:
    """``make_grid`` then ``save_png`` (what torchvision's ``save_image`` does with a batch)."""
    save_png(make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value), path)
