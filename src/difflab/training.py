"""The one training harness, used by ``digits train``, ``t2i train`` (all its stages) and
``ti train``.

A problem supplies its networks, optimizer, a *loss step* (draw the step's batch, return
the loss) and its checkpoint writer; the harness owns the rest: the Accelerate set-up
(:func:`make_accelerator`), the lock on a run folder (:func:`run_lock`), resume-or-refuse
checks of a run folder (:func:`resume_or_refuse`) and of the options a resumed leg changes
(:func:`config_changes`, :func:`refuse_changes`, :func:`add_leg`), the warm-up + cosine
learning rate (:func:`cosine_lr`), EMA with warm-up (:class:`EMA`), the optimisation step
(:func:`optimizer_step`), and, in
:func:`run_loop`, loss gathering, the progress bar, the checkpoint and sample cadence and
the final message.

Randomness: every batch comes from :func:`batch_generator`, a pure function of
(seed, step, shard) and, for problems with several stages, a stream per stage, so a
resumed run draws exactly what an uninterrupted one draws. Parameter initialisation uses
the global RNG inside :func:`seeded_init`, which leaves the caller's RNG as it was.

Several processes (``accelerate launch``, ``torchrun``; docs/multi-process.md): a step's
global batch is ``count`` shards, shard ``s`` drawn from ``batch_generator(seed, step, s)``,
and each process takes its own rows of it (:class:`Shards`); Accelerate averages the
gradients, so every process holds the same weights, EMA and optimizer state, which
:func:`run_loop` checks at every checkpoint (:func:`check_agreement`). Only the main process
writes. A checkpoint records the world size and shard count; :func:`resume_shards` decides
whether a run can continue on another number of processes. Generation shares its batches
out with :class:`difflab.processes.Processes`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from difflab.devices import resolve_device
from difflab.io import PathLike, staged_dir
from difflab.processes import close_at_exit

MAX_RANKS = 64  # processes batch_generator keeps apart: the seed holds the rank in its last factor
STEP_STRIDE = 1_000_003  # a prime above any step count, so (seed, step) pairs give distinct integers
LOG_EVERY = 20  # steps between progress-bar updates (and always at the last step)
LOG_WINDOW = 100  # steps whose mean the progress bar shows
TRAIN_DEVICES = ("auto", "cpu", "cuda")  # one process per GPU: several GPUs through `accelerate launch`
# Options a resumed leg may change freely: where it runs and how often it reports or checkpoints.
NOT_A_CHANGE = frozenset({"device", "ckpt_every", "sample_every", "keep_checkpoints"})
LOCK_NAME = ".lock"  # the lock file of a run folder (see run_lock)

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


@dataclass(frozen=True)
class Shards:
    """Which rows of a step's batch this process draws.

    A step's global batch, ``world_size * batch_size`` rows, is the concatenation of
    ``count`` shards of ``shard_size`` rows; shard ``s`` is drawn from
    ``batch_generator(seed, step, s)``, and process ``rank`` takes rows
    ``[rank * batch_size, (rank + 1) * batch_size)``, drawing only the shards they fall in.
    With ``count == world_size`` (a new run's default) process ``r`` draws exactly shard
    ``r`` (one process: ``batch_generator(seed, step, 0)``); one process with batch ``N * B``
    and ``count = N`` draws the same rows as ``N`` processes with batch ``B``.
    """

    count: int
    batch_size: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_RANKS:
            raise ValueError(f"shards must be in [1, {MAX_RANKS}] (MAX_RANKS), got {self.count!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank!r}")
        if (self.world_size * self.batch_size) % self.count:
            raise ValueError(f"a global batch of {self.world_size} processes x batch_size {self.batch_size} cannot be "
                             f"cut into {self.count} equal shards")

    @property
    def shard_size(self) -> int:
        return self.world_size * self.batch_size // self.count

    def pieces(self) -> list[tuple[int, slice]]:
        """(shard, rows of that shard) that make up this process's batch, in order."""
        n, lo, hi = self.shard_size, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [(s, slice(max(lo, s * n) - s * n, min(hi, (s + 1) * n) - s * n)) for s in range(lo // n, (hi - 1) // n + 1)]

    def draw(self, seed: int, step: int, draw: Callable[[torch.Generator, int], tuple], stream: int = 0,
             streams: int = 1) -> tuple:
        """This process's batch of ``step``: ``draw(generator, shard_size)`` returns one shard
        as a tuple of tensors or lists (batch first); its rows are cut and concatenated."""
        parts = [tuple(x[rows] for x in draw(batch_generator(seed, step, s, stream, streams), self.shard_size))
                 for s, rows in self.pieces()]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(col) if isinstance(col[0], Tensor) else [v for c in col for v in c] for col in zip(*parts))


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

    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision)
    close_at_exit()
    return accelerator


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


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with dots (``model.channels``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Any, asked: Any, ignore: Collection[str] = NOT_A_CHANGE) -> dict[str, list]:
    """The options a resumed leg changes: ``{option: [saved, asked]}``, sorted, nested
    configs as ``model.channels``; ``saved`` and ``asked`` are configs (``to_dict()``) or
    dicts. Options in ``ignore`` (default :data:`NOT_A_CHANGE`) are left out."""
    a = _flat(saved.to_dict() if hasattr(saved, "to_dict") else saved)
    b = _flat(asked.to_dict() if hasattr(asked, "to_dict") else asked)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if k not in ignore and k.split(".")[0] not in ignore and a.get(k) != b.get(k)}


