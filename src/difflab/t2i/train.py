"""Training the mini text-to-image model (``difflab t2i train``).

Stages, all on the captioned digits (see :mod:`difflab.t2i.captions`), each in its module:

1. :mod:`difflab.t2i.vae`: a small VAE, frozen afterwards (``OUT/vae``).
1b. :mod:`difflab.t2i.descriptor` (with ``p_descriptor`` > 0): the descriptor network
   whose projected features can stand in the name slot (``OUT/descriptor``).
2. :mod:`difflab.t2i.diffusion`: UNet and CLIP text encoder, jointly, on the VAE latents
   (``OUT/checkpoints``, exported to ``OUT/unet`` and ``OUT/text_encoder``).

``OUT`` is then a diffusers-format SD folder. Every batch (images, captions, steps,
noise) is a pure function of (seed, stage, step, shard) (:class:`difflab.training.Shards`
on the stage's stream), so ``resume`` reproduces an uninterrupted run, also on another
number of processes with the same global batch (docs/multi-process.md). A resumed leg
may change options; each change is recorded under ``legs`` in ``mini_sd.json``
(:func:`difflab.training.config_changes`, :func:`difflab.training.add_leg`). The main
process holds ``OUT/.lock`` while it trains (:func:`difflab.training.run_lock`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from difflab.data import BalancedDigits
from difflab.io import PathLike, load_json, save_json
from difflab.processes import main_process
from difflab.sd.load import load_sd
from difflab.t2i.config import T2ITrainConfig
from difflab.t2i.descriptor import descriptor_stage
from difflab.t2i.diffusion import train_diffusion
from difflab.t2i.model import build_tokenizer
from difflab.t2i.stages import Run
from difflab.t2i.vae import vae_stage
from difflab.training import LOCK_NAME, add_leg, config_changes, make_accelerator, resume_or_refuse, resume_shards, run_lock

__all__ = ["T2ITrainConfig", "config_changes", "train_t2i"]


def _resumed(existing: Optional[Path], cfg: T2ITrainConfig) -> tuple[int, list[float], dict, Optional[dict], int]:
    """(first diffusion step, losses so far, config changes, the checkpoint's state, its
    per-process batch) of a run resumed from checkpoint ``existing`` (None: the diffusion
    stage starts afresh)."""
    if existing is None:
        return 0, [], {}, None, 0
    state = load_json(existing / "state.json")
    saved = T2ITrainConfig.from_dict(state["train_config"])
    if saved.model != cfg.model:
        raise ValueError(f"--resume: {existing} was trained with a different model config ({saved.model})")
    if (saved.p_descriptor > 0) != (cfg.p_descriptor > 0):
        raise ValueError(f"--resume: {existing} was trained with p_descriptor {saved.p_descriptor}; a run cannot "
                         f"switch descriptor captions on or off (asked for {cfg.p_descriptor})")
    return int(state["step"]), list(state["losses"]), config_changes(saved, cfg), state, saved.batch_size


def _load_init_source(folder: PathLike):
    """The ``init_from`` model folder, loaded once (float32, CPU) by the project's SD loader."""
    folder = Path(folder)
    for sub in ("vae", "unet", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {folder}: no {sub}/config.json (expected a `difflab t2i` model folder)")
    return load_sd(folder, device="cpu")


def _open_run(data_root: PathLike, out: Path, cfg: T2ITrainConfig, data: Optional[BalancedDigits], progress: bool,
              fresh: bool, shards: Callable[[int], int]) -> Run:
    """Accelerate, data, the init_from model (for a fresh run), ``OUT/train_config.json``,
    the tokenizer (written to ``OUT/tokenizer``) and the facts of ``OUT/mini_sd.json``;
    ``shards(world size)`` is the run's shard count (or raises why it cannot continue)."""
    from transformers import CLIPTokenizer

    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    count = shards(accelerator.num_processes)
    source = _load_init_source(cfg.init_from) if cfg.init_from and fresh else None
    show = progress and accelerator.is_main_process
    if data is None:
        data = BalancedDigits.from_root(data_root, progress=show)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg.to_dict(), out / "train_config.json")
        build_tokenizer(out / "tokenizer", cfg.model.max_length)
    accelerator.wait_for_everyone()
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    facts: dict = load_json(out / "mini_sd.json") if (out / "mini_sd.json").is_file() else {}
    return Run(out, cfg, accelerator, data, tokenizer, facts, show, source, count)


def train_t2i(
    data_root: PathLike,
    out: PathLike,
    cfg: T2ITrainConfig,
    *,
    resume: bool = False,
    stop_at: Optional[int] = None,
    data: Optional[BalancedDigits] = None,
    progress: bool = True,
    shards: Optional[int] = None,
) -> list[float]:
    """Train (or resume) the mini model into ``out``; returns the diffusion-stage losses.

    Under ``accelerate launch``/``torchrun`` every process runs this; the batch sizes are
    per process, and only the main process writes.

    :param stop_at: stop after this many diffusion steps (the LR schedule still follows
        ``cfg.steps``), e.g. to test resumption.
    :param shards: draw each step's global batch as this many shards (None: one per
        process; :class:`difflab.training.Shards`); a resumed run keeps its own.
    """
    cfg.validate()
    out = Path(out)
    with run_lock(out / LOCK_NAME, f"run folder {out}", hold=main_process()):
        return _train_t2i(data_root, out, cfg, resume, stop_at, data, progress, shards)


def _train_t2i(data_root: PathLike, out: Path, cfg: T2ITrainConfig, resume: bool, stop_at: Optional[int],
               data: Optional[BalancedDigits], progress: bool, shards: Optional[int]) -> list[float]:
    existing = resume_or_refuse(out, resume, started=("vae",))
    start, losses, changed, saved, saved_batch = _resumed(existing, cfg)
    run = _open_run(data_root, out, cfg, data, progress, fresh=existing is None,
                    shards=lambda world: resume_shards(existing, saved, world, cfg.batch_size, saved_batch, shards))
    if changed:  # a leg with other options: keep the history, train_config holds only the newest
        run.facts["legs"] = add_leg(run.facts.get("legs", []), start, changed)
    latents, scale = vae_stage(run)
    descriptor = descriptor_stage(run)
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    return train_diffusion(run, latents, scale, descriptor, existing, start, losses, end)
