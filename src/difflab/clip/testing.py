"""Randomly initialised CLIP folders for tests and benchmarks (no weights exist offline).

``save_random_clip(folder, "tiny")`` writes a complete Hugging Face CLIP folder (config,
safetensors weights, CLIPImageProcessor with CLIP's default 224 preprocessing, and a
CLIPTokenizer) that ``load_clip`` reads exactly as it reads a downloaded
``openai/clip-vit-base-patch32``. ``"vit-b-32"`` uses that model's real dimensions.

The tokenizer vocabulary is byte-level with no merges: the 256 byte symbols, each also
with CLIP's end-of-word suffix ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>``.
Every string therefore tokenizes (one token per byte) without an unknown token.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

PathLike = Union[str, os.PathLike]

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


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the other bytes are mapped, in order,
    to code points 256, 257, ...
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_byte_tokenizer(folder: PathLike) -> int:
    """Write vocab.json + merges.txt + tokenizer settings for a byte-level CLIPTokenizer; return the vocab size."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    syms = byte_symbols()
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
