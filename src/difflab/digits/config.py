"""Options of the digit commands: training (``TrainConfig``) and sampling (``SampleConfig``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from difflab.nets.digit_unet import DigitUNetConfig

GUIDE_ON = ("both", "digit", "dataset")


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 500
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond_digit: float = 0.1
    p_uncond_dataset: float = 0.1
    min_snr_gamma: float = 0.0   # >0: Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain loss
    schedule: str = "linear"
    num_train_steps: int = 1000
    seed: int = 0
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    device: str = "auto"
    model: DigitUNetConfig = field(default_factory=DigitUNetConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        model = DigitUNetConfig.from_dict(d.pop("model", {}))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(model=model, **d)


@dataclass
class SampleConfig:
    sampler: str = "ddim"        # ddim | ddpm
    steps: int = 10              # DDIM steps (ignored by ddpm, which uses all T)
    guidance: float = 3.0        # w in eps = (1+w) eps_c - w eps_u (chosen by benchmarks/digits.py)
    guide_on: str = "both"       # which condition the unconditional branch drops
    eta: float = 0.0
    clip_x0: Optional[float] = 1.0
    batch_size: int = 500
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if self.guide_on not in GUIDE_ON:
            raise ValueError(f"guide_on must be one of {GUIDE_ON}, got {self.guide_on!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


