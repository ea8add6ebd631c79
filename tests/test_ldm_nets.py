"""difflab.nets.ldm's UNet and VAE compute what diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` compute, under the CompVis (SD v1 ``model.ckpt``) parameter names.

diffusers is the oracle here, never a dependency of the module: our state dict, prefixed
as in a single-file checkpoint, goes through diffusers' own converter
(``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``) and loads strictly
into diffusers' class; then both networks run on the same inputs.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.nets.ldm import LdmUNet, LdmVAE, ldm_networks_from_state
from difflab.testing import TINY_UNET, TINY_VAE

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SD_CONFIGS = ROOT / "src" / "difflab" / "sd" / "configs"
MINI_UNET_CONFIG = ROOT / "src" / "difflab" / "assets" / "mini_sd" / "unet" / "config.json"
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."

# Outputs must agree to float32 rounding, relative to the output's scale (max |ref|).
# The two implementations do the same operations in the same order, and most
# comparisons come out bit-identical; but a tensor's memory layout can differ between
# them (diffusers' VAE attention returns a transposed, non-contiguous tensor), which
# changes the summation order inside the following convolutions by a few ulps. Measured:
# at most 1.4e-6 relative for the tiny nets, 7.6e-6 after the full VAE decoder's ~30
# convolutions of width 512. The tiny bound stays well under what a real slip costs
# (LayerNorm eps 1e-6 instead of 1e-5 in the transformer blocks moves the tiny UNet's
# eps by 1.5e-5); the full-size check is there for the wiring at scale.
RTOL = 5e-6
RTOL_FULL = 3e-5

# A third tiny UNet: three levels, attention at the first and last but not the middle,
# one head count per level, one ResBlock per level: every kind of step (ResBlock with
# and without attention, Downsample, Upsample after a plain or an attention block) at
# indices a two-level, two-layer net does not reach.
TINY_UNET_3 = dict(
    TINY_UNET, block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=[2, 4, 8],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
)


def perturb(net: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value: norms' 1/0 affines by N(0, 0.05^2), and
    weights by half their own spread (a fixed N(0, 0.05^2) would blow up the activations
    of 1280-wide layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            scale = 0.05 if p.ndim == 1 else 0.5 * float(p.std())
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    """max |ours - ref| <= rtol * max |ref|; returns the max difference relative to max |ref|."""
    assert ours.shape == ref.shape, what
    scale = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    assert diff <= rtol * scale, f"{what}: max diff {diff:.3g}, ref scale {scale:.3g}"
    return diff / scale


def assert_consumed(ours: dict, converted: dict, ref_keys) -> None:
    """The converter used every tensor of ours exactly once, and filled every key of diffusers' net.

    Converted tensors are ours or views of them at offset 0 (the VAE attention's 1x1
    convs sliced to matrices), so their data pointers name the tensor they came from.
    """
    assert set(converted) == set(ref_keys)
    assert len(converted) == len(ours)
    assert {t.data_ptr() for t in converted.values()} == {t.data_ptr() for t in ours.values()}


def pair(ours_cls, ref_cls, convert, prefix: str, config: dict, seed: int = 0):
    """(ours, diffusers') networks with the same random weights, via the CompVis names."""
    torch.manual_seed(seed)
    ours = ours_cls(config).eval()
    perturb(ours, seed)
    state = ours.state_dict()
    converted = convert({prefix + k: v for k, v in state.items()}, dict(config))
    ref = ref_cls(**config).eval()
    assert_consumed(state, converted, ref.state_dict().keys())
    ref.load_state_dict(converted, strict=True)
    return ours, ref


def unet_pair(config: dict, seed: int = 0):
    return pair(LdmUNet, UNet2DConditionModel, convert_ldm_unet_checkpoint, UNET_PREFIX, config, seed)


def vae_pair(config: dict, seed: int = 0):
    return pair(LdmVAE, AutoencoderKL, convert_ldm_vae_checkpoint, VAE_PREFIX, config, seed)


def compare_unet(ours, ref, config: dict, side: int, text_len: int = 7, rtol: float = RTOL) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, config["in_channels"], side, side + 1 if side % 2 else side, generator=g)
    t = torch.tensor([1, 480, 999])
    text = torch.randn(3, text_len, config["cross_attention_dim"], generator=g)
    with torch.no_grad():
        return assert_close(ours(x, t, encoder_hidden_states=text).sample,
                            ref(x, t, encoder_hidden_states=text).sample, "UNet eps", rtol)


