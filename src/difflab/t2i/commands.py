"""``difflab t2i``: the mini text-to-image model of SD v1's family, trained on captioned digits.

The training options are the fields of :class:`difflab.t2i.config.T2ITrainConfig` and of
its model, :class:`difflab.t2i.model.MiniConfig`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from difflab.options import (
    Config,
    DigitDataRun,
    Threads,
    add_command,
    add_group,
    config_from_args,
    option,
    out_option,
)

NAME = "t2i"
HELP = "a small Stable-Diffusion-format text-to-image model trained on captioned digits"


@dataclass(kw_only=True)
class TrainRun(DigitDataRun):
    out: str = out_option("output model folder (a diffusers folder, plus checkpoints/ and samples/)")


@dataclass(kw_only=True)
class ExportRun(Config):
    run: str = option(help="the --out folder of `difflab t2i train`", positional=True)
    out: str = out_option("destination model folder (replaced)")


def register(subparsers) -> None:
    from difflab.t2i.config import T2ITrainConfig

    sub = add_group(subparsers, NAME, HELP,
                    "Train a small model of Stable Diffusion v1's family (AutoencoderKL, UNet2DConditionModel, "
                    "CLIPTextModel, CLIP tokenizer) from scratch on captioned MNIST-M and SVHN digits, with the digit 7 "
                    "and the phrase 'on a house number sign' held out, so that `difflab ti train` can be measured on "
                    "a CPU.")
    add_command(sub, "train", _train, (TrainRun, T2ITrainConfig, Threads),
                help="train the mini model into a diffusers-format folder",
                description="Stage 1 trains the VAE (--vae-steps), stage 2 the UNet and text encoder (--steps). OUT "
                "becomes a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) that `difflab ti` loads; "
                "OUT/checkpoints/ makes the run resumable and OUT/samples/ holds sample grids.")
    add_command(sub, "export", _export, (ExportRun,),
                help="copy a run's model (without checkpoints and samples) into a folder, e.g. the shipped one",
                description="Copy unet/ vae/ text_encoder/ tokenizer/ scheduler/ and mini_sd.json of a `t2i train` run "
                "(its newest export, the EMA weights) into OUT, replacing OUT in one rename. The shipped model is "
                "made with `difflab t2i export runs/mini-sd --out src/difflab/assets/mini_sd`.")


def _train(args: argparse.Namespace) -> int:
    from difflab.io import check_output
    from difflab.sd.load import quiet_libraries
    from difflab.t2i.config import T2ITrainConfig
    from difflab.t2i.train import train_t2i

    run, cfg = config_from_args(TrainRun, args), config_from_args(T2ITrainConfig, args)
    check_output(run.out, "dir", "--out")
    quiet_libraries()
    train_t2i(run.data, run.out, cfg, resume=run.resume, progress=not run.quiet)
    return 0


def _export(args: argparse.Namespace) -> int:
    from difflab.io import check_output
    from difflab.t2i.model import export_folder

    run = config_from_args(ExportRun, args)
    check_output(run.out, "dir", "--out")
    out = export_folder(run.run, run.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {run.run} -> {out} ({size / 2**20:.1f} MiB)")
    return 0