def refuse_changes(where: PathLike, changes: Mapping[str, list], may_change: Collection[str] = (),
                   may_grow: Collection[str] = ("steps",)) -> None:
    """Refuse a resumed leg that changes what the run computes: ValueError, one line
    naming every changed option with its saved and asked value, unless the option is in
    ``may_change`` or in ``may_grow`` and grows (more steps). ``changes``: from
    :func:`config_changes`."""
    bad = {k: v for k, v in changes.items()
           if k not in may_change and not (k in may_grow and v[0] is not None and v[1] > v[0])}
    if bad:
        listed = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in bad.items())
        free = ", ".join(sorted(NOT_A_CHANGE))
        raise ValueError(f"--resume: {where} was trained with other options: {listed} (saved -> asked); a resumed run "
                         f"keeps the options that decide its results (it may train more steps and change {free}); "
                         f"give the saved values, or start a new run in another --out")


def add_leg(legs: Sequence[Mapping], start: int, changes: Mapping[str, list]) -> list[dict]:
    """A run's history of legs (``[{"from_step": S, "changed": {option: [before, now]}}]``)
    with one more entry when the leg resumed at ``start`` changes options."""
    legs = [dict(leg) for leg in legs]
    return legs + [{"from_step": int(start), "changed": dict(changes)}] if changes else legs


def resume_shards(where: PathLike, saved: Optional[dict], world_size: int, batch_size: int, saved_batch_size: int = 0,
                  asked: Optional[int] = None) -> int:
    """The shard count (see :class:`Shards`) of a run on ``world_size`` processes of
    ``batch_size`` each: ``asked`` or ``world_size`` for a new run (``saved`` None), else
    the count the run was started with (``saved``: a checkpoint's ``world_size`` and
    ``shards``, both 1 when absent; ``saved_batch_size``: its per-process batch).

    A run continues on another number of processes only with the same global batch
    (processes x batch size): the data are then the same rows, and the learning rate
    still fits. Anything else raises ValueError, one line saying why and what to pass.
    """
    if saved is None:
        return asked or world_size
    old_world = int(saved.get("world_size", 1))
    count = int(saved.get("shards", old_world))
    if asked and asked != count:
        raise ValueError(f"--resume: {where} draws each batch as {count} shard(s); it cannot switch to {asked}")
    total = old_world * saved_batch_size
    if world_size != old_world and world_size * batch_size != total:
        fix = (f"pass --batch-size {total // world_size} to continue it on {world_size} process(es)" if total % world_size == 0
               else f"{total} does not split evenly over {world_size} processes")
        raise ValueError(f"--resume: {where} was trained by {old_world} process(es) x batch {saved_batch_size} = {total} "
                         f"images per step, {world_size} x {batch_size} = {world_size * batch_size} would change the "
                         f"batch its learning rate was set for; {fix}")
    if (world_size * batch_size) % count:
        raise ValueError(f"--resume: {where} draws each batch as {count} shards; {world_size} process(es) x batch "
                         f"{batch_size} does not split into {count} equal shards")
    return count


# ------------------------------------------------------------- agreement of processes
def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and every byte, in the given order."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = torch.as_tensor(t).detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(optimizer, prefix: str = "optimizer") -> Iterator[tuple[str, Tensor]]:
    """The per-parameter state of ``optimizer`` (AdamW: step, exp_avg, exp_avg_sq) as named tensors."""
    for index, st in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(st.items()):
            yield f"{prefix}.{index}.{key}", torch.as_tensor(value)


