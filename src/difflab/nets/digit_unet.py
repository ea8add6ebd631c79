"""A small class-conditional UNet for 28x28 RGB digits with two conditions.

Conditions: ``digit`` in 0..9 (10 = null) and ``dataset`` in 0..1 (2 = null: 0 = MNIST-M,
1 = SVHN). Each has its own embedding table with its own null token; the embeddings
are added to the timestep embedding and fed to every residual block (scale-shift
modulation after the second GroupNorm, as in Dhariwal & Nichol 2021).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.nets.attention import attention
from difflab.options import Config, option

NUM_DIGITS = 10
NUM_DATASETS = 2
NULL_DIGIT = NUM_DIGITS
NULL_DATASET = NUM_DATASETS


@dataclass
class DigitUNetConfig(Config):
    """The network's sizes. The upper bounds keep a ``config.json`` (or a command line)
    from describing a network far beyond any digit model (the defaults are the shipped model's)."""

    channels: int = option(64, "UNet base width", minimum=1, maximum=4096)
    channel_mults: tuple[int, ...] = option((1, 2), "width multiplier per resolution level", minimum=1, maximum=64)
    num_res_blocks: int = option(1, "residual blocks per level", minimum=1, maximum=64)
    attention_levels: tuple[int, ...] = option((1,), "levels with self-attention (0 = the finest)", minimum=0,
                                               maximum=16, nargs="*")
    groups: int = option(16, "GroupNorm groups", minimum=1, maximum=4096)
    dropout: float = option(0.0, "dropout in the residual blocks", minimum=0.0, maximum=1.0)
    in_channels: int = option(3, "image channels", minimum=1, maximum=64, cli=False)
    patch: int = option(2, "pixel-unshuffle factor before the UNet (2: 28x28x3 -> 14x14x12)", minimum=1, maximum=28)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer steps (Vaswani et al. 2017): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    def __init__(self, ch: int, groups: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class DigitUNet(nn.Module):
    """eps = net(x [B,3,28,28], t [B] long, digit [B] long, dataset [B] long).

    ``distilled_scale``: None for a model trained on data (guidance costs a second,
    unconditional evaluation), or the guidance scale S whose guided prediction the network
    was distilled to give in one evaluation (``difflab digits distill``; set by the loader
    from the model's ``config.json``).
    """

    def __init__(self, config: DigitUNetConfig | None = None):
        super().__init__()
        cfg = config or DigitUNetConfig()
        self.config = cfg
        self.distilled_scale: float | None = None
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.digit_emb = nn.Embedding(NUM_DIGITS + 1, emb_dim)
        self.dataset_emb = nn.Embedding(NUM_DATASETS + 1, emb_dim)
        pix = cfg.in_channels * cfg.patch**2
        self.unshuffle = nn.PixelUnshuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()
        self.shuffle = nn.PixelShuffle(cfg.patch) if cfg.patch > 1 else nn.Identity()
        self.stem = nn.Conv2d(pix, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(cfg.channel_mults):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                out = ch * mult
                blocks.append(ResBlock(cur, out, emb_dim, cfg.groups, cfg.dropout))
                if level in cfg.attention_levels:
                    blocks.append(Attention(out, cfg.groups))
                cur = out
                skips.append(cur)
            if level < len(cfg.channel_mults) - 1:
                blocks.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
            self.down.append(blocks)

        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)
        self.mid_attn = Attention(cur, cfg.groups)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                out = ch * mult
                blocks.append(ResBlock(cur + skips.pop(), out, emb_dim, cfg.groups, cfg.dropout))
                if level in cfg.attention_levels:
                    blocks.append(Attention(out, cfg.groups))
                cur = out
            if level > 0:
                blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                blocks.append(nn.Conv2d(cur, cur, 3, padding=1))
            self.up.append(blocks)
        self.out_norm = nn.GroupNorm(cfg.groups, cur)
        self.out_conv = nn.Conv2d(cur, pix, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: Tensor, t: Tensor, digit: Tensor, dataset: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.channels).to(x.dtype))
        emb = emb + self.digit_emb(digit) + self.dataset_emb(dataset)
        h = self.stem(self.unshuffle(x))
        hs = [h]
        for blocks in self.down:
            for layer in blocks:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
                if not isinstance(layer, Attention):
                    hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks in self.up:
            for layer in blocks:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = layer(h)
        return self.shuffle(self.out_conv(F.silu(self.out_norm(h))))


class DigitDenoiser(nn.Module):
    """Adapter to the Denoiser contract: ``eps = f(x, t, cond)`` with
    ``cond = (digit [B] long, dataset [B] long)``."""

    def __init__(self, net: DigitUNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, cond) -> Tensor:
        digit, dataset = cond
        return self.net(x, t, digit, dataset)
