"""Classifier-free guidance (Ho & Salimans 2022) as a Denoiser wrapper.

Convention. The course (and Ho & Salimans' paper) writes the guided noise as

    eps = (1 + w) * eps_cond - w * eps_uncond

with ``w = 0`` the plain conditional model. This is the same line as the form

    eps = eps_uncond + s * (eps_cond - eps_uncond),     s = 1 + w,

that Stable Diffusion tools use (their "guidance scale" 7.5 is s, i.e. w = 6.5).
``guided`` takes ``w``; callers using the s convention pass ``s - 1``.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import Tensor

from difflab.sampling import Denoiser


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions of the same structure along the batch dimension.

    Supports tensors, and tuples/lists/dicts of them (recursively); ``None`` stays None.
    """
    if a is None and b is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        if set(a) != set(b):
            raise ValueError(f"condition keys differ: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise ValueError(f"condition lengths differ: {len(a)} vs {len(b)}")
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch a condition of type {type(a).__name__}")


def guided(denoiser: Denoiser, scale: float, null_cond: Union[Any, Callable[[Any], Any]]) -> Denoiser:
    """Wrap ``denoiser`` with classifier-free guidance of weight ``scale`` (= w above).

    :param null_cond: the unconditional condition, with the same structure and batch
        size as the conditions the wrapper will be called with, or a function mapping
        a condition to its unconditional counterpart (e.g. replacing only the digit).
    :return: a Denoiser with the same signature. At ``scale == 0`` it is ``denoiser``
        itself (no second pass). Otherwise conditional and unconditional halves run in
        one doubled batch.
    """
    if scale == 0:
        return denoiser

    def guided_denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        uncond = null_cond(cond) if callable(null_cond) else null_cond
        eps = denoiser(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, uncond))
        eps_c, eps_u = eps.chunk(2)
        return eps_c + scale * (eps_c - eps_u)

    return guided_denoiser
