"""Training the conditional digit UNet (``difflab digits train``).

DDPM epsilon-prediction loss with independent condition dropout: the digit label is
replaced by its null token with probability ``p_uncond_digit`` and, independently, the
dataset label by its null token with probability ``p_uncond_dataset``. Sampling can
then guide on the digit, on the dataset, or on both.

Every batch (images, steps, noise, dropout masks) is a pure function of
(seed, step, process index), so ``--resume`` reproduces an uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from difflab.data import BalancedDigits
from difflab.digits.config import TrainConfig
from difflab.io import PathLike, load_json, load_tensors, save_json, save_tensors
from difflab.nets.digit_unet import NULL_DATASET, NULL_DIGIT, DigitDenoiser, DigitUNet
from difflab.schedule import NoiseSchedule, ddpm_loss
from difflab.training import cosine_lr, ema_update, latest_checkpoint, write_checkpoint


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    return cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio, step)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def draw_batch(data: BalancedDigits, cfg: TrainConfig, step: int, rank: int = 0):
    g = step_generator(cfg.seed, step, rank)
    x0, digit, dataset = data.batch(g, cfg.batch_size)
    t = torch.randint(cfg.num_train_steps, (cfg.batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop_d = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond_digit
    drop_s = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond_dataset
    digit = torch.where(drop_d, torch.full_like(digit, NULL_DIGIT), digit)
    dataset = torch.where(drop_s, torch.full_like(dataset, NULL_DATASET), dataset)
    return x0, t, noise, digit, dataset


def _save_checkpoint(run_dir: Path, step: int, model, ema: dict, optimizer, cfg: TrainConfig, losses: list[float], keep: int) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` atomically (see :func:`difflab.training.write_checkpoint`)."""

    def write(folder: Path) -> None:
        meta = {"model": cfg.model.to_dict(), "schedule": cfg.schedule, "num_train_steps": cfg.num_train_steps}
        save_json(meta, folder / "config.json")
        save_tensors(ema, folder / "model.safetensors")
        save_tensors(model.state_dict(), folder / "raw.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_json({"step": step, "losses": losses, "train_config": cfg.to_dict()}, folder / "state.json")

    return write_checkpoint(run_dir / "checkpoints", step, write, keep)


def train(
    data_root: PathLike,
    run_dir: PathLike,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    stop_at: Optional[int] = None,
    data: Optional[BalancedDigits] = None,
    progress: bool = True,
    sample_fn: Optional[Callable] = None,
) -> list[float]:
    """Train (or resume) a digit model in ``run_dir``; returns the per-step losses.

    :param stop_at: stop after this many total steps (to test resumption); the LR
        schedule still follows ``cfg.steps``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    start, losses = 0, []
    existing = latest_checkpoint(run_dir)
    if resume and existing is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    if not resume and existing is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue it or pick a new --out")
    latest = existing if resume else None
    if latest is not None:
        state = load_json(latest / "state.json")
        saved = TrainConfig.from_dict(state["train_config"])
        if saved.model != cfg.model or saved.schedule != cfg.schedule:
            raise ValueError(f"--resume: {latest} was trained with a different model/schedule config")
        start, losses = int(state["step"]), list(state["losses"])

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    if data is None:
        data = BalancedDigits.from_root(data_root, progress=progress and accelerator.is_main_process)
    torch.manual_seed(cfg.seed)  # parameter initialisation only
    model = DigitUNet(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    if latest is not None:
        model.load_state_dict(load_tensors(latest / "raw.safetensors"))
        ema = load_tensors(latest / "model.safetensors")
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_train_steps)
    denoiser = DigitDenoiser(model)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(cfg.to_dict(), run_dir / "train_config.json")

    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    rank = accelerator.process_index
    bar = tqdm(range(start, end), initial=start, total=end, desc="train", disable=not (progress and accelerator.is_main_process))
    t0 = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        x0, t, noise, digit, dataset = (v.to(accelerator.device) for v in draw_batch(data, cfg, step, rank))
        model.train()
        with accelerator.autocast():
            loss = ddpm_loss(denoiser, schedule, x0, t, noise, (digit, dataset), min_snr_gamma=cfg.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema, accelerator.unwrap_model(model), decay)
        loss_value = float(accelerator.gather(loss.detach()[None]).mean())
        losses.append(loss_value)
        done = step + 1
        if accelerator.is_main_process:
            if done % 20 == 0 or done == end:
                recent = losses[-100:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_at(cfg, step):.1e}")
            if cfg.ckpt_every > 0 and (done % cfg.ckpt_every == 0 or done == end):
                _save_checkpoint(run_dir, done, accelerator.unwrap_model(model), ema, optimizer, cfg, losses, cfg.keep_checkpoints)
            if sample_fn is not None and cfg.sample_every > 0 and (done % cfg.sample_every == 0 or done == end):
                sample_fn(ema, cfg, run_dir / "samples" / f"step_{done:07d}.png")
        accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process and progress:
        print(f"trained steps {start}..{end} in {time.time() - t0:.0f} s; run folder {run_dir}")
    return losses
