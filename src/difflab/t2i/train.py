"""Training the mini text-to-image model (``difflab t2i train``).

Two stages, both on the captioned digits (see :mod:`difflab.t2i.captions`):

1. **VAE.** A small ``AutoencoderKL`` learns to reconstruct the 32x32 digits (mean
   squared error plus a small KL term). Its ``scaling_factor`` is then set to
   1 / std of the latents, as Stable Diffusion does, and it is frozen. Written to
   ``OUT/vae`` in one go; a rerun with ``--resume`` reuses it.
2. **Diffusion.** The UNet and the CLIP text encoder learn jointly with the
   epsilon-prediction loss on the (frozen) VAE latents, with caption dropout for
   classifier-free guidance. With ``p_descriptor`` > 0 some captions put the
   pseudo-word ``*`` in the name slot, and its input embedding is replaced by a
   learned projection of the image's *descriptor*: the features of a small digit
   network (:class:`DescriptorNet`) trained first (stage 1b) on the images of the
   nine *named* digits only, and frozen. 7s get descriptors too (no label is used to
   compute one), so the name slot learns to carry how any digit looks, and textual
   inversion can reach a digit that has no word. The descriptor network
   (``OUT/descriptor``) and the projection (in each checkpoint) are training aids:
   the exported folder is plain SD. Checkpoints in ``OUT/checkpoints/step_XXXXXXX``
   (raw and EMA weights, optimizer, losses) make the run resumable; every checkpoint also
   exports the EMA networks to ``OUT/unet`` and ``OUT/text_encoder`` (in
   ``export_dtype``; the VAE stays float32 so a resumed run encodes exactly as before).

``OUT`` is then a diffusers-format SD folder. Every batch (images, captions, steps,
noise) is a pure function of (seed, step, process index).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab.data import BalancedDigits, DigitSet
from difflab.io import PathLike, load_json, load_tensors, save_grid, save_json, save_tensors
from difflab.schedule import ddpm_loss
from difflab.sd.load import UNetDenoiser, load_sd, read_config, schedule_from_config
from difflab.sd.sample import sample_images
from difflab.t2i.captions import DESCRIPTOR_MARK, DIGIT_NAMES, HELD_OUT_DIGIT, check_caption, draw_captions
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.model import (
    IMAGE_SIZE,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    save_folder,
)
from difflab.training import cosine_lr, ema_update, latest_checkpoint, write_checkpoint


def to_model_size(x: Tensor) -> Tensor:
    """[B, 3, 28, 28] digits in [-1, 1] -> [B, 3, 32, 32] (bilinear)."""
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)


def _generator(seed: int, stage: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4 + stage) * 64 + rank)


# ------------------------------------------------------------------------ stage 1: VAE
def vae_loss(vae, x: Tensor, generator: torch.Generator, kl_weight: float) -> tuple[Tensor, Tensor]:
    """(total, reconstruction MSE) of one batch."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(x.device, post.mean.dtype)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec.float(), x.float())
    kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).mean()
    return mse + kl_weight * kl, mse


