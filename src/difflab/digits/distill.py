"""Guidance distillation of a digit model (``difflab digits distill``).

A guided model costs two network evaluations per sampling step (conditional and
unconditional). The student learns the teacher's guided prediction

    eps_S(x, t, c) = eps_u + S (eps_c - eps_u),      eps_c, eps_u: the teacher's,

in one evaluation (Meng et al. 2023, "On distillation of guided diffusion models", stage
one, here for one fixed S and guidance on both conditions). It starts as a copy of the
teacher and is trained on the squared error to eps_S. Each batch holds two kinds of rows:

- *data rows*: real images noised to a uniform random step (the student stays usable at
  any step and with any sampler);
- *trajectory rows*: states of the teacher's own guided DDIM trajectories (``sample_steps``
  uniform steps, x0 clipped to [-1, 1], as ``digits generate`` samples), which are where
  sampling queries the student. The target of such a row is the guided prediction the
  teacher made there, so these rows cost no extra teacher evaluation.

Trajectories come in *blocks* of ``sample_steps`` training steps: block ``b`` runs the
teacher from starting noise and labels drawn from ``batch_generator(seed, b, shard, 1, 2)``
and, at step ``j`` of the block, row ``r`` takes the state ``(r + j) mod sample_steps``, so
every state is used once and each batch mixes all steps. Data rows are drawn per step from
stream 0. So, as for ``digits train``, a batch is a pure function of (seed, step, shard):
``--resume`` reproduces an uninterrupted run (a block interrupted halfway is run again).

The model folder records ``"distilled": {"guidance_scale": S, "guide_on": "both",
"teacher_sha256": ...}`` in ``config.json``; sampling then makes one evaluation per step
and refuses guidance options the student does not hold (:func:`difflab.digits.generate.sample_digits`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from difflab.data import BalancedDigits
from difflab.digits.config import DistillConfig
from difflab.digits.generate import null_condition
from difflab.digits.model_io import load_digit_model
from difflab.digits.train import leg_changes, optimizer_and_ema, resumed, run_state, save_checkpoint, state_tensors
from difflab.guidance import guided
from difflab.io import PathLike, save_json
from difflab.nets.digit_unet import NUM_DIGITS, DigitDenoiser, DigitUNet
from difflab.processes import main_process
from difflab.sampling import ddim_sample, spaced_timesteps
from difflab.schedule import NoiseSchedule
from difflab.training import (
    LOCK_NAME,
    Loop,
    Shards,
    add_leg,
    cosine_lr,
    make_accelerator,
    resume_or_refuse,
    resume_shards,
    run_lock,
    run_loop,
    tensor_digest,
)

DATA_STREAM, TRAJECTORY_STREAM, STREAMS = 0, 1, 2
CLIP_X0 = 1.0  # the trajectories clip x0 as `digits generate` does by default


def load_teacher(path: PathLike, device="cpu") -> tuple[DigitUNet, NoiseSchedule, dict, str]:
    """(network, schedule, config.json, sha256 of its weights: :func:`difflab.training.tensor_digest`)
    of a guided teacher; a model that is itself distilled is refused (it holds no
    unconditional prediction to guide with)."""
    net, schedule, meta = load_digit_model(path, device=device)
    if meta.get("distilled") is not None:
        raise ValueError(f"--teacher {path}: this model is already distilled (guidance scale "
                         f"{meta['distilled'].get('guidance_scale')}); distil from the guided model it came from")
    net.requires_grad_(False)
    return net, schedule, meta, tensor_digest(net.state_dict().items())


def teacher_trajectories(teacher_eps, schedule: NoiseSchedule, timesteps: Tensor, noise: Tensor, cond) -> tuple[Tensor, Tensor, Tensor]:
    """Run guided DDIM (eta 0, x0 clipped to +-1) from ``noise`` [n, 3, 28, 28] and record
    every state the sampler evaluates: (x [n, N, 3, 28, 28], t [n, N], eps [n, N, 3, 28, 28]),
    N = len(timesteps), eps being the guided prediction made at that state."""
    states: list[tuple[Tensor, Tensor]] = []

    def recording(x: Tensor, t: Tensor, c) -> Tensor:
        eps = teacher_eps(x, t, c).float()
        states.append((x, eps))
        return eps

    ddim_sample(recording, schedule, noise, timesteps, cond, clip_x0=CLIP_X0)
    x = torch.stack([s[0] for s in states], dim=1)
    eps = torch.stack([s[1] for s in states], dim=1)
    t = timesteps.to(x.device).repeat(len(noise), 1)
    return x, t, eps


def draw_starts(cfg: DistillConfig, g: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Starting noise, digit and dataset of ``n`` teacher trajectories."""
    noise = torch.randn((n, 3, 28, 28), generator=g)
    digit = torch.randint(NUM_DIGITS, (n,), generator=g)
    dataset = (torch.rand(n, generator=g) < cfg.svhn_share).long()
    return noise, digit, dataset


