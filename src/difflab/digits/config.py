"""Options of the digit commands: training (``TrainConfig``) and sampling (``SampleConfig``).

Each field carries its help and range (:func:`difflab.options.option`); the command
line is built from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from difflab.devices import PRECISIONS
from difflab.nets.digit_unet import DigitUNetConfig
from difflab.options import (
    Config,
    device_option,
    grad_clip_option,
    guidance_scale_option,
    min_lr_ratio_option,
    mixed_precision_option,
    option,
    seed_option,
)
from difflab.sampling import SAMPLERS, SPACINGS

GUIDE_ON = ("both", "digit", "dataset")
SCHEDULES = ("linear", "cosine")


@dataclass
class TrainConfig(Config):
    """Training options; the defaults (with ``--mixed-precision bf16``) are the recipe of the
    shipped model (docs/model-cards/digits.md)."""

    steps: int = option(15000, "total optimisation steps", minimum=1)
    batch_size: int = option(64, "images per step (per process)", minimum=1)
    lr: float = option(8e-4, "peak AdamW learning rate (linear warm-up, then cosine decay)", above=0.0)
    warmup: int = option(500, "linear warm-up steps", minimum=0)
    min_lr_ratio: float = min_lr_ratio_option()
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0.0)
    grad_clip: float = grad_clip_option()
    ema_decay: float = option(0.999, "EMA decay of the saved weights", minimum=0.0, maximum=1.0)
    p_uncond_digit: float = option(0.1, "probability of dropping the digit label", minimum=0.0, maximum=1.0)
    p_uncond_dataset: float = option(0.1, "probability of dropping the dataset label", minimum=0.0, maximum=1.0)
    svhn_share: float = option(0.5, "probability that a training image is drawn from SVHN rather than MNIST-M, "
                               "whatever the datasets' sizes", minimum=0.0, maximum=1.0)
    min_snr_gamma: float = option(5.0, "weight each step's loss by min(SNR, gamma)/SNR (Min-SNR, Hang et al. 2023); "
                                  "0: the plain DDPM loss", minimum=0.0)
    schedule: str = option("linear", "noise schedule (linear: the course's betas)", choices=SCHEDULES)
    num_train_steps: int = option(1000, "diffusion steps T of the noise schedule", minimum=1)
    seed: int = seed_option()
    sample_every: int = option(1000, "write a sample grid every N steps (0: never)", minimum=0)
    ckpt_every: int = option(1000, "checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = option(2, "how many checkpoints to keep (0: all)", minimum=0)
    mixed_precision: str = mixed_precision_option()
    device: str = device_option(" (several GPUs: `accelerate launch`)")
    model: DigitUNetConfig = field(default_factory=DigitUNetConfig)


@dataclass
class DistillConfig(Config):
    """Guidance distillation options (``difflab digits distill``); the defaults (with
    ``--mixed-precision bf16``) are the recipe of the distilled model measured in
    docs/results.md#digits (not shipped).

    The student starts as a copy of the teacher and learns, in one network evaluation, the
    teacher's guided prediction eps_u + S (eps_c - eps_u) at S = ``guidance_scale``, guiding
    on both conditions (Meng et al. 2023, "On distillation of guided diffusion models",
    stage one with a fixed S). Each batch mixes two kinds of rows: real images noised to a
    uniform random step (the model stays usable at any step), and states of the teacher's
    own guided DDIM trajectories at the ``sample_steps`` steps that sampling visits.
    """

    guidance_scale: float = guidance_scale_option(4.0, ": the guided teacher the student learns")
    steps: int = option(4000, "total optimisation steps", minimum=1)
    batch_size: int = option(64, "rows per step (per process)", minimum=1)
    trajectory_share: float = option(0.5, "fraction of each batch taken from the teacher's guided DDIM trajectories "
                                     "(the rest: real images noised to a uniform random step)", minimum=0.0, maximum=1.0)
    sample_steps: int = option(10, "DDIM steps (uniform spacing) of the teacher trajectories", minimum=1)
    lr: float = option(3e-4, "peak AdamW learning rate (linear warm-up, then cosine decay)", above=0.0)
    warmup: int = option(100, "linear warm-up steps", minimum=0)
    min_lr_ratio: float = min_lr_ratio_option()
    grad_clip: float = grad_clip_option()
    ema_decay: float = option(0.998, "EMA decay of the saved weights", minimum=0.0, maximum=1.0)
    svhn_share: float = option(0.5, "probability that a real image or a trajectory's label is SVHN rather than "
                               "MNIST-M", minimum=0.0, maximum=1.0)
    seed: int = seed_option()
    ckpt_every: int = option(500, "checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = option(2, "how many checkpoints to keep (0: all)", minimum=0)
    mixed_precision: str = mixed_precision_option()
    device: str = device_option(" (several GPUs: `accelerate launch`)")

    def validate(self) -> None:
        super().validate()
        if self.guidance_scale == 1:
            raise ValueError("guidance_scale 1 is the conditional model itself: there is no guidance to distil")


@dataclass
class SampleConfig(Config):
    sampler: str = option("ddim", "ddim, dpmpp-2m (DPM-Solver++(2M)), unipc (UniPC, B(h) = h) or ddpm (all T "
                          "ancestral steps)", choices=SAMPLERS)
    steps: int = option(10, "sampling steps (ddpm uses all T)", minimum=1)
    spacing: str = option("uniform", "where the steps fall among the T training steps: uniform (DDIM's stride), quad "
                          "(quadratic, denser near the data) or logsnr (uniform in log-SNR)", choices=SPACINGS)
    # S = 4 (w = 3) was chosen by benchmarks/digits.py.
    guidance_scale: float = guidance_scale_option(
        4.0, ". The course writes the same rule with w = S - 1: eps = (1 + w) eps_cond - w eps_uncond, so S 4 is w 3")
    guidance_interval: Optional[Tuple[int, int]] = option(
        None, "apply guidance only at training steps t in [LO, HI] and the conditional model alone elsewhere "
        "(Kynkaanniemi et al. 2024); none: at every step", metavar=("LO", "HI"), minimum=0)
    guide_on: str = option("both", "which condition the unconditional branch drops", choices=GUIDE_ON)
    eta: float = option(0.0, "DDIM eta (0: deterministic)", minimum=0.0)
    clip_x0: Optional[float] = option(1.0, "clip the predicted x0 to [-C, C] at each step (none: no clipping)",
                                      above=0.0, metavar="C|none")
    batch_size: int = option(100, "images per forward batch (doubled for guidance)", minimum=1)
    precision: str = option("fp32", "network arithmetic: fp32, bf16 (autocast; 1.5x faster on a CPU with native bf16, "
                            "slightly other images) or auto (bf16 on a CPU with native bf16, AVX-512 BF16 or AMX, under "
                            "torch >= 2; fp32 elsewhere)", choices=PRECISIONS)
    seed: int = seed_option()
    device: str = device_option()

    def validate(self) -> None:
        super().validate()
        if self.guidance_interval is not None and self.guidance_interval[0] > self.guidance_interval[1]:
            raise ValueError(f"guidance_interval must be (LO, HI) with LO <= HI, got {tuple(self.guidance_interval)}")
