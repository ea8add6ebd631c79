"""The mini text-to-image model: Stable Diffusion v1's classes at digit size.

Images are the 28x28 digits resized to 32x32. The VAE halves the side (latents
[4, 16, 16]); the UNet is a two-level ``UNet2DConditionModel`` with cross-attention
on a two-layer ``CLIPTextModel``, and by default also an attention-pooled text vector
added to its time embedding, applied as a scale and shift in every ResNet block. The
folder written by :func:`save_folder` has SD's
diffusers layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), which
``difflab ti train`` / ``ti generate`` load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.io import PathLike, save_json, staged_dir
from difflab.options import Config, option
from difflab.sd.load import read_config
from difflab.sd.tokenizer import write_clip_vocab
from difflab.t2i.captions import VOCAB_WORDS

IMAGE_SIZE = 32


@dataclass
class MiniConfig(Config):
    """Sizes of the three networks (defaults: the shipped model)."""

    unet_channels: tuple[int, ...] = option((64, 128), "UNet block_out_channels, one per level", minimum=8)
    unet_layers_per_block: int = option(1, "UNet layers_per_block", minimum=1)
    attention_levels: tuple[int, ...] = option((1,), "UNet levels (0 = finest) with cross-attention", minimum=0)
    attention_head_dim: int = option(8, "UNet attention head width", minimum=1)
    vae_channels: tuple[int, ...] = option((32, 64), "VAE block_out_channels (n levels: 2^(n-1) downsampling)", minimum=8)
    latent_channels: int = option(4, "latent channels of the VAE", minimum=1)
    text_width: int = option(64, "text encoder hidden size (= UNet cross_attention_dim)", minimum=1)
    text_layers: int = option(2, "text encoder layers", minimum=1)
    text_heads: int = option(4, "text encoder attention heads", minimum=1)
    max_length: int = option(24, "caption tokens, start and end included", minimum=3)
    text_time_embedding: bool = option(True, "also add an attention-pooled text vector to the UNet's time embedding, "
                                       "so every ResNet block sees the caption (diffusers' addition_embed_type='text'), "
                                       "not only the cross-attention layers")
    time_scale_shift: bool = option(True, "ResNet blocks apply the time (and text) embedding as a scale and shift after "
                                    "GroupNorm (resnet_time_scale_shift='scale_shift'), instead of a bias before it "
                                    "that GroupNorm partly removes")

    def validate(self) -> None:
        """Raise ValueError for sizes the networks cannot be built with."""
        super().validate()
        if len(self.unet_channels) < 1 or len(self.vae_channels) < 1:
            raise ValueError("unet_channels and vae_channels need at least one level each")
        if any(c < 8 or c % 8 for c in (*self.unet_channels, *self.vae_channels)):
            raise ValueError(f"channel counts must be positive multiples of 8, got unet {self.unet_channels}, "
                             f"vae {self.vae_channels}")
        if IMAGE_SIZE % 2 ** len(self.vae_channels):
            raise ValueError(f"{len(self.vae_channels)} VAE levels downsample {IMAGE_SIZE}x{IMAGE_SIZE} too far")
        if self.text_width % self.text_heads or self.text_width % self.attention_head_dim:
            raise ValueError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads} "
                             f"and attention_head_dim {self.attention_head_dim}")
        self.unet_kwargs()

    def unet_kwargs(self) -> dict[str, Any]:
        n = len(self.unet_channels)
        if not self.attention_levels or any(not 0 <= i < n for i in self.attention_levels):
            raise ValueError(f"attention_levels must name at least one of the UNet's levels 0..{n - 1}, "
                             f"got {self.attention_levels}")
        down = ["CrossAttnDownBlock2D" if i in self.attention_levels else "DownBlock2D" for i in range(n)]
        return dict(
            sample_size=IMAGE_SIZE // 2 ** (len(self.vae_channels) - 1),
            in_channels=self.latent_channels, out_channels=self.latent_channels,
            layers_per_block=self.unet_layers_per_block, block_out_channels=list(self.unet_channels),
            down_block_types=down, up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
            cross_attention_dim=self.text_width, attention_head_dim=self.attention_head_dim,
            norm_num_groups=min(32, self.unet_channels[0]),
            **(dict(addition_embed_type="text", addition_embed_type_num_heads=self.text_heads)
               if self.text_time_embedding else {}),
            **(dict(resnet_time_scale_shift="scale_shift") if self.time_scale_shift else {}),
        )

    def vae_kwargs(self, scaling_factor: float = 1.0) -> dict[str, Any]:
        n = len(self.vae_channels)
        return dict(
            in_channels=3, out_channels=3, latent_channels=self.latent_channels,
            block_out_channels=list(self.vae_channels), layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
            norm_num_groups=min(32, self.vae_channels[0]), sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
        )


def build_tokenizer(folder: PathLike, max_length: int):
    """A CLIP tokenizer whose vocabulary has one token per mini-world word, written to
    ``folder`` (vocab.json, merges.txt and the tokenizer config) in one rename."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    with staged_dir(folder) as tmp:
        write_clip_vocab(tmp, VOCAB_WORDS)
        tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>",
                            model_max_length=max_length)
        tok.save_pretrained(str(tmp))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_vae(cfg: MiniConfig, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg.vae_kwargs(scaling_factor))


def build_unet(cfg: MiniConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**cfg.unet_kwargs())


def build_text_encoder(cfg: MiniConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(tokenizer)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_attention_heads=cfg.text_heads, num_hidden_layers=cfg.text_layers,
        max_position_embeddings=cfg.max_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def save_folder(folder: PathLike, *, unet=None, vae=None, text_encoder=None,
                dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None) -> Path:
    """Write the given networks of an SD-format diffusers folder, plus ``scheduler/``
    (the tokenizer is written by :func:`build_tokenizer`).

    Each part (``unet/``, ``vae/``, ``text_encoder/``) is built in a
    temporary folder beside it and renamed into place, so a crash never leaves a
    half-written part; other files in ``folder`` (training state) are kept. ``dtype``
    float16 halves the size; ``difflab ti`` casts to its own precision on load.
    ``extra`` is written to ``mini_sd.json`` (training facts).
    """
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name, obj in parts.items():
        if obj is None:
            continue
        with staged_dir(folder / name) as tmp:
            copy.deepcopy(obj).to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    sched = folder / "scheduler"
    sched.mkdir(exist_ok=True)
    save_json(read_config("scheduler"), sched / "scheduler_config.json")
    if extra is not None:
        save_json(extra, folder / "mini_sd.json")
    return folder


MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "mini_sd.json")


def export_folder(run: PathLike, out: PathLike) -> Path:
    """Copy the model of a training run (``unet/ vae/ text_encoder/ tokenizer/ scheduler/
    mini_sd.json``, without checkpoints and samples) to ``out``, replacing it in one rename."""
    import shutil

    run, out = Path(run), Path(out)
    missing = [p for p in MODEL_PARTS if not (run / p).exists()]
    if missing:
        raise FileNotFoundError(f"{run} is not a mini model run or folder: missing {', '.join(missing)}")
    if out.resolve() == run.resolve():
        raise ValueError(f"--out {out} is the run folder itself")
    with staged_dir(out) as tmp:
        for part in MODEL_PARTS:
            (shutil.copytree if (run / part).is_dir() else shutil.copy2)(run / part, tmp / part)
    return out
