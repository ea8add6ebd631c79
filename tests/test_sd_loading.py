"""SD v1 loading: both file forms, carried configs, no network, clear errors.

The single-file form needs CompVis key names. The test writes them from tiny diffusers
models with its own diffusers -> CompVis key mapping (written here, independent of the
diffusers conversion the product uses), then checks that loading gives back exactly
the same weights.
"""
import json
import socket

import pytest
import torch

from difflab.sd import load as sdmod
from difflab.sd.load import UNetDenoiser, load_sd, read_config, schedule_from_config
from difflab.testing import save_tiny_sd

# ------------------------------------------------------------ diffusers -> CompVis keys
RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise AssertionError(rest)


def unet_to_ldm(state, layers_per_block: int):
    L = layers_per_block
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in state.items():
        head, _, leaf = k.rpartition(".")
        p = k.split(".")
        if head in fixed:
            new = f"{fixed[head]}.{leaf}"
        elif p[0] == "down_blocks":
            b = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{1 + b * (L + 1) + L}.0.op.{leaf}"
            else:
                i = 1 + b * (L + 1) + int(p[3])
                rest = ".".join(p[4:])
                new = f"input_blocks.{i}.0.{_resnet(rest)}" if p[2] == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = f"middle_block.{2 * int(p[2])}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b = int(p[1])
            has_attn = any(x.startswith(f"up_blocks.{b}.attentions.") for x in state)
            if p[2] == "upsamplers":
                new = f"output_blocks.{b * (L + 1) + L}.{2 if has_attn else 1}.conv.{leaf}"
            else:
                i = b * (L + 1) + int(p[3])
                rest = ".".join(p[4:])
                new = f"output_blocks.{i}.0.{_resnet(rest)}" if p[2] == "resnets" else f"output_blocks.{i}.1.{rest}"
        else:
            raise AssertionError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(state, num_blocks: int):
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in state.items():
        p = k.split(".")
        if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
            new = k
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            j = i if p[1] == "down_blocks" else num_blocks - 1 - i
            level = "down" if p[1] == "down_blocks" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{level}.{j}.{'downsample' if level == 'down' else 'upsample'}.conv.{p[-1]}"
            else:
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{p[0]}.{level}.{j}.block.{p[4]}.{rest}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
            else:
                name = ".".join(p[4:-1])
                new = f"{p[0]}.mid.attn_1.{attn[name]}.{p[-1]}"
                if v.ndim == 2:
                    v = v[:, :, None, None]  # CompVis stores these 1x1 projections as convs
        else:
            raise AssertionError(k)
        out["first_stage_model." + new] = v
    return out


def to_compvis(unet, vae, text):
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    # SD v1 files name the text encoder's weights with a 'text_model.' level
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    return state


class TrainerCallback:  # stands for the pickled Python objects real .ckpt files carry
    def __init__(self):
        self.monitor = "val/loss"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    folder = save_tiny_sd(root / "diffusers", seed=0)
    ref = load_sd(folder)
    state = {k: v.clone() for k, v in to_compvis(ref.unet, ref.vae, ref.text_encoder).items()}
    state["betas"] = ref.schedule.betas.float()  # CompVis files carry their training schedule
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    torch.save({"state_dict": state, "global_step": 470000, "callbacks": {"ckpt": TrainerCallback()}}, root / "model.ckpt")
    return root, folder, ref


def assert_same_weights(a, b):
    for net_a, net_b in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sa, sb = net_a.state_dict(), net_b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_single_file_reproduces_diffusers_weights(tiny, name):
    root, folder, ref = tiny
    loaded = load_sd(root / name, config_dir=folder, tokenizer=folder / "tokenizer")
    assert_same_weights(loaded, ref)
    # and the same function: one UNet evaluation and one text encoding
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        cond = ref.encode_text(["a photo of a dog", "a cat"])
        assert torch.equal(loaded.encode_text(["a photo of a dog", "a cat"]), cond)
        assert torch.equal(UNetDenoiser(loaded.unet)(x, t, cond), ref.unet(x, t, encoder_hidden_states=cond).sample)
    assert loaded.latent_scale == pytest.approx(0.18215)
    assert loaded.resolution == 16 and loaded.steps_offset == 1


