"""Options of ``difflab ti train`` (``TrainConfig``) and ``difflab ti generate``
(``GenerateConfig``); the command line is built from these fields."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from difflab.io import check_fresh_output, check_output, read_templates
from difflab.options import (
    Config,
    device_option,
    guidance_scale_option,
    mixed_precision_option,
    option,
    out_option,
    overwrite_option,
    quiet_option,
    resume_option,
    seed_option,
)
from difflab.personalize.templates import TEMPLATES
from difflab.sampling import SAMPLERS

# The Stable Diffusion loading options, shared by train and generate.
SD_HELP = (
    "Stable Diffusion v1.x: an original single-file checkpoint (sd-v1-4.ckpt or .safetensors, "
    "CompVis key names), a diffusers-format folder with unet/ vae/ text_encoder/ tokenizer/, or the Hugging Face "
    "id of such a folder already in the local cache (e.g. CompVis/stable-diffusion-v1-4; never downloaded). "
    "A single file is read into diffusers' networks when diffusers is installed, else into difflab's own SD v1 "
    "UNet and VAE ($DIFFLAB_SD_NETWORKS=diffusers|ldm chooses)"
)
TOKENIZER_HELP = (
    "folder with the CLIP tokenizer's vocab.json and merges.txt (or the Hugging Face id of one in the local "
    "cache). A single-file checkpoint carries no "
    "tokenizer; without this option it is taken from $DIFFLAB_SD_TOKENIZER, a tokenizer/ folder beside "
    "the checkpoint, or the local Hugging Face cache of openai/clip-vit-large-patch14 (never downloaded)"
)
CONFIG_HELP = (
    "folder with unet, vae, text_encoder (and scheduler) configs as NAME.json or NAME/config.json, for a "
    "single-file checkpoint of another size (none: $DIFFLAB_SD_CONFIG, else the SD v1 configs carried by difflab)"
)
EMBEDDINGS_HELP = "learned embedding files (token -> [n, width])"


@dataclass
class TrainConfig(Config):
    """Options of ``difflab ti train``."""

    sd: str = option(help=SD_HELP)
    concept_dir: str = option(help="folder of images of the concept (.jpg .jpeg .png .webp .bmp). An image may have a "
                              "caption file beside it, the same name ending in .txt (00.png: 00.txt), in the "
                              "--templates format; its templates replace the others for that image, e.g. to name "
                              "what the image shows besides the concept")
    token: str = option(help='the new token, e.g. "<new1>" (must not be in the vocabulary)')
    init_word: str = option(help="word whose embedding initialises the token, e.g. dog or painting")
    out: str = out_option("output .safetensors: {token: [num_vectors, width]}, readable by diffusers' "
                          "load_textual_inversion; the resume state OUT.state.safetensors is written beside it")
    property: str = option("object", "caption templates: an object ('a photo of a <tok>') or a style "
                           "('a painting in the style of <tok>')", choices=tuple(TEMPLATES))
    templates: Optional[str] = option(None, "caption templates to train with instead of --property's: a text file, "
                                      "one template per line with {} where the token goes (blank lines and # "
                                      "comments skipped)", metavar="FILE")
    num_vectors: int = option(1, "embedding vectors for the token; >1 adds tokens TOKEN_1 .. TOKEN_{n-1}", minimum=1)
    steps: int = option(3000, "optimisation steps", minimum=1)
    lr: float = option(2e-3, "AdamW learning rate", above=0.0)
    weight_decay: float = option(1e-2, "AdamW weight decay on the new rows", minimum=0.0)
    batch_size: int = option(4, "images per step, per process", minimum=1)
    resolution: Optional[int] = option(None, "training image size (none: the model's native size, 512 for SD v1)",
                                       minimum=8)
    flip_p: float = option(0.5, "probability that a training image is mirrored left-right (0.5: as SD textual "
                           "inversion usually trains); use 0 when a mirror changes the concept: digits, letters, "
                           "text, asymmetric objects", minimum=0.0, maximum=1.0)
    seed: int = seed_option()
    resume: bool = resume_option()
    overwrite: bool = overwrite_option("; here: an embedding file --out that exists already, with the earlier run's "
                                       "files beside it (resume state, snapshots, validation grids); without it, or "
                                       "--resume, such an --out is refused")
    embeddings: List[str] = option([], "other learned embeddings to load (frozen), so several concepts live in one "
                                   "model", metavar="FILE")
    validation_prompt: Optional[str] = option(None, "prompt for validation images (use the token in it); "
                                              "none: no validation")
    validation_every: int = option(500, "steps between validation grids", minimum=1)
    validation_images: int = option(4, "images per validation grid", minimum=1)
    validation_steps: int = option(50, "DDIM steps for validation images", minimum=1)
    guidance_scale: float = guidance_scale_option(7.5, ", for validation images")
    save_every: int = option(500, "steps between embedding snapshots OUT-stepNNNNNN.safetensors and the resume state",
                             minimum=1)
    mixed_precision: str = mixed_precision_option()
    device: str = device_option(" (several GPUs: `accelerate launch`)")
    tokenizer: Optional[str] = option(None, TOKENIZER_HELP)
    config_dir: Optional[str] = option(None, CONFIG_HELP)
    quiet: bool = quiet_option()

    def validate(self) -> None:
        super().validate()
        if self.templates is not None:
            read_templates(self.templates)
        if Path(self.out).suffix != ".safetensors":
            raise ValueError(f"out must end in .safetensors, got {self.out!r}")
        check_output(self.out, "file", "out")
        check_distinct_files(self.embeddings, "embeddings")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run that wrote out, "
                             "overwrite starts it afresh")
        if not (self.resume or self.overwrite):
            check_fresh_file(self.out, "out", [state_path(self.out)])


@dataclass
class GenerateConfig(Config):
    """Options of ``difflab ti generate``."""

    json: str = option(help="the course's input.json: {key: {token_name, prompt: [...]}}")
    out: str = out_option("output folder: OUT/KEY/P/sourceKEY_promptP_I.png")
    overwrite: bool = overwrite_option()
    sd: Optional[str] = option(None, SD_HELP + " (none: the shipped mini model trained on captioned digits, "
                               "src/difflab/assets/mini_sd, see `difflab t2i train`, with its shipped embeddings)")
    embeddings: Tuple[str, ...] = option((), EMBEDDINGS_HELP + "; they win over the ones shipped in "
                                         "difflab/assets/embeddings", metavar="FILE")
    guidance_scale: float = guidance_scale_option(7.5)
    sampler: str = option("ddim", "ddim, dpmpp-2m (DPM-Solver++(2M)), unipc (UniPC) or ddpm (all T steps)",
                          choices=SAMPLERS)
    steps: int = option(50, "sampling steps", minimum=1)
    images_per_prompt: int = option(25, "images per prompt", minimum=1)
    batch_size: int = option(5, "images per forward pass. Each image starts from the noise of its own seed, so the "
                             "batch size changes it only through floating-point rounding (batched convolutions "
                             "round differently): a few pixels may differ by one of 255 levels", minimum=1)
    seed: int = seed_option()
    height: Optional[int] = option(None, "image height (none: the model's native size, 512 for SD v1)", minimum=8)
    width: Optional[int] = option(None, "image width (none: the model's native size)", minimum=8)
    device: str = device_option()
    dtype: str = option("fp32", "network precision; fp16 and bf16 on a GPU only", choices=("fp32", "fp16", "bf16"))
    tokenizer: Optional[str] = option(None, TOKENIZER_HELP)
    config_dir: Optional[str] = option(None, CONFIG_HELP)
    quiet: bool = quiet_option()

    def validate(self) -> None:
        super().validate()
        check_output(self.out, "dir", "out")
        check_fresh_output(self.out, "out", self.overwrite)
        check_distinct_files(self.embeddings, "embeddings")


def state_path(out) -> Path:
    """The resume state of the run that writes embedding file ``out``: ``NAME.state.safetensors`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".state.safetensors")


def check_fresh_file(path, what: str, companions=()) -> None:
    """Refuse (FileExistsError) to start a new run whose output file ``path`` (or one of
    ``companions``, an earlier run's files beside it) exists already."""
    for p in [Path(path), *map(Path, companions)]:
        if p.exists():
            found = f"{what} {path} already exists" if p == Path(path) else f"{what} {path}: an earlier run left {p}"
            raise FileExistsError(f"{found}; pass --resume to continue that run, --overwrite to replace it, or choose "
                                  f"another {what}")


def check_distinct_files(files, name: str) -> None:
    """Raise when one file is listed twice in ``files`` (field ``name``), however spelled."""
    seen = {}
    for f in files:
        p = Path(f)
        key = p.resolve() if p.exists() else p
        if key in seen:
            same = f"{f} is given twice" if str(seen[key]) == str(f) else f"{seen[key]} and {f} are one file, given twice"
            raise ValueError(f"{name}: {same}; give each file once")
        seen[key] = f
