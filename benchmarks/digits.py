"""Problem 1 benchmark: time for the course's 1,000 images, their accuracy, and a sweep
of guidance weight x DDIM steps (accuracy and time of each).

    python benchmarks/digits.py                      # shipped model, default settings + sweep
    python benchmarks/digits.py --ckpt runs/X --no-sweep
    python benchmarks/digits.py --sweep-w 0 1 2 4 --sweep-steps 5 10 20 --sweep-per-class 20

Accuracy uses the classifiers in ../shared/evaluators (or --evaluators DIR).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from difflab.digits.evaluate import evaluate_folder, format_report
from difflab.devices import resolve_device
from difflab.digits.generate import SampleConfig, generate_course_set
from difflab.digits.model_io import SHIPPED_DIR, load_digit_model


def run_one(net, schedule, cfg: SampleConfig, per_class: int, evaluators: Path, device) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        seconds = generate_course_set(net, schedule, tmp, cfg, per_class=per_class, progress=False)
        result = evaluate_folder(tmp, evaluators / "mnistm_classifier.pth", evaluators / "svhn_classifier.pth", device=device)
    return seconds, result


def main(argv=None) -> int:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(SHIPPED_DIR), help="model folder or run folder (default: shipped model)")
    p.add_argument("--evaluators", default=str(here.parent / "shared" / "evaluators"), help="folder with the two classifier .pth files")
    p.add_argument("--steps", type=int, default=SampleConfig.steps, help="DDIM steps of the headline run")
    p.add_argument("--guidance", type=float, default=SampleConfig.guidance, help="guidance w of the headline run")
    p.add_argument("--batch-size", type=int, default=SampleConfig.batch_size)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-sweep", action="store_true", help="only the headline 1,000-image run")
    p.add_argument("--sweep-w", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
    p.add_argument("--sweep-steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--sweep-per-class", type=int, default=20, help="images per digit per dataset in each sweep cell")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    evaluators = Path(args.evaluators)
    if not evaluators.is_dir():
        print(f"evaluators not found at {evaluators}", file=sys.stderr)
        return 2
    net, schedule, _ = load_digit_model(args.ckpt, device=device)
    print(f"model {args.ckpt}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; device {device}; "
          f"threads {torch.get_num_threads()}")

    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, device=str(device))
    seconds, result = run_one(net, schedule, cfg, 50, evaluators, device)
    print(f"\nheadline: 1000 images, DDIM {cfg.steps} steps, w={cfg.guidance}: {seconds:.1f} s "
          f"({1000 / seconds:.1f} images/s)")
    print(format_report(result))
    if args.no_sweep:
        return 0

    n = 2 * 10 * args.sweep_per_class
    print(f"\nsweep: {n} images per cell ({args.sweep_per_class} per digit per dataset); accuracy MNIST-M / SVHN / mean, seconds")
    print("| w | steps | MNIST-M | SVHN | mean | seconds for 1,000 images |")
    print("|---|---|---|---|---|---|")
    for w in args.sweep_w:
        for steps in args.sweep_steps:
            c = SampleConfig(steps=steps, guidance=w, batch_size=args.batch_size, device=str(device))
            t, r = run_one(net, schedule, c, args.sweep_per_class, evaluators, device)
            m, s = r["mnistm"].acc, r["svhn"].acc
            print(f"| {w:g} | {steps} | {m:.3f} | {s:.3f} | {(m + s) / 2:.3f} | {t * 1000 / n:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
