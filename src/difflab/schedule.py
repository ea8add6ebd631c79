"""Noise schedules and the forward process of DDPM.

Source: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (eq. 4, 12, 14);
the cosine schedule from Nichol & Dhariwal 2021, "Improved DDPM" (eq. 17).

Notation (variable name -> symbol in the paper):
    betas            -> beta_t
    alphas           -> alpha_t = 1 - beta_t
    alphas_cumprod   -> alpha_bar_t = prod_{s<=t} alpha_s
Index ``t`` is 0-based: ``t = 0`` is the first noising step, ``t = T - 1`` the last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor


def extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather ``values[t]`` for a batch of steps and shape it to broadcast.

    :param values: a [T] tensor (any dtype/device).
    :param t: a [B] long tensor of steps.
    :param ndim: number of dimensions of the tensor it will broadcast against.
    :return: a [B, 1, ..., 1] tensor with ``ndim`` dimensions, on ``t``'s device.
    """
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """The DDPM linear schedule, ``linspace(beta_start, beta_end, T)`` in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2).

    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at ``max_beta``; float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete-time variance schedule and every quantity derived from it.

    All tensors are float64 and computed once at construction; methods cast to the
    dtype of the tensors they act on.
    """

    betas: Tensor

    def __post_init__(self) -> None:
        betas = self.betas
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        betas = betas.to(torch.float64)
        object.__setattr__(self, "betas", betas)
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, dim=0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "alphas_cumprod", acp)
        object.__setattr__(self, "alphas_cumprod_prev", acp_prev)
        object.__setattr__(self, "sqrt_alphas_cumprod", acp.sqrt())
        object.__setattr__(self, "sqrt_one_minus_alphas_cumprod", (1.0 - acp).sqrt())
        # Posterior q(x_{t-1} | x_t, x_0) variance, beta_tilde_t (Ho et al. eq. 7).
        object.__setattr__(self, "posterior_variance", betas * (1.0 - acp_prev) / (1.0 - acp))
        # alpha_bar with step -1 ("before the first step", alpha_bar = 1) at index 0.
        object.__setattr__(self, "alpha_bar_padded", torch.cat([torch.ones(1, dtype=torch.float64), acp]))

    # Declared for type checkers; set in __post_init__.
    alphas: Tensor = None  # type: ignore[assignment]
    alphas_cumprod: Tensor = None  # type: ignore[assignment]
    alphas_cumprod_prev: Tensor = None  # type: ignore[assignment]
    sqrt_alphas_cumprod: Tensor = None  # type: ignore[assignment]
    sqrt_one_minus_alphas_cumprod: Tensor = None  # type: ignore[assignment]
    posterior_variance: Tensor = None  # type: ignore[assignment]
    alpha_bar_padded: Tensor = None  # type: ignore[assignment]

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> "NoiseSchedule":
        return cls(linear_betas(num_steps, beta_start, beta_end))

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        return cls(cosine_betas(num_steps, s))

    @classmethod
    def from_name(cls, name: str, num_steps: int = 1000) -> "NoiseSchedule":
        if name == "linear":
            return cls.linear(num_steps)
        if name == "cosine":
            return cls.cosine(num_steps)
        raise ValueError(f"unknown schedule {name!r}; expected 'linear' or 'cosine'")

    @property
    def num_steps(self) -> int:
        return int(self.betas.numel())

    def table(self, name: str, device: Union[str, torch.device]) -> Tensor:
        """The float64 table ``name`` (e.g. ``"alphas_cumprod"``) on ``device``, copied there
        once and kept. A copy from pageable host memory makes the host wait for the GPU's
        queued work, so copying at every step would stop a sampler from queuing step n+1's
        kernels while step n runs."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (name, torch.device(device))
        if key not in cache:
            cache[key] = getattr(self, name).to(key[1])
        return cache[key]

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t for a [B] batch of steps, shaped and cast to broadcast with ``like``.

        ``t = -1`` means "before the first step": alpha_bar = 1 (the clean image).
        """
        return extract(self.table("alpha_bar_padded", t.device), t + 1, like.ndim).to(like.dtype)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. eq. 4).

        :param x0: [B, C, H, W] clean images.
        :param t: [B] long steps in [0, T).
        :param noise: [B, C, H, W] standard normal noise epsilon.
        """
        a = extract(self.table("sqrt_alphas_cumprod", t.device), t, x0.ndim).to(x0.dtype)
        s = extract(self.table("sqrt_one_minus_alphas_cumprod", t.device), t, x0.ndim).to(x0.dtype)
        return a * x0 + s * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample given the noise: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self.alpha_bar(t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that maps x0 to x_t at step t: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        abar = self.alpha_bar(t, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer steps ``t`` (float64)."""
    a = schedule.table("alphas_cumprod", t.device)[t]
    return a / (1.0 - a)


def ddpm_loss(denoiser, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, cond=None,
              min_snr_gamma: float = 0.0) -> Tensor:
    """The simple DDPM objective (Ho et al. eq. 14): E || eps - eps_theta(x_t, t) ||^2.

    With ``min_snr_gamma > 0`` each sample's squared error is weighted by
    ``min(SNR_t, gamma) / SNR_t`` (Min-SNR-gamma, Hang et al. 2023, for epsilon
    prediction), which down-weights the nearly noise-free steps. ``0`` is the plain loss.
    Randomness (``t``, ``noise``) is passed in by the caller.
    """
    x_t = schedule.q_sample(x0, t, noise)
    eps = denoiser(x_t, t, cond)
    if min_snr_gamma <= 0:
        return torch.nn.functional.mse_loss(eps.float(), noise.float())
    per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    s = snr(schedule, t)
    weight = (s.clamp(max=min_snr_gamma) / s).to(per_sample.dtype)
    return (weight * per_sample).mean()