def module_tensors(prefix: str, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``state`` (a state dict or an EMA shadow) as named tensors, keys prefixed."""
    return ((f"{prefix}.{k}", v) for k, v in state.items())


def check_agreement(accelerator, tensors: Iterable[tuple[str, Tensor]], what: str) -> list[str]:
    """Every process's :func:`tensor_digest` of ``tensors`` (in process order), gathered on
    every process; RuntimeError on every process when they differ."""
    digest = tensor_digest(tensors)
    if getattr(accelerator, "num_processes", 1) == 1:
        return [digest]
    from accelerate.utils import gather_object

    digests = list(gather_object([digest]))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {len(digests)} processes hold different {what}: sha256 {[d[:12] for d in digests]}")
    return digests


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
    num_processes = 1

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
    :param checkpoint: ``(done, processes) ->`` write a checkpoint after ``done`` steps;
        called on the main process every ``checkpoint_every`` steps (<= 0: only at the end)
        and at ``end``. ``processes`` is what the checkpoint records about the processes:
        ``{"world_size": N, "shards": S}`` and, with ``state`` and several processes,
        ``"state_digests"``: every process's digest of ``state()``, all equal.
    :param state: ``() ->`` the named tensors every process must hold bit-identically
        (weights, EMA, optimizer state); with several processes their digests are
        gathered and compared before each checkpoint, and the run stops when they differ.
    :param shards: the shard count the checkpoint records (see :class:`Shards`).
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
    checkpoint: Optional[Callable[[int, dict], None]] = None
    checkpoint_every: int = 0
    state: Optional[Callable[[], Iterable[tuple[str, Tensor]]]] = None
    shards: int = 1
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


def _checkpoint_due(loop: Loop, done: int) -> bool:
    return loop.checkpoint is not None and (is_due(done, loop.checkpoint_every, loop.end) or done == loop.end)


def _processes(loop: Loop, done: int) -> dict:
    """What a checkpoint after ``done`` steps records about the processes (every process
    calls this: the digests are gathered from all of them)."""
    acc = loop.accelerator
    facts = {"world_size": getattr(acc, "num_processes", 1), "shards": loop.shards}
    if facts["world_size"] > 1 and loop.state is not None:
        facts["state_digests"] = check_agreement(acc, loop.state(), f"training state after step {done}")
    return facts


def _after_step(loop: Loop, done: int, bar, processes: Optional[dict]) -> None:
    """The main process's cadence: progress bar, checkpoint, samples."""
    if done % LOG_EVERY == 0 or done == loop.end:
        recent = loop.history.get(loop.show, [])[-LOG_WINDOW:]
        shown = {loop.show: f"{sum(recent) / max(1, len(recent)):.4f}"}
        if loop.lr is not None:
            shown["lr"] = f"{loop.lr(done - 1):.1e}"
        bar.set_postfix(shown)
    if processes is not None:
        loop.checkpoint(done, processes)
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
        processes = _processes(loop, step + 1) if _checkpoint_due(loop, step + 1) else None
        if main:
            _after_step(loop, step + 1, bar, processes)
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


class RunLocked(OSError):
    """Another process holds the lock of a run folder (see :func:`run_lock`)."""


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return pid if pid.isdigit() else "unknown"


def _created_dirs(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def run_lock(lock_file: PathLike, what: PathLike, hold: bool = True) -> Iterator[Optional[Path]]:
    """Hold an OS lock (``flock``) on ``lock_file`` for the block: one training at a time
    writes a run folder (``RUN/.lock``) or an output file (``OUT.lock`` beside it).

    A second holder is refused at once with :class:`RunLocked` (an OSError), one line
    naming ``what`` and the holder's process id (which the lock file holds). The lock ends
    with the block, or with the process however it ends (the kernel releases a dead
    process's locks); the file is removed on release, while still locked, and a locker
    that finds its file removed or replaced tries again, so two never hold it at once.
    Folders the lock file needed are removed again when left empty. ``hold`` False (every
    process but the main one) does nothing. Where the file system has no ``flock``, a
    warning says the run is not protected.
    """
    if not hold:
        yield None
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        warnings.warn(f"cannot lock {lock_file} on this system: two trainings into {what} at once would not be caught")
        yield None
        return
    lock_file = Path(lock_file)
    made = _created_dirs(lock_file.parent)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                fd = None
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLocked(f"{what} is in use by another training (pid {_lock_holder(lock_file)}, lock "
                                    f"{lock_file}); wait for it to end, or train into another --out") from None
                warnings.warn(f"cannot lock {lock_file} ({e.strerror or e}): two trainings into {what} at once "
                              "would not be caught")
                break
            try:  # the holder before us may have removed (or a new one replaced) the file we opened
                same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield lock_file
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
            os.close(fd)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
