"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word").

A new token S* gets an embedding v* (``num_vectors`` rows of width d); everything else
is frozen. Training minimises the latent-diffusion loss (Gal et al. eq. 2)

    v* = argmin_v  E_{z ~ E(x), y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

with y a caption template holding S*. Only v* is handed to the optimizer: the new rows
are a separate ``nn.Parameter`` spliced into the token-embedding lookup
(``ConceptEmbedding``), so the original embedding matrix and every network weight are
frozen by construction, not restored after each step.

Embedding files are safetensors mapping token -> [num_vectors, d] (the layout
diffusers' ``load_textual_inversion`` reads). A token with n > 1 vectors is expanded in
prompts to ``tok tok_1 ... tok_{n-1}`` (diffusers' naming for multi-vector tokens).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from difflab.checkpoint import save_tensors
from difflab.personalize.templates import TEMPLATES

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ------------------------------------------------------------------ the spliced lookup
class ConceptEmbedding(nn.Module):
    """A token-embedding lookup: the frozen original table plus added concept rows.

    ``base`` keeps its original rows (never given to an optimizer); each concept is one
    ``nn.Parameter`` [n, d] registered as ``concept_{k}``. Token ids of added tokens map
    to rows of these parameters; every other id reads ``base``.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.tokens: List[str] = []  # concept token per parameter
        self.names: List[List[str]] = []  # tokenizer tokens per concept (tok, tok_1, ...)
        self.ids: List[List[int]] = []

    @property
    def weight(self) -> Tensor:
        """The original table (callers that inspect ``.weight`` see the frozen rows)."""
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def concept(self, token: str) -> nn.Parameter:
        if token not in self.tokens:
            raise KeyError(f"no concept {token!r}; have {self.tokens}")
        return getattr(self, f"concept_{self.tokens.index(token)}")

    def add(self, token: str, names: List[str], ids: List[int], vectors: Tensor, trainable: bool) -> nn.Parameter:
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"embedding for {token!r} must be [n, {self.embedding_dim}], got {tuple(vectors.shape)}")
        param = nn.Parameter(vectors.detach().clone().to(self.base.weight), requires_grad=trainable)
        self.register_parameter(f"concept_{len(self.tokens)}", param)
        self.tokens.append(token)
        self.names.append(list(names))
        self.ids.append(list(ids))
        return param

    def expand_prompt(self, prompt: str) -> str:
        """Write each multi-vector token ``tok`` as ``tok tok_1 ... tok_{n-1}``."""
        for token, names in zip(self.tokens, self.names):
            if len(names) > 1:
                prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda m: " ".join(names), prompt)
        return prompt

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.base(torch.where(input_ids < self.base.num_embeddings, input_ids, torch.zeros_like(input_ids)))
        if not self.tokens:
            return out
        table = torch.cat([getattr(self, f"concept_{k}").to(out.dtype) for k in range(len(self.tokens))])
        all_ids = torch.tensor([i for ids in self.ids for i in ids], device=input_ids.device)
        match = input_ids.unsqueeze(-1) == all_ids  # [..., K]
        is_new = match.any(-1, keepdim=True)
        rows = table[match.float().argmax(-1)]  # row of the matching new token (garbage where none)
        return torch.where(is_new, rows, out)


def concept_embedding(sd) -> ConceptEmbedding:
    """Install (once) a ConceptEmbedding as the text encoder's input embedding."""
    if sd.concepts is None:
        base = sd.text_encoder.get_input_embeddings()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"text encoder input embedding is {type(base).__name__}, expected nn.Embedding")
        emb = ConceptEmbedding(base)
        sd.text_encoder.set_input_embeddings(emb)
        sd.concepts = emb
    return sd.concepts


def token_names(token: str, num_vectors: int) -> List[str]:
    return [token] + [f"{token}_{k}" for k in range(1, num_vectors)]


def add_concept(sd, token: str, vectors: Tensor, trainable: bool = False) -> nn.Parameter:
    """Add ``token`` with embedding ``vectors`` [n, d] to the tokenizer and text encoder."""
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token must be a non-empty word without spaces, got {token!r}")
    emb = concept_embedding(sd)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != emb.embedding_dim:
        raise ValueError(
            f"embedding for {token!r} has shape {tuple(vectors.shape)}; the text encoder needs width {emb.embedding_dim}"
        )
    names = token_names(token, vectors.shape[0])
    vocab = sd.tokenizer.get_vocab()
    taken = [n for n in names if n in vocab or n + "</w>" in vocab]  # '</w>': a whole word in CLIP's BPE
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary; choose a new token name")
    added = sd.tokenizer.add_tokens(names)
    if added != len(names):
        raise ValueError(f"the tokenizer added {added} of the tokens {names}")
    ids = sd.tokenizer.convert_tokens_to_ids(names)
    return emb.add(token, names, ids, vectors, trainable)


def init_vectors(sd, init_word: str, num_vectors: int) -> Tensor:
    """Initial embedding: the init word's token embedding, repeated ``num_vectors`` times,
    or its tokens in order when it has exactly ``num_vectors`` tokens."""
    ids = sd.tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init word {init_word!r} encodes to no tokens")
    if len(ids) == 1:
        ids = ids * num_vectors
    elif len(ids) != num_vectors:
        raise ValueError(
            f"init word {init_word!r} is {len(ids)} tokens ({sd.tokenizer.convert_ids_to_tokens(ids)}); "
            f"give a one-token word or --num-vectors {len(ids)}"
        )
    base = concept_embedding(sd).base.weight
    return base[torch.tensor(ids, device=base.device)].detach().float().clone()


# ------------------------------------------------------------------------ embedding files
def save_embedding(path: PathLike, token: str, vectors: Tensor, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write {token: [n, d]} as safetensors, atomically."""
    save_tensors({token: vectors.detach().float().cpu()}, path, metadata=metadata)


def read_embedding_file(path: PathLike) -> Dict[str, Tensor]:
    """token -> [n, d] float32 from one safetensors file (1-D entries become [1, d])."""
    from difflab.checkpoint import load_tensors

    path = Path(path)
    tensors = load_tensors(path)
    out = {}
    for token, t in tensors.items():
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[0] < 1:
            raise ValueError(f"embedding file {path}: entry {token!r} has shape {tuple(t.shape)}, expected [num_vectors, width]")
        out[token] = t.float()
    if not out:
        raise ValueError(f"embedding file {path} holds no tensors")
    return out


# ------------------------------------------------------------------------ concept images
def list_concept_images(folder: PathLike) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"concept folder {folder} has no images: expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return files


def load_concept_image(path: Path, resolution: int) -> Tensor:
    """Center-crop to a square, resize (bicubic) to ``resolution``: [3, R, R] in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_concept_images(sd, files: Sequence[Path], resolution: int) -> Tuple[Tensor, Tensor]:
    """VAE posterior of every image and its mirror: mean, std [N, 2, C, h, w] (float32, CPU).

    Latents are sampled from these at each training step (z = mean + std * n), which is
    what encoding each step would give, without re-running the encoder.
    """
    images = torch.stack([load_concept_image(f, resolution) for f in files])
    pair = torch.stack([images, images.flip(-1)], 1).flatten(0, 1)
    vae_dtype = next(sd.vae.parameters()).dtype
    means, stds = [], []
    for chunk in pair.split(4):
        dist = sd.vae.encode(chunk.to(sd.vae.device, vae_dtype)).latent_dist
        means.append(dist.mean.float().cpu())  # on the CPU, beside the CPU generator's draws
        stds.append(dist.std.float().cpu())
    mean = torch.cat(means).unflatten(0, (len(files), 2))
    std = torch.cat(stds).unflatten(0, (len(files), 2))
    return mean, std


# ------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """Options of ``difflab ti train`` (the CLI is built from these fields)."""

    sd: str
    concept_dir: str
    token: str
    init_word: str
    out: str
    property: str = "object"
    templates: Optional[str] = None  # a text file of caption templates (one per line, "{}" = the token)
    num_vectors: int = 1
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 4
    resolution: Optional[int] = None  # None: the model's native size (512 for SD v1)
    flip_p: float = 0.5  # probability of a horizontal mirror per training image (0 for text, digits, asymmetric things)
    seed: int = 0
    resume: Optional[str] = None
    embeddings: List[str] = field(default_factory=list)  # other concepts, loaded frozen
    validation_prompt: Optional[str] = None
    validation_every: int = 500
    validation_images: int = 4
    validation_steps: int = 50
    guidance: float = 7.5
    save_every: int = 500
    mixed_precision: str = "no"
    device: Optional[str] = None  # None: accelerate's choice
    tokenizer: Optional[str] = None
    config_dir: Optional[str] = None
    quiet: bool = False

    def validate(self) -> None:
        if self.property not in TEMPLATES:
            raise ValueError(f"--property must be one of {sorted(TEMPLATES)}, got {self.property!r}")
        for name in ("num_vectors", "steps", "batch_size", "validation_every", "validation_images", "validation_steps", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be >= 8, got {self.resolution!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"--flip-p must be in [0, 1], got {self.flip_p!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.templates is not None:
            read_templates(self.templates)
        if Path(self.out).suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {self.out!r}")


def parse_templates(text: str, source: str) -> Tuple[str, ...]:
    """Caption templates, one per line, each with exactly one ``{}`` where the token
    goes; blank lines and lines starting with ``#`` are skipped. ``source`` names the
    file in errors."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
            raise ValueError(f"{source}, line {n}: a template needs exactly one '{{}}' (where the token goes) and no other braces, got {line!r}")
        out.append(line)
    if not out:
        raise ValueError(f"templates file {source} has no templates")
    return tuple(out)


def read_templates(path: PathLike) -> Tuple[str, ...]:
    """Caption templates from a text file (``parse_templates``'s format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file not found: {path}")
    return parse_templates(path.read_text(encoding="utf-8"), str(path))


def caption_file(image: Path) -> Path:
    """The per-image caption file of a concept image: the same name ending in ``.txt``."""
    return image.with_suffix(".txt")


def read_caption_files(files: Sequence[Path]) -> Dict[Path, Tuple[str, ...]]:
    """The templates of each concept image that has a caption file (``IMAGE.txt`` beside
    ``IMAGE.png``, in ``parse_templates``'s format); the others use the shared templates.
    A caption file can say what the image shows besides the concept ("a photo of the
    digit two in the style of {}"), so the token need not learn it."""
    out = {}
    for f in files:
        c = caption_file(f)
        if c.is_file():
            out[f] = parse_templates(c.read_text(encoding="utf-8"), str(c))
    return out


def state_path(out: PathLike) -> Path:
    """Resume state written beside the embedding: ``NAME.state.safetensors``."""
    out = Path(out)
    return out.with_name(out.stem + ".state.safetensors")


def step_path(out: PathLike, step: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}-step{step:06d}.safetensors")


def _save_state(path: Path, param: Tensor, optimizer, generator: torch.Generator, step: int, meta: Dict[str, str]) -> None:
    tensors = {"embedding": param.detach().float().cpu(), "rng": generator.get_state()}
    st = optimizer.state_dict()["state"].get(0, {})
    for k, v in st.items():
        tensors[f"adam.{k}"] = torch.as_tensor(v).detach().float().cpu().reshape(-1) if k == "step" else v.detach().cpu()
    save_tensors(tensors, path, metadata={**meta, "step": str(step)})


def _load_state(path: PathLike, token: str, shape: Tuple[int, ...]):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume state not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot read resume state {path}: {e}") from None
    if "embedding" not in tensors or "step" not in meta or "rng" not in tensors:
        raise ValueError(f"{path} is not a textual-inversion resume state: expected 'embedding', 'rng' and a step")
    if meta.get("token") != token or tuple(tensors["embedding"].shape) != tuple(shape):
        raise ValueError(
            f"{path} holds token {meta.get('token')!r} with shape {tuple(tensors['embedding'].shape)}, "
            f"expected {token!r} with shape {tuple(shape)}"
        )
    return tensors, int(meta["step"])


def train_textual_inversion(cfg: TrainConfig, sd=None) -> Path:
    """Learn ``cfg.token``'s embedding from the images in ``cfg.concept_dir``.

    Writes ``cfg.out`` ({token: [n, d]}), the resume state beside it, snapshots
    ``NAME-stepNNNNNN.safetensors`` every ``save_every`` steps, and validation grids in
    ``NAME-validation/`` every ``validation_every`` steps when a prompt is given.
    ``sd`` may pass an already loaded model (tests); otherwise ``cfg.sd`` is loaded.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from difflab.personalize.sd import UNetDenoiser, load_sd
    from difflab.schedule import ddpm_loss

    cfg.validate()
    files = list_concept_images(cfg.concept_dir)  # fail before loading anything big
    for f in files:
        load_concept_image(f, 8)
    templates = read_templates(cfg.templates) if cfg.templates else TEMPLATES[cfg.property]
    own = read_caption_files(files)
    captions = [own.get(f, templates) for f in files]
    others: Dict[str, Tensor] = {}
    for f in cfg.embeddings:
        others.update(read_embedding_file(f))
    if cfg.token in others:
        raise ValueError(f"token {cfg.token!r} is being trained; do not also load it with --embeddings")

    cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    if sd is None:
        sd = load_sd(cfg.sd, tokenizer=cfg.tokenizer, config_dir=cfg.config_dir)
    device = accelerator.device
    sd.unet.to(device, weight_dtype)
    sd.vae.to(device, weight_dtype)
    sd.text_encoder.to(device)  # fp32: the new rows are trained in fp32
    for net in (sd.unet, sd.vae, sd.text_encoder):
        net.requires_grad_(False)

    for token, vec in others.items():
        add_concept(sd, token, vec, trainable=False)
    vectors = init_vectors(sd, cfg.init_word, cfg.num_vectors)
    param = add_concept(sd, cfg.token, vectors, trainable=True)
    emb = sd.concepts
    resolution = cfg.resolution or sd.resolution
    if resolution % sd.vae_downsample:
        raise ValueError(f"--resolution {resolution} must be a multiple of the VAE downsampling {sd.vae_downsample}")

    # The optimizer gets the new rows and nothing else.
    optimizer = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator("cpu").manual_seed(cfg.seed + accelerator.process_index)
    start = 0
    meta = {"token": cfg.token, "init_word": cfg.init_word, "property": cfg.property, "num_vectors": str(cfg.num_vectors), "seed": str(cfg.seed),
            "flip_p": str(cfg.flip_p)}
    if cfg.templates:
        meta["templates"] = "\n".join(templates)
    if own:
        meta["captions"] = json.dumps({f.name: list(c) for f, c in own.items()})
    # One draw per image picks its template: uniform over every image's list, and the
    # same draws as a single template list when no image has a caption file.
    draws = math.lcm(*(len(c) for c in captions))
    if cfg.resume:
        tensors, start = _load_state(cfg.resume, cfg.token, tuple(param.shape))
        with torch.no_grad():
            param.copy_(tensors["embedding"].to(param))
        generator.set_state(tensors["rng"])
        adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
        if adam:
            state = optimizer.state_dict()
            adam["step"] = adam["step"].reshape(()) if "step" in adam else torch.tensor(float(start))
            state["state"] = {0: {k: v.to(device) if k != "step" else v for k, v in adam.items()}}
            optimizer.load_state_dict(state)
    if start >= cfg.steps:
        raise ValueError(f"{cfg.resume} is already at step {start} >= --steps {cfg.steps}")

    wrapped, optimizer = accelerator.prepare(emb, optimizer)
    sd.text_encoder.set_input_embeddings(wrapped)

    mean, std = encode_concept_images(sd, files, resolution)
    denoiser = UNetDenoiser(sd.unet)
    out = Path(cfg.out)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"ti {cfg.token}",
               disable=cfg.quiet or not accelerator.is_local_main_process)
    loss_value = float("nan")
    for step in bar:
        sd.text_encoder.train()
        b = cfg.batch_size
        idx = torch.randint(len(files), (b,), generator=generator)
        flip = (torch.rand((b,), generator=generator) < cfg.flip_p).long()
        which = torch.randint(draws, (b,), generator=generator)
        z_noise = torch.randn((b, *mean.shape[2:]), generator=generator)
        t = torch.randint(sd.schedule.num_steps, (b,), generator=generator)
        noise = torch.randn((b, *mean.shape[2:]), generator=generator)
        z0 = (mean[idx, flip] + std[idx, flip] * z_noise) * sd.latent_scale
        prompts = [captions[int(i)][int(k) % len(captions[int(i)])].format(cfg.token) for i, k in zip(idx, which)]
        with accelerator.autocast():
            cond = sd.encode_text(prompts)
            loss = ddpm_loss(denoiser, sd.schedule, z0.to(device), t.to(device), noise.to(device), cond)
        if not torch.isfinite(loss):
            raise ValueError(f"loss became {float(loss)} at step {step}; lower --lr or use --mixed-precision no")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if accelerator.is_main_process:
            if done % cfg.save_every == 0 or done == cfg.steps:
                vec = param.detach()
                save_embedding(step_path(out, done) if done != cfg.steps else out, cfg.token, vec, {**meta, "step": str(done)})
                _save_state(state_path(out), param, optimizer, generator, done, meta)
            if cfg.validation_prompt and (done % cfg.validation_every == 0 or done == cfg.steps):
                _validate(sd, cfg, out, done)
    accelerator.wait_for_everyone()
    sd.text_encoder.set_input_embeddings(emb)
    return out


@torch.no_grad()
def _validate(sd, cfg: TrainConfig, out: Path, step: int) -> None:
    from difflab.imageio import save_grid
    from difflab.personalize.generate import sample_images

    sd.text_encoder.eval()
    seeds = [cfg.seed * 1000 + k for k in range(cfg.validation_images)]
    images = sample_images(sd, cfg.validation_prompt, seeds, steps=cfg.validation_steps, guidance=cfg.guidance)
    save_grid(images, out.with_name(f"{out.stem}-validation") / f"step{step:06d}.png", nrow=min(4, len(seeds)))
