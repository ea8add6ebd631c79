"""Zero-shot classification with CLIP (Radford et al. 2021, Sec. 3.1.2 and 3.1.4).

Each class c gets a text embedding w_c from a prompt ("A photo of {object}." by default).
An image embedding x is assigned to argmax_c cos(x, w_c); class probabilities are
softmax(exp(logit_scale) * cos) as in CLIP's forward pass. With several templates T the
class embedding is the prompt ensemble
    w_c = normalize(mean_t normalize(t(template_t(c))))
i.e. the mean of the L2-normalised text features, renormalised (CLIP's published recipe).

Labels come from file names ``{class_id}_{image_id}.png`` and class names from the
course's ``id2label.json``; underscores in class names become spaces.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from difflab.clip.templates import COURSE_TEMPLATE, TEMPLATE_SETS
from difflab.io import PathLike, atomic_path, from_uint8, list_images, load_json, read_templates, save_json, save_png

NAME_RE = re.compile(r"^(\d+)_([^.]+)\.[A-Za-z]+$")


# ----------------------------------------------------------------------------- data
def display_name(name: str) -> str:
    """Class names are shown and prompted with spaces: 'willow_tree' -> 'willow tree'."""
    return name.replace("_", " ")


def label_from_name(path: PathLike) -> int:
    """Class id from a file name ``{class_id}_{image_id}.png``."""
    name = Path(path).name
    m = NAME_RE.match(name)
    if not m:
        raise ValueError(f"{path}: expected a file name {{class_id}}_{{image_id}}.png, got {name!r}")
    return int(m.group(1))


def load_id2label(path: PathLike) -> dict[int, str]:
    """The course's ``id2label.json``: {"0": "bicycle", ...} -> {0: "bicycle", ...}."""
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty object mapping class id to class name, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        if not (isinstance(k, str) and k.strip().lstrip("-").isdigit()) or not isinstance(v, str) or not v:
            raise ValueError(f"{path}: expected entries like \"0\": \"bicycle\", got {k!r}: {v!r}")
        out[int(k)] = v
    return dict(sorted(out.items()))


def list_labelled_images(val_dir: PathLike, id2label: dict[int, str]) -> tuple[list[Path], list[int]]:
    """Image files of ``val_dir`` (sorted by name) and their class ids, checked against ``id2label``."""
    val_dir = Path(val_dir)
    files = list_images(val_dir, "validation folder")
    if not files:
        raise ValueError(f"validation folder {val_dir}: expected images named {{class_id}}_{{image_id}}.png, found none")
    labels = [label_from_name(f) for f in files]
    unknown = sorted({y for y in labels if y not in id2label})
    if unknown:
        bad = next(f for f, y in zip(files, labels) if y == unknown[0])
        raise ValueError(f"{bad}: class id {unknown[0]} is not in id2label (unknown ids: {unknown[:10]})")
    return files, labels


