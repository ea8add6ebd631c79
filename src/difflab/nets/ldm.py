"""Stable Diffusion v1's UNet and VAE, with the CompVis ``ldm`` parameter names.

``LdmUNet().state_dict()`` has exactly the keys of an SD v1 ``model.ckpt`` under
``model.diffusion_model.`` (prefix stripped), and ``LdmVAE().state_dict()`` those under
``first_stage_model.``, so a single-file checkpoint loads with ``strict=True`` and no key
renaming. Both take the diffusers-style config dicts (``UNet2DConditionModel`` /
``AutoencoderKL``; keys missing from a config get diffusers' defaults) and compute what
those classes compute; tests/test_ldm_nets.py checks this against diffusers itself.

Only SD v1's architecture is written here. A config option that would change it (class
or added embeddings, scale-shift time conditioning, linear projections, deeper
transformers, ...) raises ``ValueError`` naming the option: such a model needs
diffusers. Keys starting with ``_`` are ignored, and so are options that do not change
the network (``force_upcast``; ``addition_embed_type_num_heads`` without an added
embedding).

UNet module tree (CompVis layout; ``input_blocks.k`` / ``output_blocks.k`` are steps
whose children run in order; a level has attention when its down block type is
``CrossAttnDownBlock2D``):

    time_embed        Sequential(0 Linear C0 -> 4 C0, 1 SiLU, 2 Linear)
    input_blocks.0    (0 Conv 3x3 in -> C0)
    input_blocks.k    (0 ResBlock[, 1 SpatialTransformer]) or (0 Downsample: op, conv stride 2)
    middle_block      (0 ResBlock, 1 SpatialTransformer, 2 ResBlock)
    output_blocks.k   (0 ResBlock on cat[h, skip][, 1 SpatialTransformer][, last Upsample])
    out               Sequential(0 GroupNorm, 1 SiLU, 2 Conv 3x3)

VAE: ``encoder``/``decoder`` with ``conv_in``, ``down.i``/``up.i`` levels (``block.j``
ResnetBlocks, ``downsample``/``upsample``), ``mid`` (``block_1``, ``attn_1``,
``block_2``), ``norm_out``, ``conv_out``; plus ``quant_conv`` and ``post_quant_conv``.
CompVis indexes the decoder's ``up.i`` by resolution level, so ``up.0`` is the
full-resolution level and the decoder runs ``up.{n-1}`` first.

Only torch APIs present in torch 1.11 are used (the course's environment).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.nets.attention import attention

# ------------------------------------------------------------------------- configs
# Options this module reads, with diffusers' defaults (used for keys a config lacks).
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, attention_head_dim=8,
)
VAE_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215,
)
# Options whose only accepted values are SD v1's (or equivalent no-ops); a list value
# passes when every element does (diffusers accepts per-block lists for some).
_UNET_FIXED: dict[str, tuple[Any, ...]] = dict(
    center_input_sample=(False,), mid_block_type=("UNetMidBlock2DCrossAttn",), only_cross_attention=(False,),
    mid_block_scale_factor=(1,), dropout=(0,), act_fn=("silu",), transformer_layers_per_block=(1,),
    reverse_transformer_layers_per_block=(None,), encoder_hid_dim=(None,), encoder_hid_dim_type=(None,),
    num_attention_heads=(None,), dual_cross_attention=(False,), use_linear_projection=(False,),
    class_embed_type=(None,), addition_embed_type=(None,), addition_time_embed_dim=(None,),
    num_class_embeds=(None,), upcast_attention=(False,), resnet_time_scale_shift=("default",),
    resnet_skip_time_act=(False,), resnet_out_scale_factor=(1,), time_embedding_type=("positional",),
    time_embedding_dim=(None,), time_embedding_act_fn=(None,), timestep_post_act=(None,),
    time_cond_proj_dim=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
    projection_class_embeddings_input_dim=(None,), attention_type=("default",), class_embeddings_concat=(False,),
    mid_block_only_cross_attention=(None, False), cross_attention_norm=(None,), downsample_padding=(1,),
)
_VAE_FIXED: dict[str, tuple[Any, ...]] = dict(
    act_fn=("silu",), shift_factor=(None,), latents_mean=(None,), latents_std=(None,),
    use_quant_conv=(True,), use_post_quant_conv=(True,), mid_block_add_attention=(True,),
)
# Options that never change the network, whatever their value: ``force_upcast`` is a
# pipeline's fp16 hint; the added-embedding head count is unused without one.
_UNET_IGNORED = ("addition_embed_type_num_heads",)
_VAE_IGNORED = ("force_upcast",)


class NetConfig(dict):
    """A resolved config: a dict whose keys also read as attributes (``config.in_channels``),
    like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _allowed(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed`` (``None`` and booleans by identity, so ``0`` is not
    ``False``), or a non-empty list of such."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_allowed(v, allowed) for v in value)
    exact = [a for a in allowed if a is None or isinstance(a, bool)]
    loose = [a for a in allowed if not (a is None or isinstance(a, bool))]
    return any(value is a for a in exact) or (not isinstance(value, bool) and value in loose)


def _reject(what: str, key: str, value: Any) -> None:
    raise ValueError(f"{what} config needs the full install (diffusers): option {key} = {value!r} is not an SD v1 setting")


def _resolve(what: str, config: Mapping[str, Any], defaults: Mapping[str, Any],
             fixed: Mapping[str, tuple[Any, ...]], ignored: Sequence[str]) -> NetConfig:
    """``defaults`` updated by ``config``; the first option (in ``config``'s order) that is
    not an SD v1 setting, or that this module does not know, raises the one-line ``ValueError``."""
    out = NetConfig(defaults)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        known = key in defaults or key in fixed or key in ignored
        if not known or (key in fixed and not _allowed(value, fixed[key])):
            _reject(what, key, value)
        out[key] = value
    return out


def _unet_layout(c: NetConfig) -> tuple[list[bool], list[int]]:
    """(attention per level, attention heads per level) of a resolved UNet config. The up
    block types must mirror the down ones (CompVis derives both from one list)."""
    n = len(c.block_out_channels)
    attn = [{"CrossAttnDownBlock2D": True, "DownBlock2D": False}.get(t) for t in c.down_block_types]
    if None in attn or len(attn) != n:
        _reject("UNet", "down_block_types", c.down_block_types)
    if list(c.up_block_types) != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        _reject("UNet", "up_block_types", c.up_block_types)
    heads = c.attention_head_dim
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    if len(heads) != n:
        _reject("UNet", "attention_head_dim", c.attention_head_dim)
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(c[key], int):
            _reject("UNet", key, c[key])
    return attn, [int(h) for h in heads]


# ---------------------------------------------------------------------------- UNet
def timestep_features(t: Tensor, dim: int, flip_sin_to_cos: bool, shift: float, max_period: int = 10000) -> Tensor:
    """[B] timesteps -> [B, dim] float32 sinusoids, frequencies max_period^(-i / (dim/2 - shift));
    [sin, cos] halves, swapped to [cos, sin] by ``flip_sin_to_cos`` (SD v1: True, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-conv; the
    input (1x1-conv'd when the width changes) added back. ``out_layers.2`` is CompVis's
    dropout, which SD v1 runs at p=0, so an identity holds its index."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin, eps=eps), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout, eps=eps), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, L, dim] over ``context`` [B, M, context_dim]
    (``x`` itself when None); q, k, v without bias; ``to_out.1`` is dropout (p=0)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Identity())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """``proj`` to twice the width; the first half times GELU (exact, erf) of the second."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """``net``: 0 GEGLU dim -> 4 dim, 1 dropout (p=0, identity), 2 Linear back to dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm (eps 1e-5) self-attention, cross-attention, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), 1x1 conv ``proj_in`` to heads * (channels // heads), one
    transformer block over the h*w positions, 1x1 conv ``proj_out``, plus the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, context_dim, heads, head_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y = self.proj_in(self.norm(x))
        inner = y.shape[1]
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.reshape(b, h, w, inner).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(y) + x


class Downsample(nn.Module):
    """``op``: 3x3 conv, stride 2, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to ``size``, for sides that were odd on the way down), then a 3x3 ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Runs its children in order, giving each what it takes: the time embedding (ResBlock),
    the text states (SpatialTransformer), the next skip's size (Upsample), or nothing."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class UNetOutput:
    sample: Tensor  # eps, [B, out_channels, h, w]


class PlacedModule(nn.Module):
    """``.device`` and ``.dtype`` of the parameters, which diffusers' models expose and the SD code reads."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class LdmUNet(PlacedModule):
    """SD v1's noise-prediction UNet: ``forward(sample [B, C, h, w], timestep,
    encoder_hidden_states [B, L, cross_attention_dim]).sample`` is eps, as
    ``UNet2DConditionModel`` computes it. ``attention_head_dim`` is, as in diffusers'
    SD v1 configs, the number of heads per level (an int, or one per level)."""

    def __init__(self, config: Mapping[str, Any] | None = None, **options: Any):
        super().__init__()
        c = _resolve("UNet", {**(config or {}), **options}, UNET_DEFAULTS, _UNET_FIXED, _UNET_IGNORED)
        self.config = c
        self._attn, self._heads = _unet_layout(c)
        ch0 = c.block_out_channels[0]
        self._emb_dim = 4 * ch0
        self.time_embed = nn.Sequential(nn.Linear(ch0, self._emb_dim), nn.SiLU(), nn.Linear(self._emb_dim, self._emb_dim))
        self.input_blocks, skips = self._input_blocks()
        top = c.block_out_channels[-1]
        self.middle_block = TimestepSequential(
            self._res(top, top), self._transformer(top, len(self._heads) - 1), self._res(top, top))
        self.output_blocks = self._output_blocks(skips)
        g, eps = c.norm_num_groups, c.norm_eps
        self.out = nn.Sequential(nn.GroupNorm(g, ch0, eps=eps), nn.SiLU(), nn.Conv2d(ch0, c.out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options: Any) -> LdmUNet:
        return cls(config, **options)

    def _res(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, self._emb_dim, self.config.norm_num_groups, self.config.norm_eps)

    def _transformer(self, channels: int, level: int) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(channels, self._heads[level], c.cross_attention_dim, c.norm_num_groups)

    def _input_blocks(self) -> tuple[nn.ModuleList, list[int]]:
        """The encoder steps, and the width of each step's output (the skips, in order)."""
        c = self.config
        ch = c.block_out_channels[0]
        blocks = [TimestepSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))]
        widths = [ch]
        last = len(c.block_out_channels) - 1
        for level, width in enumerate(c.block_out_channels):
            for _ in range(c.layers_per_block):
                layers: list[nn.Module] = [self._res(ch, width)]
                ch = width
                if self._attn[level]:
                    layers.append(self._transformer(ch, level))
                blocks.append(TimestepSequential(*layers))
                widths.append(ch)
            if level != last:
                blocks.append(TimestepSequential(Downsample(ch)))
                widths.append(ch)
        return nn.ModuleList(blocks), widths

    def _output_blocks(self, skips: list[int]) -> nn.ModuleList:
        """The decoder steps: per level, lowest resolution first, layers_per_block + 1
        ResBlocks, each on cat[h, the latest unused skip]; an Upsample ends every level but the last."""
        c = self.config
        skips = list(skips)
        ch = c.block_out_channels[-1]
        blocks = []
        for level in reversed(range(len(c.block_out_channels))):
            width = c.block_out_channels[level]
            for i in range(c.layers_per_block + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), width)]
                ch = width
                if self._attn[level]:
                    layers.append(self._transformer(ch, level))
                if level and i == c.layers_per_block:
                    layers.append(Upsample(ch))
                blocks.append(TimestepSequential(*layers))
        return nn.ModuleList(blocks)

    def time_embedding(self, sample: Tensor, timestep: Any) -> Tensor:
        """[B, 4 C0] embedding of ``timestep`` (int, float, 0-d or [B] / [1] tensor), broadcast to
        the batch; the sinusoids are computed in float32, then cast to ``sample``'s dtype."""
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t[None]
        t = t.to(sample.device).expand(sample.shape[0])
        c = self.config
        feats = timestep_features(t, c.block_out_channels[0], bool(c.flip_sin_to_cos), float(c.freq_shift))
        return self.time_embed(feats.to(sample.dtype))

    def forward(self, sample: Tensor, timestep: Any, encoder_hidden_states: Tensor, return_dict: bool = True) -> Any:
        """eps for ``sample`` [B, in, h, w] at ``timestep`` given the text states [B, L, D]:
        ``UNetOutput(eps)``, or ``(eps,)`` when ``return_dict`` is False (as diffusers)."""
        emb = self.time_embedding(sample, timestep)
        context = encoder_hidden_states
        h, skips = sample, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        eps = self.out(h)
        return UNetOutput(eps) if return_dict else (eps,)