def draw_data(data: BalancedDigits, cfg: DistillConfig, num_train_steps: int, g: torch.Generator, n: int):
    """Real images, their labels, uniform random steps and noise of ``n`` data rows."""
    x0, digit, dataset = data.batch(g, n, (1.0 - cfg.svhn_share, cfg.svhn_share))
    t = torch.randint(num_train_steps, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise, digit, dataset


def split_rows(cfg: DistillConfig) -> tuple[int, int]:
    """(trajectory rows, data rows) of each process's batch."""
    k = round(cfg.batch_size * cfg.trajectory_share)
    return k, cfg.batch_size - k


class Batches:
    """The (x_t, t, digit, dataset, target eps) rows of each step on one process; the
    trajectories of the current block are kept until the block ends."""

    def __init__(self, teacher_eps, schedule: NoiseSchedule, data: Optional[BalancedDigits], cfg: DistillConfig,
                 count: int, world: int, rank: int, device):
        self.teacher_eps, self.schedule, self.data, self.cfg, self.device = teacher_eps, schedule, data, cfg, device
        k, m = split_rows(cfg)
        self.traj = Shards(count, k, world, rank) if k else None
        self.rows = Shards(count, m, world, rank) if m else None
        self.timesteps = spaced_timesteps(schedule, cfg.sample_steps, "uniform")
        self.block: Optional[tuple[int, tuple]] = None

    def _trajectory_rows(self, step: int) -> tuple:
        n_steps = len(self.timesteps)
        b, j = divmod(step, n_steps)
        if self.block is None or self.block[0] != b:
            noise, digit, dataset = (v.to(self.device) for v in self.traj.draw(
                self.cfg.seed, b, lambda g, n: draw_starts(self.cfg, g, n), TRAJECTORY_STREAM, STREAMS))
            x, t, eps = teacher_trajectories(self.teacher_eps, self.schedule, self.timesteps, noise, (digit, dataset))
            self.block = (b, (x, t, eps, digit, dataset))
        x, t, eps, digit, dataset = self.block[1]
        rows = torch.arange(len(x), device=x.device)
        which = (rows + j) % n_steps
        return x[rows, which], t[rows, which], digit, dataset, eps[rows, which]

    def _data_rows(self, step: int) -> tuple:
        x0, t, noise, digit, dataset = (v.to(self.device) for v in self.rows.draw(
            self.cfg.seed, step, lambda g, n: draw_data(self.data, self.cfg, self.schedule.num_steps, g, n),
            DATA_STREAM, STREAMS))
        x_t = self.schedule.q_sample(x0, t, noise)
        return x_t, t, digit, dataset, self.teacher_eps(x_t, t, (digit, dataset)).float()

    @torch.no_grad()
    def __call__(self, step: int) -> tuple:
        parts = ([self._trajectory_rows(step)] if self.traj else []) + ([self._data_rows(step)] if self.rows else [])
        return tuple(torch.cat(col) for col in zip(*parts))


def distill(teacher: PathLike, data_root: Optional[PathLike], run_dir: PathLike, cfg: DistillConfig, *,
            resume: bool = False, stop_at: Optional[int] = None, data: Optional[BalancedDigits] = None,
            progress: bool = True) -> list[float]:
    """Distil the guided ``teacher`` (a model or run folder) into a one-evaluation student
    in ``run_dir``; returns the per-step losses. ``data_root`` (the course's digit data) is
    needed when any rows are data rows (``trajectory_share < 1``). ``stop_at``: stop after
    this many total steps (to test resumption; the LR schedule still follows ``cfg.steps``)."""
    cfg.validate()
    run_dir = Path(run_dir)
    with run_lock(run_dir / LOCK_NAME, f"run folder {run_dir}", hold=main_process()):
        return _distill(teacher, data_root, run_dir, cfg, resume, stop_at, data, progress)


def _check_teacher(run_dir: Path, state: Optional[dict], digest: str) -> None:
    saved = (state or {}).get("teacher_sha256")
    if saved is not None and saved != digest:
        raise ValueError(f"--resume: {run_dir} was distilled from a teacher with weights sha256 {saved[:12]}..., "
                         f"the --teacher given has {digest[:12]}...; give the same teacher or a new --out")


def _distill(teacher_path, data_root, run_dir: Path, cfg: DistillConfig, resume: bool, stop_at: Optional[int],
             data: Optional[BalancedDigits], progress: bool) -> list[float]:
    latest = resume_or_refuse(run_dir, resume)
    start, losses, state, saved = resumed(latest, DistillConfig)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    count = resume_shards(latest, state, world, cfg.batch_size, saved.batch_size if saved else 0)
    legs = add_leg((state or {}).get("legs", []), start, leg_changes(run_dir, saved, state, cfg, world))
    teacher, schedule, meta, digest = load_teacher(teacher_path, device=accelerator.device)
    _check_teacher(run_dir, state, digest)
    if data is None and split_rows(cfg)[1]:
        if data_root is None:
            raise ValueError("--data is needed unless --trajectory-share is 1 (every row from the teacher's trajectories)")
        data = BalancedDigits.from_root(data_root, progress=progress and accelerator.is_main_process)
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # a new run starts as the teacher
    optimizer, ema = optimizer_and_ema(student, cfg.lr, 0.0, cfg.ema_decay, latest)
    student, optimizer = accelerator.prepare(student, optimizer)
    guided_teacher = guided(DigitDenoiser(teacher), cfg.guidance_scale - 1.0, null_condition("both"))

    def teacher_eps(x, t, cond):
        with accelerator.autocast():
            return guided_teacher(x, t, cond)

    batches = Batches(teacher_eps, schedule, data, cfg, count, world, rank, accelerator.device)
    denoiser = DigitDenoiser(student)
    meta = {**meta, "distilled": {"guidance_scale": cfg.guidance_scale, "guide_on": "both", "teacher_sha256": digest}}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json({**cfg.to_dict(), "teacher": str(teacher_path), **({"legs": legs} if legs else {})},
                  run_dir / "train_config.json")

    def loss_step(step: int):
        x, t, digit, dataset, target = batches(step)
        with accelerator.autocast():
            eps = denoiser(x, t, (digit, dataset))
        return (eps.float() - target).pow(2).mean(), {}

    def checkpoint(done: int, processes: dict) -> None:
        state_ = {**run_state(cfg, losses, processes, legs), "teacher": str(teacher_path), "teacher_sha256": digest}
        save_checkpoint(run_dir, done, meta, accelerator.unwrap_model(student), ema.shadows["model"], optimizer,
                        state_, cfg.keep_checkpoints)

    run_loop(Loop(accelerator, optimizer, loss_step, start=start,
                  end=min(cfg.steps, stop_at) if stop_at is not None else cfg.steps,
                  lr=lambda step: cosine_lr(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio, step),
                  params=list(student.parameters()), grad_clip=cfg.grad_clip, ema=ema, checkpoint=checkpoint,
                  checkpoint_every=cfg.ckpt_every, shards=count,
                  state=lambda: state_tensors(accelerator.unwrap_model(student), ema.shadows["model"], optimizer),
                  history={"loss": losses}, desc="digits distill", progress=progress, where=f"run folder {run_dir}"))
    return losses
