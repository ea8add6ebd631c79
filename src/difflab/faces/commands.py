"""``difflab faces ...``: Problem 2 commands (generate, mse, eta-grid, interpolate).

The DDIM recipe options come from :class:`difflab.faces.generate.FaceSampling`, whose
defaults are the recipe that matched the course's ground-truth images.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from difflab.options import (
    Config,
    Threads,
    add_command,
    add_group,
    config_from_args,
    device_option,
    option,
    out_option,
    overwrite_option,
    quiet_option,
    seed_option,
)

NAME = "faces"
HELP = "Problem 2: DDIM with the course's 256x256 face UNet"

RECIPE_NOTE = (
    "Recipe defaults reproduce the recipe in ../shared/specs/face_unet.md that matched the "
    "course's ground-truth images: DDIM on the linear betas linspace(1e-4, 2e-2, 1000), "
    "50 steps 981, 961, ..., 1, eta 0, the last step landing on t=0 with alpha_bar[0], x0 "
    "clipped to [-1, 1] without recomputing eps, and each image min-max normalised."
)


@dataclass(kw_only=True)
class Inputs(Config):
    noise: str = option(help="folder of noise files *.pt (e.g. hw2_data/face/noise)")
    unet: str = option(help="the course's UNet.pt (a state dict; read with weights_only=True)")


@dataclass(kw_only=True)
class Run(Config):
    device: str = device_option()
    seed: int = seed_option()
    quiet: bool = quiet_option()


@dataclass(kw_only=True)
class GenerateRun(Inputs):
    out: str = out_option("output folder (created if needed): OUT/<stem>.png per noise file")
    overwrite: bool = overwrite_option()
    batch_size: int = option(10, "images sampled together (10: all ten course noises in one batch)", minimum=1)


@dataclass(kw_only=True)
class EtaGridRun(Inputs):
    out: str = out_option("output PNG path")
    names: tuple[str, ...] = option(("00", "01", "02", "03"), "noise file stems, one column each")
    etas: tuple[float, ...] = option((), "eta per row (none given: the figure's rows, eta 0, 0.25, 0.5, 0.75, 1)",
                                     minimum=0.0)


@dataclass(kw_only=True)
class InterpolateRun(Inputs):
    out: str = out_option("output folder: interpolation.png, slerp.png, lerp.png")
    pair: tuple[str, str] = option(("00", "01"), "the two noise stems", metavar=("A", "B"))
    alphas: tuple[float, ...] = option((), "interpolation weights in [0, 1] (none given: 0.0, 0.1, ..., 1.0)",
                                       minimum=0.0, maximum=1.0)
    batch_size: int = option(11, "images sampled together (11: one row of eleven alphas per batch)", minimum=1)


@dataclass(kw_only=True)
class MseRun(Config):
    images: str = option(help="folder of generated images", positional=True)
    gt: str = option(help="folder of ground-truth images (e.g. hw2_data/face/GT)", positional=True)
    max: float = option(20.0, "fail (exit 1) when the mean MSE is above this (20: the course baseline)", minimum=0.0)


def register(subparsers) -> None:
    from difflab.faces.generate import FaceSampling

    sub = add_group(subparsers, NAME, HELP, "Problem 2: DDIM with the course's 256x256 face UNet (UNet.pt).")
    add_command(sub, "generate", _generate, (GenerateRun, FaceSampling, Run, Threads),
                help="one PNG per noise file (what hw2_2.sh runs)",
                description="DDIM from every NOISE/*.pt ([1,3,H,W] or [3,H,W]) to OUT/<stem>.png. All inputs are "
                "checked before sampling; images are written at the end, each atomically. " + RECIPE_NOTE)
    add_command(sub, "mse", _mse, (MseRun,), help="per-image and mean MSE against ground truth (0-255 RGB)",
                description="MSE on 0-255 RGB pixels, mean over all pixels and channels, for each ground-truth image "
                "against the generated image of the same file name; prints each and the mean; exits 1 when the "
                "mean exceeds --max.")
    add_command(sub, "eta-grid", _eta_grid, (EtaGridRun, FaceSampling, Run, Threads), skip=("eta",),
                help="figure: noises as columns, eta values as rows, one PNG",
                description="One PNG grid: columns are the noises --names, rows the eta values --etas. Each row's "
                "per-step noise is seeded with --seed. " + RECIPE_NOTE)
    add_command(sub, "interpolate", _interpolate, (InterpolateRun, FaceSampling, Run, Threads),
                help="figure: slerp and lerp between two noises",
                description="DDIM along slerp and lerp paths between two noises; writes OUT/interpolation.png (slerp "
                "row above lerp row), OUT/slerp.png and OUT/lerp.png, and prints |z|/sqrt(d) for each interpolated "
                "noise (lerp's shrinks towards alpha 0.5). " + RECIPE_NOTE)


def _generate(args: argparse.Namespace) -> int:
    from difflab.faces.generate import FaceSampling, generate_dir
    from difflab.processes import main_process

    io, recipe, run = config_from_args(GenerateRun, args), config_from_args(FaceSampling, args), config_from_args(Run, args)
    _check_out(io.out, "dir", io.overwrite)
    paths = generate_dir(io.noise, io.out, io.unet, recipe, batch_size=io.batch_size, device=run.device, seed=run.seed,
                         progress=not run.quiet, overwrite=io.overwrite)
    if main_process():  # every launched process runs the command; the main one reports
        print(f"wrote {len(paths)} images to {io.out}")
    return 0


def _mse(args: argparse.Namespace) -> int:
    from difflab.faces.mse import folder_mse

    run = config_from_args(MseRun, args)
    scores = folder_mse(run.images, run.gt)
    for name, v in scores.items():
        print(f"{name}\t{v:.4f}")
    mean = sum(scores.values()) / len(scores)
    print(f"mean\t{mean:.4f}\t({len(scores)} images, max {run.max:g}: {'ok' if mean <= run.max else 'FAIL'})")
    return 0 if mean <= run.max else 1


def _check_out(out: str, kind: str, overwrite: Optional[bool] = None) -> None:
    """Fail now, not after sampling, when the output cannot be written or (for a command
    with ``--overwrite``, ``overwrite`` not None) already holds files."""
    from difflab.io import check_fresh_output, check_output

    check_output(out, kind, "--out")
    if overwrite is not None:
        check_fresh_output(out, "--out", overwrite)


def _load(inputs: Inputs, names, device: str):
    from difflab.devices import resolve_device
    from difflab.faces.generate import face_denoiser, load_noise_dir
    from difflab.faces.model_io import load_face_unet

    _, noise = load_noise_dir(inputs.noise, names)
    dev = resolve_device(device)
    return noise, face_denoiser(load_face_unet(inputs.unet), dev), dev


def _eta_grid(args: argparse.Namespace) -> int:
    from difflab.faces.figures import DEFAULT_ETAS, eta_grid, save_eta_grid
    from difflab.faces.generate import FaceSampling

    io, run = config_from_args(EtaGridRun, args), config_from_args(Run, args)
    recipe, etas = config_from_args(FaceSampling, args, skip=("eta",)), io.etas or DEFAULT_ETAS
    _check_out(io.out, "file")
    noise, den, dev = _load(io, io.names, run.device)
    save_eta_grid(eta_grid(den, noise, etas, recipe, seed=run.seed, device=dev, progress=not run.quiet), io.out)
    print(f"wrote {io.out}: rows eta {', '.join(f'{e:g}' for e in etas)}; columns {', '.join(io.names)}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from difflab.faces.figures import DEFAULT_ALPHAS, interpolate_noises, interpolation_rows, relative_norms, save_interpolation
    from difflab.faces.generate import FaceSampling

    io, recipe, run = config_from_args(InterpolateRun, args), config_from_args(FaceSampling, args), config_from_args(Run, args)
    alphas = io.alphas or DEFAULT_ALPHAS
    _check_out(io.out, "dir")
    noise, den, dev = _load(io, io.pair, run.device)
    z0, z1 = noise[0:1], noise[1:2]
    for method in ("slerp", "lerp"):
        norms = relative_norms(interpolate_noises(z0, z1, alphas, method))
        print(f"{method} |z|/sqrt(d): " + " ".join(f"{a:g}:{n:.3f}" for a, n in zip(alphas, norms)))
    rows = interpolation_rows(den, z0, z1, alphas, recipe, device=dev, batch_size=io.batch_size, seed=run.seed,
                              progress=not run.quiet)
    print("wrote " + ", ".join(str(p) for p in save_interpolation(rows, io.out)))
    return 0