# ----------------------------------------------------------------------------- VAE
class VaeResBlock(nn.Module):
    """GroupNorm (eps 1e-6)-SiLU-conv twice, plus the input (``nin_shortcut``, a 1x1 conv, when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VaeAttention(nn.Module):
    """Single-head self-attention over the h*w positions, q/k/v/proj_out as 1x1 convs, plus the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        # The 1x1 convs are applied as linear maps on [B, h*w, C]: the same product, in the
        # layout attention wants (and the summation order diffusers' linear layers use).
        b, c, h, w = x.shape
        y = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (F.linear(y, conv.weight[:, :, 0, 0], conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        out = F.linear(attention(q, k, v)[:, 0], self.proj_out.weight[:, :, 0, 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class VaeMid(nn.Module):
    """``block_1``, ``attn_1``, ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = VaeResBlock(channels, channels, groups)
        self.attn_1 = VaeAttention(channels, groups)
        self.block_2 = VaeResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VaeDownsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 ``conv`` with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class VaeLevel(nn.Module):
    """One resolution level: ``block.j`` ResnetBlocks, then ``downsample`` or ``upsample`` if it has one."""

    def __init__(self, widths: Sequence[tuple[int, int]], groups: int, resample: str = "", channels: int = 0):
        super().__init__()
        self.block = nn.ModuleList([VaeResBlock(cin, cout, groups) for cin, cout in widths])
        if resample == "downsample":
            self.downsample = VaeDownsample(channels)
        elif resample == "upsample":
            self.upsample = Upsample(channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _chain(cin: int, cout: int, n: int) -> list[tuple[int, int]]:
    """(in, out) widths of ``n`` ResnetBlocks taking ``cin`` to ``cout``."""
    return [(cin if j == 0 else cout, cout) for j in range(n)]


class VaeEncoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2 latent, H / 2^(n-1), W / 2^(n-1)] (mean, log-variance)."""

    def __init__(self, c: NetConfig):
        super().__init__()
        widths, g, n = list(c.block_out_channels), c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList([
            VaeLevel(_chain(widths[max(i - 1, 0)], widths[i], c.layers_per_block), g,
                     "downsample" if i < n - 1 else "", widths[i])
            for i in range(n)])
        self.mid = VaeMid(widths[-1], g)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VaeDecoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, out, h 2^(n-1), w 2^(n-1)]; ``up.i`` is level i
    (``up.0`` full resolution), run from ``up.{n-1}`` down to ``up.0``."""

    def __init__(self, c: NetConfig):
        super().__init__()
        widths, g, n = list(c.block_out_channels), c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = VaeMid(widths[-1], g)
        self.up = nn.ModuleList([
            VaeLevel(_chain(widths[min(i + 1, n - 1)], widths[i], c.layers_per_block + 1), g,
                     "upsample" if i > 0 else "", widths[i])
            for i in range(n)])
        self.norm_out = nn.GroupNorm(g, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: ``moments`` [B, 2 L, h, w] split into mean and log-variance
    (clamped to [-30, 20], as the original does)."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * N(0, 1), the noise drawn with ``generator`` on its own device."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(posterior || N(0, 1)) per sample, summed over the latent's elements."""
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    sample: Tensor


class LdmVAE(PlacedModule):
    """SD v1's KL autoencoder, as ``AutoencoderKL`` computes it: ``encode(x).latent_dist``
    (x in [-1, 1]) and ``decode(z).sample``; ``z`` is the unscaled latent (divide sampled
    latents by ``config.scaling_factor`` first)."""

    def __init__(self, config: Mapping[str, Any] | None = None, **options: Any):
        super().__init__()
        c = _resolve("VAE", {**(config or {}), **options}, VAE_DEFAULTS, _VAE_FIXED, _VAE_IGNORED)
        n = len(c.block_out_channels)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if list(c[key]) != [kind] * n:
                _reject("VAE", key, c[key])
        if not isinstance(c.layers_per_block, int):
            _reject("VAE", "layers_per_block", c.layers_per_block)
        self.config = c
        self.encoder = VaeEncoder(c)
        self.decoder = VaeDecoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options: Any) -> LdmVAE:
        return cls(config, **options)

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        dist = DiagonalGaussian(self.quant_conv(self.encoder(x)))
        return EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z: Tensor, return_dict: bool = True) -> Any:
        img = self.decoder(self.post_quant_conv(z))
        return DecoderOutput(img) if return_dict else (img,)

    def forward(self, sample: Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> DecoderOutput:
        """Encode, take the posterior's sample (or its mean), decode."""
        dist = self.encode(sample).latent_dist
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode())


def ldm_networks_from_state(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                            unet_state: Mapping[str, Tensor], vae_state: Mapping[str, Tensor]) -> tuple[LdmUNet, LdmVAE]:
    """(UNet, VAE) built from their configs and loaded strictly from CompVis-named state
    dicts (prefixes ``model.diffusion_model.`` / ``first_stage_model.`` already stripped),
    in eval mode, in the state's dtype."""
    unet, vae = LdmUNet(unet_config), LdmVAE(vae_config)
    for net, state in ((unet, unet_state), (vae, vae_state)):
        dtype = next(iter(state.values())).dtype if state else None
        if dtype is not None and dtype.is_floating_point:
            net.to(dtype)
        net.load_state_dict(dict(state), strict=True)
        net.eval()
    return unet, vae
