"""Sampling digits from a trained model, and the course's 1,000-image set.

Course layout: ``OUT/mnistm/{digit}_{k:03d}.png`` and ``OUT/svhn/{digit}_{k:03d}.png``
for digit 0..9 and k = 1..50, 28x28 RGB.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difflab.data import DATASETS
from difflab.digits.config import SampleConfig
from difflab.guidance import guided
from difflab.io import PathLike, save_png
from difflab.nets.digit_unet import NULL_DATASET, NULL_DIGIT, DigitDenoiser, DigitUNet
from difflab.sampling import run_sampler, spaced_timesteps
from difflab.schedule import NoiseSchedule


def null_condition(guide_on: str) -> Callable:
    """The unconditional counterpart of a (digit, dataset) condition."""

    def null(cond):
        digit, dataset = cond
        if guide_on in ("both", "digit"):
            digit = torch.full_like(digit, NULL_DIGIT)
        if guide_on in ("both", "dataset"):
            dataset = torch.full_like(dataset, NULL_DATASET)
        return digit, dataset

    return null


@torch.inference_mode()
def sample_digits(
    net: DigitUNet,
    schedule: NoiseSchedule,
    digits: Tensor,
    datasets: Tensor,
    noise: Tensor,
    cfg: SampleConfig,
    *,
    callback=None,
    progress: bool = False,
) -> Tensor:
    """Sample one batch. ``noise`` [B,3,28,28] is x_T; returns images in [-1, 1]."""
    cfg.validate()
    device = next(net.parameters()).device
    denoiser = guided(DigitDenoiser(net), cfg.guidance_scale - 1.0, null_condition(cfg.guide_on),  # w = S - 1
                      interval=cfg.guidance_interval)
    cond = (digits.to(device), datasets.to(device))
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # per-step noise (ddpm / eta > 0)
    ts = spaced_timesteps(schedule, cfg.steps, cfg.spacing)
    x = run_sampler(cfg.sampler, denoiser, schedule, noise.to(device), ts, cond, eta=cfg.eta, clip_x0=cfg.clip_x0,
                    generator=gen, callback=callback, progress=progress)
    return x.clamp(-1, 1)


def course_plan(per_class: int = 50) -> tuple[Tensor, Tensor, list[str]]:
    """Digits, datasets and relative file names of the course's image set, in a fixed order."""
    digits, datasets, names = [], [], []
    for s, ds_name in enumerate(DATASETS):
        for d in range(10):
            for k in range(1, per_class + 1):
                digits.append(d)
                datasets.append(s)
                names.append(f"{ds_name}/{d}_{k:03d}.png")
    return torch.tensor(digits), torch.tensor(datasets), names


def generate_images(net, schedule, digits: Tensor, datasets: Tensor, cfg: SampleConfig, progress: bool = True) -> Tensor:
    """Sample ``len(digits)`` images in batches; x_T for image i depends only on (seed, i)."""
    from tqdm.auto import tqdm

    n = len(digits)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((n, 3, 28, 28), generator=g)
    out = torch.empty((n, 3, 28, 28))
    starts = range(0, n, cfg.batch_size)
    for i in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
        j = min(i + cfg.batch_size, n)
        out[i:j] = sample_digits(net, schedule, digits[i:j], datasets[i:j], noise[i:j], cfg).float().cpu()
    return out


def generate_course_set(net, schedule, out_dir: PathLike, cfg: SampleConfig, per_class: int = 50, progress: bool = True) -> float:
    """Write the course's image set into ``out_dir``; returns the seconds spent.

    All images are sampled first and written at the end (each atomically), so an
    interrupted run leaves no partial set behind.
    """
    cfg.validate()
    t0 = time.time()
    digits, datasets, names = course_plan(per_class)
    images = generate_images(net, schedule, digits, datasets, cfg, progress)
    out_dir = Path(out_dir)
    for img, name in zip(images, names):
        save_png((img + 1) / 2, out_dir / name)
    return time.time() - t0
