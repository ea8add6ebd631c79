"""The course's Problem 3 generation: every prompt of every concept, N images each.

Layout: ``OUT/{key}/{p}/source{key}_prompt{p}_{i}.png`` for each concept key of the JSON,
each prompt index p of its ``prompt`` list and i = 0 .. images_per_prompt - 1.

Sampling is our DDIM (``difflab.sampling.ddim_sample``, eta = 0) on SD's training
schedule, with classifier-free guidance (``difflab.guidance.guided``; SD's guidance
scale s is w = s - 1 there). Steps are ``ddim_timesteps(1000, steps, offset)`` with SD
v1's ``steps_offset = 1`` (981, 961, ..., 1 for 50 steps), and the last step lands on
alpha_bar_0 as in CompVis' DDIM sampler and diffusers' ``set_alpha_to_one=False``.

Each image has its own seed, derived from (seed, key, p, i); its starting noise is
drawn from a CPU generator with that seed, so an image does not depend on the batch
it is in or on the device (up to the network's own floating-point behaviour).
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from difflab.guidance import guided
from difflab.imageio import save_png
from difflab.sampling import ddim_sample, ddim_timesteps

PathLike = Union[str, os.PathLike]
SHIPPED_EMBEDDINGS = Path(__file__).resolve().parents[1] / "assets" / "embeddings"
# The mini SD-format model trained on captioned digits (``difflab t2i train``): the
# model ``ti generate`` uses when no --sd is given.
SHIPPED_MINI_SD = Path(__file__).resolve().parents[1] / "assets" / "mini_sd"


@dataclass(frozen=True)
class Concept:
    key: str
    token: str
    prompts: Tuple[str, ...]


def read_prompt_json(path: PathLike) -> List[Concept]:
    """The course's ``input.json``: ``{key: {"token_name": str, "prompt": [str, ...], ...}}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt JSON not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty object of concepts, got {type(data).__name__}")
    concepts = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: concept {key!r} must be an object, got {type(entry).__name__}")
        for field in ("token_name", "prompt"):
            if field not in entry:
                raise ValueError(f"{path}: concept {key!r} has no {field!r}")
        token, prompts = entry["token_name"], entry["prompt"]
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"{path}: concept {key!r} token_name must be a non-empty string, got {token!r}")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: concept {key!r} prompt must be a non-empty list of strings, got {prompts!r}")
        if any(c in str(key) for c in "/\\") or str(key) in (".", ".."):
            raise ValueError(f"{path}: concept key {key!r} cannot be a folder name")
        concepts.append(Concept(str(key), token, tuple(prompts)))
    return concepts


def embedding_files(extra: Sequence[PathLike] = ()) -> Tuple[List[Path], List[Path]]:
    """(explicit files, shipped files): ``extra`` as given, then every
    ``assets/embeddings/**/*.safetensors`` shipped with the package."""
    explicit = [Path(p) for p in extra]
    for p in explicit:
        if not p.is_file():
            raise FileNotFoundError(f"embedding file not found: {p}")
    shipped = sorted(SHIPPED_EMBEDDINGS.rglob("*.safetensors")) if SHIPPED_EMBEDDINGS.is_dir() else []
    return explicit, shipped


def find_embeddings(tokens: Sequence[str], width: int, extra: Sequence[PathLike] = (), prompts: Sequence[str] = ()) -> Dict[str, Tensor]:
    """token -> [n, width] for every token in ``tokens`` (required) and every other known
    token that appears in ``prompts``.

    Files given in ``extra`` win; among shipped files, the first with the right width
    is used. A required token that is missing, or only found with another width, is an
    error naming the files searched.
    """
    from difflab.personalize.textual_inversion import read_embedding_file

    explicit, shipped = embedding_files(extra)
    chosen: Dict[str, Tuple[Tensor, Path]] = {}
    for f in explicit:
        for tok, vec in read_embedding_file(f).items():
            if tok in chosen:
                raise ValueError(f"token {tok!r} is in two embedding files: {chosen[tok][1]} and {f}")
            if vec.shape[1] != width:
                raise ValueError(f"embedding file {f}: {tok!r} has width {vec.shape[1]}, but the text encoder's is {width}")
            chosen[tok] = (vec, f)
    wrong_width: Dict[str, List[str]] = {}
    for f in shipped:
        for tok, vec in read_embedding_file(f).items():
            if tok in chosen:
                continue
            if vec.shape[1] != width:
                wrong_width.setdefault(tok, []).append(f"{f} (width {vec.shape[1]})")
                continue
            chosen[tok] = (vec, f)
    for tok in tokens:
        if tok not in chosen:
            searched = [str(p) for p in explicit] + [f"{SHIPPED_EMBEDDINGS}/**/*.safetensors ({len(shipped)} files)"]
            if tok in wrong_width:
                raise ValueError(
                    f"embedding for {tok!r} has the wrong width for this text encoder ({width}): {'; '.join(wrong_width[tok])}"
                )
            raise ValueError(f"no embedding for token {tok!r}; searched {', '.join(searched)}. Pass --embeddings FILE")
    wanted = set(tokens) | {tok for tok in chosen if any(tok in p for p in prompts)}
    return {tok: chosen[tok][0] for tok in sorted(wanted)}


