"""Options of ``difflab t2i train``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from difflab.t2i.model import MiniConfig


@dataclass
class T2ITrainConfig:
    steps: int = 6000              # diffusion-stage optimisation steps (95 min at 1.05 steps/s, 2 cores, bf16: the shipped run)
    batch_size: int = 64
    lr: float = 1e-3               # with p_unnamed 0.3: in the first mini model's run, names were learned ~2x faster than with 5e-4 / 0.6
    warmup: int = 300
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    train_text_encoder: bool = True
    p_unnamed: float = 0.3         # caption a non-7 digit without its name
    p_empty: float = 0.1           # empty caption (classifier-free guidance)
    p_descriptor: float = 0.0      # non-empty caption -> "a photo of the digit * ..." with * = the image's descriptor
    p_held_out_unnamed: float = 1.0  # a 7's non-descriptor caption is "a digit" (else a descriptor caption); = p_unnamed balances "a digit"
    descriptor_steps: int = 1500   # stage 1b: the descriptor network (about 2 min here)
    init_from: str = ""            # start the diffusion stage from this model folder's UNet and text encoder (and VAE)
    vae_steps: int = 800           # about 9.5 min at 1.42 steps/s
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 1000
    export_dtype: str = "fp16"
    mixed_precision: str = "no"
    device: str = "auto"
    model: MiniConfig = field(default_factory=MiniConfig)

    def validate(self) -> None:
        self.model.validate()
        for name in ("steps", "batch_size", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.vae_steps < 0:
            raise ValueError(f"vae_steps must be >= 0, got {self.vae_steps!r}")
        if self.descriptor_steps < 1:
            raise ValueError(f"descriptor_steps must be >= 1, got {self.descriptor_steps!r}")
        for name in ("p_unnamed", "p_empty", "p_descriptor", "p_held_out_unnamed"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.p_held_out_unnamed < 1.0 and self.p_descriptor <= 0:
            raise ValueError(f"p_held_out_unnamed {self.p_held_out_unnamed} < 1 gives 7s descriptor captions; "
                             "it needs p_descriptor > 0")
        if self.export_dtype not in ("fp16", "fp32"):
            raise ValueError(f"export_dtype must be fp16 or fp32, got {self.export_dtype!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "T2ITrainConfig":
        d = dict(d)
        model = MiniConfig.from_dict(d.pop("model", {}))
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown T2ITrainConfig fields: {sorted(unknown)}")
        return cls(model=model, **d)


