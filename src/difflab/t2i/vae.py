"""Stage 1 of ``difflab t2i train``: the VAE.

A small ``AutoencoderKL`` learns to reconstruct the 32x32 digits (mean squared error plus
a small KL term). Its ``scaling_factor`` is then set to 1 / std of the latents, as Stable
Diffusion does, and it is frozen. Written to ``OUT/vae`` in one go (float32, so a
resumed run encodes exactly as the first leg did); a resumed run reuses it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab.data import BalancedDigits
from difflab.io import load_json
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.model import IMAGE_SIZE, MiniConfig, build_vae, save_folder
from difflab.t2i.stages import STREAMS, Run, Stage, copy_weights, init_seed
from difflab.training import Loop, Shards, check_agreement, cosine_lr, module_tensors, run_loop, seeded_init

VAE_WARMUP_MAX = 200  # warm-up steps: a tenth of the run, at most this many
VAE_WARMUP_DIVISOR = 10
VAE_MIN_LR_RATIO = 0.05  # the cosine decays to this fraction of vae_lr
FINAL_WINDOW = 50  # steps averaged for the recorded final reconstruction error
SCALE_IMAGES = 4096  # images whose sampled latents set the latent scale
ENCODE_BATCH = 512


def to_model_size(x: Tensor) -> Tensor:
    """[B, 3, 28, 28] digits in [-1, 1] -> [B, 3, 32, 32] (bilinear)."""
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)


def latent_shape(cfg: MiniConfig) -> tuple[int, int, int]:
    """[C, h, w] of one image's latent."""
    side = IMAGE_SIZE // 2 ** (len(cfg.vae_channels) - 1)
    return cfg.latent_channels, side, side


def vae_loss(vae, x: Tensor, generator: torch.Generator, kl_weight: float) -> tuple[Tensor, Tensor]:
    """(total, reconstruction MSE) of one batch, the posterior sample's noise drawn from ``generator``."""
    post = vae.encode(x).latent_dist
    return _vae_loss(vae, x, post, torch.randn(post.mean.shape, generator=generator), kl_weight)


def _vae_loss(vae, x: Tensor, post, eps: Tensor, kl_weight: float) -> tuple[Tensor, Tensor]:
    """(total, reconstruction MSE) of one batch whose posterior ``post`` is sampled with noise ``eps``."""
    z = post.mean + post.std * eps.to(x.device, post.mean.dtype)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec.float(), x.float())
    kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).mean()
    return mse + kl_weight * kl, mse


class VAEStep(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode, as one ``forward``: the
    call that ``DistributedDataParallel`` hooks to average the gradients over processes
    (``vae.encode``/``vae.decode`` called on the wrapper would bypass it)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor, kl_weight: float) -> tuple[Tensor, Tensor]:
        return _vae_loss(self.vae, x, self.vae.encode(x).latent_dist, eps, kl_weight)


