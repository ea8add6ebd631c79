"""Report figures for Problem 2: an eta grid and slerp-vs-lerp noise interpolation.

Both take any ``Denoiser`` and noise batch, so they work with the course face UNet,
a tiny test network, or any other eps-predicting model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from difflab.faces.generate import FaceSampling, sample_faces
from difflab.interpolation import lerp, slerp
from difflab.io import PathLike, make_grid, save_png
from difflab.sampling import Denoiser

DEFAULT_ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def eta_grid(
    denoiser: Denoiser,
    noise: Tensor,
    etas: Sequence[float] = DEFAULT_ETAS,
    recipe: FaceSampling = FaceSampling(),
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> Tensor:
    """Images for every (eta, noise) pair: [len(etas), N, 3, H, W] in [0, 1].

    Row r uses ``etas[r]``; each row draws its per-step noise from a generator seeded
    with ``seed`` (so the same seed gives the same grid).
    """
    rows = []
    for eta in etas:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows.append(sample_faces(denoiser, noise, recipe, eta=float(eta), batch_size=noise.shape[0],
                                 device=device, generator=gen, progress=progress))
    return torch.stack(rows)


def interpolate_noises(z0: Tensor, z1: Tensor, alphas: Sequence[float], method: str) -> Tensor:
    """[len(alphas), *z0.shape[1:]] noises between z0 and z1 ([1, C, H, W] or [C, H, W])."""
    fn = {"slerp": slerp, "lerp": lerp}.get(method)
    if fn is None:
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")
    a, b = z0.reshape(1, *z0.shape[-3:]), z1.reshape(1, *z1.shape[-3:])
    return torch.cat([fn(a, b, float(al)) for al in alphas])


def relative_norms(z: Tensor) -> list[float]:
    """|z_i| / sqrt(d) for each sample: about 1 for a standard Gaussian of dimension d."""
    flat = z.reshape(z.shape[0], -1).double()
    return (flat.norm(dim=1) / math.sqrt(flat.shape[1])).tolist()


def interpolation_rows(
    denoiser: Denoiser,
    z0: Tensor,
    z1: Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    recipe: FaceSampling = FaceSampling(),
    *,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 11,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """DDIM images along slerp and lerp paths: {'slerp': [A,3,H,W], 'lerp': [A,3,H,W]}.

    With eta > 0 both rows draw their per-step noise from a generator seeded with ``seed``."""
    out = {}
    for method in ("slerp", "lerp"):
        z = interpolate_noises(z0, z1, alphas, method)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out[method] = sample_faces(denoiser, z, recipe, batch_size=batch_size, device=device, generator=gen,
                                   progress=progress)
    return out


def save_eta_grid(grid: Tensor, path: PathLike) -> Path:
    """One PNG: rows = etas, columns = noises."""
    n_eta, n = grid.shape[:2]
    save_png(make_grid(grid.reshape(n_eta * n, *grid.shape[2:]), nrow=n), path)
    return Path(path)


def save_interpolation(rows: dict[str, Tensor], out_dir: PathLike) -> list[Path]:
    """``interpolation.png`` (slerp row above lerp row) plus ``slerp.png`` and ``lerp.png``."""
    out_dir = Path(out_dir)
    a = rows["slerp"].shape[0]
    # Build every image first, then write: nothing is half-written if one fails.
    pictures = {
        "interpolation.png": make_grid(torch.cat([rows["slerp"], rows["lerp"]]), nrow=a),
        "slerp.png": make_grid(rows["slerp"], nrow=a),
        "lerp.png": make_grid(rows["lerp"], nrow=a),
    }
    paths = []
    for name, img in pictures.items():
        save_png(img, out_dir / name)
        paths.append(out_dir / name)
    return paths