def resolve_templates(spec: str) -> list[str]:
    """A template-set name (``course``, ``cifar100``) or a text file with one template ('{}') per line."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    if not Path(spec).is_file():
        raise FileNotFoundError(f"template set {spec!r}: expected one of {sorted(TEMPLATE_SETS)} or a text file, not found")
    return list(read_templates(spec))


# ----------------------------------------------------------------------------- math
def ensemble_text_features(features: Tensor) -> Tensor:
    """Prompt ensemble: [C, T, D] per-template text features -> [C, D] unit class embeddings.

    normalize(mean_t normalize(features[:, t])) — average on the unit sphere, then renormalise.
    """
    if features.ndim != 3:
        raise ValueError(f"expected [classes, templates, dim] text features, got shape {tuple(features.shape)}")
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


def cosine_matrix(image_features: Tensor, class_features: Tensor) -> Tensor:
    """cos(x_n, w_c) for image features [N, D] and class features [C, D] -> [N, C]."""
    x = torch.nn.functional.normalize(image_features.float(), dim=-1)
    w = torch.nn.functional.normalize(class_features.float(), dim=-1)
    return x @ w.T


def topk_accuracy(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target column is among the k highest scores (k capped at C)."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == targets[:, None]).any(dim=1)
        out[k] = float(hit.float().mean())
    return out


def class_text_features(clip, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """[C, D] unit class embeddings: one template -> its normalised feature; several -> ensemble."""
    prompts = [t.format(display_name(c)) for c in classnames for t in templates]
    feats = clip.text_features(prompts).reshape(len(classnames), len(templates), -1)
    return ensemble_text_features(feats)


# ----------------------------------------------------------------------------- run
@dataclass
class ZeroShotResult:
    files: list[Path]
    class_ids: list[int]  # column c of the score matrices is class id class_ids[c]
    classnames: list[str]  # display names (spaces)
    targets: Tensor  # [N] column index of the true class
    logit_scale: float
    cos: dict[str, Tensor]  # method name -> [N, C] cosine similarities

    def accuracy(self, method: str) -> dict[int, float]:
        return topk_accuracy(self.cos[method], self.targets)

    def probabilities(self, method: str) -> Tensor:
        return torch.softmax(self.logit_scale * self.cos[method], dim=1)


def run_zeroshot(
    clip,
    val_dir: PathLike,
    id2label: dict[int, str],
    templates: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> ZeroShotResult:
    """Classify every image of ``val_dir`` with the course prompt and, if given, a template ensemble."""
    files, labels = list_labelled_images(val_dir, id2label)
    class_ids = list(id2label)
    column = {cid: n for n, cid in enumerate(class_ids)}
    raw_names = [id2label[c] for c in class_ids]
    methods = {"single": [COURSE_TEMPLATE]}
    if templates:
        methods["ensemble"] = list(templates)
    class_feats = {m: class_text_features(clip, raw_names, t) for m, t in methods.items()}
    img = clip.image_features(files, batch_size, progress, desc="zero-shot images")
    return ZeroShotResult(
        files=files,
        class_ids=class_ids,
        classnames=[display_name(n) for n in raw_names],
        targets=torch.tensor([column[y] for y in labels]),
        logit_scale=clip.logit_scale,
        cos={m: cosine_matrix(img, w) for m, w in class_feats.items()},
    )


# ----------------------------------------------------------------------------- cases
def select_cases(result: ZeroShotResult, method: str, n: int) -> tuple[list[dict], list[dict]]:
    """The ``n`` most confident successes and the ``n`` most confident failures (ties by file name)."""
    probs = result.probabilities(method)
    pred = probs.argmax(dim=1)
    rows = []
    for i, f in enumerate(result.files):
        t, p = int(result.targets[i]), int(pred[i])
        rows.append(
            {
                "file": f.name,
                "prediction": result.classnames[p],
                "truth": result.classnames[t],
                "probability": float(probs[i, p]),
                "truth_probability": float(probs[i, t]),
                "correct": p == t,
            }
        )
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["probability"], rows[i]["file"]))
    good = [rows[i] for i in order if rows[i]["correct"]][:n]
    bad = [rows[i] for i in order if not rows[i]["correct"]][:n]
    return good, bad


def _fit(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def cases_figure(val_dir: PathLike, successes: Sequence[dict], failures: Sequence[dict], tile: int = 128):
    """One PIL figure: a row of successes (green) over a row of failures (red), each image captioned
    with its file, prediction + probability and truth."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line, pad, head = 12, 6, 16
    cols = max(len(successes), len(failures), 1)
    cell_w, cell_h = tile + 2 * pad, tile + 3 * line + 2 * pad
    rows = [("successes", successes, (0, 130, 0)), ("failures", failures, (190, 0, 0))]
    fig = Image.new("RGB", (cols * cell_w, len(rows) * (cell_h + head)), "white")
    draw = ImageDraw.Draw(fig)
    for r, (title, cases, colour) in enumerate(rows):
        y0 = r * (cell_h + head)
        draw.text((pad, y0 + 2), f"{title} ({len(cases)})", fill=colour, font=font)
        for c, case in enumerate(cases):
            x, y = c * cell_w + pad, y0 + head
            with Image.open(Path(val_dir) / case["file"]) as im:
                fig.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
            ty = y + tile + 2
            draw.text((x, ty), _fit(draw, case["file"], tile, font), fill=(0, 0, 0), font=font)
            pred = f"pred: {case['prediction']} ({case['probability']:.2f})"
            draw.text((x, ty + line), _fit(draw, pred, tile, font), fill=colour, font=font)
            draw.text((x, ty + 2 * line), _fit(draw, f"true: {case['truth']}", tile, font), fill=(0, 0, 0), font=font)
    return fig


def write_cases(out_dir: PathLike, val_dir: PathLike, successes: Sequence[dict], failures: Sequence[dict], method: str) -> list[Path]:
    """Write ``cases.json``, ``cases.csv`` and ``cases.png`` into ``out_dir`` (each atomically)."""
    import numpy as np

    out_dir = Path(out_dir)
    fig = cases_figure(val_dir, successes, failures)  # build everything before writing anything
    rows = [dict(kind="success", **c) for c in successes] + [dict(kind="failure", **c) for c in failures]
    save_json({"method": method, "successes": list(successes), "failures": list(failures)}, out_dir / "cases.json")
    fields = ["kind", "file", "prediction", "truth", "probability", "truth_probability", "correct"]
    with atomic_path(out_dir / "cases.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    save_png(from_uint8(np.array(fig)), out_dir / "cases.png")
    return [out_dir / "cases.json", out_dir / "cases.csv", out_dir / "cases.png"]


def predictions_json(result: ZeroShotResult, templates: Sequence[str] | None) -> dict[str, Any]:
    """Accuracies plus every image's prediction under each method."""
    out: dict[str, Any] = {"images": len(result.files), "classes": len(result.class_ids), "logit_scale": result.logit_scale}
    out["methods"] = {}
    for m, cos in result.cos.items():
        acc = result.accuracy(m)
        pred = cos.argmax(dim=1)
        out["methods"][m] = {
            "templates": [COURSE_TEMPLATE] if m == "single" else list(templates or []),
            "top1": acc[1],
            "top5": acc[5],
            "predictions": {f.name: result.classnames[int(p)] for f, p in zip(result.files, pred)},
        }
    return out
