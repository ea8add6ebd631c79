"""Labelled figures for the report, drawn with matplotlib (Agg): image grids shown
pixel for pixel (nearest-neighbour upscaling, never blurred) with row and column labels,
and line plots. The caption is not drawn into the image; the page puts it under it."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def labelled_grid(grid, nrows: int, ncols: int, tile: int, path: Path, *, row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), row_title: str = "", col_title: str = "", padding: int = 2,
                  tile_inches: float = 0.6) -> Path:
    """Save ``grid`` ([C, H, W] in [0, 1], as :func:`difflab.io.make_grid` lays it out with
    ``padding``) with labelled rows and columns; each tile is ``tile_inches`` wide."""
    plt = _plt()
    img = np.asarray(grid.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())
    step = tile + padding
    w, h = ncols * tile_inches + 1.6, nrows * tile_inches + 1.0
    fig, ax = plt.subplots(figsize=(w, h), dpi=max(100, int(np.ceil(tile / tile_inches))))
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([padding + c * step + tile / 2 - 0.5 for c in range(ncols)])
    ax.set_xticklabels(list(col_labels) or [""] * ncols, fontsize=8)
    ax.set_yticks([padding + r * step + tile / 2 - 0.5 for r in range(nrows)])
    ax.set_yticklabels(list(row_labels) or [""] * nrows, fontsize=8)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.tick_params(length=0)
    if col_title:
        ax.set_xlabel(col_title, fontsize=9)
    if row_title:
        ax.set_ylabel(row_title, fontsize=9)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], path: Path, *, xlabel: str, ylabel: str,
              title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def contact_sheet(files: Sequence[Path], path: Path, *, marks: dict[int, str] | None = None, ncols: int = 5,
                  tile_inches: float = 1.3) -> Path:
    """Every image of ``files`` in file order, its index under it; ``marks`` (index -> label,
    e.g. the top-5 ranks) are framed in red with the label above. Small images are upscaled
    by nearest neighbour."""
    from PIL import Image

    plt = _plt()
    marks = marks or {}
    n = len(files)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * tile_inches, nrows * (tile_inches + 0.35)), dpi=100,
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        with Image.open(files[k]) as im:
            ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
        ax.set_xlabel(str(k), fontsize=8)
        marked = k in marks
        for s in ax.spines.values():
            s.set_visible(marked)
            s.set_color("red")
            s.set_linewidth(3)
        if marked:
            ax.set_title(marks[k], fontsize=9, color="red", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
