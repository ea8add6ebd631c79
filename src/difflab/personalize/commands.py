"""``difflab ti``: textual inversion on Stable Diffusion v1.x (train, generate).

The options are the fields of :mod:`difflab.personalize.config`.
"""
from __future__ import annotations

import argparse
import sys

from difflab.options import Threads, add_command, add_group, config_from_args

NAME = "ti"
HELP = "textual inversion on Stable Diffusion v1.x (Problem 3)"


def register(subparsers) -> None:
    from difflab.personalize.config import GenerateConfig, TrainConfig

    sub = add_group(subparsers, NAME, HELP,
                    "Learn new-token embeddings for a concept (train) and generate the course's images (generate).")
    add_command(sub, "train", _train, (TrainConfig, Threads), help="learn a token's embedding from a folder of images",
                description="Textual inversion: learn the embedding of a new token from a few images. Only the new "
                "token's rows are trained; every network weight and every other embedding row stays frozen. "
                "Run under `accelerate launch` for several GPUs.")
    add_command(sub, "generate", _generate, (GenerateConfig, Threads),
                help="the course's generation: N images per prompt for every concept in a JSON",
                description="For every concept key K and prompt index P of the JSON, write OUT/K/P/sourceK_promptP_I.png "
                "for I = 0 .. images-per-prompt - 1, with DDIM and classifier-free guidance. Every input is checked "
                "(JSON, embeddings for each token_name, widths) before any image is generated.")


def _train(args: argparse.Namespace) -> int:
    from difflab.personalize.config import TrainConfig
    from difflab.personalize.textual_inversion import train_textual_inversion
    from difflab.sd.load import quiet_libraries

    cfg = config_from_args(TrainConfig, args)
    quiet_libraries()
    out = train_textual_inversion(cfg)
    if not cfg.quiet:
        print(f"wrote {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from difflab.personalize.config import GenerateConfig
    from difflab.personalize.generate import generate_from_json
    from difflab.processes import main_process
    from difflab.sd.load import quiet_libraries

    cfg = config_from_args(GenerateConfig, args)
    quiet_libraries()
    if cfg.sd is None and main_process():  # one line, also under --quiet: the images are not Stable Diffusion's
        print("difflab ti generate: no --sd given, so the shipped 32x32 mini digit model (difflab/assets/mini_sd) "
              "and its embeddings draw the prompts: Stable Diffusion v1.4's weights cannot ship with difflab; "
              "pass the checkpoint (hw2_3.sh's third argument) for the course's images", file=sys.stderr)
    paths = generate_from_json(cfg)
    if not cfg.quiet and main_process():  # every launched process runs the command; the main one reports
        print(f"wrote {len(paths)} images under {cfg.out}")
    return 0
