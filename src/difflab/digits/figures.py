"""Report figures for Problem 1, and the sample grid written during training."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from difflab.data import DATASETS
from difflab.digits.generate import SampleConfig, course_plan, generate_images, sample_digits
from difflab.interpolation import lerp, slerp
from difflab.io import PathLike, make_grid, save_grid, save_png
from difflab.nets.digit_unet import DigitUNet
from difflab.sampling import spaced_timesteps
from difflab.schedule import NoiseSchedule

SNAPSHOT_TIMES = (1000, 800, 600, 400, 200, 0)


def digit_grid(net: DigitUNet, schedule: NoiseSchedule, dataset: int, cfg: SampleConfig) -> torch.Tensor:
    """A 10x10 grid: row r is digit r, column c uses noise input c (shared across rows)."""
    digits = torch.arange(10).repeat_interleave(10)
    datasets = torch.full((100,), dataset)
    g = torch.Generator().manual_seed(cfg.seed)
    cols = torch.randn((10, 3, 28, 28), generator=g)
    noise = cols.repeat(10, 1, 1, 1)
    x = sample_digits(net, schedule, digits, datasets, noise, cfg).float().cpu()
    return make_grid((x + 1) / 2, nrow=10)


def reverse_process(net: DigitUNet, schedule: NoiseSchedule, dataset: int, cfg: SampleConfig, times=SNAPSHOT_TIMES) -> torch.Tensor:
    """Snapshots of the first '0' (the noise of image 0_001) at t = 1000, 800, ..., 0.

    t = 1000 is the starting noise x_T; t = 0 the final image; between them the sample
    x_t after the sampler's step that lands on (or first passes below) each time.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    n_before = course_plan()[2].index(f"{DATASETS[dataset]}/0_001.png")  # its index in the course set
    noise = torch.randn((n_before + 1, 3, 28, 28), generator=g)[n_before:]
    snaps: dict[int, torch.Tensor] = {times[0]: noise[0].clone()}
    pending = [t for t in times[1:] if t > 0]

    def callback(i, t, x, x0):
        # x is the sample at the step the update lands on: the next list entry.
        landed = ts[i + 1] if i + 1 < len(ts) else -1
        while pending and landed < pending[0]:
            snaps[pending.pop(0)] = x[0].float().cpu().clone()

    if cfg.sampler == "ddpm":
        ts = list(range(schedule.num_steps - 1, -1, -1))
    else:
        ts = [int(v) for v in spaced_timesteps(schedule, cfg.steps, cfg.spacing)]
    final = sample_digits(net, schedule, torch.tensor([0]), torch.tensor([dataset]), noise, cfg, callback=callback)
    snaps[0] = final[0].float().cpu()
    strip = torch.stack([snaps[t].clamp(-1, 1) for t in times])
    return make_grid((strip + 1) / 2, nrow=len(times))


ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def eta_grid(net: DigitUNet, schedule: NoiseSchedule, dataset: int, cfg: SampleConfig, etas=ETAS) -> torch.Tensor:
    """Problem 2's eta grid on the digit model: columns are digits 0-3 (noises 0-3), rows eta."""
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((4, 3, 28, 28), generator=g)
    digits, datasets = torch.arange(4), torch.full((4,), dataset)
    rows = [sample_digits(net, schedule, digits, datasets, noise, replace(cfg, eta=float(e))).float().cpu() for e in etas]
    return make_grid((torch.cat(rows) + 1) / 2, nrow=4)


def interpolation(net: DigitUNet, schedule: NoiseSchedule, dataset: int, digit: int, cfg: SampleConfig, alphas=ALPHAS) -> torch.Tensor:
    """Problem 2's interpolation on the digit model: noises 0 and 1 of the seed, slerp row above lerp row."""
    g = torch.Generator().manual_seed(cfg.seed)
    z0, z1 = torch.randn((2, 1, 3, 28, 28), generator=g)
    rows = []
    for fn in (slerp, lerp):
        z = torch.cat([fn(z0, z1, a) for a in alphas])
        n = len(alphas)
        rows.append(sample_digits(net, schedule, torch.full((n,), digit), torch.full((n,), dataset), z, cfg).float().cpu())
    return make_grid((torch.cat(rows) + 1) / 2, nrow=len(alphas))


def write_figures(net: DigitUNet, schedule: NoiseSchedule, out_dir: PathLike, cfg: SampleConfig) -> list[Path]:
    out = Path(out_dir)
    paths = []
    for s, name in enumerate(DATASETS):
        p = out / f"grid_{name}.png"
        save_png(digit_grid(net, schedule, s, cfg), p)
        paths.append(p)
        p = out / f"reverse_{name}.png"
        save_png(reverse_process(net, schedule, s, cfg), p)
        paths.append(p)
        p = out / f"eta_grid_{name}.png"
        save_png(eta_grid(net, schedule, s, cfg), p)
        paths.append(p)
        p = out / f"interpolation_{name}.png"
        save_png(interpolation(net, schedule, s, 8, cfg), p)
        paths.append(p)
    return paths


def training_sample_fn(ema_state, train_cfg, path: Path) -> None:
    """Sample grid during training: rows mnistm 0-9 then svhn 0-9, 10 samples each (EMA weights)."""
    net = DigitUNet(train_cfg.model)
    net.load_state_dict(ema_state)
    net.eval()
    schedule = NoiseSchedule.from_name(train_cfg.schedule, train_cfg.num_train_steps)
    cfg = SampleConfig(steps=20, guidance_scale=4.0, batch_size=200, seed=0)
    digits = torch.arange(10).repeat_interleave(10).repeat(2)
    datasets = torch.arange(2).repeat_interleave(100)
    x = generate_images(net, schedule, digits, datasets, cfg, progress=False)
    save_grid((x + 1) / 2, path, nrow=20)