def compare_vae(ours, ref, config: dict, side: int, rtol: float = RTOL) -> float:
    g = torch.Generator().manual_seed(2)
    down = 2 ** (len(config["block_out_channels"]) - 1)
    z = torch.randn(2, config["latent_channels"], side // down, side // down, generator=g)
    x = torch.rand(2, config["in_channels"], side, side, generator=g) * 2 - 1
    with torch.no_grad():
        diffs = [assert_close(ours.decode(z).sample, ref.decode(z).sample, "VAE decode", rtol)]
        mine, theirs = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        diffs.append(assert_close(mine.mean, theirs.mean, "posterior mean", rtol))
        diffs.append(assert_close(mine.std, theirs.std, "posterior std", rtol))
    return max(diffs)


# ------------------------------------------------------------------------ tiny nets
@pytest.mark.parametrize("config", [TINY_UNET, TINY_UNET_3], ids=["tiny", "tiny_3_levels"])
def test_tiny_unet_equals_diffusers(config):
    ours, ref = unet_pair(config)
    print(f"max diff / scale {compare_unet(ours, ref, config, side=8):.3g}")
    # odd sides: the up path follows the skips' sizes
    print(f"odd sides: max diff / scale {compare_unet(ours, ref, config, side=5):.3g}")


def test_unet_timestep_forms():
    """An int, a 0-d tensor and a [1] tensor are broadcast to the batch; a [B] tensor is per sample."""
    ours, ref = unet_pair(TINY_UNET)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        want = ref(x, torch.tensor([250, 250]), encoder_hidden_states=text).sample
        for t in (250, torch.tensor(250), torch.tensor([250]), torch.tensor([250.0, 250.0])):
            assert_close(ours(x, t, encoder_hidden_states=text).sample, want, f"timestep {t!r}")
        assert ours(x, 0, encoder_hidden_states=text, return_dict=False)[0].shape == x.shape


def test_tiny_vae_equals_diffusers():
    ours, ref = vae_pair(TINY_VAE)
    print(f"max diff / scale {compare_vae(ours, ref, TINY_VAE, side=16):.3g}")


def test_vae_posterior_sample_uses_the_generator():
    ours, _ = vae_pair(TINY_VAE)
    with torch.no_grad():
        dist = ours.encode(torch.rand(1, 3, 16, 16) * 2 - 1).latent_dist
    a = dist.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, dist.mean + dist.std * noise)
    assert torch.equal(dist.logvar, dist.logvar.clamp(-30, 20))


def test_networks_from_state_load_strictly():
    unet, vae = LdmUNet(TINY_UNET), LdmVAE(TINY_VAE)
    unet2, vae2 = ldm_networks_from_state(TINY_UNET, TINY_VAE, unet.state_dict(), vae.state_dict())
    assert not unet2.training and not vae2.training
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), unet2.state_dict().values()))
    with pytest.raises(RuntimeError, match="Missing key"):
        ldm_networks_from_state(TINY_UNET, TINY_VAE, dict(list(unet.state_dict().items())[1:]), vae.state_dict())


def test_config_attributes():
    unet, vae = LdmUNet(TINY_UNET), LdmVAE(TINY_VAE)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (4, 4, 8)
    assert unet.config.cross_attention_dim == 32 and list(unet.config.block_out_channels) == [32, 64]
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    assert list(vae.config.block_out_channels) == [32, 64] and vae.config.sample_size == 16
    assert unet.dtype == torch.float32 and vae.device.type == "cpu"


# -------------------------------------------------------------------- full SD v1
def sd_config(name: str) -> dict:
    return json.loads((SD_CONFIGS / f"{name}.json").read_text())


# Names and shapes of an SD v1.4 model.ckpt (prefixes stripped), from the checkpoint's layout.
FULL_UNET_SHAPES = {
    "time_embed.0.weight": (1280, 320), "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3), "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3), "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3), "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
    "middle_block.2.emb_layers.1.weight": (1280, 1280), "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1), "out.0.weight": (320,), "out.2.weight": (4, 320, 3, 3),
}
FULL_VAE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3), "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3), "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3), "decoder.mid.attn_1.norm.weight": (512,),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1), "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.norm_out.weight": (128,), "decoder.conv_out.weight": (3, 128, 3, 3),
}


