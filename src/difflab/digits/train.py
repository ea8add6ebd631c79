"""Training the conditional digit UNet (``difflab digits train``).

DDPM epsilon-prediction loss with independent condition dropout: the digit label is
replaced by its null token with probability ``p_uncond_digit`` and, independently, the
dataset label by its null token with probability ``p_uncond_dataset``. Sampling can
then guide on the digit, on the dataset, or on both.

Every batch (images, steps, noise, dropout masks) is a pure function of
(seed, step, shard) (:class:`difflab.training.Shards`), so ``--resume`` reproduces an
uninterrupted run, and one process with batch N x B and N shards draws what N processes
with batch B draw (docs/multi-process.md).

A resumed run keeps the options that decide its results: it may train more steps and
change where and how often it reports (:data:`difflab.training.NOT_A_CHANGE`), and its
batch size only with the process count, keeping the global batch
(:func:`difflab.training.resume_shards`); any other change is refused. Each leg that
changes options is recorded under ``legs`` in ``state.json`` and ``train_config.json``
(which holds the newest leg's options). The main process holds ``RUN/.lock`` while it
trains (:func:`difflab.training.run_lock`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from difflab.data import BalancedDigits
from difflab.digits.config import TrainConfig
from difflab.io import PathLike, load_json, load_tensors, save_json, save_tensors
from difflab.nets.digit_unet import NULL_DATASET, NULL_DIGIT, DigitDenoiser, DigitUNet
from difflab.options import Config
from difflab.processes import main_process
from difflab.schedule import NoiseSchedule, ddpm_loss
from difflab.training import (
    EMA,
    LOCK_NAME,
    Loop,
    Shards,
    add_leg,
    config_changes,
    cosine_lr,
    make_accelerator,
    module_tensors,
    optimizer_tensors,
    refuse_changes,
    resume_or_refuse,
    resume_shards,
    run_lock,
    run_loop,
    seeded_init,
    write_checkpoint,
)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    return cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio, step)


def draw_shard(data: BalancedDigits, cfg: TrainConfig, g: torch.Generator, n: int):
    """Images, steps, noise and condition-dropped labels of ``n`` rows drawn from ``g``."""
    x0, digit, dataset = data.batch(g, n, (1.0 - cfg.svhn_share, cfg.svhn_share))
    t = torch.randint(cfg.num_train_steps, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop_d = torch.rand(n, generator=g) < cfg.p_uncond_digit
    drop_s = torch.rand(n, generator=g) < cfg.p_uncond_dataset
    digit = torch.where(drop_d, torch.full_like(digit, NULL_DIGIT), digit)
    dataset = torch.where(drop_s, torch.full_like(dataset, NULL_DATASET), dataset)
    return x0, t, noise, digit, dataset


def draw_batch(data: BalancedDigits, cfg: TrainConfig, step: int, shards: Optional[Shards] = None):
    """(x0, t, noise, digit, dataset) of one step on one process (``shards``: which rows;
    None: one process, one shard of ``cfg.batch_size``)."""
    shards = shards or Shards(1, cfg.batch_size)
    return shards.draw(cfg.seed, step, lambda g, n: draw_shard(data, cfg, g, n))


def save_checkpoint(run_dir: Path, step: int, meta: dict, model, ema: dict, optimizer, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` atomically (see :func:`difflab.training.write_checkpoint`):
    ``config.json`` (``meta``: what :func:`difflab.digits.model_io.load_digit_model` reads),
    the EMA and raw weights, the optimizer state, and ``state.json`` (``{"step": step, **state}``)."""

    def write(folder: Path) -> None:
        save_json(meta, folder / "config.json")
        save_tensors(ema, folder / "model.safetensors")
        save_tensors(model.state_dict(), folder / "raw.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_json({"step": step, **state}, folder / "state.json")

    return write_checkpoint(run_dir / "checkpoints", step, write, keep)


def run_state(cfg: Config, losses: list[float], processes: Optional[dict], legs: Sequence[dict]) -> dict:
    """What ``state.json`` records beside the step: losses, options, the legs that changed
    options (:func:`difflab.training.add_leg`) and the processes (:class:`difflab.training.Loop`)."""
    return {"losses": losses, "train_config": cfg.to_dict(), **({"legs": list(legs)} if legs else {}), **(processes or {})}


def resumed(latest: Optional[Path], config_type: type = TrainConfig, before: Optional[dict] = None) -> tuple:
    """(first step, losses so far, the checkpoint's state, its options as ``config_type``) of
    a run resumed from checkpoint ``latest`` (None: a new run). ``before``: the values of
    options added after a run was saved, as such runs had them."""
    if latest is None:
        return 0, [], None, None
    state = load_json(latest / "state.json")
    options = {**(before or {}), **state["train_config"]}
    return int(state["step"]), list(state["losses"]), state, config_type.from_dict(options)


def leg_changes(run_dir: Path, saved: Optional[Config], state: Optional[dict], cfg: Config, world: int) -> dict:
    """The options this leg changes (:func:`difflab.training.config_changes`), after
    refusing any it may not: more steps, NOT_A_CHANGE, and the batch size together with
    the process count (``resume_shards`` has checked that the global batch is kept)."""
    if saved is None:
        return {}
    changes = config_changes(saved, cfg)
    moved = world != int(state.get("world_size", 1))
    refuse_changes(run_dir, changes, may_change=("batch_size",) if moved else ())
    return changes


def optimizer_and_ema(model, lr: float, weight_decay: float, ema_decay: float, latest: Optional[Path]):
    """AdamW and the EMA of ``model``; from ``latest`` (a checkpoint folder) the raw weights
    go into ``model`` and the EMA and optimizer state are restored."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMA(ema_decay, {"model": model})
    if latest is not None:
        model.load_state_dict(load_tensors(latest / "raw.safetensors"))
        ema.shadows["model"] = load_tensors(latest / "model.safetensors")
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    return optimizer, ema


def state_tensors(model, ema: dict, optimizer):
    """What every process holds alike: raw weights, EMA and optimizer state."""
    yield from module_tensors("raw", model.state_dict())
    yield from module_tensors("ema", ema)
    yield from optimizer_tensors(optimizer)


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
    shards: Optional[int] = None,
) -> list[float]:
    """Train (or resume) a digit model in ``run_dir``; returns the per-step losses (each
    the mean over the processes).

    Under ``accelerate launch``/``torchrun`` every process runs this; ``cfg.batch_size`` is
    per process, and only the main process writes.

    :param stop_at: stop after this many total steps (to test resumption); the LR
        schedule still follows ``cfg.steps``.
    :param sample_fn: ``(ema weights, cfg, png path)``, called every ``cfg.sample_every``
        steps and at the end.
    :param shards: draw each step's global batch as this many shards (None: one per
        process; see :class:`difflab.training.Shards`): one process with batch N x B and
        ``shards=N`` follows N processes with batch B. A resumed run keeps its own.
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir / LOCK_NAME, f"run folder {run_dir}", hold=main_process()):
        return _train(data_root, run_dir, cfg, resume, stop_at, data, progress, sample_fn, shards)


