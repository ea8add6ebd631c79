"""``difflab clip score`` and ``difflab clip zeroshot`` (heavy imports inside the handlers)."""
from __future__ import annotations

import argparse
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clip", required=True, metavar="PATH",
        help="local Hugging Face CLIP folder, e.g. a downloaded openai/clip-vit-base-patch32 "
        "(config.json, weights, preprocessor_config.json, tokenizer); never fetched from the network",
    )
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per CLIP forward pass (default: 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    group = subparsers.add_parser(
        "clip", help="CLIP scores for personalised images (course grader) and zero-shot classification",
        description="CLIP tools: the course's textual-inversion grader (score) and zero-shot classification (zeroshot).",
    )
    sub = group.add_subparsers(dest="clip_command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "score", help="grade generated images like the course's grade_hw2_3.py",
        description="For each concept k and prompt p of INPUT_JSON, score the images in GEN_ROOT/k/p/: image score = "
        "mean over CONCEPT_ROOT/k/ references of 100*cos(CLIP image features); text score = 100*cos with "
        "prompt_4_clip_eval[p]; rank by image + 2.5*text; PASS when the top-5 mean image and mean text scores both "
        "reach baseline[p]. Ends with 'You have passed X/Y cases'.",
    )
    s.add_argument("--json", required=True, metavar="INPUT_JSON", help="the course's input.json (prompt_4_clip_eval, baseline per concept)")
    s.add_argument("--input-dir", required=True, metavar="CONCEPT_ROOT", help="folder holding one reference-image folder per concept key (hw2_data/textual_inversion)")
    s.add_argument("--output-dir", required=True, metavar="GEN_ROOT", help="folder of generated images, laid out GEN_ROOT/<key>/<prompt index>/*.png")
    _add_common(s)
    s.add_argument("--json-out", metavar="FILE", help="also write every image's image/text/combined score, rank and top-5 flag to this JSON file")
    s.add_argument("--table", choices=("all", "top", "none"), default="all",
                   help="per-case table: every image ranked with top-5 marked (all), only the top 5 (top), or none (default: all)")
    s.set_defaults(func=_score)

    z = sub.add_parser(
        "zeroshot", help="zero-shot top-1/top-5 accuracy on {class_id}_{image_id}.png images",
        description="Zero-shot classification: each class is prompted as 'A photo of {object}.' (underscores -> spaces); "
        "an image gets the class of highest cosine similarity. --templates adds a prompt-ensemble result.",
    )
    z.add_argument("--val", required=True, metavar="DIR", help="folder of images named {class_id}_{image_id}.png")
    z.add_argument("--id2label", required=True, metavar="JSON", help="JSON object mapping class id to class name")
    _add_common(z)
    z.add_argument("--templates", metavar="SET",
                   help="also report a prompt ensemble: 'cifar100' (the CLIP authors' 18 CIFAR-100 templates), "
                   "'course', or a text file with one template per line containing '{}'")
    z.add_argument("--cases", type=int, default=0, metavar="N",
                   help="write the N most confident successes and N most confident failures (file, prediction, truth, "
                   "probability) as cases.json, cases.csv and the figure cases.png into --cases-dir")
    z.add_argument("--cases-dir", default="zeroshot_cases", metavar="DIR", help="where --cases writes (default: ./zeroshot_cases)")
    z.add_argument("--json-out", metavar="FILE", help="also write accuracies and every image's prediction to this JSON file")
    z.set_defaults(func=_zeroshot)


def _check_batch(n: int) -> None:
    if n < 1:
        raise ValueError(f"--batch-size must be >= 1, got {n}")


def _score(args) -> int:
    from difflab.clip import score as S
    from difflab.clip.model import load_clip
    from difflab.io import save_json

    _check_batch(args.batch_size)
    concepts = S.load_spec(args.json)
    S.plan_scoring(concepts, args.input_dir, args.output_dir)  # fail on missing folders before loading CLIP
    clip = load_clip(args.clip, args.device)
    print(f"CLIP: {clip.path} on {clip.device}")
    if abs(clip.logit_scale - 100.0) > 1e-2:
        print(f"note: this model's exp(logit_scale) is {clip.logit_scale:.4g}, not 100; scores use 100*cos as the grader "
              "does with the released weights", file=sys.stderr)
    results = S.score_concepts(
        clip, concepts, args.input_dir, args.output_dir, batch_size=args.batch_size, progress=not args.quiet,
        warn=lambda msg: print(f"warning: {msg}", file=sys.stderr),
    )
    for r in results:
        print(S.format_case(r, args.table))
    print(S.summary_line(results))
    if args.json_out:
        save_json(S.results_json(results, {"clip": str(clip.path), "json": str(args.json)}), args.json_out)
        print(f"wrote {args.json_out}")
    return 0


def _zeroshot(args) -> int:
    from difflab.clip import zeroshot as Z
    from difflab.clip.model import load_clip
    from difflab.clip.templates import COURSE_TEMPLATE
    from difflab.io import save_json

    _check_batch(args.batch_size)
    if args.cases < 0:
        raise ValueError(f"--cases must be >= 0, got {args.cases}")
    id2label = Z.load_id2label(args.id2label)
    Z.list_labelled_images(args.val, id2label)  # fail on bad names before loading CLIP
    templates = Z.resolve_templates(args.templates) if args.templates else None
    clip = load_clip(args.clip, args.device)
    print(f"CLIP: {clip.path} on {clip.device}")
    result = Z.run_zeroshot(clip, args.val, id2label, templates, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{len(result.files)} images, {len(result.class_ids)} classes")
    labels = {"single": f'prompt "{COURSE_TEMPLATE.format("{object}")}"'}
    if templates:
        labels["ensemble"] = f"ensemble of {len(templates)} templates ({args.templates})"
    width = max(len(v) for v in labels.values())
    for m, text in labels.items():
        acc = result.accuracy(m)
        print(f"{text:<{width}}  top-1 {100 * acc[1]:6.2f}%  top-5 {100 * acc[5]:6.2f}%")
    if args.json_out:
        save_json(Z.predictions_json(result, templates), args.json_out)
        print(f"wrote {args.json_out}")
    if args.cases:
        method = "ensemble" if templates else "single"
        good, bad = Z.select_cases(result, method, args.cases)
        paths = Z.write_cases(args.cases_dir, args.val, good, bad, method)
        print(f"{len(good)} successes, {len(bad)} failures ({method}) -> " + ", ".join(str(p) for p in paths))
    return 0
