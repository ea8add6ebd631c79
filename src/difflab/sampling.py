"""DDPM ancestral sampling and DDIM sampling, as pure functions.

Every sampler takes the starting noise ``x_T`` and (for DDIM) the list of steps from
the caller, and drives any ``Denoiser``: ``eps = denoiser(x [B,C,H,W], t [B] long, cond)``.
Samplers never know which network they drive; adapters meet the contract instead.

Per-step noise (DDPM, or DDIM with eta > 0) is drawn from the ``generator`` passed in,
on the generator's device, then moved to ``x``'s device, so a seed gives the same
numbers on any device and batch layout.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from difflab.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
# callback(i, t, x_t, x0_pred): called after each step with the new sample.
Callback = Callable[[int, int, Tensor, Tensor], None]


def _randn(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _progress(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def ddim_timesteps(num_train_steps: int, num_steps: int, offset: int = 0) -> Tensor:
    """Uniformly spaced DDIM steps, descending (Song et al. 2021, "uniform" skip).

    ``stride = num_train_steps // num_steps``; steps are ``offset + k * stride`` for
    ``k = 0 .. num_steps - 1``, returned largest first. With 1000/50 and offset 1 this
    is 981, 961, ..., 21, 1.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps!r}")
    stride = num_train_steps // num_steps
    steps = torch.arange(num_steps, dtype=torch.long) * stride + offset
    if offset < 0 or int(steps[-1]) >= num_train_steps:
        raise ValueError(
            f"offset {offset!r} puts steps outside [0, {num_train_steps}) for {num_steps} steps of stride {stride}"
        )
    return steps.flip(0)


def _adds_noise(schedule: NoiseSchedule, t: int, t_prev: int, eta: float, dtype: torch.dtype) -> bool:
    """Whether DDIM's sigma is > 0 for the step t -> t_prev: the sampler's formula in its
    dtype, on the host's copy of the schedule, so that no GPU value is read back."""
    a_t = schedule.alpha_bar_padded[t + 1].to(dtype)
    a_prev = schedule.alpha_bar_padded[t_prev + 1].to(dtype)
    return bool(eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt() > 0)


def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Union[Tensor, Sequence[int]],
    cond: Any = None,
    *,
    eta: float = 0.0,
    clip_x0: Optional[float] = None,
    last_prev: int = -1,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12 and 16).

    Notation (variable -> paper): ``a_t`` -> alpha_t (the paper's alpha is our
    alpha_bar), ``a_prev`` -> alpha_{t-1}, ``sigma`` -> sigma_t(eta).

        x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)          [clipped to +-clip_x0]
        sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z

    The direction term uses the network's eps as predicted, also when x0 is clipped.

    :param x_T: [B, C, H, W] starting noise.
    :param timesteps: steps at which the network is evaluated, descending. Each step
        moves to the next entry of the same list; the last moves to ``last_prev``.
    :param last_prev: where the last step lands: ``-1`` is the clean image
        (alpha_bar = 1); ``0`` lands on step 0 (alpha_bar_0), as the course recipe does.
    :param clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] at each step, or None.
    :param generator: source of the per-step noise z (only used when eta > 0).
    :param callback: called as ``callback(i, t, x_prev, x0_pred)`` after each step.
    """
    steps = [int(s) for s in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if not steps:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {steps!r}")
    if not (-1 <= last_prev < steps[-1]):
        raise ValueError(f"last_prev must be in [-1, {steps[-1]}), got {last_prev!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    x = x_T
    batch = x.shape[0]
    prevs = steps[1:] + [last_prev]
    for i, (t, t_prev) in enumerate(_progress(list(zip(steps, prevs)), progress, "DDIM")):
        t_b = torch.full((batch,), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, t_b, cond)
        a_t = schedule.alpha_bar(t_b, x)
        a_prev = schedule.alpha_bar(torch.full_like(t_b, t_prev), x)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and _adds_noise(schedule, t, t_prev, eta, x.dtype):
            x = x + sigma * _randn(x.shape, x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    cond: Any = None,
    *,
    clip_x0: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2), with
    the posterior variance beta_tilde_t (eq. 7):

        mu     = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)
        x_{t-1} = mu + sqrt(beta_tilde_t) z,   z = 0 at t = 0

    With ``clip_x0`` the mean is formed from the clipped x0 through the posterior
    q(x_{t-1} | x_t, x0), which equals the formula above when nothing is clipped.
    """
    x = x_T
    batch = x.shape[0]
    T = schedule.num_steps
    for i, t in enumerate(_progress(range(T - 1, -1, -1), progress, "DDPM")):
        t_b = torch.full((batch,), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, t_b, cond)
        a_t = schedule.alpha_bar(t_b, x)
        a_prev = schedule.alpha_bar(t_b - 1, x)
        beta = 1 - a_t / a_prev
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # Posterior mean (Ho et al. eq. 7) written with x0.
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * _randn(x.shape, x, generator)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, x0)
    return x
