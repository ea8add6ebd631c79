"""What the stages of ``difflab t2i train`` share: each stage's random stream and
initialisation seed, the run they belong to, and copying weights from ``init_from``."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Optional

import torch

from difflab.data import BalancedDigits
from difflab.io import PathLike
from difflab.t2i.config import T2ITrainConfig
from difflab.training import batch_generator


class Stage(IntEnum):
    """The stages of a run, each with its own stream of batch seeds (one of ``STREAMS``)."""

    DESCRIPTOR_AUX = 0  # the aux loss of train_descriptor (benchmarks/descriptor_probe.py)
    VAE = 1  # stage 1: the autoencoder
    DIFFUSION = 2  # stage 2: UNet and text encoder
    DESCRIPTOR = 3  # stage 1b: the descriptor network


STREAMS = len(Stage)

# Parameter initialisation seed of each stage: cfg.seed + offset.
INIT_SEED_OFFSET = {Stage.VAE: 0, Stage.DIFFUSION: 1, Stage.DESCRIPTOR: 2}


def stage_generator(seed: int, stage: Stage, step: int, rank: int) -> torch.Generator:
    """The generator of one batch of ``stage`` (see :func:`difflab.training.batch_generator`)."""
    return batch_generator(seed, step, rank, stream=int(stage), streams=STREAMS)


def init_seed(seed: int, stage: Stage) -> int:
    """The global-RNG seed under which ``stage`` builds its networks."""
    return seed + INIT_SEED_OFFSET[stage]


@dataclass
class Run:
    """One ``t2i train`` run as its stages see it.

    :param facts: the contents of ``OUT/mini_sd.json``; stages add to it.
    :param show: progress bars and messages (on the main process only).
    :param source: the ``init_from`` model (a loaded SD model), or None.
    :param shards: how each step's global batch is drawn (:class:`difflab.training.Shards`);
        fixed when the run starts, recorded in its checkpoints.
    """

    out: Path
    cfg: T2ITrainConfig
    accelerator: Any
    data: BalancedDigits
    tokenizer: Any
    facts: dict
    show: bool
    source: Optional[Any] = None
    shards: int = 1

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def copy_weights(folder: PathLike, name: str, dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst`` <- the weights of ``src``, network ``name`` of the init_from model ``folder``."""
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise ValueError(f"--init-from {folder}: its {name} does not fit this run's model config: {e}") from None
