"""The course's 256x256 DDPM face UNet (the network behind ``UNet.pt``).

Written from the description in ``../shared/specs/face_unet.md``; parameter names and
shapes match the course's plain ``state_dict`` exactly (427 tensors, 113,673,283 values
including the ``time.0.inv_freq`` buffer), so the real file loads with ``strict=True``.

Module tree (names are what the state dict uses):

    time      Sequential(0 sinusoid [buffer inv_freq], 1 Linear, 2 SiLU, 3 Linear)
    down1     Conv 3x3, 3 -> C
    downK     Block(resblocks[, attention]) or Sequential(0 Conv 3x3 stride 2)
    mid1/2    Block
    upK       Block (input = cat[x, skip]) or Sequential(0 nearest x2, 1 Conv 3x3)
    out       Sequential(0 GroupNorm, 1 SiLU, 2 Conv 3x3, C -> 3)

``FaceUNetConfig`` scales the widths, so tests build a tiny network with the same
layout and names; the default config is the course's full-size network. The network
is fully convolutional: any input whose sides are multiples of 2**(levels - 1) works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.nets.attention import attention


@dataclass(frozen=True)
class FaceUNetConfig:
    """Widths and layout. Defaults are the course network (``UNet.pt``)."""

    base_channels: int = 128  # C: channels at full resolution
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4, 4)  # per resolution level, 256x256 first
    attention_levels: tuple[int, ...] = (4,)  # level 4 is 16x16 at 256x256 input
    sinusoid_dim: int = 128
    time_dim: int = 512
    norm_groups: int = 32
    down_blocks: int = 2  # ResBlocks per level on the way down
    up_blocks: int = 3  # ResBlocks per level on the way up
    in_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for c in self.widths:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of norm_groups={self.norm_groups}")
        if self.sinusoid_dim % 2:
            raise ValueError(f"sinusoid_dim must be even, got {self.sinusoid_dim}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @classmethod
    def tiny(cls, base_channels: int = 8) -> "FaceUNetConfig":
        """The same layout and names with small widths (for tests)."""
        return cls(
            base_channels=base_channels,
            sinusoid_dim=2 * base_channels,
            time_dim=4 * base_channels,
            norm_groups=math.gcd(32, base_channels),
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "FaceUNetConfig":
        """Read the widths off a state dict in the course layout; the default config
        when the keys it needs are absent (loading then reports the mismatch)."""
        try:
            base = int(state["down1.weight"].shape[0])
            time_dim, sin_dim = (int(s) for s in state["time.1.weight"].shape)
        except (KeyError, ValueError, AttributeError):
            return cls()
        if base < 1 or sin_dim % 2:
            return cls()
        return cls(base_channels=base, sinusoid_dim=sin_dim, time_dim=time_dim, norm_groups=math.gcd(32, base))


class SinusoidalEmbedding(nn.Module):
    """Transformer-style step embedding (Vaswani et al. 2017, sec. 3.5), as the course's:
    ``inv_freq_k = 10000^(-2k/dim)``, embedding ``[sin(t inv_freq), cos(t inv_freq)]``
    (all sines first). ``t`` is the raw integer step, not rescaled."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: it is in UNet.pt

    def forward(self, t: Tensor) -> Tensor:
        a = t.float()[:, None] * self.inv_freq.float()[None]
        return torch.cat([a.sin(), a.cos()], dim=-1)


class ResBlock(nn.Module):
    """h = conv1(SiLU(norm1(x))) + time(temb); out = conv2(dropout(SiLU(norm2(h)))) + skip(x).

    The time term is added before norm2 (no scale-shift), as in the course network."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, cout))
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """One-head self-attention over all H*W positions, with a residual connection:
    q, k, v = split(qkv(GroupNorm(x))); out = x + out(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each [B, C, HW]
        # [B, 1, HW, C] so that SDPA's default scale is 1/sqrt(C).
        q, k, v = (z.transpose(1, 2).unsqueeze(1) for z in (q, k, v))
        a = attention(q, k, v)  # [B, 1, HW, C]
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.out(a)


class Block(nn.Module):
    """ResBlock, then SelfAttention on its output when the block has one."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.resblocks = ResBlock(cin, cout, time_dim, groups, dropout)
        self.attention = SelfAttention(cout, groups) if attention else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.resblocks(x, temb)
        return self.attention(x) if self.attention is not None else x


def _downsample(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1))


def _upsample(c: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))


class FaceUNet(nn.Module):
    """``model(x [B,3,H,W] in [-1,1], t [B] integer steps 0..999) -> eps [B,3,H,W]``."""

    def __init__(self, config: Optional[FaceUNetConfig] = None) -> None:
        super().__init__()
        cfg = config or FaceUNetConfig()
        self.config = cfg
        g, td = cfg.norm_groups, cfg.time_dim
        self.time = nn.Sequential(
            SinusoidalEmbedding(cfg.sinusoid_dim), nn.Linear(cfg.sinusoid_dim, td), nn.SiLU(), nn.Linear(td, td)
        )
        widths = cfg.widths
        self.down_names: list[str] = []
        self.up_names: list[str] = []
        skips = [widths[0]]
        self._add("down", 1, nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1))
        k, ch = 2, widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.down_blocks):
                self._add("down", k, Block(ch, w, td, g, level in cfg.attention_levels, cfg.dropout))
                ch = w
                skips.append(ch)
                k += 1
            if level != len(widths) - 1:
                self._add("down", k, _downsample(ch))
                skips.append(ch)
                k += 1
        self.mid1 = Block(ch, ch, td, g, True, cfg.dropout)
        self.mid2 = Block(ch, ch, td, g, False, cfg.dropout)
        k = 1
        for level in reversed(range(len(widths))):
            w = widths[level]
            for _ in range(cfg.up_blocks):
                self._add("up", k, Block(ch + skips.pop(), w, td, g, level in cfg.attention_levels, cfg.dropout))
                ch = w
                k += 1
            if level != 0:
                self._add("up", k, _upsample(ch))
                k += 1
        assert not skips, "every skip is consumed"
        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    def _add(self, prefix: str, k: int, module: nn.Module) -> None:
        name = f"{prefix}{k}"
        self.add_module(name, module)
        (self.down_names if prefix == "down" else self.up_names).append(name)

    @property
    def downscale(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (len(self.config.channel_mults) - 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """:param x: [B, C, H, W], H and W multiples of ``downscale``. :param t: [B] steps."""
        if x.shape[-1] % self.downscale or x.shape[-2] % self.downscale:
            raise ValueError(f"input sides must be multiples of {self.downscale}, got {tuple(x.shape[-2:])}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time(t.to(x.device)).to(x.dtype)
        skips = []
        h = x
        for name in self.down_names:
            m = getattr(self, name)
            h = m(h, temb) if isinstance(m, Block) else m(h)
            skips.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for name in self.up_names:
            m = getattr(self, name)
            if isinstance(m, Block):
                h = m(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = m(h)
        return self.out(h)


class FaceDenoiser:
    """Adapter to the sampler's ``Denoiser`` contract: ``eps = f(x, t, cond)`` (cond unused).

    ``channels_last`` hands the network NHWC-strided input (faster convolutions on
    most GPUs and on recent CPUs); the returned eps is contiguous float32.
    """

    def __init__(self, model: FaceUNet, channels_last: bool = False) -> None:
        self.model = model
        self.channels_last = channels_last
        dtype = next(model.parameters()).dtype
        self.dtype = dtype

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        inp = x.to(self.dtype)
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        eps = self.model(inp, t)
        return eps.to(x.dtype).contiguous()