def _train(data_root, run_dir: Path, cfg: TrainConfig, resume: bool, stop_at: Optional[int],
           data: Optional[BalancedDigits], progress: bool, sample_fn: Optional[Callable], shards: Optional[int]) -> list[float]:
    latest = resume_or_refuse(run_dir, resume)
    start, losses, state, saved = resumed(latest, TrainConfig, {"svhn_share": 0.5})  # runs before --svhn-share: half
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    count = resume_shards(latest, state, world, cfg.batch_size, saved.batch_size if saved else 0, shards)
    legs = add_leg((state or {}).get("legs", []), start, leg_changes(run_dir, saved, state, cfg, world))
    rows = Shards(count, cfg.batch_size, world, rank)
    if data is None:
        data = BalancedDigits.from_root(data_root, progress=progress and accelerator.is_main_process)
    with seeded_init(cfg.seed):
        model = DigitUNet(cfg.model)
    optimizer, ema = optimizer_and_ema(model, cfg.lr, cfg.weight_decay, cfg.ema_decay, latest)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_train_steps)
    denoiser = DigitDenoiser(model)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json({**cfg.to_dict(), **({"legs": legs} if legs else {})}, run_dir / "train_config.json")
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps

    def loss_step(step: int):
        x0, t, noise, digit, dataset = (v.to(accelerator.device) for v in draw_batch(data, cfg, step, rows))
        model.train()
        with accelerator.autocast():
            return ddpm_loss(denoiser, schedule, x0, t, noise, (digit, dataset), min_snr_gamma=cfg.min_snr_gamma), {}

    def checkpoint(done: int, processes: dict) -> None:
        meta = {"model": cfg.model.to_dict(), "schedule": cfg.schedule, "num_train_steps": cfg.num_train_steps}
        save_checkpoint(run_dir, done, meta, accelerator.unwrap_model(model), ema.shadows["model"], optimizer,
                        run_state(cfg, losses, processes, legs), cfg.keep_checkpoints)

    def sample(done: int) -> None:
        sample_fn(ema.shadows["model"], cfg, run_dir / "samples" / f"step_{done:07d}.png")

    run_loop(Loop(accelerator, optimizer, loss_step, start=start, end=end,
                  lr=lambda step: lr_at(cfg, step), params=list(model.parameters()), grad_clip=cfg.grad_clip, ema=ema,
                  checkpoint=checkpoint, checkpoint_every=cfg.ckpt_every, shards=count,
                  state=lambda: state_tensors(accelerator.unwrap_model(model), ema.shadows["model"], optimizer),
                  sample=sample if sample_fn else None,
                  sample_every=cfg.sample_every, history={"loss": losses}, desc="digits train", progress=progress,
                  where=f"run folder {run_dir}"))
    return losses