def test_full_size_names_shapes_and_conversion():
    """The full SD v1 configs, built without storage (meta tensors): 686 UNet and 248 VAE
    tensors (an SD v1 checkpoint's counts) with the checkpoint's names and shapes, which
    diffusers' converter maps one to one onto its own nets' keys and shapes."""
    with torch.device("meta"):
        nets = [(LdmUNet(sd_config("unet")), UNet2DConditionModel(**sd_config("unet")), UNET_PREFIX,
                 convert_ldm_unet_checkpoint, "unet", FULL_UNET_SHAPES, 686, 859_520_964),
                (LdmVAE(sd_config("vae")), AutoencoderKL(**sd_config("vae")), VAE_PREFIX,
                 convert_ldm_vae_checkpoint, "vae", FULL_VAE_SHAPES, 248, 83_653_863)]
    for ours, ref, prefix, convert, name, shapes, count, params in nets:
        state = ours.state_dict()
        assert len(state) == count and sum(p.numel() for p in ours.parameters()) == params
        for key, shape in shapes.items():
            assert tuple(state[key].shape) == shape, key
        converted = convert({prefix + k: v for k, v in state.items()}, sd_config(name))
        ref_state = ref.state_dict()
        assert_consumed(state, converted, ref_state.keys())
        assert all(converted[k].shape == ref_state[k].shape for k in ref_state)
    assert "decoder.up.0.upsample.conv.weight" not in nets[1][0].state_dict()
    assert "encoder.down.3.downsample.conv.weight" not in nets[1][0].state_dict()


@pytest.mark.slow
def test_full_size_outputs_equal_diffusers():
    """The full SD v1 UNet (latent 8x8, 77 text tokens) and VAE (64x64 images) with random
    weights give diffusers' outputs. About 25 s and 4 GB: diffusers' UNet takes our
    tensors as its parameters (``assign``) instead of a second 3.4 GB copy."""
    config = sd_config("unet")
    torch.manual_seed(0)
    ours = LdmUNet(config).eval()
    perturb(ours, 0)
    state = ours.state_dict()
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in state.items()}, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config).eval()
    assert_consumed(state, converted, ref.state_dict().keys())
    ref.load_state_dict(converted, strict=True, assign=True)
    del state, converted
    print(f"full UNet: max diff / scale {compare_unet(ours, ref, config, side=8, text_len=77, rtol=RTOL_FULL):.3g}")
    del ours, ref
    gc.collect()
    ours, ref = vae_pair(sd_config("vae"))
    print(f"full VAE: max diff / scale {compare_vae(ours, ref, sd_config('vae'), side=64, rtol=RTOL_FULL):.3g}")


# ----------------------------------------------------------------- configs refused
def test_mini_sd_config_is_refused():
    config = json.loads(MINI_UNET_CONFIG.read_text())
    with pytest.raises(ValueError) as err:
        LdmUNet(config)
    message = str(err.value)
    assert "\n" not in message
    assert "needs the full install (diffusers): option addition_embed_type = 'text' is not an SD v1 setting" in message


@pytest.mark.parametrize("cls, base, key, value", [
    (LdmUNet, TINY_UNET, "resnet_time_scale_shift", "scale_shift"),
    (LdmUNet, TINY_UNET, "use_linear_projection", True),
    (LdmUNet, TINY_UNET, "upcast_attention", True),
    (LdmUNet, TINY_UNET, "class_embed_type", "timestep"),
    (LdmUNet, TINY_UNET, "transformer_layers_per_block", 2),
    (LdmUNet, TINY_UNET, "transformer_layers_per_block", [1, 2]),
    (LdmUNet, TINY_UNET, "time_cond_proj_dim", 256),
    (LdmUNet, TINY_UNET, "up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]),
    (LdmUNet, TINY_UNET, "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    (LdmUNet, TINY_UNET, "an_unknown_option", 1),
    (LdmVAE, TINY_VAE, "use_quant_conv", False),
    (LdmVAE, TINY_VAE, "latents_mean", [0.0, 0.0, 0.0, 0.0]),
    (LdmVAE, TINY_VAE, "mid_block_add_attention", False),
])
def test_non_sd_v1_option_is_named(cls, base, key, value):
    with pytest.raises(ValueError, match=f"needs the full install \\(diffusers\\): option {key} = .* is not an SD v1 setting"):
        cls({**base, key: value})


def test_sd_v1_values_and_no_ops_are_accepted():
    LdmUNet({**TINY_UNET, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
             "transformer_layers_per_block": [1, 1], "addition_embed_type_num_heads": 4, "only_cross_attention": [False, False],
             "mid_block_only_cross_attention": None, "resnet_out_scale_factor": 1.0, "dropout": 0.0, "act_fn": "silu"})
    LdmVAE({**TINY_VAE, "force_upcast": False, "shift_factor": None, "use_post_quant_conv": True})


# ----------------------------------------------------------------------- layering
def test_module_imports_neither_diffusers_nor_transformers():
    code = ("import sys, difflab.nets.ldm; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
