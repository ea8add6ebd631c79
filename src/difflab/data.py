"""The course's digit data layout and a dataset-balanced batch sampler.

Layout (``hw2_data/digits``)::

    {mnistm,svhn}/train.csv      image_name,label
    {mnistm,svhn}/data/*.png     28x28 RGB

Decoded images are cached as one ``.npz`` per dataset under ``cache_dir``; the cache
key is a fingerprint of the csv bytes and every listed image's name, size and mtime,
so any change to the folder invalidates it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from difflab.io import PathLike, read_rgb

DATASETS = ("mnistm", "svhn")
IMAGE_SIZE = 28



@dataclass
class DigitSet:
    """All images of one dataset in memory: ``images`` [N, 28, 28, 3] uint8, ``labels`` [N] int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab"))


def _name_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a file name inside ``data/`` (None when it is)."""
    if not name:
        return "it is empty"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", name):
        return "it is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "it leaves data/ ('..')"
    if any(ord(c) < 32 for c in name):
        return "it holds a control character"
    return None


def read_csv(csv_path: Path) -> list[tuple[str, int]]:
    """Parse ``image_name,label`` rows; labels must be integers in 0..9, names must lie
    inside ``data/`` and each image is listed once. A byte-order mark (spreadsheet
    programs save one) is accepted."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"missing label file: {csv_path} (expected 'image_name,label' rows)")
    rows: list[tuple[str, int]] = []
    first_line: dict[str, tuple[int, int]] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["image_name", "label"]:
                raise ValueError(f"{csv_path}: expected header 'image_name,label', got {header!r}")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 2:
                    raise ValueError(f"{csv_path}:{lineno}: expected 'image_name,label', got {row!r}")
                name, label = row[0].strip(), row[1].strip()
                problem = _name_problem(name)
                if problem:
                    raise ValueError(f"{csv_path}:{lineno}: image name {name!r} is not a file in data/: {problem}")
                try:
                    value = int(label)
                except ValueError:
                    raise ValueError(f"{csv_path}:{lineno}: label {label!r} of {name} is not an integer") from None
                if not 0 <= value <= 9:
                    raise ValueError(f"{csv_path}:{lineno}: label {value} of {name} is outside 0-9")
                if name in first_line:
                    line, old = first_line[name]
                    how = f"with label {old} and again with label {value}" if old != value else "twice"
                    raise ValueError(f"{csv_path}:{lineno}: image {name} is listed {how} (first on line {line}); "
                                     "list each image once")
                first_line[name] = (lineno, value)
                rows.append((name, value))
    except UnicodeDecodeError as e:
        raise ValueError(f"{csv_path} is not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise ValueError(f"{csv_path}: not a readable csv file: {e}") from None
    if not rows:
        raise ValueError(f"{csv_path}: no images listed")
    return rows


def _fingerprint(csv_path: Path, data_dir: Path, rows: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256(csv_path.read_bytes())
    for name, _ in rows:
        p = data_dir / name
        try:
            st = p.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"missing image {p} (listed in {csv_path})") from None
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_digit_set(root: PathLike, name: str, cache_dir: Optional[PathLike] = None, progress: bool = True) -> DigitSet:
    """Load ``root/name`` (course layout) into memory, using the decoded-image cache."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    base = Path(root) / name
    csv_path, data_dir = base / "train.csv", base / "data"
    rows = read_csv(csv_path)
    key = _fingerprint(csv_path, data_dir, rows)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"digits-{name}-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                return DigitSet(name, z["images"], z["labels"])
        except Exception:
            pass  # a damaged cache is rebuilt below
    from tqdm.auto import tqdm

    images = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (img_name, _) in enumerate(tqdm(rows, desc=f"decoding {name}", disable=not progress, leave=False)):
        images[i] = read_rgb(data_dir / img_name, (IMAGE_SIZE, IMAGE_SIZE))
    labels = np.array([label for _, label in rows], dtype=np.int64)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels)
        from difflab.io import atomic_path

        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(buf.getvalue())
        for old in cache.glob(f"digits-{name}-*.npz"):
            if old != cache_file:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # caching is an optimisation only
    return DigitSet(name, images, labels)


class BalancedDigits:
    """Both datasets in memory, sampled so that each batch draws each dataset with
    probability ``1 / len(sets)`` (or the given ``shares``) regardless of their sizes.

    ``batch(step, ...)`` is a pure function of (seed, step, rank): resuming at a step
    reproduces exactly the batches an uninterrupted run would have drawn.
    """

    def __init__(self, sets: Sequence[DigitSet]):
        self.sets = list(sets)
        self.images = [torch.from_numpy(s.images) for s in self.sets]
        self.labels = [torch.from_numpy(s.labels) for s in self.sets]

    @classmethod
    def from_root(cls, root: PathLike, cache_dir: Optional[PathLike] = None, progress: bool = True) -> "BalancedDigits":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"digit data folder not found: {root} (expected mnistm/ and svhn/ inside)")
        return cls([load_digit_set(root, name, cache_dir, progress) for name in DATASETS])

    def draw(self, generator: torch.Generator, n: int, shares: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
        """(dataset [n], index [n]): each dataset with probability 1/len(sets) (``shares``: with
        these probabilities, in the order of ``sets``), then a uniform image of it."""
        if shares is not None and (len(shares) != len(self.sets) or min(shares) < 0 or sum(shares) <= 0):
            raise ValueError(f"shares must be {len(self.sets)} non-negative numbers, not all 0; got {list(shares)}")
        if shares is None or len(set(shares)) == 1:  # equal shares: the uniform draw (that of runs made before shares)
            which = torch.randint(len(self.sets), (n,), generator=generator)
        else:
            probs = torch.tensor(shares, dtype=torch.float64)
            which = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
        idx = torch.empty(n, dtype=torch.long)
        for k in range(len(self.sets)):
            sel = which == k
            idx[sel] = torch.randint(len(self.labels[k]), (int(sel.sum()),), generator=generator)
        return which, idx

    def gather(self, which: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,28,28] float in [-1, 1] and digits [B] of (dataset, index) pairs."""
        images = torch.empty((len(which), *self.images[0].shape[1:]), dtype=self.images[0].dtype)
        digits = torch.empty(len(which), dtype=self.labels[0].dtype)
        for k in range(len(self.sets)):
            sel = which == k
            images[sel], digits[sel] = self.images[k][idx[sel]], self.labels[k][idx[sel]]
        return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), digits

    def batch(self, generator: torch.Generator, batch_size: int,
              shares: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Draw a batch: images [B,3,28,28] float in [-1, 1], digit [B], dataset [B], grouped by dataset
        (``shares``: as in :meth:`draw`)."""
        which, idx = self.draw(generator, batch_size, shares)
        order = torch.sort(which, stable=True).indices
        which, idx = which[order], idx[order]
        x, digit = self.gather(which, idx)
        return x, digit, which
