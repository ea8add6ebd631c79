"""Pieces shared by the training loops (digits, t2i): learning-rate schedule, EMA, and
atomic, pruned checkpoint folders."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difflab.io import PathLike, staged_dir


def cosine_lr(base: float, warmup: int, total: int, min_ratio: float, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