def test_ckpt_pickled_objects_need_no_trust(tiny):
    """weights_only=True refuses the file; the refused object is replaced, not run."""
    root, _, _ = tiny
    with pytest.raises(Exception):
        torch.load(root / "model.ckpt", weights_only=True)
    state = sdmod.read_state_dict(root / "model.ckpt")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "model.diffusion_model.input_blocks.0.0.weight" in state


def test_no_network_access(tiny, monkeypatch):
    root, folder, _ = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, *a))
    load_sd(folder)
    load_sd(root / "model.ckpt", config_dir=folder, tokenizer=folder / "tokenizer")
    # the tokenizer search (including the local HF cache lookup) stays offline too
    monkeypatch.setattr(sdmod, "CLIP_TOKENIZER_REPO", "difflab-test/no-such-tokenizer")
    monkeypatch.delenv(sdmod.TOKENIZER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer found"):
        load_sd(root / "model.ckpt", config_dir=folder)
    assert calls == []


def test_carried_configs_are_sd_v1(tmp_path):
    """The carried configs build networks of SD v1's published sizes, and the CompVis
    keys of those networks convert back onto them (all on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {n: read_config(n) for n in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        tcfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type")}
        text = CLIPTextModel(CLIPTextConfig(**tcfg))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    state = to_compvis(unet, vae, text)
    # names and shapes every SD v1.x checkpoint has
    assert state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    conv = sdmod.convert_ldm_state(state, cfg)
    conv["text_encoder"] = sdmod.fit_clip_keys(conv["text_encoder"], text)
    for name, net in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        assert sdmod.describe_mismatch(net, conv[name]) == ""
    sched = schedule_from_config(read_config("scheduler"))
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.equal(sched.betas, expected)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0046, abs=1e-4)  # SD v1's alpha_bar_999


def test_not_sd_v1_errors_name_the_file(tiny, tmp_path):
    from safetensors.torch import save_file

    root, folder, _ = tiny
    other = tmp_path / "classifier.safetensors"
    save_file({"conv1.weight": torch.zeros(6, 3, 5, 5)}, str(other))
    with pytest.raises(ValueError, match=r"classifier\.safetensors is not a Stable Diffusion v1 checkpoint"):
        load_sd(other, tokenizer=folder / "tokenizer")
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 2)}, str(sd2))
    with pytest.raises(ValueError, match=r"sd2\.safetensors .*SD 2"):
        load_sd(sd2)
    # the tiny checkpoint against the carried full-size SD v1 configs: shapes disagree
    with pytest.raises(ValueError, match=r"model\.safetensors \(unet\) is not a Stable Diffusion v1 checkpoint.*shape conflicts"):
        load_sd(root / "model.safetensors", tokenizer=folder / "tokenizer")
    state = sdmod.read_state_dict(root / "model.safetensors")
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    save_file(state, str(tmp_path / "other_schedule.safetensors"))
    with pytest.raises(ValueError, match=r"other_schedule\.safetensors: the betas stored in the checkpoint differ"):
        load_sd(tmp_path / "other_schedule.safetensors", config_dir=folder, tokenizer=folder / "tokenizer")
    garbage = tmp_path / "broken.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"broken\.ckpt"):
        load_sd(garbage)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_sd(tmp_path / "nowhere.ckpt")
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"half is not a diffusers-format SD folder: missing unet/config.json"):
        load_sd(half)


def test_single_file_without_tokenizer_says_how(tiny, tmp_path, monkeypatch):
    root, folder, _ = tiny
    monkeypatch.setattr(sdmod, "CLIP_TOKENIZER_REPO", "difflab-test/no-such-tokenizer")
    monkeypatch.delenv(sdmod.TOKENIZER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_sd(root / "model.safetensors", config_dir=folder)
    monkeypatch.setenv(sdmod.TOKENIZER_ENV, str(folder / "tokenizer"))
    assert len(load_sd(root / "model.safetensors", config_dir=folder).tokenizer) == len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))


def test_half_precision_is_refused_on_cpu():
    with pytest.raises(ValueError, match="fp16"):
        sdmod.parse_dtype("fp16", "cpu")
    assert sdmod.parse_dtype("bf16", "cuda") is torch.bfloat16


# ------------------------------------------------- difflab's own SD v1 networks (no diffusers)
@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_own_networks_read_the_file_diffusers_reads(tiny, name):
    """The same CompVis file into difflab.nets.ldm (keys as they are) and into diffusers'
    classes (keys converted by diffusers): the text states are identical, the UNet's eps
    and the VAE's images agree to float rounding (the VAE's attention is summed in
    another order: a few 1e-6)."""
    root, folder, ref = tiny
    own = load_sd(root / name, config_dir=folder, tokenizer=folder / "tokenizer", networks="ldm")
    theirs = load_sd(root / name, config_dir=folder, tokenizer=folder / "tokenizer", networks="diffusers")
    assert type(own.unet).__name__ == "LdmUNet" and type(theirs.unet).__name__ == "UNet2DConditionModel"
    assert (own.resolution, own.latent_channels, own.latent_scale, own.text_width) == \
        (theirs.resolution, theirs.latent_channels, theirs.latent_scale, theirs.text_width)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 977])
    with torch.no_grad():
        cond = own.encode_text(["a photo of the dog", "a house"])
        assert torch.equal(cond, theirs.encode_text(["a photo of the dog", "a house"]))
        eps = UNetDenoiser(own.unet)(x, t, cond)
        ref_eps = UNetDenoiser(theirs.unet)(x, t, cond)
        assert eps.abs().max() > 0.1
        torch.testing.assert_close(eps, ref_eps, rtol=0, atol=1e-5)
        torch.testing.assert_close(own.decode(x), theirs.decode(x), rtol=0, atol=1e-5)


def test_networks_choice_and_its_errors(tiny, monkeypatch):
    root, folder, ref = tiny
    monkeypatch.setenv(sdmod.NETWORKS_ENV, "keras")
    with pytest.raises(ValueError, match="DIFFLAB_SD_NETWORKS must be one of auto, diffusers, ldm, got 'keras'"):
        load_sd(root / "model.ckpt", config_dir=folder, tokenizer=folder / "tokenizer")
    monkeypatch.setenv(sdmod.NETWORKS_ENV, "ldm")
    assert sdmod.networks_kind() == "ldm" and sdmod.networks_kind("diffusers") == "diffusers"
    with pytest.raises(ModuleNotFoundError, match=r"diffusers-format folder, which needs diffusers' networks, but DIFFLAB_SD_NETWORKS=ldm reads"):
        load_sd(folder)
    monkeypatch.delenv(sdmod.NETWORKS_ENV)
    assert sdmod.networks_kind() == "diffusers"  # installed here
    real = sdmod.importlib.util.find_spec
    monkeypatch.setattr(sdmod.importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert sdmod.networks_kind() == "ldm"  # the course environment: no diffusers
    with pytest.raises(ModuleNotFoundError, match="DIFFLAB_SD_NETWORKS=diffusers, but diffusers is not installed"):
        sdmod.networks_kind("diffusers")


def test_config_dir_from_the_environment(tiny, monkeypatch):
    """$DIFFLAB_SD_CONFIG stands for --config-dir (hw2_3.sh passes only the checkpoint)."""
    root, folder, ref = tiny
    with pytest.raises(ValueError, match="model.ckpt"):  # the carried SD v1 configs do not fit the tiny file
        load_sd(root / "model.ckpt", tokenizer=folder / "tokenizer", networks="ldm")
    monkeypatch.setenv(sdmod.CONFIG_ENV, str(folder))
    assert_same_weights(load_sd(root / "model.ckpt", tokenizer=folder / "tokenizer"), ref)
