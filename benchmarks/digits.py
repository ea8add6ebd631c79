"""Problem 1 benchmark: accuracy, fidelity and wall time of the course's 1,000 images, for
a list of generation recipes measured side by side in one run.

    python benchmarks/digits.py                                  # hw2_1.sh's recipe (this checkout's defaults)
    python benchmarks/digits.py --previous PREV_MODEL            # + the recipe of the model before it
    python benchmarks/digits.py --recipe "quad6: --spacing quad --steps 6" --recipe "w2: --guidance-scale 3"

A recipe is ``LABEL: OPTIONS``, the options given to ``difflab digits generate`` (empty: its
defaults, which are ``bash hw2_1.sh OUT``). Each recipe runs as its own process, timed from
start to exit (start-up, model loading and the PNG writes included, as a user waits for
them), ``--repeats`` times (the fastest counts). Then the images are scored: the course
grader's accuracy per dataset (the classifiers in ../shared/evaluators), and the Frechet
distance, KID, k-NN precision and recall against balanced real images (``digits evaluate
--real``). The time ratio is to the first recipe. The real-data floor is printed once.

``--previous DIR`` adds, first, the default recipe of the model that shipped before the
current one: DIR holds that model (``git archive d9d072b src/difflab/assets/digits | tar -x
-C PREV`` gives it, as ``PREV/src/difflab/assets/digits``), sampled as it was: DDIM, 10
uniform steps, guidance scale 4, fp32, 500 images per batch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from difflab.cli import build_parser
from difflab.digits.config import SampleConfig
from difflab.digits.evaluate import evaluate_fidelity, evaluate_folder
from difflab.digits.model_io import SHIPPED_DIR, resolve_model_dir
from difflab.io import load_json
from difflab.options import config_from_args
from difflab.sampling import spaced_timesteps

HERE = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFLAB_SHARED", HERE.parent / "shared"))  # the course material
PREVIOUS_OPTIONS = ("--sampler ddim --spacing uniform --steps 10 --guidance-scale 4 --precision fp32 "
                    "--batch-size 500")


def parse_recipe(text: str) -> tuple[str, list[str], SampleConfig, str]:
    """``LABEL: OPTIONS`` -> (label, options, the SampleConfig they give, the --ckpt they name)."""
    label, sep, options = text.partition(":")
    if not sep or not label.strip():
        raise SystemExit(f"--recipe {text!r}: expected LABEL: OPTIONS (the options of `difflab digits generate`)")
    opts = shlex.split(options)
    try:
        args = build_parser(["digits"]).parse_args(["digits", "generate", "--out", "unused", *opts])
    except SystemExit:
        raise SystemExit(f"--recipe {text!r}: options that `difflab digits generate` does not take") from None
    return label.strip(), opts, config_from_args(SampleConfig, args), args.ckpt or str(SHIPPED_DIR)


def evaluations_per_image(cfg: SampleConfig, num_steps: int, distilled: bool = False) -> int:
    """Network evaluations per image: one per step, two where guidance applies (a distilled
    model guides in one)."""
    from difflab.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear", num_steps)
    steps = range(num_steps) if cfg.sampler == "ddpm" else spaced_timesteps(schedule, cfg.steps, cfg.spacing).tolist()
    lo, hi = cfg.guidance_interval or (0, num_steps)
    return sum(2 if cfg.guidance_scale != 1 and lo <= t <= hi and not distilled else 1 for t in steps)


def timed_generate(options: list[str], out: Path, per_class: int, threads: int, repeats: int) -> float:
    """Fastest wall time of ``repeats`` runs of ``difflab digits generate`` in a fresh process."""
    cmd = [sys.executable, "-m", "difflab", "digits", "generate", "--out", str(out), "--overwrite", "--quiet",
           "--per-class", str(per_class), "--threads", str(threads), *options]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr.strip()}")
    return best


def row(label, opts, cfg, evals, seconds, first, acc, fid) -> str:
    m, s = acc["mnistm"].acc, acc["svhn"].acc
    gm, gs = fid["mnistm"]["generated"], fid["svhn"]["generated"]
    interval = "all" if cfg.guidance_interval is None else f"[{cfg.guidance_interval[0]}, {cfg.guidance_interval[1]}]"
    return (f"| {label} | `{shlex.join(opts)}` | {cfg.sampler} | {cfg.spacing} | {cfg.steps} | {cfg.guidance_scale:g} | "
            f"{interval} | {evals} | {m:.3f} | {s:.3f} | {(m + s) / 2:.4f} | {gm.frechet:.2f} | {gm.kid_mean * 1000:.1f} | "
            f"{gm.precision:.3f} | {gm.recall:.3f} | {gs.frechet:.2f} | {gs.kid_mean * 1000:.1f} | {gs.precision:.3f} | "
            f"{gs.recall:.3f} | {seconds:.1f} | {seconds / first:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=None,
                   help="LABEL: OPTIONS of `difflab digits generate` (repeatable; default: 'default:', its defaults)")
    p.add_argument("--previous", default=None, metavar="DIR",
                   help="the previously shipped model: its recipe is measured first (see above)")
    p.add_argument("--per-class", type=int, default=50, help="images per digit per dataset (50: the course's 1,000)")
    p.add_argument("--repeats", type=int, default=1, help="time each recipe this many times, keep the fastest")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run (default 2)")
    p.add_argument("--data", default=str(SHARED / "hw2_data" / "digits"), help="real digit data (course layout)")
    p.add_argument("--evaluators", default=str(SHARED / "evaluators"), help="folder with the two classifier .pth files")
    args = p.parse_args(argv)
    evaluators, data = Path(args.evaluators), Path(args.data)
    for path in (evaluators, data) + ((Path(args.previous),) if args.previous else ()):
        if not path.is_dir():
            print(f"not found: {path}", file=sys.stderr)
            return 2
    texts = ([f"previous: --ckpt {shlex.quote(args.previous)} {PREVIOUS_OPTIONS}"] if args.previous else [])
    recipes = [parse_recipe(r) for r in texts + (args.recipe or ["default:"])]
    classifiers = {n: evaluators / f"{n}_classifier.pth" for n in ("mnistm", "svhn")}
    print(f"{20 * args.per_class} images per recipe; {args.threads} threads; fastest of {args.repeats} run(s); "
          "KID x 1000")
    print("| recipe | options | sampler | spacing | steps | S | guidance interval | evals/image | MNIST-M | SVHN | mean | "
          "FD mnistm | KID mnistm | precision mnistm | recall mnistm | FD svhn | KID svhn | precision svhn | "
          "recall svhn | s / run | time ratio |")
    print("|" + "---|" * 21)
    first = None
    for label, opts, cfg, ckpt in recipes:
        meta = load_json(resolve_model_dir(ckpt) / "config.json")  # T and whether distilled, for evals/image
        num_steps, distilled = int(meta["num_train_steps"]), meta.get("distilled") is not None
        with tempfile.TemporaryDirectory() as tmp:
            seconds = timed_generate(opts, Path(tmp) / "out", args.per_class, args.threads, args.repeats)
            first = first or seconds
            acc = evaluate_folder(Path(tmp) / "out", classifiers["mnistm"], classifiers["svhn"])
            fid = evaluate_fidelity(Path(tmp) / "out", data, classifiers, per_class=args.per_class)
        print(row(label, opts, cfg, evaluations_per_image(cfg, num_steps, distilled), seconds, first, acc, fid),
              flush=True)
    fm, fs = fid["mnistm"]["floor"], fid["svhn"]["floor"]
    print(f"\nreal-data floor (two disjoint real sets): FD mnistm {fm.frechet:.2f}, KID {fm.kid_mean * 1000:.1f}, "
          f"precision {fm.precision:.3f}, recall {fm.recall:.3f}; FD svhn {fs.frechet:.2f}, KID {fs.kid_mean * 1000:.1f}, "
          f"precision {fs.precision:.3f}, recall {fs.recall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
