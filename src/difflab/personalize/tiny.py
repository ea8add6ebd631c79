"""Tiny random SD v1-style models, for tests and the small-network benchmark.

Same classes and layout as SD v1 (CLIPTokenizer + CLIPTextModel, UNet2DConditionModel
with cross-attention down/up blocks, AutoencoderKL), a few hundred thousand weights.
The tokenizer's BPE vocabulary is written here from a word list, in CLIP's format
(byte-level symbols, ``</w>`` marks the end of a word).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Union

import torch

PathLike = Union[str, os.PathLike]

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


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols: merge the lowest-ranked adjacent pair
    until no pair has a merge (the rule CLIP's tokenizer applies)."""
    word = list(word)
    while len(word) > 1:
        known = [(ranks[p], i) for i, p in enumerate(zip(word, word[1:])) if p in ranks]
        if not known:
            break
        _, first = min(known)
        a, b = word[first], word[first + 1]
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def write_clip_vocab(folder: PathLike, words: Iterable[str] = TINY_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a CLIP-format BPE over ``words``.

    Each word first gets what the merges so far make of it, then new merges that join
    those pieces left to right; later merges rank after earlier ones, so every listed
    word encodes to one token. Other text falls back to shorter pieces.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab)
    for word in words:
        if len(word) < 2:
            continue
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        cur = pieces[0]
        for nxt in pieces[1:]:
            pair, merged = (cur, nxt), cur + nxt
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            cur = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def tiny_tokenizer(folder: PathLike):
    from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    tok = CLIPTokenizer(
        str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=TINY_TEXT["max_position_embeddings"],
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
