"""Sampling digits from a trained model, and the course's 1,000-image set.

Course layout: ``OUT/mnistm/{digit}_{k:03d}.png`` and ``OUT/svhn/{digit}_{k:03d}.png``
for digit 0..9 and k = 1..50, 28x28 RGB.

Under ``accelerate launch``/``torchrun`` the course set's batches are shared out among the
processes, each batch sampled exactly as one process samples it, and the main process
writes the whole folder: the files are byte-identical to a one-process run's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difflab.data import DATASETS
from difflab.devices import autocast_fn, resolve_precision
from difflab.digits.config import SampleConfig
from difflab.guidance import guided
from difflab.io import PathLike, save_png
from difflab.nets.digit_unet import NULL_DATASET, NULL_DIGIT, DigitDenoiser, DigitUNet
from difflab.processes import Processes, publish_folder
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


def check_sampling(net, cfg: SampleConfig) -> None:
    """Validate ``cfg`` for ``net``: a distilled model (``net.distilled_scale`` set) gives one
    guided prediction, so options asking for another are refused."""
    cfg.validate()
    scale = getattr(net, "distilled_scale", None)  # DigitUNet's; any other network is guided
    if scale is not None and (cfg.guidance_scale != scale or cfg.guidance_interval is not None
                              or cfg.guide_on != "both"):
        raise ValueError(
            f"this model has guidance scale {scale:g} distilled into it (one network evaluation per step): it samples "
            f"only with --guidance-scale {scale:g}, --guide-on both and no --guidance-interval (asked: "
            f"--guidance-scale {cfg.guidance_scale:g}, --guide-on {cfg.guide_on}, --guidance-interval "
            f"{cfg.guidance_interval}); for other guidance use the guided model it was distilled from")


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
    check_sampling(net, cfg)
    device = next(net.parameters()).device
    dtype = resolve_precision(cfg.precision, device)
    net_fn = autocast_fn(DigitDenoiser(net), device, dtype)
    if getattr(net, "distilled_scale", None) is None:
        denoiser = guided(net_fn, cfg.guidance_scale - 1.0, null_condition(cfg.guide_on),  # w = S - 1
                          interval=cfg.guidance_interval)
    else:
        denoiser = net_fn  # the guided prediction in one evaluation
    cond = (digits.to(device), datasets.to(device))
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # per-step noise (ddpm / eta > 0)
    ts = spaced_timesteps(schedule, cfg.steps, cfg.spacing)
    # fp32 on a CPU runs the network on channels_last input: oneDNN's convolutions are faster
    # in that layout there (not under bf16 autocast; benchmarks/digit_net.py --layout), and
    # the values differ by float rounding only.
    x_T = noise.to(device)
    if device.type == "cpu" and dtype is None:
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    x = run_sampler(cfg.sampler, denoiser, schedule, x_T, ts, cond, eta=cfg.eta, clip_x0=cfg.clip_x0,
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


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The [start, end) rows of each forward batch of ``n`` images."""
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _sample_ranges(net, schedule, digits: Tensor, datasets: Tensor, noise: Tensor, ranges, cfg: SampleConfig,
                   progress: bool) -> list[tuple[int, Tensor]]:
    """(start, images [j - i, 3, 28, 28] in [-1, 1] on the CPU) of each batch [i, j) of ``ranges``."""
    from tqdm.auto import tqdm

    return [(i, sample_digits(net, schedule, digits[i:j], datasets[i:j], noise[i:j], cfg).float().cpu())
            for i, j in tqdm(ranges, desc="generating", disable=not progress, unit="batch")]


def initial_noise(n: int, seed: int) -> Tensor:
    """x_T of images 0 .. n - 1, [n, 3, 28, 28]: one draw from a generator seeded with
    ``seed``, so image i's noise depends only on (seed, i)."""
    return torch.randn((n, 3, 28, 28), generator=torch.Generator().manual_seed(seed))


def generate_images(net, schedule, digits: Tensor, datasets: Tensor, cfg: SampleConfig, progress: bool = True) -> Tensor:
    """Sample ``len(digits)`` images in batches of ``cfg.batch_size``; x_T for image i depends
    only on (seed, i)."""
    n = len(digits)
    out = torch.empty((n, 3, 28, 28))
    noise = initial_noise(n, cfg.seed)
    for i, images in _sample_ranges(net, schedule, digits, datasets, noise, batch_ranges(n, cfg.batch_size), cfg, progress):
        out[i : i + len(images)] = images
    return out


def generate_course_set(net, schedule, out_dir: PathLike, cfg: SampleConfig, per_class: int = 50, progress: bool = True,
                        overwrite: bool = False) -> float:
    """Write the course's image set into ``out_dir``; returns the seconds spent.

    All images are sampled first; the main process then writes them into a staging folder
    and moves it into place (:func:`difflab.processes.publish_folder`), so an interrupted
    run leaves no partial set behind. An ``out_dir`` that holds files is refused unless
    ``overwrite``, which replaces it whole. With several processes each samples its share of
    the batches (on its own GPU: ``net`` is moved there) and sends them to the main one.
    """
    check_sampling(net, cfg)  # before any work
    t0 = time.time()
    procs = Processes(next(net.parameters()).device)
    net = net.to(procs.device)
    digits, datasets, names = course_plan(per_class)
    noise = initial_noise(len(names), cfg.seed)
    mine = procs.share(batch_ranges(len(names), cfg.batch_size))
    done = procs.gather(_sample_ranges(net, schedule, digits, datasets, noise, mine, cfg, progress and procs.is_main))
    if procs.is_main:
        images = torch.cat([x for _, x in sorted(done, key=lambda r: r[0])])

        def write(folder: Path) -> None:
            for img, name in zip(images, names):
                save_png((img + 1) / 2, folder / name)

        publish_folder(out_dir, write, overwrite)
    procs.wait()
    return time.time() - t0
