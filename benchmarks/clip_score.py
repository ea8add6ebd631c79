"""Benchmark: `difflab clip score` against the course grader's reload-per-folder procedure.

Both run on the same randomly initialised CLIP folder and the same synthetic images:
CONCEPTS concepts x PROMPTS prompts x IMAGES generated images, REFS references each.

- ours: load CLIP once; reference features once per concept; each generated image
  embedded once; scores from the features (``difflab.clip.score.score_concepts``).
- grader (simulated, the procedure of the course's clip_image_score.py / clip_text_score.py):
  for every generated folder, load the model + processor from disk for the text scores
  (a full CLIP forward of the images and the prompt), load them again for the image scores,
  and embed every reference image in its own forward pass for each batch of generated images.

Prints both wall times, the ratio, and the largest score difference between the two.

    python benchmarks/clip_score.py                 # tiny random CLIP (seconds)
    python benchmarks/clip_score.py --size vit-b-32 # openai/clip-vit-base-patch32 dimensions
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_data(root: Path, concepts: int, prompts: int, images: int, refs: int, seed: int = 0) -> Path:
    import json

    rng = np.random.default_rng(seed)
    spec = {}
    for c in range(concepts):
        (root / "concepts" / str(c)).mkdir(parents=True)
        for r in range(refs):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(root / "concepts" / str(c) / f"{r:02d}.jpg")
        spec[str(c)] = {
            "src_image": f"concept {c}",
            "prompt_4_clip_eval": [f"A photo of concept {c} in scene {p}." for p in range(prompts)],
            "baseline": [[70, 30]] * prompts,
        }
        for p in range(prompts):
            d = root / "gen" / str(c) / str(p)
            d.mkdir(parents=True)
            for i in range(images):
                Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    (root / "input.json").write_text(json.dumps(spec))
    return root / "input.json"


def grader_procedure(clip_dir: Path, concepts, concept_root: Path, gen_root: Path, batch_size: int = 32):
    """The grader's steps, in our words: reload per folder, one forward per reference image."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from difflab.clip.score import evaluate_case
    from difflab.io import list_images

    def load():
        model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
        proc = CLIPProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(clip_dir, local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True),
        )
        return model, proc

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    results = []
    for c in concepts:
        for p, prompt in enumerate(c.eval_prompts):
            files = list_images(gen_root / c.key / str(p))
            refs = list_images(concept_root / c.key)
            with torch.no_grad():
                model, proc = load()  # text scores: fresh load
                txt = []
                for i in range(0, len(files), batch_size):
                    ims = [Image.open(f).convert("RGB") for f in files[i : i + batch_size]]
                    out = model(**proc(text=[prompt], images=ims, return_tensors="pt", padding=True))
                    txt += (out.logits_per_image[:, 0] * 100.0 / model.logit_scale.exp()).tolist()
                model, proc = load()  # image scores: another fresh load
                img = []
                ref_ims = [Image.open(r).convert("RGB") for r in refs]
                for i in range(0, len(files), batch_size):
                    ims = [Image.open(f).convert("RGB") for f in files[i : i + batch_size]]
                    g = pooled(model.get_image_features(**proc(images=ims, return_tensors="pt")))
                    per_ref = [
                        100 * torch.nn.functional.cosine_similarity(g, pooled(model.get_image_features(**proc(images=[r], return_tensors="pt"))))
                        for r in ref_ims
                    ]
                    img += torch.stack(per_ref).mean(0).tolist()
            results.append((img, txt, evaluate_case(img, txt, c.baselines[p])))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "vit-b-32"), default="tiny", help="random CLIP architecture (default: tiny)")
    ap.add_argument("--concepts", type=int, default=2, help="concept keys (default: 2, as the course's input.json)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per concept (default: 2)")
    ap.add_argument("--images", type=int, default=25, help="generated images per folder (the course uses 25)")
    ap.add_argument("--refs", type=int, default=5, help="reference images per concept")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from difflab.clip.model import load_clip
    from difflab.clip.score import load_spec, score_concepts
    from difflab.testing import save_random_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_dir = save_random_clip(tmp / "clip", args.size, seed=0)
        spec = make_data(tmp / "data", args.concepts, args.prompts, args.images, args.refs)
        concepts = load_spec(spec)
        croot, groot = tmp / "data" / "concepts", tmp / "data" / "gen"

        t0 = time.perf_counter()
        clip = load_clip(clip_dir, "cpu")
        ours = score_concepts(clip, concepts, croot, groot, warn=lambda m: None)
        t_ours = time.perf_counter() - t0

        t0 = time.perf_counter()
        theirs = grader_procedure(clip_dir, concepts, croot, groot)
        t_grader = time.perf_counter() - t0

    diff = max(
        max(abs(a - b) for a, b in zip(r.image_scores + r.text_scores, img + txt)) for r, (img, txt, _) in zip(ours, theirs)
    )
    same_verdicts = all(r.top == v[0] and r.passed == v[3] for r, (_, _, v) in zip(ours, theirs))
    n_folders = args.concepts * args.prompts
    print(f"random CLIP '{args.size}', {n_folders} folders x {args.images} images, {args.refs} references per concept, "
          f"{args.threads} CPU threads")
    print(f"ours   (load once, features once): {t_ours:8.2f} s")
    print(f"grader (reload per folder)       : {t_grader:8.2f} s")
    print(f"speed-up grader/ours             : {t_grader / t_ours:8.2f} x")
    print(f"max |score difference|           : {diff:.2e}   same top-5 and verdicts: {same_verdicts}")


if __name__ == "__main__":
    main()
