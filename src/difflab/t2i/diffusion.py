"""Stage 2 of ``difflab t2i train``: diffusion.

The UNet and the CLIP text encoder learn jointly with the epsilon-prediction loss on the
frozen VAE latents, with caption dropout for classifier-free guidance (see
:mod:`difflab.t2i.captions`). With a descriptor network (stage 1b), the input embedding
of the mark token ``*`` is replaced by a learned projection of the image's descriptor.

Checkpoints ``OUT/checkpoints/step_XXXXXXX`` (raw and EMA weights, optimizer, losses, the
projection) make the run resumable; every checkpoint also exports the EMA networks to
``OUT/unet`` and ``OUT/text_encoder`` in ``export_dtype``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from difflab.io import PathLike, load_tensors, save_grid, save_json, save_tensors
from difflab.schedule import ddpm_loss
from difflab.sd.load import UNetDenoiser, load_sd, read_config, schedule_from_config
from difflab.sd.sample import sample_images
from difflab.t2i.captions import DESCRIPTOR_MARK, check_caption, draw_captions
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.descriptor import DescriptorNet, name_ids, splice_descriptors
from difflab.t2i.model import build_text_encoder, build_unet, save_folder
from difflab.t2i.stages import STREAMS, Run, Stage, copy_weights, init_seed
from difflab.training import (
    EMA,
    Loop,
    Shards,
    cosine_lr,
    module_tensors,
    optimizer_tensors,
    run_loop,
    seeded_init,
    write_checkpoint,
)

Latents = list[tuple[Tensor, Tensor]]  # per dataset: posterior mean and std of every image

SAMPLE_PROMPTS = tuple(
    f"a photo of the digit {name}" + suffix
    for suffix in (" on a textured background", "")
    for name in ("zero", "one", "two", "three", "four", "five", "six", "eight", "nine")
) + ("a photo of a digit on a textured background", "a photo of a digit")


@dataclass
class Nets:
    """The networks stage 2 trains (``projection``: descriptor features -> the text
    encoder's input-embedding space, only with descriptor captions)."""

    unet: torch.nn.Module
    text: torch.nn.Module
    projection: Optional[torch.nn.Linear] = None

    def trainable(self, train_text_encoder: bool) -> list[torch.nn.Parameter]:
        params = list(self.unet.parameters()) + (list(self.text.parameters()) if train_text_encoder else [])
        return params + (list(self.projection.parameters()) if self.projection is not None else [])


def init_projection(text, tokenizer, features: int, width: int) -> torch.nn.Linear:
    """A projection ``features`` -> ``width`` (the text encoder's input-embedding width)
    that starts ``*`` at the mean digit name, spread like the names are."""
    projection = torch.nn.Linear(features, width)
    with torch.no_grad():
        names = text.get_input_embeddings().weight[name_ids(tokenizer)]
        projection.bias.copy_(names.mean(0))
        projection.weight.normal_(0.0, float(names.std(0).mean()) / projection.in_features ** 0.5)
    return projection


def build_nets(run: Run, descriptor: Optional[DescriptorNet]) -> Nets:
    """Stage 2's networks: new (seeded) or, with init_from, the source model's weights."""
    cfg = run.cfg
    with seeded_init(init_seed(cfg.seed, Stage.DIFFUSION)):
        unet = build_unet(cfg.model)
        text = build_text_encoder(cfg.model, run.tokenizer)
        if run.source is not None:
            copy_weights(cfg.init_from, "unet", unet, run.source.unet)
            copy_weights(cfg.init_from, "text_encoder", text, run.source.text_encoder)
        projection = None
        if descriptor is not None:
            projection = init_projection(text, run.tokenizer, descriptor.norm.normalized_shape[0], cfg.model.text_width)
    text.requires_grad_(cfg.train_text_encoder)
    return Nets(unet, text, projection)


def load_checkpoint(ckpt: Path, nets: Nets, ema: EMA, optimizer) -> None:
    """Resume ``nets``, ``ema`` and ``optimizer`` from checkpoint folder ``ckpt``."""
    nets.unet.load_state_dict(load_tensors(ckpt / "unet_raw.safetensors"))
    nets.text.load_state_dict(load_tensors(ckpt / "text_raw.safetensors"))
    ema.shadows = {"unet": load_tensors(ckpt / "unet_ema.safetensors"), "text": load_tensors(ckpt / "text_ema.safetensors")}
    if nets.projection is not None:
        nets.projection.load_state_dict(load_tensors(ckpt / "projection_raw.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))


def _prepare(run: Run, nets: Nets, optimizer) -> tuple[Nets, object, Optional[dict]]:
    """Hand the networks to Accelerate, after splicing descriptors into the text encoder's
    input (returns the splice state, or None without a projection)."""
    if nets.projection is None:
        unet, text, optimizer = run.accelerator.prepare(nets.unet, nets.text, optimizer)
        return Nets(unet, text), optimizer, None
    mark = run.tokenizer.convert_tokens_to_ids(DESCRIPTOR_MARK + "</w>")
    if mark == run.tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer in {run.out / 'tokenizer'} has no token for {DESCRIPTOR_MARK!r}")
    spliced, _ = splice_descriptors(nets.text, mark)
    unet, text, projection, optimizer = run.accelerator.prepare(nets.unet, nets.text, nets.projection, optimizer)
    return Nets(unet, text, projection), optimizer, spliced


class DiffusionStep:
    """The loss step of stage 2: a batch of latents, captions, steps and noise (a pure
    function of seed, step and shard), and its epsilon-prediction loss."""

    def __init__(self, run: Run, nets: Nets, latents: Latents, scale: float,
                 descriptor: Optional[DescriptorNet], spliced: Optional[dict]):
        self.run, self.nets, self.latents, self.scale = run, nets, latents, scale
        self.descriptor, self.spliced = descriptor, spliced
        self.schedule = schedule_from_config(read_config("scheduler"))
        self.denoiser = UNetDenoiser(nets.unet)
        acc = run.accelerator
        self.rows = Shards(run.shards, run.cfg.batch_size, acc.num_processes, acc.process_index)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(z0, t, noise, token ids, dataset index, image index) of ``step`` on this process."""
        cfg = self.run.cfg
        z0, t, noise, captions, which, idx = self.rows.draw(cfg.seed, step, self.draw, stream=int(Stage.DIFFUSION),
                                                            streams=STREAMS)
        ids = self.run.tokenizer(captions, padding="max_length", max_length=cfg.model.max_length, truncation=True,
                                 return_tensors="pt").input_ids
        return z0, t, noise, ids, which, idx

    def draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor, list[str], Tensor, Tensor]:
        """(z0, t, noise, captions, dataset index, image index) of ``n`` rows drawn from ``g``."""
        cfg, data = self.run.cfg, self.run.data
        which, idx = data.draw(g, n)
        mean = torch.empty((n, *self.latents[0][0].shape[1:]))
        std = torch.empty_like(mean)
        digits = torch.empty(n, dtype=torch.long)
        for k, (m, s) in enumerate(self.latents):
            sel = which == k
            mean[sel], std[sel], digits[sel] = m[idx[sel]], s[idx[sel]], data.labels[k][idx[sel]].long()
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * self.scale
        captions = draw_captions(digits, which, g, p_unnamed=cfg.p_unnamed, p_empty=cfg.p_empty,
                                 p_descriptor=cfg.p_descriptor, p_held_out_unnamed=cfg.p_held_out_unnamed)
        for c in captions:
            check_caption(c)
        t = torch.randint(self.schedule.num_steps, (n,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        return z0, t, noise, captions, which, idx

    def __call__(self, step: int) -> tuple[Tensor, dict]:
        z0, t, noise, ids, which, idx = self.batch(step)
        cfg, nets, acc = self.run.cfg, self.nets, self.run.accelerator
        dev = acc.device
        nets.unet.train()
        nets.text.train(cfg.train_text_encoder)
        with acc.autocast():
            if nets.projection is not None:
                with torch.no_grad():
                    feats = self.descriptor.features(self.run.data.gather(which, idx)[0].to(dev)).float()
                self.spliced["vectors"] = nets.projection(feats)
            with torch.set_grad_enabled(cfg.train_text_encoder or nets.projection is not None):
                cond = nets.text(ids.to(dev))[0]
            loss = ddpm_loss(self.denoiser, self.schedule, z0.to(dev), t.to(dev), noise.to(dev), cond,
                             min_snr_gamma=cfg.min_snr_gamma)
        return loss, {}


def _save_checkpoint(out: Path, step: int, unet, text, ema: dict, optimizer, cfg: T2ITrainConfig, losses: list[float],
                     projection=None, processes: Optional[dict] = None) -> Path:
    def write(folder: Path) -> None:
        if projection is not None:
            save_tensors(projection.state_dict(), folder / "projection_raw.safetensors")
        save_tensors(unet.state_dict(), folder / "unet_raw.safetensors")
        save_tensors(text.state_dict(), folder / "text_raw.safetensors")
        save_tensors(ema["unet"], folder / "unet_ema.safetensors")
        save_tensors(ema["text"], folder / "text_ema.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_json({"step": step, "losses": losses, "train_config": cfg.to_dict(), **(processes or {})},
                  folder / "state.json")

    return write_checkpoint(out / "checkpoints", step, write, cfg.keep_checkpoints)


def _with_weights(model: torch.nn.Module, state: dict[str, Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()


def checkpoint_and_export(run: Run, nets: Nets, ema: EMA, optimizer, losses: list[float], step: int,
                          processes: Optional[dict] = None) -> None:
    """Write checkpoint ``step`` and export its EMA networks to ``OUT`` (main process)."""
    unwrap, cfg = run.accelerator.unwrap_model, run.cfg
    unet, text = unwrap(nets.unet), unwrap(nets.text)
    projection = unwrap(nets.projection) if nets.projection is not None else None
    _save_checkpoint(run.out, step, unet, text, ema.shadows, optimizer, cfg, losses, projection=projection,
                     processes=processes)
    run.facts.update(diffusion_steps=step, train_config=cfg.to_dict())
    save_folder(run.out, unet=_with_weights(unet, ema.shadows["unet"]), text_encoder=_with_weights(text, ema.shadows["text"]),
                dtype=torch.float16 if cfg.export_dtype == "fp16" else torch.float32, extra=run.facts)


def train_diffusion(run: Run, latents: Latents, scale: float, descriptor: Optional[DescriptorNet],
                    resume_from: Optional[Path], start: int, losses: list[float], end: int) -> list[float]:
    """Stage 2, steps ``start .. end - 1`` (resumed from checkpoint ``resume_from`` with the
    earlier ``losses``); returns the losses of every step so far."""
    cfg = run.cfg
    nets = build_nets(run, descriptor)
    run.source = None  # its weights are copied: free it
    params = nets.trainable(cfg.train_text_encoder)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = EMA(cfg.ema_decay, {"unet": nets.unet, "text": nets.text})
    if resume_from is not None:
        load_checkpoint(resume_from, nets, ema, optimizer)
    nets, optimizer, spliced = _prepare(run, nets, optimizer)
    samples = run.out / "samples"
    unwrap = run.accelerator.unwrap_model

    def state():
        yield from module_tensors("unet", unwrap(nets.unet).state_dict())
        yield from module_tensors("text", unwrap(nets.text).state_dict())
        if nets.projection is not None:
            yield from module_tensors("projection", unwrap(nets.projection).state_dict())
        for name, shadow in ema.shadows.items():
            yield from module_tensors(f"ema.{name}", shadow)
        yield from optimizer_tensors(optimizer)

    run_loop(Loop(run.accelerator, optimizer, DiffusionStep(run, nets, latents, scale, descriptor, spliced),
                  start=start, end=end, lr=lambda step: cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio, step),
                  params=params, grad_clip=cfg.grad_clip, ema=ema, history={"loss": losses},
                  checkpoint=lambda done, processes: checkpoint_and_export(run, nets, ema, optimizer, losses, done,
                                                                           processes),
                  checkpoint_every=cfg.ckpt_every, state=state, shards=run.shards, sample_every=cfg.sample_every,
                  sample=lambda done: write_sample_grid(run.out, samples / f"step_{done:07d}.png", sampler=cfg.sampler),
                  desc="t2i train", progress=run.show, where=f"model folder {run.out}"))
    return losses


def write_sample_grid(model_dir: PathLike, path: PathLike, per_prompt: int = 4, steps: int = 25, guidance_scale: float = 4.0,
                      sampler: str = "ddim") -> Path:
    """A grid of ``per_prompt`` samples (one row each) for each of SAMPLE_PROMPTS, from the
    exported model in ``model_dir``."""
    sd = load_sd(model_dir)
    images = [sample_images(sd, p, list(range(per_prompt)), steps=steps, guidance_scale=guidance_scale,
                             sampler=sampler) for p in SAMPLE_PROMPTS]
    grid = torch.stack(images, dim=1).flatten(0, 1)  # column = prompt
    save_grid(grid, path, nrow=len(SAMPLE_PROMPTS))
    return Path(path)
