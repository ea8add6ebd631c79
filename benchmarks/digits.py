"""Problem 1 benchmark: accuracy, fidelity and seconds for the course's 1,000 images,
for a list of sampling recipes measured side by side in one run.

    python benchmarks/digits.py                                   # today's default vs the candidates below
    python benchmarks/digits.py --recipe ddim,uniform,10,4 --recipe ddim,quad,5,4 --per-class 50
    python benchmarks/digits.py --recipe ddim,quad,5,4,300,999    # guidance only for t in [300, 999]

A recipe is ``sampler,spacing,steps,guidance_scale[,lo,hi]``. Each prints the course
grader's accuracy per dataset (the classifiers in ../shared/evaluators), the Frechet
distance and k-NN recall against balanced real images (``digits evaluate --real``), the
network evaluations per image (a guided step costs two) and the seconds for 1,000
images, with its ratio to the first recipe. The real-data floor is printed once.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from difflab.assets import SHIPPED_DIGITS
from difflab.digits.config import SampleConfig
from difflab.digits.evaluate import evaluate_fidelity, evaluate_folder
from difflab.digits.generate import generate_course_set
from difflab.digits.model_io import load_digit_model

HERE = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFLAB_SHARED", HERE.parent / "shared"))  # the course material
CANDIDATES = ["ddim,uniform,10,4", "ddim,quad,5,4", "dpmpp-2m,quad,6,4", "ddim,quad,4,4"]


def parse_recipe(text: str) -> SampleConfig:
    parts = text.split(",")
    if len(parts) not in (4, 6):
        raise SystemExit(f"--recipe {text!r}: expected sampler,spacing,steps,guidance_scale[,lo,hi]")
    interval = (int(parts[4]), int(parts[5])) if len(parts) == 6 else None
    return SampleConfig(sampler=parts[0], spacing=parts[1], steps=int(parts[2]), guidance_scale=float(parts[3]),
                        guidance_interval=interval, device="cpu")


def evaluations_per_image(cfg: SampleConfig, schedule) -> int:
    """Network evaluations per image: one per step, two where guidance applies."""
    from difflab.sampling import spaced_timesteps

    steps = range(schedule.num_steps) if cfg.sampler == "ddpm" else spaced_timesteps(schedule, cfg.steps, cfg.spacing).tolist()
    lo, hi = cfg.guidance_interval or (0, schedule.num_steps)
    return sum(2 if cfg.guidance_scale != 1 and lo <= t <= hi else 1 for t in steps)


def measure(net, schedule, cfg: SampleConfig, per_class: int, data: Path, evaluators: Path):
    classifiers = {n: evaluators / f"{n}_classifier.pth" for n in ("mnistm", "svhn")}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_course_set(net, schedule, tmp, cfg, per_class=per_class, progress=False)
        seconds = time.perf_counter() - t0
        acc = evaluate_folder(tmp, classifiers["mnistm"], classifiers["svhn"])
        fid = evaluate_fidelity(tmp, data, classifiers, per_class=per_class)
    return seconds, acc, fid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(SHIPPED_DIGITS), help="model folder or run folder (default: the shipped model)")
    p.add_argument("--recipe", action="append", default=None, help=f"a recipe (repeatable; default: {' '.join(CANDIDATES)})")
    p.add_argument("--per-class", type=int, default=50, help="images per digit per dataset (50: the course's 1,000)")
    p.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="real digit data (course layout)")
    p.add_argument("--evaluators", default=str(SHARED / "evaluators"), help="folder with the two classifier .pth files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluators, data = Path(args.evaluators), Path(args.data)
    for path in (evaluators, data):
        if not path.is_dir():
            print(f"not found: {path}", file=sys.stderr)
            return 2
    net, schedule, _ = load_digit_model(args.ckpt)
    recipes = [parse_recipe(r) for r in (args.recipe or CANDIDATES)]
    n = 20 * args.per_class
    print(f"model {args.ckpt}; {n} images per recipe; threads {torch.get_num_threads()}")
    print("| sampler | spacing | steps | S | guidance interval | evals/image | MNIST-M | SVHN | mean | FD mnistm | "
          "recall mnistm | FD svhn | recall svhn | s / 1,000 images | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for cfg in recipes:
        seconds, acc, fid = measure(net, schedule, replace(cfg, batch_size=500), args.per_class, data, evaluators)
        per_1000 = seconds * 1000 / n
        first = first or per_1000
        m, s = acc["mnistm"].acc, acc["svhn"].acc
        gm, gs = fid["mnistm"]["generated"], fid["svhn"]["generated"]
        interval = "all" if cfg.guidance_interval is None else f"[{cfg.guidance_interval[0]}, {cfg.guidance_interval[1]}]"
        print(f"| {cfg.sampler} | {cfg.spacing} | {cfg.steps} | {cfg.guidance_scale:g} | {interval} | "
              f"{evaluations_per_image(cfg, schedule)} | {m:.3f} | {s:.3f} | {(m + s) / 2:.4f} | {gm.frechet:.2f} | "
              f"{gm.recall:.3f} | {gs.frechet:.2f} | {gs.recall:.3f} | {per_1000:.1f} | {per_1000 / first:.2f} |", flush=True)
    fm, fs = fid["mnistm"]["floor"], fid["svhn"]["floor"]
    print(f"\nreal-data floor (two disjoint real sets): FD mnistm {fm.frechet:.2f}, recall {fm.recall:.3f}; "
          f"FD svhn {fs.frechet:.2f}, recall {fs.recall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