def train_vae(data: BalancedDigits, cfg: T2ITrainConfig, accelerator, progress: bool) -> tuple[torch.nn.Module, dict]:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae, opt = accelerator.prepare(vae, opt)
    rank = accelerator.process_index
    bar = tqdm(range(cfg.vae_steps), desc="t2i vae", disable=not progress)
    recent: list[float] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.vae_lr, min(200, cfg.vae_steps // 10 + 1), cfg.vae_steps, 0.05, step)
        g = _generator(cfg.seed, 1, step, rank)
        which, idx = data.draw(g, cfg.vae_batch_size)
        x = to_model_size(data.gather(which, idx)[0]).to(accelerator.device)
        with accelerator.autocast():
            loss, mse = vae_loss(vae, x, g, cfg.vae_kl_weight)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        recent = (recent + [mse.item()])[-50:]
        if (step + 1) % 20 == 0:
            bar.set_postfix(mse=f"{sum(recent) / len(recent):.4f}")
    bar.close()
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    facts = {"vae_steps": cfg.vae_steps, "vae_final_mse": sum(recent) / max(1, len(recent))}
    return vae, facts


@torch.no_grad()
def encode_all(vae, data: BalancedDigits, device, batch_size: int = 512, progress: bool = True) -> list[tuple[Tensor, Tensor]]:
    """Posterior (mean, std) of every image of each dataset, on the CPU."""
    from tqdm.auto import tqdm

    out = []
    for k, images in enumerate(data.images):
        means, stds = [], []
        for i in tqdm(range(0, len(images), batch_size), desc=f"t2i encode set {k}", disable=not progress):
            x = to_model_size(images[i : i + batch_size].permute(0, 3, 1, 2).float().div(127.5).sub(1.0))
            post = vae.encode(x.to(device)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
        out.append((torch.cat(means), torch.cat(stds)))
    return out


def latent_scale(latents: list[tuple[Tensor, Tensor]], generator: torch.Generator, n: int = 4096) -> float:
    """1 / std of sampled latents over ``n`` images drawn evenly from the datasets (SD's rule)."""
    zs = []
    for mean, std in latents:
        idx = torch.randint(len(mean), (n // len(latents),), generator=generator)
        zs.append(mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator))
    return float(1.0 / torch.cat(zs).std())


# ------------------------------------------------------------ stage 1b: descriptor net
class DescriptorNet(torch.nn.Module):
    """A digit's form -> a ``features``-number descriptor (and 10 logits, for training).

    It sees only the form: grayscale, standardised per image, so colour and brightness
    cannot pass. Trained as a classifier of the nine named digits (the held-out digit's
    images are never shown to it, and its logit is masked), its features still tell a 7
    apart from the others (measured: a linear probe on them finds held-out MNIST-M 7s).
    """

    def __init__(self, hidden: int = 32, features: int = 32):
        super().__init__()
        act = torch.nn.SiLU()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, hidden, 3, padding=1), act,
            torch.nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), act,
            torch.nn.Conv2d(hidden, 2 * hidden, 3, padding=1), act,
            torch.nn.Conv2d(2 * hidden, 2 * hidden, 3, stride=2, padding=1), act,
            torch.nn.Flatten(), torch.nn.Linear(2 * hidden * 49, features),
        )
        self.norm = torch.nn.LayerNorm(features)
        self.head = torch.nn.Linear(features, 10)

    @staticmethod
    def form(x: Tensor) -> Tensor:
        """[B, 3, 28, 28] in [-1, 1] -> per-image standardised grayscale [B, 1, 28, 28]."""
        g = x.float().mean(1, keepdim=True)
        return (g - g.mean(dim=(2, 3), keepdim=True)) / (g.std(dim=(2, 3), keepdim=True) + 1e-3)

    def features(self, x: Tensor) -> Tensor:
        return self.norm(self.body(self.form(x)))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(F.silu(self.features(x)))
        return logits.index_fill(1, torch.tensor([HELD_OUT_DIGIT], device=logits.device), -1e4)


def named_only(data: BalancedDigits) -> BalancedDigits:
    """The same datasets without any image of the held-out digit."""
    return BalancedDigits([DigitSet(s.name, s.images[s.labels != HELD_OUT_DIGIT], s.labels[s.labels != HELD_OUT_DIGIT])
                           for s in data.sets])


