"""``difflab digits ...``: train, generate, evaluate, figures, export.

The options come from the configs (:mod:`difflab.digits.config`) and from the small
option classes below, which hold what the library takes as plain arguments. Heavy
modules are imported inside the handlers and in :func:`register`, which runs only when
``digits`` is the group asked for.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from difflab.options import (
    Config,
    DigitDataRun,
    Threads,
    add_command,
    add_group,
    config_from_args,
    device_option,
    option,
    out_option,
    overwrite_option,
    quiet_option,
    resume_option,
    seed_option,
)

NAME = "digits"
HELP = "Problem 1: conditional digit diffusion (MNIST-M, SVHN)"


def _default_evaluators() -> Path:
    """``$DIFFLAB_SHARED/evaluators``, else ``../shared/evaluators`` beside the working
    directory or beside the repository checkout (the course-material layout)."""
    candidates = [Path(os.environ["DIFFLAB_SHARED"]) / "evaluators"] if os.environ.get("DIFFLAB_SHARED") else []
    candidates += [Path.cwd().parent / "shared" / "evaluators", Path(__file__).resolve().parents[4] / "shared" / "evaluators"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


@dataclass(kw_only=True)
class TrainRun(DigitDataRun):
    out: str = out_option("run folder: checkpoints/, samples/, train_config.json")


@dataclass(kw_only=True)
class DistillRun(Config):
    teacher: str = option(help="the guided model to distil: model folder, run folder or model.safetensors")
    data: Optional[str] = option(None, "folder in the course layout (mnistm/, svhn/) for the data rows; none: only with "
                                 "--trajectory-share 1")
    out: str = out_option("run folder: checkpoints/, train_config.json (export it with `digits export`)")
    resume: bool = resume_option()
    quiet: bool = quiet_option()


@dataclass(kw_only=True)
class Model(Config):
    ckpt: Optional[str] = option(None, "model folder, run folder or model.safetensors (none: the shipped model)")


@dataclass(kw_only=True)
class GenerateRun(Model):
    out: str = out_option("output folder; writes mnistm/D_KKK.png and svhn/D_KKK.png")
    overwrite: bool = overwrite_option()
    per_class: int = option(50, "images per digit per dataset", minimum=1)
    quiet: bool = quiet_option()


@dataclass(kw_only=True)
class FiguresRun(Model):
    out: str = out_option("folder for grid_*.png, reverse_*.png, eta_grid_*.png (digits 0-3 x eta 0..1) and "
                          "interpolation_*.png (an 8 along slerp, then lerp, alpha 0..1), * = mnistm, svhn")


@dataclass(kw_only=True)
class EvaluateRun(Config):
    images: str = option(help="folder of images to score: mnistm/ and svhn/ with images named D_*.png (D = the label)",
                         positional=True)
    mnistm_classifier: Optional[str] = option(None, "MNIST-M grader state dict "
                                              "(none: ../shared/evaluators/mnistm_classifier.pth)")
    svhn_classifier: Optional[str] = option(None, "SVHN classifier state dict (none: ../shared/evaluators/svhn_classifier.pth)")
    real: Optional[str] = option(None, "digit data in the course layout (mnistm/, svhn/): also print, per dataset, the "
                                 "Frechet distance, KID and k-NN precision/recall against balanced real images in the "
                                 "classifiers' penultimate features, and the same numbers for two disjoint real sets "
                                 "(the floor); none: accuracy only")
    per_class: int = option(50, "with --real: images per digit compared (fewer when a digit has too few real "
                            "images for two disjoint sets)", minimum=4)
    seed: int = seed_option()
    device: str = device_option()


@dataclass(kw_only=True)
class ExportRun(Config):
    run: str = option(help="training run folder (or one of its checkpoint folders)", positional=True)
    out: str = out_option("model folder to write: config.json + model.safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    from difflab.digits.config import DistillConfig, SampleConfig, TrainConfig

    s = add_group(sub, NAME, HELP, "Train, sample, evaluate and plot the class-conditional digit model.")
    add_command(s, "train", _train, (TrainRun, TrainConfig, Threads),
                help="train a digit model (Accelerate: CPU, GPU, multi-GPU, mixed precision)")
    add_command(s, "distill", _distill, (DistillRun, DistillConfig, Threads),
                help="distil a guided model into one that guides in one network evaluation per step (half the "
                     "sampling time)")
    add_command(s, "generate", _generate, (GenerateRun, SampleConfig, Threads),
                help="write the course's 1,000 images (50 per digit per dataset)")
    add_command(s, "evaluate", _evaluate, (EvaluateRun, Threads),
                help="score generated digits with the pretrained classifiers (course grader output)")
    add_command(s, "figures", _figures, (FiguresRun, SampleConfig, Threads),
                help="report figures: 10x10 grids, the reverse process of a '0', eta grid and slerp/lerp rows per dataset")
    add_command(s, "export", _export, (ExportRun,),
                help="copy a run's newest EMA weights into a small model folder (what ships)")


def _check_out(out: str, overwrite: Optional[bool] = None) -> None:
    """Fail now, not after the work, when the output folder cannot be written or (for a
    command with ``--overwrite``, ``overwrite`` not None) already holds files."""
    from difflab.io import check_fresh_output, check_output

    check_output(out, "dir", "--out")
    if overwrite is not None:
        check_fresh_output(out, "--out", overwrite)


def _load(ckpt: Optional[str], device: str):
    from difflab.devices import resolve_device
    from difflab.digits.model_io import SHIPPED_DIR, load_digit_model

    net, schedule, _ = load_digit_model(ckpt or SHIPPED_DIR, device=resolve_device(device))
    return net, schedule


def _train(args: argparse.Namespace) -> int:
    from difflab.digits.config import TrainConfig
    from difflab.digits.figures import training_sample_fn
    from difflab.digits.train import train

    run, cfg = config_from_args(TrainRun, args), config_from_args(TrainConfig, args)
    _check_out(run.out)
    train(run.data, run.out, cfg, resume=run.resume, progress=not run.quiet, sample_fn=training_sample_fn)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from difflab.digits.config import DistillConfig
    from difflab.digits.distill import distill

    run, cfg = config_from_args(DistillRun, args), config_from_args(DistillConfig, args)
    _check_out(run.out)
    distill(run.teacher, run.data, run.out, cfg, resume=run.resume, progress=not run.quiet)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from difflab.digits.config import SampleConfig
    from difflab.digits.generate import generate_course_set
    from difflab.processes import main_process

    run, cfg = config_from_args(GenerateRun, args), config_from_args(SampleConfig, args)
    _check_out(run.out, run.overwrite)
    net, schedule = _load(run.ckpt, cfg.device)
    seconds = generate_course_set(net, schedule, run.out, cfg, per_class=run.per_class, progress=not run.quiet,
                                  overwrite=run.overwrite)
    if main_process():  # every launched process runs the command; the main one reports
        print(f"wrote {2 * 10 * run.per_class} images to {run.out} in {seconds:.1f} s")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from difflab.devices import resolve_device
    from difflab.digits.evaluate import evaluate_fidelity, evaluate_folder, format_fidelity, format_report

    run = config_from_args(EvaluateRun, args)
    ev = _default_evaluators()
    m = run.mnistm_classifier or ev / "mnistm_classifier.pth"
    s = run.svhn_classifier or ev / "svhn_classifier.pth"
    device = resolve_device(run.device)
    print(format_report(evaluate_folder(run.images, m, s, device=device)))
    if run.real is not None:
        fid = evaluate_fidelity(run.images, run.real, {"mnistm": m, "svhn": s}, per_class=run.per_class,
                                seed=run.seed, device=device)
        print(format_fidelity(fid))
    return 0


def _figures(args: argparse.Namespace) -> int:
    from difflab.digits.config import SampleConfig
    from difflab.digits.figures import write_figures

    run, cfg = config_from_args(FiguresRun, args), config_from_args(SampleConfig, args)
    _check_out(run.out)
    net, schedule = _load(run.ckpt, cfg.device)
    for path in write_figures(net, schedule, run.out, cfg):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    import shutil

    from difflab.digits.model_io import resolve_model_dir
    from difflab.io import atomic_path, load_json, save_json

    run = config_from_args(ExportRun, args)
    _check_out(run.out)
    src, out = resolve_model_dir(run.run), Path(run.out)
    meta = load_json(src / "config.json")
    out.mkdir(parents=True, exist_ok=True)
    save_json(meta, out / "config.json")
    with atomic_path(out / "model.safetensors") as tmp:
        shutil.copyfile(src / "model.safetensors", tmp)
    print(f"exported {src} -> {out}")
    return 0
