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

Every step's batch (images, mirrors, templates, latent noise, steps, noise) is a pure
function of (seed, step, shard) (:class:`difflab.training.Shards`), so a resumed run, and a
run on several processes (``accelerate launch``), draws what an uninterrupted one-process
run with the same global batch draws. With several processes the frozen weights are
checked, at the end, to be bit-identical on every process.
"""
from __future__ import annotations

import glob
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.io import IMAGE_SUFFIXES, PathLike, list_images, open_rgb, parse_templates, read_templates, save_grid, save_tensors
from difflab.personalize.config import TrainConfig, check_fresh_file, state_path
from difflab.personalize.templates import TEMPLATES
from difflab.processes import main_process
from difflab.schedule import ddpm_loss
from difflab.sd.concepts import add_concept, init_vectors, read_embedding_file, save_embedding
from difflab.sd.load import DTYPES, UNetDenoiser, load_sd
from difflab.sd.sample import sample_images
from difflab.training import (
    Loop,
    Shards,
    check_agreement,
    make_accelerator,
    optimizer_tensors,
    resume_shards,
    run_lock,
    run_loop,
)

CHECK_SIZE = 8  # concept images are decoded this small before training, only to fail early on a bad one
VALIDATION_SEED_STRIDE = 1000  # validation image k uses seed * VALIDATION_SEED_STRIDE + k


# ------------------------------------------------------------------------ concept images
def list_concept_images(folder: PathLike) -> List[Path]:
    files = list_images(folder, "concept folder")
    if not files:
        raise ValueError(f"concept folder {folder} has no images: expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return files


def load_concept_image(path: Path, resolution: int) -> Tensor:
    """Center-crop to a square, resize (bicubic) to ``resolution``: [3, R, R] in [-1, 1]."""
    im = open_rgb(path)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    arr = np.asarray(im.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
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


def lock_path(out: PathLike) -> Path:
    """The lock a run holds while it trains (:func:`difflab.training.run_lock`): ``NAME.lock``
    beside the embedding."""
    out = Path(out)
    return out.with_name(out.stem + ".lock")


def validation_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}-validation")


def run_files(out: PathLike) -> List[Path]:
    """What a run that writes ``out`` leaves beside it: the embedding, its resume state,
    its snapshots and its validation folder (those that exist)."""
    out = Path(out)
    snapshots = sorted(out.parent.glob(f"{glob.escape(out.stem)}-step[0-9]*.safetensors"))
    return [p for p in (out, state_path(out), *snapshots, validation_dir(out)) if p.exists()]


def remove_run_files(out: PathLike) -> None:
    """Remove an earlier run's files beside ``out`` (``overwrite``: the new run replaces
    them whole, so no old snapshot or grid is left beside the new ones)."""
    for p in run_files(out):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def step_path(out: PathLike, step: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}-step{step:06d}.safetensors")


def _save_state(path: Path, param: Tensor, optimizer, step: int, meta: Dict[str, str], processes: dict) -> None:
    """The resume state: the embedding, AdamW's state, the step, and (metadata) the world
    size, batch size and shard count, and with several processes their state digests."""
    tensors = {"embedding": param.detach().float().cpu()}
    st = optimizer.state_dict()["state"].get(0, {})
    for k, v in st.items():
        tensors[f"adam.{k}"] = torch.as_tensor(v).detach().float().cpu().reshape(-1) if k == "step" else v.detach().cpu()
    facts = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in processes.items()}
    save_tensors(tensors, path, metadata={**meta, **facts, "step": str(step)})


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
    if "embedding" not in tensors or "step" not in meta:
        raise ValueError(f"{path} is not a textual-inversion resume state: expected 'embedding' and a step")
    if meta.get("token") != token or tuple(tensors["embedding"].shape) != tuple(shape):
        raise ValueError(
            f"{path} holds token {meta.get('token')!r} with shape {tuple(tensors['embedding'].shape)}, "
            f"expected {token!r} with shape {tuple(shape)}"
        )
    return tensors, meta


def _read_inputs(cfg: TrainConfig) -> tuple[List[Path], List[Tuple[str, ...]], Dict[str, str], Dict[str, Tensor]]:
    """Check everything ``cfg`` names before a model is loaded: (concept images, each
    image's templates, metadata for the embedding file, other concepts' embeddings)."""
    cfg.validate()
    files = list_concept_images(cfg.concept_dir)
    for f in files:
        load_concept_image(f, CHECK_SIZE)
    templates = read_templates(cfg.templates) if cfg.templates else TEMPLATES[cfg.property]
    own = read_caption_files(files)
    others: Dict[str, Tensor] = {}
    source: Dict[str, str] = {}
    for f in cfg.embeddings:
        for tok, vec in read_embedding_file(f).items():
            if tok.lower() in source:  # the tokenizer lowercases: <A> and <a> are one token
                raise ValueError(f"token {tok!r} is in two embedding files: {source[tok.lower()]} and {f}")
            source[tok.lower()] = str(f)
            others[tok] = vec
    if cfg.token.lower() in source:
        raise ValueError(f"token {cfg.token!r} is being trained; do not also load it from {source[cfg.token.lower()]}")
    meta = {"token": cfg.token, "init_word": cfg.init_word, "property": cfg.property, "num_vectors": str(cfg.num_vectors),
            "seed": str(cfg.seed), "flip_p": str(cfg.flip_p), "batch_size": str(cfg.batch_size)}
    if cfg.templates:
        meta["templates"] = "\n".join(templates)
    if own:
        meta["captions"] = json.dumps({f.name: list(c) for f, c in own.items()})
    return files, [own.get(f, templates) for f in files], meta, others


def _add_concepts(sd, cfg: TrainConfig, others: Dict[str, Tensor], device, weight_dtype) -> torch.nn.Parameter:
    """Freeze ``sd`` on ``device`` and splice in the frozen ``others`` and the trainable
    rows of ``cfg.token`` (returned)."""
    sd.unet.to(device, weight_dtype)
    sd.vae.to(device, weight_dtype)
    sd.text_encoder.to(device)  # fp32: the new rows are trained in fp32
    for net in (sd.unet, sd.vae, sd.text_encoder):
        net.requires_grad_(False)
    for token, vec in others.items():
        add_concept(sd, token, vec, trainable=False)
    return add_concept(sd, cfg.token, init_vectors(sd, cfg.init_word, cfg.num_vectors), trainable=True)


def _resume(cfg: TrainConfig, param: torch.nn.Parameter, optimizer, device, world_size: int,
            asked: Optional[int] = None) -> tuple[int, int]:
    """Load the resume state beside ``cfg.out`` (``state_path``) into the embedding and the
    optimizer; returns its step and its shard count (:func:`difflab.training.resume_shards`
    refuses another number of processes that would change the global batch)."""
    path = state_path(cfg.out)
    tensors, meta = _load_state(path, cfg.token, tuple(param.shape))
    start = int(meta["step"])
    # a state without these facts is from one process (its "rng" tensor, a generator state, is not used)
    saved = {k: int(meta.get(k, 1)) for k in ("world_size", "shards")}
    shards = resume_shards(path, saved, world_size, cfg.batch_size, int(meta.get("batch_size", cfg.batch_size)), asked)
    with torch.no_grad():
        param.copy_(tensors["embedding"].to(param))
    adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
    if adam:
        state = optimizer.state_dict()
        adam["step"] = adam["step"].reshape(()) if "step" in adam else torch.tensor(float(start))
        state["state"] = {0: {k: v.to(device) if k != "step" else v for k, v in adam.items()}}
        optimizer.load_state_dict(state)
    if start >= cfg.steps:
        raise ValueError(f"{path} is already at step {start} >= steps {cfg.steps}")
    return start, shards


def _loss_step(sd, cfg: TrainConfig, accelerator, rows: Shards, captions: List[Tuple[str, ...]],
               mean: Tensor, std: Tensor):
    """The loss step: images, mirrors, templates, latents, steps and noise, drawn in that
    order from each shard's CPU generator (the same draws on any device)."""
    denoiser = UNetDenoiser(sd.unet)
    device = accelerator.device
    # One draw per image picks its template: uniform over every image's list, and the
    # same draws as a single template list when no image has a caption file.
    draws = math.lcm(*(len(c) for c in captions))

    def draw(g: torch.Generator, b: int):
        idx = torch.randint(len(captions), (b,), generator=g)
        flip = (torch.rand((b,), generator=g) < cfg.flip_p).long()
        which = torch.randint(draws, (b,), generator=g)
        z_noise = torch.randn((b, *mean.shape[2:]), generator=g)
        t = torch.randint(sd.schedule.num_steps, (b,), generator=g)
        noise = torch.randn((b, *mean.shape[2:]), generator=g)
        return idx, flip, which, z_noise, t, noise

    def loss_step(step: int):
        sd.text_encoder.train()
        idx, flip, which, z_noise, t, noise = rows.draw(cfg.seed, step, draw)
        z0 = (mean[idx, flip] + std[idx, flip] * z_noise) * sd.latent_scale
        prompts = [captions[int(i)][int(k) % len(captions[int(i)])].format(cfg.token) for i, k in zip(idx, which)]
        with accelerator.autocast():
            cond = sd.encode_text(prompts)
            loss = ddpm_loss(denoiser, sd.schedule, z0.to(device), t.to(device), noise.to(device), cond)
        if not torch.isfinite(loss):
            raise ValueError(f"loss became {float(loss)} at step {step}; lower --lr or use --mixed-precision no")
        return loss, {}

    return loss_step


