"""Classifier-free guidance (Ho & Salimans 2022) as a Denoiser wrapper.

Convention. The course (and Ho & Salimans' paper) writes the guided noise as

    eps = (1 + w) * eps_cond - w * eps_uncond

with ``w = 0`` the plain conditional model. This is the same line as the form

    eps = eps_uncond + s * (eps_cond - eps_uncond),     s = 1 + w,

that Stable Diffusion tools use (their "guidance scale" 7.5 is s, i.e. w = 6.5).
``guided`` takes ``w``; callers using the s convention pass ``s - 1``.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality in diffusion models"): guidance is applied only
at noise levels inside a chosen interval and the plain conditional prediction is used
elsewhere. The paper states the interval in EDM noise levels sigma; here it is given in
training steps t (sigma grows with t), ``interval=(t_lo, t_hi)``, both ends included.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

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


def index_cond(c: Any, index: Tensor) -> Any:
    """Rows ``index`` (a [K] long tensor) of a condition, along the batch dimension.

    Supports the structures :func:`cat_cond` does: tensors, and tuples/lists/dicts of
    them (recursively); ``None`` stays None.
    """
    if c is None:
        return None
    if isinstance(c, Tensor):
        return c[index.to(c.device)]
    if isinstance(c, dict):
        return {k: index_cond(v, index) for k, v in c.items()}
    if isinstance(c, (tuple, list)):
        return type(c)(index_cond(v, index) for v in c)
    raise TypeError(f"cannot index a condition of type {type(c).__name__}")


def _check_interval(interval: Optional[Sequence[float]]) -> Optional[tuple]:
    if interval is None:
        return None
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair (t_lo, t_hi), got {interval!r}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo <= hi:
        raise ValueError(f"interval must be a pair of numbers (t_lo, t_hi) with t_lo <= t_hi, got {interval!r}")
    return lo, hi


def guided(
    denoiser: Denoiser,
    scale: float,
    null_cond: Union[Any, Callable[[Any], Any]],
    *,
    interval: Optional[Sequence[float]] = None,
) -> Denoiser:
    """Wrap ``denoiser`` with classifier-free guidance of weight ``scale`` (= w above).

    :param null_cond: the unconditional condition, with the same structure and batch
        size as the conditions the wrapper will be called with, or a function mapping
        a condition to its unconditional counterpart (e.g. replacing only the digit).
    :param interval: ``(t_lo, t_hi)`` in training steps: guide only the batch rows whose
        step t lies in [t_lo, t_hi]; other rows get the conditional prediction alone. A
        call whose rows are all outside runs one plain forward (batch B); all inside, the
        usual doubled batch (2B); mixed, one batch of B + (rows inside). Deciding this reads
        ``t`` back to the host once per call (a device sync on GPU). ``None`` (default)
        guides every step, exactly as without the option.
    :raises ValueError: for a ``scale`` that is NaN or infinite.
    :return: a Denoiser with the same signature. At ``scale == 0`` it is ``denoiser``
        itself (no second pass). Otherwise conditional and unconditional halves run in
        one doubled batch.
    """
    bounds = _check_interval(interval)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if scale == 0:
        return denoiser

    def guided_denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        uncond = null_cond(cond) if callable(null_cond) else null_cond
        eps = denoiser(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, uncond))
        eps_c, eps_u = eps.chunk(2)
        return eps_c + scale * (eps_c - eps_u)

    if bounds is None:
        return guided_denoiser
    lo, hi = bounds

    def interval_denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        inside = ((t >= lo) & (t <= hi)).nonzero().flatten()
        k = inside.numel()
        if k == t.shape[0]:
            return guided_denoiser(x, t, cond)
        if k == 0:
            return denoiser(x, t, cond)
        uncond = null_cond(cond) if callable(null_cond) else null_cond
        eps = denoiser(torch.cat([x, x[inside]]), torch.cat([t, t[inside]]),
                       cat_cond(cond, index_cond(uncond, inside)))
        eps_c, eps_u = eps[: t.shape[0]], eps[t.shape[0]:]
        eps_in = eps_c[inside]
        return eps_c.index_copy(0, inside, eps_in + scale * (eps_in - eps_u))

    return interval_denoiser
