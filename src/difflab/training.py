"""The one training harness, used by ``digits train``, ``t2i train`` (all its stages) and
``ti train``.

A problem supplies its networks, optimizer, a *loss step* (draw the step's batch, return
the loss) and its checkpoint writer; the harness owns the rest: the Accelerate set-up
(:func:`make_accelerator`), resume-or-refuse checks of a run folder
(:func:`resume_or_refuse`), the warm-up + cosine learning rate (:func:`cosine_lr`), EMA
with warm-up (:class:`EMA`), the optimisation step (:func:`optimizer_step`), and, in
:func:`run_loop`, loss gathering, the progress bar, the checkpoint and sample cadence and
the final message.

Randomness: every batch comes from :func:`batch_generator`, a pure function of
(seed, step, process rank) and, for problems with several stages, a stream per stage, so a
resumed run draws exactly what an uninterrupted one draws. Parameter initialisation uses
the global RNG inside :func:`seeded_init`, which leaves the caller's RNG as it was.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from difflab.devices import resolve_device
from difflab.io import PathLike, staged_dir

MAX_RANKS = 64  # processes batch_generator keeps apart: the seed holds the rank in its last factor
STEP_STRIDE = 1_000_003  # a prime above any step count, so (seed, step) pairs give distinct integers
LOG_EVERY = 20  # steps between progress-bar updates (and always at the last step)
LOG_WINDOW = 100  # steps whose mean the progress bar shows
TRAIN_DEVICES = ("auto", "cpu", "cuda")  # one process per GPU: several GPUs through `accelerate launch`

# (loss, extra per-step values to record, e.g. {"acc": 0.9}) for one step
LossStep = Callable[[int], "tuple[Tensor, dict[str, float]]"]


# ------------------------------------------------------------------------- randomness
def batch_generator(seed: int, step: int, rank: int, stream: int = 0, streams: int = 1) -> torch.Generator:
    """The CPU generator of one batch: seeded with
    ``((seed * STEP_STRIDE + step) * streams + stream) * MAX_RANKS + rank``.

    ``stream`` in ``[0, streams)`` keeps the draws of a problem's stages apart (t2i: one
    stream per stage); ``rank`` is the process index, below ``MAX_RANKS``.
    """
    if not 0 <= rank < MAX_RANKS:
        raise ValueError(f"rank must be in [0, {MAX_RANKS}) (MAX_RANKS), got {rank!r}")
    if not 0 <= stream < streams:
        raise ValueError(f"stream must be in [0, streams={streams}), got {stream!r}")
    return torch.Generator().manual_seed(((seed * STEP_STRIDE + step) * streams + stream) * MAX_RANKS + rank)


@contextlib.contextmanager
def seeded_init(seed: Optional[int]) -> Iterator[None]:
    """Run a block (parameter initialisation) on the global CPU RNG seeded with ``seed``
    (None: its current state), then restore the caller's RNG state.

    Only the CPU generator is seeded and restored: networks are built on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        yield