def train_textual_inversion(cfg: TrainConfig, sd=None, shards: Optional[int] = None) -> Path:
    """Learn ``cfg.token``'s embedding from the images in ``cfg.concept_dir``.

    Writes ``cfg.out`` ({token: [n, d]}), the resume state beside it, snapshots
    ``NAME-stepNNNNNN.safetensors`` every ``save_every`` steps, and validation grids in
    ``NAME-validation/`` every ``validation_every`` steps when a prompt is given.
    ``sd`` may pass an already loaded model (tests); otherwise ``cfg.sd`` is loaded.
    Under ``accelerate launch`` every process runs this (``cfg.batch_size`` per process)
    and only the main process writes. ``shards``: draw each step's global batch as this
    many shards (None: one per process; a resumed run keeps its own), so one process with
    batch N x B and ``shards=N`` follows N processes with batch B.
    """
    files, captions, meta, others = _read_inputs(cfg)  # fail before loading anything big
    out = Path(cfg.out)
    with run_lock(lock_path(out), f"--out {out}", hold=main_process()):
        return _train(cfg, sd, shards, files, captions, meta, others)


def _train(cfg: TrainConfig, sd, shards: Optional[int], files: List[Path], captions: List[Tuple[str, ...]],
           meta: Dict[str, str], others: Dict[str, Tensor]) -> Path:
    if not (cfg.resume or cfg.overwrite):  # again, under the lock: another run may have written it meanwhile
        check_fresh_file(cfg.out, "out", [state_path(cfg.out)])
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    if sd is None:
        sd = load_sd(cfg.sd, tokenizer=cfg.tokenizer, config_dir=cfg.config_dir)
    weight_dtype = DTYPES[{"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)]
    param = _add_concepts(sd, cfg, others, accelerator.device, weight_dtype)
    # every caption and the validation prompt must reach the text encoder whole, before step 1
    sd.check_prompts([t.format(cfg.token) for c in captions for t in c] + ([cfg.validation_prompt] if cfg.validation_prompt else []))
    emb = sd.concepts
    resolution = cfg.resolution or sd.resolution
    if resolution % sd.vae_downsample:
        raise ValueError(f"--resolution {resolution} must be a multiple of the VAE downsampling {sd.vae_downsample}")

    # The optimizer gets the new rows and nothing else.
    optimizer = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    start, shards = _resume(cfg, param, optimizer, accelerator.device, world, shards) if cfg.resume else (0, shards or world)
    rows = Shards(shards, cfg.batch_size, world, rank)
    wrapped, optimizer = accelerator.prepare(emb, optimizer)
    sd.text_encoder.set_input_embeddings(wrapped)
    mean, std = encode_concept_images(sd, files, resolution)
    out = Path(cfg.out)
    if cfg.overwrite and accelerator.is_main_process:
        remove_run_files(out)

    def save(done: int, processes: dict) -> None:
        save_embedding(out if done == cfg.steps else step_path(out, done), cfg.token, param.detach(), {**meta, "step": str(done)})
        _save_state(state_path(out), param, optimizer, done, meta, processes)

    def state():
        yield "embedding", param
        yield from optimizer_tensors(optimizer)

    run_loop(Loop(accelerator, optimizer, _loss_step(sd, cfg, accelerator, rows, captions, mean, std),
                  start=start, end=cfg.steps, checkpoint=save, checkpoint_every=cfg.save_every, state=state,
                  shards=shards, sample=(lambda done: _validate(sd, cfg, out, done)) if cfg.validation_prompt else None,
                  sample_every=cfg.validation_every, desc=f"ti {cfg.token}", progress=not cfg.quiet))
    sd.text_encoder.set_input_embeddings(emb)
    if world > 1:
        check_agreement(accelerator, frozen_tensors(sd), "frozen weights after training")
    return out


def frozen_tensors(sd):
    """Every weight textual inversion must leave alone, named: the UNet's, the VAE's and
    the text encoder's parameters that do not require grad (the original token table and
    other concepts' rows included), and their buffers."""
    for name, net in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder)):
        for k, v in net.named_parameters():
            if not v.requires_grad:
                yield f"{name}.{k}", v
        for k, v in net.named_buffers():
            yield f"{name}.{k}", v


@torch.no_grad()
def _validate(sd, cfg: TrainConfig, out: Path, step: int) -> None:
    sd.text_encoder.eval()
    seeds = [cfg.seed * VALIDATION_SEED_STRIDE + k for k in range(cfg.validation_images)]
    images = sample_images(sd, cfg.validation_prompt, seeds, steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale)
    save_grid(images, validation_dir(out) / f"step{step:06d}.png", nrow=min(4, len(seeds)))
