"""``difflab report --out R``: the whole course report (heavy imports inside the handler)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from difflab.options import (
    Config,
    Threads,
    add_command,
    config_from_args,
    device_option,
    option,
    out_option,
    overwrite_option,
    quiet_option,
    seed_option,
)

NAME = "report"
HELP = "the course report (index.html, report.md, report.json) from the models and data you have"


@dataclass(kw_only=True)
class ReportRun(Config):
    out: str = out_option("report folder: index.html, report.md, report.json and one folder of files per section; "
                          "an earlier report there is updated, reusing sections whose inputs did not change")
    overwrite: bool = overwrite_option(" (and rebuild every section)")
    data: Optional[str] = option(None, "course data root (digits/ for fidelity, clip_zeroshot/; none: "
                                 "$DIFFLAB_SHARED/hw2_data or ../shared/hw2_data)")
    evaluators: Optional[str] = option(None, "folder of mnistm_classifier.pth and svhn_classifier.pth (none: "
                                       "$DIFFLAB_SHARED/evaluators or ../shared/evaluators)")
    ckpt: Optional[str] = option(None, "digit model folder, run folder or model.safetensors (none: the shipped model)")
    faces_noise: Optional[str] = option(None, "Problem 2 noise folder of *.pt (none: DATA/face/noise if present)")
    faces_gt: Optional[str] = option(None, "Problem 2 ground-truth faces (none: DATA/face/GT if present)")
    unet: Optional[str] = option(None, "the course face UNet.pt (docs/weights.md)")
    sd: Optional[str] = option(None, "Stable Diffusion weights for Problem 3 and the multi-concept section (none: the "
                               "shipped mini digit model and its embeddings; docs/weights.md)")
    json: Optional[str] = option(None, "the course input.json for Problem 3, reference images in folders beside it "
                                 "(none: DATA/textual_inversion/input.json)")
    embeddings: tuple[str, ...] = option((), "textual-inversion embedding files for Problem 3 (they win over the "
                                         "shipped ones)", metavar="FILE")
    images_per_prompt: int = option(25, "Problem 3 and multi-concept images per prompt (25: the course's)", minimum=1)
    clip: Optional[str] = option(None, "a Hugging Face CLIP folder or cached id (docs/weights.md), for the zero-shot "
                                 "section and the Problem 3 and multi-concept scores")
    zeroshot_dir: Optional[str] = option(None, "zero-shot set: val/ and id2label.json (none: DATA/clip_zeroshot)")
    per_class: int = option(50, "digit images per class per dataset (fidelity needs 4 or more)", minimum=1)
    steps: Optional[int] = option(None, "sampling steps (none: the defaults, 10 for digits, 50 for Problem 3 and "
                                  "multi-concept)", minimum=1)
    seed: int = seed_option()
    device: str = device_option()
    quiet: bool = quiet_option()


def register(subparsers) -> None:
    add_command(subparsers, NAME, _report, (ReportRun, Threads), help=HELP,
                description="Build the course report from what is available; each section that cannot be built says "
                "which input is missing and how to provide it. Sections are cached on a hash of their inputs and "
                "options: a second run reuses unchanged ones. See docs/report.md.")


def _report(args: argparse.Namespace) -> int:
    from difflab.report.build import build_report
    from difflab.report.sections import ReportOptions, shared_root

    run = config_from_args(ReportRun, args)
    shared = shared_root()
    data = Path(run.data) if run.data else shared / "hw2_data"

    def default(given, path: Path):
        return Path(given) if given else (path if path.exists() else None)

    o = ReportOptions(
        data=data, evaluators=Path(run.evaluators) if run.evaluators else shared / "evaluators", ckpt=run.ckpt,
        faces_noise=default(run.faces_noise, data / "face" / "noise"), faces_gt=default(run.faces_gt, data / "face" / "GT"),
        unet=run.unet, sd=run.sd,
        json=Path(run.json) if run.json else data / "textual_inversion" / "input.json", embeddings=tuple(run.embeddings),
        clip=run.clip, zeroshot_dir=Path(run.zeroshot_dir) if run.zeroshot_dir else data / "clip_zeroshot",
        per_class=run.per_class, steps=run.steps, images_per_prompt=run.images_per_prompt, seed=run.seed, device=run.device, quiet=run.quiet,
    )
    log = (lambda m: None) if run.quiet else (lambda m: print(m, file=sys.stderr))
    records = build_report(Path(run.out), o, overwrite=run.overwrite, log=log)
    for r in records:
        note = " (cached)" if r.get("cached") else ""
        print(f"{r['id']}: {r['status']}{note}")
    print(f"wrote {Path(run.out) / 'index.html'}")
    return 0