def train_descriptor(data: BalancedDigits, cfg: T2ITrainConfig, progress: bool,
                     aux: Optional[Callable[[DescriptorNet], torch.nn.Module]] = None) -> tuple[DescriptorNet, dict]:
    """Stage 1b: the descriptor network, a classifier of the nine named digits (CPU, fp32).

    :param aux: for experiments (``benchmarks/descriptor_probe.py``): builds, right after
        the network, a module whose ``(net, step)`` call returns a loss added to the
        classification loss; its parameters are trained too.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed + 2)
    named = named_only(data)
    net = DescriptorNet()
    extra = aux(net) if aux is not None else None
    opt = torch.optim.AdamW(list(net.parameters()) + (list(extra.parameters()) if extra is not None else []), lr=2e-3)
    recent: list[float] = []
    bar = tqdm(range(cfg.descriptor_steps), desc="t2i descriptor", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(2e-3, 100, cfg.descriptor_steps, 0.05, step)
        x, y, _ = named.batch(_generator(cfg.seed, 3, step, 0), 128)
        logits = net(x)
        loss = F.cross_entropy(logits, y.long())
        if extra is not None:
            loss = loss + extra(net, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [float((logits.argmax(1) == y).float().mean())])[-50:]
        if (step + 1) % 20 == 0:
            bar.set_postfix(acc=f"{sum(recent) / len(recent):.3f}")
    bar.close()
    return net.eval().requires_grad_(False), {"descriptor_steps": cfg.descriptor_steps,
                                              "descriptor_train_acc": round(sum(recent) / max(1, len(recent)), 4)}


def splice_descriptors(text, mark_id: int):
    """Install a forward hook on ``text``'s input embedding that replaces the rows of token
    ``mark_id`` by ``state["vectors"][batch row]`` while ``state["vectors"]`` is set.
    Returns (state, hook handle)."""
    state: dict = {"vectors": None}

    def hook(module, inputs, output):
        vectors = state["vectors"]
        if vectors is None:
            return output
        mask = (inputs[0] == mark_id).unsqueeze(-1)
        return torch.where(mask, vectors.to(output.dtype).unsqueeze(1), output)

    return state, text.get_input_embeddings().register_forward_hook(hook)


def name_ids(tokenizer) -> list[int]:
    """Token ids of the nine named digits."""
    return [tokenizer.convert_tokens_to_ids(n + "</w>") for i, n in enumerate(DIGIT_NAMES) if i != HELD_OUT_DIGIT]


def read_descriptor_net(path: PathLike) -> DescriptorNet:
    """A saved descriptor network (``OUT/descriptor/descriptor.safetensors``), frozen."""
    net = DescriptorNet()
    net.load_state_dict(load_tensors(path))
    return net.eval().requires_grad_(False)


def load_descriptor(run: PathLike) -> tuple[DescriptorNet, torch.nn.Linear]:
    """The frozen descriptor network of a run and the projection of its newest checkpoint
    (descriptor features -> the text encoder's input-embedding space)."""
    run = Path(run)
    net = read_descriptor_net(run / "descriptor" / "descriptor.safetensors")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no checkpoint with a descriptor projection")
    w = load_tensors(ckpt / "projection_raw.safetensors")
    proj = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
    proj.load_state_dict(w)
    return net, proj.eval()


def _load_init_source(folder: PathLike):
    """The ``--init-from`` model folder, loaded once (float32, CPU) by the project's SD loader."""
    
    folder = Path(folder)
    for sub in ("vae", "unet", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {folder}: no {sub}/config.json (expected a `difflab t2i` model folder)")
    return load_sd(folder, device="cpu")


def _copy_weights(folder: PathLike, name: str, dst: torch.nn.Module, src: torch.nn.Module) -> None:
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise ValueError(f"--init-from {folder}: its {name} does not fit this run's model config: {e}") from None


# ----------------------------------------------------------------- stage 2: diffusion
def _save_checkpoint(out: Path, step: int, unet, text, ema: dict, optimizer, cfg: T2ITrainConfig, losses: list[float],
                     projection=None) -> Path:
    def write(folder: Path) -> None:
        if projection is not None:
            save_tensors(projection.state_dict(), folder / "projection_raw.safetensors")
        save_tensors(unet.state_dict(), folder / "unet_raw.safetensors")
        save_tensors(text.state_dict(), folder / "text_raw.safetensors")
        save_tensors(ema["unet"], folder / "unet_ema.safetensors")
        save_tensors(ema["text"], folder / "text_ema.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_json({"step": step, "losses": losses, "train_config": cfg.to_dict()}, folder / "state.json")

    return write_checkpoint(out / "checkpoints", step, write, cfg.keep_checkpoints)


def _with_weights(model: torch.nn.Module, state: dict[str, Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()


def config_changes(old: T2ITrainConfig, new: T2ITrainConfig) -> dict:
    """The training options a resumed leg changes: {option: [before, now]} (where it runs
    and how often it reports are left out)."""
    a, b = old.to_dict(), new.to_dict()
    ignore = {"device", "ckpt_every", "sample_every", "keep_checkpoints"}
    return {k: [a.get(k), b[k]] for k in sorted(b) if k not in ignore and a.get(k) != b[k]}


def train_t2i(
    data_root: PathLike,
    out: PathLike,
    cfg: T2ITrainConfig,
    *,
    resume: bool = False,
    stop_at: Optional[int] = None,
    data: Optional[BalancedDigits] = None,
    progress: bool = True,
) -> list[float]:
    """Train (or resume) the mini model into ``out``; returns the diffusion-stage losses.

    :param stop_at: stop after this many diffusion steps (the LR schedule still follows
        ``cfg.steps``), e.g. to test resumption.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out)
    existing = latest_checkpoint(out)
    if resume and existing is None and not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"--resume: nothing to resume in {out} (no vae/ and no checkpoints/)")
    if not resume and (existing is not None or (out / "vae").exists()):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or pick a new --out")
    start, losses, changed = 0, [], {}
    if existing is not None:
        state = load_json(existing / "state.json")
        saved = T2ITrainConfig.from_dict(state["train_config"])
        if saved.model != cfg.model:
            raise ValueError(f"--resume: {existing} was trained with a different model config ({saved.model})")
        if (saved.p_descriptor > 0) != (cfg.p_descriptor > 0):
            raise ValueError(f"--resume: {existing} was trained with p_descriptor {saved.p_descriptor}; a run cannot "
                             f"switch descriptor captions on or off (asked for {cfg.p_descriptor})")
        start, losses = int(state["step"]), list(state["losses"])
        changed = config_changes(saved, cfg)

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    main = accelerator.is_main_process
    show = progress and main
    if data is None:
        data = BalancedDigits.from_root(data_root, progress=show)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg.to_dict(), out / "train_config.json")
        build_tokenizer(out / "tokenizer", cfg.model.max_length)
    accelerator.wait_for_everyone()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    facts: dict = load_json(out / "mini_sd.json") if (out / "mini_sd.json").is_file() else {}
    if changed:  # a leg with other options: keep the history, train_config holds only the newest
        facts["legs"] = facts.get("legs", []) + [{"from_step": start, "changed": changed}]

    # ---- stage 1
    t0 = time.time()
    source = _load_init_source(cfg.init_from) if cfg.init_from and existing is None else None
    if source is not None and not (out / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(Path(cfg.init_from) / "vae")))  # no source path in it
        _copy_weights(cfg.init_from, "vae", vae, source.vae)
        vae.eval()
        src_facts = Path(cfg.init_from) / "mini_sd.json"
        known = load_json(src_facts) if src_facts.is_file() else {}
        facts.update({k: v for k, v in known.items() if k not in ("diffusion_steps", "train_config", "init")},
                     init={"from": str(cfg.init_from), "diffusion_steps": known.get("diffusion_steps"),
                           "train_config": known.get("train_config")})
        if main:
            save_folder(out, vae=vae, dtype=torch.float32, extra=facts)
        accelerator.wait_for_everyone()
    if (out / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(out / "vae"), local_files_only=True).float().eval().requires_grad_(False)
    else:
        vae, vae_facts = train_vae(data, cfg, accelerator, show)
        facts.update(vae_facts)
    vae.to(accelerator.device)
    latents = encode_all(vae, data, accelerator.device, progress=show)
    if not (out / "vae" / "config.json").is_file():
        scale = latent_scale(latents, torch.Generator().manual_seed(cfg.seed))
        vae.register_to_config(scaling_factor=scale)
        facts.update(vae_seconds=round(time.time() - t0, 1), latent_scale=scale)
        if main:
            save_folder(out, vae=vae, dtype=torch.float32, extra=facts)
    scale = float(vae.config.scaling_factor)

    # ---- stage 1b
    descriptor = projection = None
    if cfg.p_descriptor > 0:
        path = out / "descriptor" / "descriptor.safetensors"
        if path.is_file():
            descriptor = read_descriptor_net(path)
        else:
            descriptor, d_facts = train_descriptor(data, cfg, show)
            facts.update(d_facts)
            if main:
                save_tensors(descriptor.state_dict(), path)
        descriptor.to(accelerator.device)

    # ---- stage 2
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg.model)
    text = build_text_encoder(cfg.model, tokenizer)
    if source is not None:
        _copy_weights(cfg.init_from, "unet", unet, source.unet)
        _copy_weights(cfg.init_from, "text_encoder", text, source.text_encoder)
        del source
    text.requires_grad_(cfg.train_text_encoder)
    params = list(unet.parameters()) + (list(text.parameters()) if cfg.train_text_encoder else [])
    if descriptor is not None:
        projection = torch.nn.Linear(descriptor.norm.normalized_shape[0], cfg.model.text_width)
        with torch.no_grad():  # start * at the mean digit name, spread like the names are
            names = text.get_input_embeddings().weight[name_ids(tokenizer)]
            projection.bias.copy_(names.mean(0))
            projection.weight.normal_(0.0, float(names.std(0).mean()) / projection.in_features ** 0.5)
        params += list(projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = {"unet": {k: v.detach().clone().float() for k, v in unet.state_dict().items()},
           "text": {k: v.detach().clone().float() for k, v in text.state_dict().items()}}
    if existing is not None:
        unet.load_state_dict(load_tensors(existing / "unet_raw.safetensors"))
        text.load_state_dict(load_tensors(existing / "text_raw.safetensors"))
        ema = {"unet": load_tensors(existing / "unet_ema.safetensors"), "text": load_tensors(existing / "text_ema.safetensors")}
        if projection is not None:
            projection.load_state_dict(load_tensors(existing / "projection_raw.safetensors"))
        optimizer.load_state_dict(torch.load(existing / "optimizer.pt", weights_only=True))
    if projection is not None:
        mark = tokenizer.convert_tokens_to_ids(DESCRIPTOR_MARK + "</w>")
        if mark == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer in {out / 'tokenizer'} has no token for {DESCRIPTOR_MARK!r}")
        spliced, _ = splice_descriptors(text, mark)
        unet, text, projection, optimizer = accelerator.prepare(unet, text, projection, optimizer)
    else:
        unet, text, optimizer = accelerator.prepare(unet, text, optimizer)
    schedule = schedule_from_config(read_config("scheduler"))
    denoiser = UNetDenoiser(unet)
    labels = data.labels
    rank = accelerator.process_index
    length = cfg.model.max_length
    export_dtype = torch.float16 if cfg.export_dtype == "fp16" else torch.float32

    def checkpoint(step: int) -> None:
        _save_checkpoint(out, step, accelerator.unwrap_model(unet), accelerator.unwrap_model(text), ema, optimizer, cfg,
                         losses, projection=accelerator.unwrap_model(projection) if projection is not None else None)
        export(step)

    def export(step: int) -> None:
        u = _with_weights(accelerator.unwrap_model(unet), ema["unet"])
        tx = _with_weights(accelerator.unwrap_model(text), ema["text"])
        facts.update(diffusion_steps=step, train_config=cfg.to_dict())
        save_folder(out, unet=u, text_encoder=tx, dtype=export_dtype, extra=facts)

    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    bar = tqdm(range(start, end), initial=start, total=end, desc="t2i train", disable=not show)
    t1 = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio, step)
        g = _generator(cfg.seed, 2, step, rank)
        which, idx = data.draw(g, cfg.batch_size)
        mean = torch.empty((cfg.batch_size, *latents[0][0].shape[1:]))
        std = torch.empty_like(mean)
        digits = torch.empty(cfg.batch_size, dtype=torch.long)
        for k, (m, s) in enumerate(latents):
            sel = which == k
            mean[sel], std[sel], digits[sel] = m[idx[sel]], s[idx[sel]], labels[k][idx[sel]].long()
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        captions = draw_captions(digits, which, g, p_unnamed=cfg.p_unnamed, p_empty=cfg.p_empty,
                                 p_descriptor=cfg.p_descriptor, p_held_out_unnamed=cfg.p_held_out_unnamed)
        for c in captions:
            check_caption(c)
        t = torch.randint(schedule.num_steps, (cfg.batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        dev = accelerator.device
        unet.train()
        text.train(cfg.train_text_encoder)
        with accelerator.autocast():
            if projection is not None:
                with torch.no_grad():
                    feats = descriptor.features(data.gather(which, idx)[0].to(dev)).float()
                spliced["vectors"] = projection(feats)
            with torch.set_grad_enabled(cfg.train_text_encoder or projection is not None):
                cond = text(ids.to(dev))[0]
            loss = ddpm_loss(denoiser, schedule, z0.to(dev), t.to(dev), noise.to(dev), cond, min_snr_gamma=cfg.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema["unet"], accelerator.unwrap_model(unet), decay)
        ema_update(ema["text"], accelerator.unwrap_model(text), decay)
        losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
        done = step + 1
        if main:
            if done % 20 == 0 or done == end:
                recent = losses[-100:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if cfg.ckpt_every > 0 and (done % cfg.ckpt_every == 0 or done == end):
                checkpoint(done)
            if cfg.sample_every > 0 and (done % cfg.sample_every == 0 or done == end):
                write_sample_grid(out, out / "samples" / f"step_{done:07d}.png")
        accelerator.wait_for_everyone()
    bar.close()
    if main and cfg.ckpt_every <= 0 and end > start:
        checkpoint(end)
    if show:
        print(f"trained diffusion steps {start}..{end} in {time.time() - t1:.0f} s; model folder {out}")
    return losses


SAMPLE_PROMPTS = tuple(
    f"a photo of the digit {name}" + suffix
    for suffix in (" on a textured background", "")
    for name in ("zero", "one", "two", "three", "four", "five", "six", "eight", "nine")
) + ("a photo of a digit on a textured background", "a photo of a digit")


def write_sample_grid(model_dir: PathLike, path: PathLike, per_prompt: int = 4, steps: int = 25, guidance: float = 4.0) -> Path:
    """A grid of ``per_prompt`` samples (one row each) for each of SAMPLE_PROMPTS, from the
    exported model in ``model_dir``."""
    
    sd = load_sd(model_dir)
    images = [sample_images(sd, p, list(range(per_prompt)), steps=steps, guidance=guidance) for p in SAMPLE_PROMPTS]
    grid = torch.stack(images, dim=1).flatten(0, 1)  # column = prompt
    save_grid(grid, path, nrow=len(SAMPLE_PROMPTS))
    return Path(path)
