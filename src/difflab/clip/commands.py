"""``difflab clip score`` and ``difflab clip zeroshot`` (heavy imports inside the handlers)."""
from __future__ import annotations

import argparse
import sys
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
    quiet_option,
)

NAME = "clip"
HELP = "CLIP scores for personalised images (course grader) and zero-shot classification"


@dataclass(kw_only=True)
class ClipRun(Config):
    clip: str = option(help="a Hugging Face CLIP folder (config.json, weights, preprocessor_config.json, tokenizer), "
                       "or its id when it is in the local cache, e.g. openai/clip-vit-base-patch32; never fetched "
                       "from the network", metavar="PATH|ID")
    device: str = device_option()
    batch_size: int = option(32, "images per CLIP forward pass", minimum=1, metavar="N")
    quiet: bool = quiet_option()


@dataclass(kw_only=True)
class ScoreRun(Config):
    """The course grader's option names (--json_path, --input_dir, --output_dir) are aliases."""

    json: str = option(help="the course's input.json (prompt_4_clip_eval, baseline per concept)", metavar="INPUT_JSON",
                       aliases=("--json_path",))
    concepts: str = option(help="folder holding one reference-image folder per concept key (hw2_data/textual_inversion)",
                           metavar="CONCEPT_ROOT", aliases=("--input_dir",))
    images: str = option(help="folder of generated images to score, laid out GEN_ROOT/<key>/<prompt index>/*.png",
                         metavar="GEN_ROOT", aliases=("--output_dir",))
    out: Optional[str] = out_option("also write every image's image/text/combined score, rank and top-5 flag to this "
                                    "JSON file", default=None)
    table: str = option("all", "per-case table: every image ranked with top-5 marked (all), only the top 5 (top), "
                        "or none", choices=("all", "top", "none"))


@dataclass(kw_only=True)
class ZeroshotRun(Config):
    val: str = option(help="folder of images named {class_id}_{image_id}.png", metavar="DIR")
    id2label: str = option(help="JSON object mapping class id to class name", metavar="JSON")
    templates: Optional[str] = option(None, "also report a prompt ensemble: 'cifar100' (the CLIP authors' 18 CIFAR-100 "
                                      "templates), 'course', or a text file with one template per line containing '{}'",
                                      metavar="SET")
    cases: int = option(0, "also write the N most confident successes and N most confident failures (file, "
                        "prediction, truth, probability) as cases.json, cases.csv and the figure cases.png into --out",
                        minimum=0, metavar="N")
    out: Optional[str] = out_option("folder for predictions.json (accuracies and every image's prediction) and the "
                                    "--cases files", default=None)


def register(subparsers) -> None:
    sub = add_group(subparsers, NAME, HELP,
                    "CLIP tools: the course's textual-inversion grader (score) and zero-shot classification (zeroshot).")
    add_command(sub, "score", _score, (ScoreRun, ClipRun, Threads),
                help="grade generated images like the course's grade_hw2_3.py",
                description="For each concept k and prompt p of INPUT_JSON, score the images in GEN_ROOT/k/p/: image "
                "score = mean over CONCEPT_ROOT/k/ references of 100*cos(CLIP image features); text score = 100*cos "
                "with prompt_4_clip_eval[p]; rank by image + 2.5*text; PASS when the top-5 mean image and mean text "
                "scores both reach baseline[p]. Ends with 'You have passed X/Y cases'. The grader's option names "
                "--json_path, --input_dir and --output_dir are accepted.")
    add_command(sub, "zeroshot", _zeroshot, (ZeroshotRun, ClipRun, Threads),
                help="zero-shot top-1/top-5 accuracy on {class_id}_{image_id}.png images",
                description="Zero-shot classification: each class is prompted as 'A photo of {object}.' (underscores "
                "-> spaces); an image gets the class of highest cosine similarity. --templates adds a prompt-ensemble "
                "result.")


def _load_clip(run: ClipRun):
    from difflab.clip.model import load_clip

    clip = load_clip(run.clip, run.device)
    print(f"CLIP: {clip.path} on {clip.device}")
    return clip


def _score(args: argparse.Namespace) -> int:
    from difflab.clip import score as S
    from difflab.io import check_output, save_json

    opts, run = config_from_args(ScoreRun, args), config_from_args(ClipRun, args)
    if opts.out:
        check_output(opts.out, "file", "--out")
    concepts = S.load_spec(opts.json)
    S.plan_scoring(concepts, opts.concepts, opts.images)  # fail on missing folders before loading CLIP
    clip = _load_clip(run)
    if abs(clip.logit_scale - 100.0) > 1e-2:
        print(f"note: this model's exp(logit_scale) is {clip.logit_scale:.4g}, not 100; scores use 100*cos as the grader "
              "does with the released weights", file=sys.stderr)
    results = S.score_concepts(clip, concepts, opts.concepts, opts.images, batch_size=run.batch_size,
                               progress=not run.quiet, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for r in results:
        print(S.format_case(r, opts.table))
    print(S.summary_line(results))
    if opts.out:
        save_json(S.results_json(results, {"clip": str(clip.path), "json": str(opts.json)}), opts.out)
        print(f"wrote {opts.out}")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from difflab.clip import zeroshot as Z
    from difflab.io import check_output, save_json

    opts, run = config_from_args(ZeroshotRun, args), config_from_args(ClipRun, args)
    if opts.cases and not opts.out:
        raise ValueError("--cases needs --out, the folder the cases are written to")
    if opts.out:
        check_output(opts.out, "dir", "--out")
    id2label = Z.load_id2label(opts.id2label)
    Z.list_labelled_images(opts.val, id2label)  # fail on bad names before loading CLIP
    templates = Z.resolve_templates(opts.templates) if opts.templates else None
    clip = _load_clip(run)
    result = Z.run_zeroshot(clip, opts.val, id2label, templates, batch_size=run.batch_size, progress=not run.quiet)
    _print_accuracies(result, templates, opts.templates)
    if opts.out:
        save_json(Z.predictions_json(result, templates), Path(opts.out) / "predictions.json")
        print(f"wrote {Path(opts.out) / 'predictions.json'}")
    if opts.cases:
        method = "ensemble" if templates else "single"
        good, bad = Z.select_cases(result, method, opts.cases)
        paths = Z.write_cases(opts.out, opts.val, good, bad, method)
        print(f"{len(good)} successes, {len(bad)} failures ({method}) -> " + ", ".join(str(p) for p in paths))
    return 0


def _print_accuracies(result, templates, template_set: Optional[str]) -> None:
    from difflab.clip.templates import COURSE_TEMPLATE

    print(f"{len(result.files)} images, {len(result.class_ids)} classes")
    labels = {"single": f'prompt "{COURSE_TEMPLATE.format("{object}")}"'}
    if templates:
        labels["ensemble"] = f"ensemble of {len(templates)} templates ({template_set})"
    width = max(len(v) for v in labels.values())
    for m, text in labels.items():
        acc = result.accuracy(m)
        print(f"{text:<{width}}  top-1 {100 * acc[1]:6.2f}%  top-5 {100 * acc[5]:6.2f}%")