def train_vae(data: BalancedDigits, cfg: T2ITrainConfig, accelerator, progress: bool,
              shards: int = 1) -> tuple[torch.nn.Module, dict]:
    """Train a VAE for ``cfg.vae_steps`` steps; returns it frozen, and facts for mini_sd.json.

    Each step's batch (images and the posterior sample's noise) is ``shards`` shards of
    the stage's stream (:class:`difflab.training.Shards`), ``cfg.vae_batch_size`` rows per process.
    """
    with seeded_init(init_seed(cfg.seed, Stage.VAE)):
        vae = build_vae(cfg.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step_net, opt = accelerator.prepare(VAEStep(vae), opt)
    rows = Shards(shards, cfg.vae_batch_size, accelerator.num_processes, accelerator.process_index)
    warmup = min(VAE_WARMUP_MAX, cfg.vae_steps // VAE_WARMUP_DIVISOR + 1)

    def draw(g: torch.Generator, n: int):
        which, idx = data.draw(g, n)
        return data.gather(which, idx)[0], torch.randn((n, *latent_shape(cfg.model)), generator=g)

    def loss_step(step: int):
        images, eps = rows.draw(cfg.seed, step, draw, stream=int(Stage.VAE), streams=STREAMS)
        x = to_model_size(images).to(accelerator.device)
        with accelerator.autocast():
            loss, mse = step_net(x, eps, cfg.vae_kl_weight)
        return loss, {"mse": mse.item()}

    history = run_loop(Loop(accelerator, opt, loss_step, end=cfg.vae_steps, params=list(step_net.parameters()),
                            lr=lambda step: cosine_lr(cfg.vae_lr, warmup, cfg.vae_steps, VAE_MIN_LR_RATIO, step),
                            grad_clip=cfg.grad_clip, show="mse", desc="t2i vae", progress=progress))
    recent = history.get("mse", [])[-FINAL_WINDOW:]
    vae = accelerator.unwrap_model(step_net).vae.eval().requires_grad_(False)
    check_agreement(accelerator, module_tensors("vae", vae.state_dict()), "VAE weights after stage 1")
    return vae, {"vae_steps": cfg.vae_steps, "vae_final_mse": sum(recent) / max(1, len(recent))}


@torch.no_grad()
def encode_all(vae, data: BalancedDigits, device, batch_size: int = ENCODE_BATCH,
               progress: bool = True) -> list[tuple[Tensor, Tensor]]:
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


def latent_scale(latents: list[tuple[Tensor, Tensor]], generator: torch.Generator, n: int = SCALE_IMAGES) -> float:
    """1 / std of sampled latents over ``n`` images drawn evenly from the datasets (SD's rule)."""
    zs = []
    for mean, std in latents:
        idx = torch.randint(len(mean), (n // len(latents),), generator=generator)
        zs.append(mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator))
    return float(1.0 / torch.cat(zs).std())


def _copy_init_vae(run: Run) -> None:
    """Write ``OUT/vae`` as the init_from model's VAE, and take over that model's facts."""
    from diffusers import AutoencoderKL

    src = Path(run.cfg.init_from)
    with seeded_init(None):  # its random initial weights are overwritten
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(src / "vae")))  # no source path in it
    copy_weights(src, "vae", vae, run.source.vae)
    vae.eval()
    known = load_json(src / "mini_sd.json") if (src / "mini_sd.json").is_file() else {}
    run.facts.update({k: v for k, v in known.items() if k not in ("diffusion_steps", "train_config", "init")},
                     init={"from": str(src), "diffusion_steps": known.get("diffusion_steps"),
                           "train_config": known.get("train_config")})
    if run.main:
        save_folder(run.out, vae=vae, dtype=torch.float32, extra=run.facts)
    run.accelerator.wait_for_everyone()


def vae_stage(run: Run) -> tuple[list[tuple[Tensor, Tensor]], float]:
    """Stage 1: the VAE of ``OUT/vae`` (copied from init_from, or trained and written
    first); returns the posterior (mean, std) of every image and the latent scale."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    folder = run.out / "vae"
    if run.source is not None and not (folder / "config.json").is_file():
        _copy_init_vae(run)
    trained = not (folder / "config.json").is_file()
    if trained:
        vae, facts = train_vae(run.data, run.cfg, run.accelerator, run.show, run.shards)
        run.facts.update(facts)
    else:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).float().eval().requires_grad_(False)
    vae.to(run.accelerator.device)
    latents = encode_all(vae, run.data, run.accelerator.device, progress=run.show)
    if trained:
        scale = latent_scale(latents, torch.Generator().manual_seed(run.cfg.seed))
        vae.register_to_config(scaling_factor=scale)
        run.facts.update(vae_seconds=round(time.time() - t0, 1), latent_scale=scale)
        if run.main:
            save_folder(run.out, vae=vae, dtype=torch.float32, extra=run.facts)
    return latents, float(vae.config.scaling_factor)