# ------------------------------------------------------------------ set-up and resume
def make_accelerator(device: Optional[str], mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for ``device`` ("auto" or None: cuda when available,
    else cpu; "cpu"; "cuda") with ``mixed_precision`` ("no", "fp16", "bf16").

    Asking for cuda where there is none is an error (:func:`difflab.devices.resolve_device`),
    not a CPU run.
    """
    if device is not None and str(device) not in TRAIN_DEVICES:
        raise ValueError(f"device must be one of {TRAIN_DEVICES} or None for training, got {device!r}")
    dev = resolve_device(device)
    from accelerate import Accelerator

    return Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision)


def resume_or_refuse(run_dir: PathLike, resume: bool, started: Sequence[str] = ()) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` to resume from (None: start afresh).

    A run folder has started when it holds a complete checkpoint or any of ``started``
    (paths relative to it). Starting over a started folder raises FileExistsError;
    resuming one that has not started raises FileNotFoundError.
    """
    run_dir = Path(run_dir)
    existing = latest_checkpoint(run_dir)
    begun = existing is not None or any((run_dir / p).exists() for p in started)
    if resume and not begun:
        also = "".join(f" and no {p}/" for p in started)
        raise FileNotFoundError(f"--resume: nothing to resume in {run_dir}: no complete checkpoint in "
                                f"{run_dir / 'checkpoints'}{also}")
    if not resume and begun:
        raise FileExistsError(f"{run_dir} already holds a training run; pass --resume to continue it or pick a new --out")
    return existing


# ------------------------------------------------------------------- step ingredients
def cosine_lr(base: float, warmup: int, total: int, min_ratio: float, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay after optimisation step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``,
    so the average is not dominated by the random initial weights early on."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, per tensor of ``model.state_dict()``
    (integer buffers are copied)."""
    for k, v in model.state_dict().items():
        e = ema[k]
        if e.dtype.is_floating_point:
            e.lerp_(v.detach().to(e.device, e.dtype), 1 - decay)
        else:
            e.copy_(v)


class EMA:
    """Float32 shadows of named models' state dicts, updated after every step with the
    warm-up decay :func:`ema_decay`.

    ``models`` are the modules themselves (``accelerator.prepare`` moves them in place);
    ``shadows`` defaults to copies of their current weights, on their current device.
    """

    def __init__(self, decay: float, models: dict[str, torch.nn.Module],
                 shadows: Optional[dict[str, dict[str, Tensor]]] = None):
        self.decay, self.models = decay, models
        self.shadows = shadows if shadows is not None else {
            name: {k: v.detach().clone().float() for k, v in m.state_dict().items()} for name, m in models.items()}

    def update(self, step: int, unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> None:
        d = ema_decay(self.decay, step)
        for name, model in self.models.items():
            ema_update(self.shadows[name], unwrap(model), d)


def optimizer_step(accelerator, optimizer, loss: Tensor, params: Sequence[torch.nn.Parameter] = (),
                   grad_clip: float = 0.0) -> None:
    """zero_grad, backward through ``accelerator``, clip ``params``' gradient norm to
    ``grad_clip`` (when > 0), step."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()


class LocalAccelerator:
    """What :func:`run_loop` uses of an ``Accelerator``, for one process on the CPU in
    float32 without Accelerate: a side network that every process trains alike."""

    device = torch.device("cpu")
    is_main_process = True
    process_index = 0

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wait_for_everyone(self) -> None:
        pass

    def autocast(self):
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------- loop
def is_due(done: int, every: int, end: int) -> bool:
    """True after every ``every``-th step and after the last one (``done == end``); never
    when ``every <= 0``."""
    return every > 0 and (done % every == 0 or done == end)


@dataclass
class Loop:
    """One training loop: what :func:`run_loop` runs for steps ``start .. end - 1``.

    :param loss_step: ``step -> (loss, extra)``: draws the step's batch (as a function of
        the step and rank), runs the forward pass, returns the loss and other per-step
        values to record (``{}`` for none).
    :param lr: ``step -> learning rate``, set on every parameter group before the step
        (None: the optimizer's own).
    :param params: the parameters whose gradient norm is clipped to ``grad_clip`` (> 0).
    :param checkpoint: ``done ->`` write a checkpoint after ``done`` steps; called on the
        main process every ``checkpoint_every`` steps (<= 0: only at the end) and at ``end``.
    :param sample: ``done ->`` write samples; every ``sample_every`` steps and at the end
        (<= 0: never).
    :param history: per-step values so far (``"loss"``: the losses of a resumed run); the
        lists are appended to in place.
    :param show: the history whose mean over the last ``LOG_WINDOW`` steps the bar shows.
    :param where: named in the final message (e.g. the run folder).
    """

    accelerator: Any
    optimizer: Any
    loss_step: LossStep
    end: int
    start: int = 0
    lr: Optional[Callable[[int], float]] = None
    params: Sequence[torch.nn.Parameter] = ()
    grad_clip: float = 0.0
    ema: Optional[EMA] = None
    checkpoint: Optional[Callable[[int], None]] = None
    checkpoint_every: int = 0
    sample: Optional[Callable[[int], None]] = None
    sample_every: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    show: str = "loss"
    desc: str = "train"
    progress: bool = True
    where: str = ""


def _train_step(loop: Loop, step: int) -> None:
    acc = loop.accelerator
    if loop.lr is not None:
        for group in loop.optimizer.param_groups:
            group["lr"] = loop.lr(step)
    loss, extra = loop.loss_step(step)
    optimizer_step(acc, loop.optimizer, loss, loop.params, loop.grad_clip)
    if loop.ema is not None:
        loop.ema.update(step, acc.unwrap_model)
    loop.history.setdefault("loss", []).append(float(acc.gather(loss.detach()[None]).mean()))
    for name, value in extra.items():
        loop.history.setdefault(name, []).append(value)


def _after_step(loop: Loop, done: int, bar) -> None:
    """The main process's cadence: progress bar, checkpoint, samples."""
    if done % LOG_EVERY == 0 or done == loop.end:
        recent = loop.history.get(loop.show, [])[-LOG_WINDOW:]
        shown = {loop.show: f"{sum(recent) / max(1, len(recent)):.4f}"}
        if loop.lr is not None:
            shown["lr"] = f"{loop.lr(done - 1):.1e}"
        bar.set_postfix(shown)
    if loop.checkpoint is not None and (is_due(done, loop.checkpoint_every, loop.end) or done == loop.end):
        loop.checkpoint(done)
    if loop.sample is not None and is_due(done, loop.sample_every, loop.end):
        loop.sample(done)


def run_loop(loop: Loop) -> dict[str, list[float]]:
    """Run ``loop`` (see :class:`Loop`); returns its history (``"loss"``: the mean loss over
    the processes at each step, including a resumed run's earlier steps)."""
    from tqdm.auto import tqdm

    acc = loop.accelerator
    main = acc.is_main_process
    bar = tqdm(range(loop.start, loop.end), initial=loop.start, total=loop.end, desc=loop.desc,
               disable=not (loop.progress and main))
    t0 = time.time()
    for step in bar:
        _train_step(loop, step)
        if main:
            _after_step(loop, step + 1, bar)
        acc.wait_for_everyone()
    bar.close()
    if main and loop.progress:
        where = f"; {loop.where}" if loop.where else ""
        print(f"{loop.desc}: trained steps {loop.start}..{loop.end} in {time.time() - t0:.0f} s{where}")
    return loop.history


# ------------------------------------------------------------------------ run folders
def write_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write ``root/step_XXXXXXX`` atomically and keep only the newest ``keep`` complete ones.

    ``write(folder)`` fills a temporary folder beside the final one, which is then renamed;
    it must write ``state.json`` last (a folder counts as complete when that file is there).
    """
    final = root / f"step_{step:07d}"
    with staged_dir(final, prefix=".tmp_step_") as tmp:
        write(tmp)
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The newest complete ``checkpoints/step_*`` folder of a run, or None."""
    ckpts = sorted(Path(run_dir).glob("checkpoints/step_*"))
    done = [c for c in ckpts if (c / "state.json").is_file()]
    return done[-1] if done else None
