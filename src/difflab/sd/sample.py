"""Text-to-image sampling with an SD v1-style model: latents, then the VAE decoder.

Sampling is our DDIM (``difflab.sampling.ddim_sample``, eta = 0) on the model's training
schedule, with classifier-free guidance (``difflab.guidance.guided``; SD's guidance
scale s is w = s - 1 there). Steps are ``ddim_timesteps(1000, steps, offset)`` with SD
v1's ``steps_offset = 1`` (981, 961, ..., 1 for 50 steps), and the last step lands on
alpha_bar_0 as in CompVis' DDIM sampler and diffusers' ``set_alpha_to_one=False``.

Each image's starting noise is drawn from a CPU generator seeded with its own seed, so
an image does not depend on the batch it is in or on the device (up to the network's
own floating-point behaviour).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from difflab.guidance import guided
from difflab.sampling import ddim_timesteps, run_sampler
from difflab.sd.load import UNetDenoiser


def initial_noise(seeds: Sequence[int], shape: Tuple[int, int, int]) -> Tensor:
    """[B, C, h, w] standard normal noise, one CPU generator per seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(
    sd,
    prompt: str,
    seeds: Sequence[int],
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    height: Optional[int] = None,
    width: Optional[int] = None,
    progress: bool = False,
) -> Tensor:
    """Guided sampling of one prompt: latents [B, C, h, w] (float32).

    :param guidance_scale: SD's guidance scale s (1 = no guidance); ``guided`` gets
        w = s - 1, with the empty prompt "" as the unconditional condition.
    :param sampler: one of ``difflab.sampling.SAMPLERS`` (DDIM by default, eta 0).
    """
    height = height or sd.resolution
    width = width or sd.resolution
    f = sd.vae_downsample
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    b = len(seeds)
    x_T = initial_noise(seeds, (sd.latent_channels, height // f, width // f)).to(sd.device)
    cond = sd.encode_text([prompt] * b)
    uncond = sd.encode_text([""] * b)
    denoiser = guided(UNetDenoiser(sd.unet), guidance_scale - 1.0, uncond)
    ts = ddim_timesteps(sd.schedule.num_steps, steps, offset=sd.steps_offset)
    return run_sampler(sampler, denoiser, sd.schedule, x_T, ts, cond, last_prev=0, progress=progress)


@torch.no_grad()
def sample_images(sd, prompt: str, seeds: Sequence[int], **kwargs) -> Tensor:
    """``sample_latents`` then the VAE decoder: [B, 3, H, W] in [0, 1] (float32, CPU)."""
    return sd.decode(sample_latents(sd, prompt, seeds, **kwargs)).cpu()
