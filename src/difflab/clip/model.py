"""Load a CLIP model from a local Hugging Face folder and embed images and texts in batches.

The folder is what ``save_pretrained`` writes for ``openai/clip-vit-base-patch32``:
``config.json``, weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded),
``preprocessor_config.json`` and the tokenizer (``vocab.json`` + ``merges.txt`` or
``tokenizer.json``). Nothing is fetched from the network: the path must be a folder and
every ``from_pretrained`` call runs with ``local_files_only=True``.

Image preprocessing is the CLIPImageProcessor saved in the folder, run on its PIL backend
(the one the course grader's transformers 4.x used): resize the shortest side to 224 with
bicubic resampling, centre-crop 224 x 224, scale to [0, 1], normalise with CLIP's mean/std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from difflab.devices import resolve_device
from difflab.io import PathLike, open_rgb, resolve_model_path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
CLIP_HOW_TO_GET = (
    "expected a local Hugging Face folder such as a downloaded openai/clip-vit-base-patch32 (config.json, "
    "model.safetensors, preprocessor_config.json, tokenizer files): `hf download openai/clip-vit-base-patch32`, "
    "then pass that id or its folder; see docs/weights.md"
)


def check_clip_folder(path: PathLike) -> Path:
    """Raise a clear error naming ``path`` unless it holds a complete CLIP model folder."""
    path = resolve_model_path(path, "CLIP folder", CLIP_HOW_TO_GET)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP folder not found: {path} is a file; {CLIP_HOW_TO_GET}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(WEIGHT_FILES) + ")")
    if not (path / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if not any(all((path / f).is_file() for f in fs) for fs in TOKENIZER_FILE_SETS):
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(f"CLIP folder {path} is incomplete: missing " + "; ".join(missing))
    return path


def _pooled(out) -> Tensor:
    """transformers 4.x returns the projected features as a tensor, 5.x as ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _load_image_processor(path: Path):
    from transformers import AutoImageProcessor

    try:  # transformers >= 5: explicit backend selection
        return AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    except TypeError:  # pragma: no cover - transformers 4.x: the slow processor is the PIL one
        return AutoImageProcessor.from_pretrained(path, use_fast=False, local_files_only=True)


@dataclass
class Clip:
    """A loaded CLIP model with its image processor and tokenizer, in eval mode, fp32."""

    model: "torch.nn.Module"
    image_processor: object
    tokenizer: object
    device: torch.device
    path: Path

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): 100.0 for the released OpenAI weights."""
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> pixel_values [B, 3, 224, 224] exactly as the saved CLIPImageProcessor makes them."""
        rgb = [im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image_features(
        self,
        images: Sequence[Image.Image | PathLike],
        batch_size: int = 32,
        progress: bool = False,
        desc: str = "CLIP images",
    ) -> Tensor:
        """Unnormalised image embeddings [N, D] (float32, cpu); paths are opened one batch at a time."""
        from tqdm.auto import tqdm

        feats = []
        steps = range(0, len(images), batch_size)
        for i in tqdm(steps, desc=desc, disable=not progress, unit="batch", leave=False):
            batch = [open_rgb(x) if not isinstance(x, Image.Image) else x for x in images[i : i + batch_size]]
            pixels = self.preprocess(batch).to(self.device, torch.float32)
            feats.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        if not feats:
            return torch.empty(0, self.model.config.projection_dim)
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Unnormalised text embeddings [N, D] (float32, cpu). Texts longer than the model's
        context (77 tokens for CLIP) are truncated."""
        feats = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            out = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            feats.append(_pooled(out).float().cpu())
        if not feats:
            return torch.empty(0, self.model.config.projection_dim)
        return torch.cat(feats)


def load_clip(path: PathLike, device: str | torch.device | None = "auto") -> Clip:
    """Load CLIPModel + its image processor + tokenizer from a local folder; never touches the network."""
    path = check_clip_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPModel, CLIPTokenizer

    dev = resolve_device(device)
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        processor = _load_image_processor(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load CLIP from {path}: {e}") from None
    model = model.to(dev).float().eval()
    return Clip(model=model, image_processor=processor, tokenizer=tokenizer, device=dev, path=path)

