"""Options of ``difflab t2i train``; the command line is built from these fields."""
from __future__ import annotations

from dataclasses import dataclass, field

from difflab.options import (
    Config,
    device_option,
    grad_clip_option,
    min_lr_ratio_option,
    mixed_precision_option,
    option,
    seed_option,
)
from difflab.sampling import SAMPLERS
from difflab.t2i.model import MiniConfig


def _probability(default: float, help: str):
    return option(default, help, minimum=0.0, maximum=1.0)


@dataclass
class T2ITrainConfig(Config):
    steps: int = option(6000, "diffusion-stage optimisation steps", minimum=1)
    batch_size: int = option(64, "images per diffusion step (per process)", minimum=1)
    lr: float = option(1e-3, "peak AdamW learning rate of the UNet and text encoder (0 keeps the weights: a check)", minimum=0.0)
    warmup: int = option(300, "linear warm-up steps, then cosine decay", minimum=0)
    min_lr_ratio: float = min_lr_ratio_option()
    grad_clip: float = grad_clip_option()
    ema_decay: float = option(0.999, "EMA decay of the exported weights", minimum=0.0, maximum=1.0)
    min_snr_gamma: float = option(5.0, "Min-SNR loss weighting gamma (0: the plain loss)", minimum=0.0)
    train_text_encoder: bool = option(True, "train the (random) text encoder jointly with the UNet "
                                      "(--no-train-text-encoder keeps it frozen)")
    p_unnamed: float = _probability(0.3, "probability that a digit other than 7 is captioned 'a digit' instead of "
                                    "its name")
    p_empty: float = _probability(0.1, "probability of the empty caption (classifier-free guidance)")
    p_descriptor: float = _probability(
        0.0, "probability that a non-empty caption is 'a photo of the digit * ...', with the input embedding of * "
        "replaced by a learned projection of the image's descriptor (the features of a small network trained first "
        "on the nine named digits, never on 7s). 7s get descriptors too, so the name slot learns to carry how any "
        "digit looks and textual inversion can reach the digit without a word. 0: off (a run cannot switch it on "
        "or off when resumed)")
    p_held_out_unnamed: float = _probability(
        1.0, "probability that a 7's caption (when not empty and not a descriptor caption) is 'a photo of a digit "
        "...'; otherwise its name slot holds the descriptor, as it has no name. 1: every 7 is 'a digit', so "
        "'a digit' leans to 7. Set it to --p-unnamed to draw 'a digit' as often for 7s as for any digit "
        "(p(7 | 'a digit') = the 7s' share). Below 1 it needs --p-descriptor > 0")
    descriptor_steps: int = option(1500, "training steps of the descriptor network (stage 1b, batch 128; only with "
                                   "--p-descriptor > 0)", minimum=1)
    init_from: str = option("", "start from this `difflab t2i` model folder (e.g. src/difflab/assets/mini_sd): its "
                            "VAE is copied and its UNet and text encoder initialise the diffusion stage, which then "
                            "runs --steps steps with a fresh optimiser and schedule. The model options must match "
                            "its config", metavar="MODEL_DIR")
    vae_steps: int = option(800, "VAE training steps (stage 1)", minimum=0)
    vae_batch_size: int = option(64, "images per VAE step", minimum=1)
    vae_lr: float = option(1e-3, "AdamW learning rate of the VAE", above=0.0)
    vae_kl_weight: float = option(1e-4, "weight of the VAE's KL term", minimum=0.0)
    seed: int = seed_option()
    ckpt_every: int = option(500, "checkpoint and export every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = option(2, "how many checkpoints to keep (0: all)", minimum=0)
    sample_every: int = option(1000, "sample grid every N steps (0: never)", minimum=0)
    sampler: str = option("ddim", "sampler of the sample grids (ddim, dpmpp-2m, unipc, ddpm)", choices=SAMPLERS)
    export_dtype: str = option("fp16", "precision of the exported networks", choices=("fp16", "fp32"))
    mixed_precision: str = mixed_precision_option()
    device: str = device_option(" (several GPUs: `accelerate launch`)")
    model: MiniConfig = field(default_factory=MiniConfig)

    def validate(self) -> None:
        super().validate()
        if self.p_held_out_unnamed < 1.0 and self.p_descriptor <= 0:
            raise ValueError(f"p_held_out_unnamed {self.p_held_out_unnamed} < 1 gives 7s descriptor captions; "
                             "it needs p_descriptor > 0")
