"""Random models with the real architectures, for tests and benchmarks only (no
weights can be downloaded here); product code never imports this module.

- Tiny SD v1-style models: the same classes and layout as SD v1 (CLIPTokenizer +
  CLIPTextModel, UNet2DConditionModel with cross-attention blocks, AutoencoderKL), a few
  hundred thousand weights, with a BPE vocabulary over ``TINY_WORDS``.
- Random CLIP folders: ``save_random_clip(folder, "tiny")`` writes a complete Hugging
  Face CLIP folder (config, safetensors weights, CLIPImageProcessor with CLIP's default
  224 preprocessing, a CLIPTokenizer) that ``load_clip`` reads exactly as it reads a
  downloaded ``openai/clip-vit-base-patch32``; ``"vit-b-32"`` uses that model's real
  dimensions. Its vocabulary is byte-level with no merges (the 256 byte symbols, each
  also with ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>``), so every string
  tokenizes without an unknown token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from difflab.io import PathLike, atomic_path
from difflab.sd.tokenizer import bytes_to_unicode, write_clip_vocab

TINY_WORDS = (
    "a photo of the dog cat in style on an painting picture digit textured background house number sign "
    "shepherd posing proudly hilltop with mount fuji perched park bench colosseum looming behind streets "
    "paris manhattan skyline rendering close up small big toy clean dirty cropped"
).split()

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    norm_num_groups=32, sample_size=16, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def tiny_tokenizer(folder: PathLike, model_max_length: int = TINY_TEXT["max_position_embeddings"]):
    from transformers import CLIPTokenizer

    write_clip_vocab(folder, TINY_WORDS)
    tok = CLIPTokenizer(
        str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=model_max_length,
    )
    tok.save_pretrained(str(folder))
    return tok


def tiny_components(folder: PathLike, seed: int = 0):
    """Random tiny (unet, vae, text_encoder, tokenizer); the tokenizer files go to ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1, **TINY_TEXT))
    return unet.eval(), vae.eval(), text.eval(), tok


def save_tiny_sd(folder: PathLike, seed: int = 0) -> Path:
    """Write a tiny random SD model as a diffusers-format folder; return it."""
    folder = Path(folder)
    unet, vae, text, tok = tiny_components(folder / "tokenizer", seed)
    unet.save_pretrained(str(folder / "unet"))
    vae.save_pretrained(str(folder / "vae"))
    text.save_pretrained(str(folder / "text_encoder"))
    tok.save_pretrained(str(folder / "tokenizer"))
    return folder


# ------------------------------------------------------------------ random CLIP
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def write_byte_tokenizer(folder: PathLike) -> int:
    """Write vocab.json + merges.txt + tokenizer settings for a byte-level CLIPTokenizer; return the vocab size."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    syms = list(bytes_to_unicode().values())
    tokens = syms + [s + "</w>" for s in syms] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(folder)
    return len(vocab)


def clip_config(size: str = "tiny", vocab_size: int = 514):
    """A CLIPConfig: ``"tiny"`` (hidden 32, 2 layers) or ``"vit-b-32"`` (openai/clip-vit-base-patch32 dimensions)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    bos, eos = vocab_size - 2, vocab_size - 1  # the byte tokenizer's special tokens are its last two ids
    text_ids = dict(vocab_size=vocab_size if size == "tiny" else max(vocab_size, 49408), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, max_position_embeddings=77)
    if size == "tiny":
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **text_ids)
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
        )
        proj = 16
    elif size == "vit-b-32":
        text = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, **text_ids)
        vision = CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32
        )
        proj = 512
    else:
        raise ValueError(f"unknown random CLIP size {size!r}: expected 'tiny' or 'vit-b-32'")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)


def save_random_clip(folder: PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised CLIP model folder (model, image processor, tokenizer) and return it."""
    from transformers import CLIPModel

    folder = Path(folder)
    vocab_size = write_byte_tokenizer(folder)
    config = clip_config(size, vocab_size)
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG; keep the caller's intact
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # The layout of the released openai/clip-vit-base-patch32 preprocessor_config.json (legacy
    # feature-extractor keys): shortest side 224, bicubic (PIL resample 3), centre crop 224.
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2) + "\n")
    return folder


# ------------------------------------------------------- tiny CompVis-format SD checkpoint
def tiny_text_config(vocab_size: int) -> dict:
    """The tiny CLIP text encoder's settings, as a ``text_encoder.json`` for ``config_dir``
    (only keys every transformers release since 4.19 reads the same way)."""
    return dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1, **TINY_TEXT)


def save_compvis(folder: PathLike, unet_config: dict, vae_config: dict, text_config: Optional[dict] = None,
                 seed: int = 0, scale: float = 0.0) -> Path:
    """Write a random SD v1-style model in the original single-file form:
    ``folder/model.ckpt`` (``{"state_dict": ...}`` with CompVis key names, the text
    encoder's ``text_model.`` level and ``position_ids`` as SD v1 files have them, betas
    included), a ``tokenizer/`` over ``TINY_WORDS`` beside it, and ``folder/configs/``
    ({unet,vae,text_encoder}.json) for ``config_dir`` / ``$DIFFLAB_SD_CONFIG``; return the
    checkpoint's path. ``text_config`` None: ``tiny_text_config`` for the tokenizer.

    With ``scale`` > 0 every float weight is perturbed by ``scale`` * N(0, 1), so that
    layers initialised to zero carry signal through a comparison of two implementations."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from difflab.nets.ldm import LdmUNet, LdmVAE
    from difflab.sd.load import read_config, schedule_from_config

    folder = Path(folder)
    positions = (text_config or TINY_TEXT)["max_position_embeddings"]
    tok = tiny_tokenizer(folder / "tokenizer", model_max_length=positions)
    configs = {"unet": unet_config, "vae": vae_config, "text_encoder": text_config or tiny_text_config(len(tok))}
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        (folder / "configs" / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix, build in (("model.diffusion_model.", lambda: LdmUNet(unet_config)),
                              ("first_stage_model.", lambda: LdmVAE(vae_config)),
                              ("cond_stage_model.transformer.", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)))):
            for key, value in build().state_dict().items():
                if prefix.startswith("cond") and not key.startswith("text_model."):
                    key = "text_model." + key  # the level SD v1 files carry (transformers 5 drops it)
                if scale and value.is_floating_point():
                    value = value + scale * torch.randn_like(value)
                state[prefix + key] = value.detach()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    state["betas"] = schedule_from_config(read_config("scheduler")).betas.float()
    path = folder / "model.ckpt"
    with atomic_path(path) as tmp:  # a reader (a benchmark reusing the file) never sees half of it
        torch.save({"state_dict": state, "global_step": 0}, tmp)
    return path


def save_tiny_compvis(folder: PathLike, seed: int = 0, scale: float = 0.05) -> Path:
    """``save_compvis`` with the tiny configs (``TINY_UNET``, ``TINY_VAE``, the tiny text
    encoder), its weights perturbed by ``scale``."""
    return save_compvis(folder, TINY_UNET, TINY_VAE, seed=seed, scale=scale)