def image_seed(seed: int, key: str, prompt_index: int, image_index: int) -> int:
    """The seed of one image: CRC-32 of ``"{seed}/{key}/{p}/{i}"`` (stable across runs)."""
    return zlib.crc32(f"{seed}/{key}/{prompt_index}/{image_index}".encode())


def initial_noise(seeds: Sequence[int], shape: Tuple[int, int, int]) -> Tensor:
    """[B, C, h, w] standard normal noise, one CPU generator per seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(
    sd,
    prompt: str,
    seeds: Sequence[int],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    progress: bool = False,
) -> Tensor:
    """DDIM with classifier-free guidance for one prompt: latents [B, C, h, w] (float32).

    :param guidance: SD's guidance scale s (1 = no guidance); ``guided`` gets w = s - 1,
        with the empty prompt "" as the unconditional condition.
    """
    from difflab.personalize.sd import UNetDenoiser

    height = height or sd.resolution
    width = width or sd.resolution
    f = sd.vae_downsample
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    b = len(seeds)
    x_T = initial_noise(seeds, (sd.latent_channels, height // f, width // f)).to(sd.device)
    cond = sd.encode_text([prompt] * b)
    uncond = sd.encode_text([""] * b)
    denoiser = guided(UNetDenoiser(sd.unet), guidance - 1.0, uncond)
    ts = ddim_timesteps(sd.schedule.num_steps, steps, offset=sd.steps_offset)
    return ddim_sample(denoiser, sd.schedule, x_T, ts, cond, eta=0.0, last_prev=0, progress=progress)


@torch.no_grad()
def sample_images(sd, prompt: str, seeds: Sequence[int], **kwargs) -> Tensor:
    """``sample_latents`` then the VAE decoder: [B, 3, H, W] in [0, 1] (float32, CPU)."""
    return sd.decode(sample_latents(sd, prompt, seeds, **kwargs)).cpu()


def output_path(out: PathLike, key: str, p: int, i: int) -> Path:
    return Path(out) / key / str(p) / f"source{key}_prompt{p}_{i}.png"


@dataclass
class GenerateConfig:
    """Options of ``difflab ti generate`` (the CLI is built from these fields)."""

    json: str
    out: str
    sd: Optional[str] = None  # None: the shipped mini model (SHIPPED_MINI_SD)
    embeddings: Tuple[str, ...] = ()
    guidance: float = 7.5
    steps: int = 50
    images_per_prompt: int = 25
    batch_size: int = 5
    seed: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    device: Optional[str] = None
    dtype: str = "fp32"
    tokenizer: Optional[str] = None
    config_dir: Optional[str] = None
    quiet: bool = False

    def validate(self) -> None:
        for name in ("steps", "images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if Path(self.out).is_file():
            raise ValueError(f"output {self.out} is a file; expected a folder")


def generate_from_json(cfg: GenerateConfig, sd=None) -> List[Path]:
    """Validate everything, then write every image of the course layout; return the paths."""
    from tqdm.auto import tqdm

    from difflab.personalize.sd import load_sd, parse_dtype
    from difflab.personalize.textual_inversion import add_concept

    cfg.validate()
    concepts = read_prompt_json(cfg.json)
    explicit, _ = embedding_files(cfg.embeddings)  # missing files fail before the model loads
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(cfg.dtype, device)
    if sd is None:
        sd_path = cfg.sd
        if sd_path is None:
            if not (SHIPPED_MINI_SD / "unet" / "config.json").is_file():
                raise FileNotFoundError(
                    f"no --sd given and the shipped mini model is missing at {SHIPPED_MINI_SD}; "
                    "pass --sd with a Stable Diffusion checkpoint or train one with `difflab t2i train`"
                )
            sd_path = str(SHIPPED_MINI_SD)
        sd = load_sd(sd_path, tokenizer=cfg.tokenizer, config_dir=cfg.config_dir, device=device, dtype=dtype)
    prompts = [p for c in concepts for p in c.prompts]
    vectors = find_embeddings(sorted({c.token for c in concepts}), sd.text_width, explicit, prompts)
    known = set(sd.concepts.tokens) if sd.concepts is not None else set()
    for tok, vec in vectors.items():
        if tok not in known:
            add_concept(sd, tok, vec.to(sd.device), trainable=False)
    sd.text_encoder.to(dtype)
    height = cfg.height or sd.resolution
    width = cfg.width or sd.resolution
    if height % sd.vae_downsample or width % sd.vae_downsample:
        raise ValueError(f"--height/--width must be multiples of {sd.vae_downsample}, got {height}x{width}")

    jobs = [(c, p, prompt) for c in concepts for p, prompt in enumerate(c.prompts)]
    total = len(jobs) * cfg.images_per_prompt
    written: List[Path] = []
    bar = tqdm(total=total, desc="ti generate", unit="img", disable=cfg.quiet)
    for c, p, prompt in jobs:
        indices = list(range(cfg.images_per_prompt))
        for start in range(0, len(indices), cfg.batch_size):
            chunk = indices[start : start + cfg.batch_size]
            seeds = [image_seed(cfg.seed, c.key, p, i) for i in chunk]
            images = sample_images(sd, prompt, seeds, steps=cfg.steps, guidance=cfg.guidance, height=height, width=width)
            for i, img in zip(chunk, images):
                path = output_path(cfg.out, c.key, p, i)
                save_png(img, path)
                written.append(path)
            bar.update(len(chunk))
    bar.close()
    return written
