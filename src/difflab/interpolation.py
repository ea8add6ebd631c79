"""Interpolation between noise tensors: the project's only copies of slerp and lerp."""
from __future__ import annotations

import torch
from torch import Tensor


def lerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Linear interpolation ``(1 - alpha) z0 + alpha z1``."""
    return (1 - alpha) * z0 + alpha * z1


def slerp(z0: Tensor, z1: Tensor, alpha: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985), per sample, as in the course:

        theta = arccos(<z0, z1> / (|z0| |z1|))
        slerp = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1

    :param z0, z1: tensors of the same shape; a leading batch dimension is
        interpolated sample by sample (all other dimensions are flattened for the angle).
    :param dot_threshold: when |cos theta| exceeds it the inputs are (nearly) parallel
        and sin(theta) ~ 0, so lerp is used for those samples instead.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    batched = z0.ndim >= 2
    a = z0.reshape(z0.shape[0], -1) if batched else z0.reshape(1, -1)
    b = z1.reshape(a.shape)
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = cos.abs() > dot_threshold
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, torch.full_like(sin, 1 - alpha), torch.sin((1 - alpha) * theta) / safe_sin)
    w1 = torch.where(parallel, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe_sin)
    out = w0[:, None] * a64 + w1[:, None] * b64
    return out.to(z0.dtype).reshape(z0.shape)
