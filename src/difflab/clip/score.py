"""CLIP image/text scores for personalised generations, with the course grader's semantics.

Course ``grade_hw2_3.py`` (NTU DLCV HW2, problem 3), for concept key k and prompt index p,
over the generated images in ``GEN_ROOT/k/p/``:

- image score of image g  = mean over reference images r in ``CONCEPT_ROOT/k/`` of
  100 * cos(f(g), f(r)), with f the CLIP image features;
- text score of image g   = 100 * cos(f(g), t(prompt_4_clip_eval[p])), with t the CLIP text
  features (the grader reads ``logits_per_image`` = exp(logit_scale) * cos, which is
  100 * cos for the released weights, whose exp(logit_scale) is 100);
- ranking by image + 2.5 * text; the case reports the mean image score and the mean text
  score of the 5 best-ranked images and PASSes when both are >= ``baseline[p]`` =
  [image baseline, text baseline].

Unlike the grader, the model is loaded once, reference features are computed once per
concept, and a folder without exactly 25 images is scored after a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from difflab.io import IMAGE_SUFFIXES, Concept, PathLike, list_images, read_course_json

EXPECTED_IMAGES = 25
TEXT_WEIGHT = 2.5
TOP_K = 5


# ----------------------------------------------------------------------------- math
def cosine_scores(a: Tensor, b: Tensor) -> Tensor:
    """100 * cosine similarity of every row of ``a`` [N, D] with every row of ``b`` [M, D] -> [N, M]."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return 100.0 * a @ b.T


def image_scores(gen_features: Tensor, ref_features: Tensor) -> Tensor:
    """CLIP image score per generated image: mean over references of 100 * cos. [N, D], [R, D] -> [N]."""
    if ref_features.shape[0] == 0:
        raise ValueError("image score needs at least one reference image, got 0")
    return cosine_scores(gen_features, ref_features).mean(dim=1)


def text_scores(gen_features: Tensor, text_feature: Tensor) -> Tensor:
    """CLIP text score per generated image: 100 * cos with one prompt. [N, D], [D] or [1, D] -> [N]."""
    return cosine_scores(gen_features, text_feature.reshape(1, -1))[:, 0]


def rank_images(img: Sequence[float], txt: Sequence[float], text_weight: float = TEXT_WEIGHT) -> list[int]:
    """Indices ordered by ``img + text_weight * txt``, best first (ties keep folder order)."""
    combined = [float(i) + text_weight * float(t) for i, t in zip(img, txt)]
    return sorted(range(len(combined)), key=lambda n: -combined[n])


@dataclass
class CaseResult:
    """One (concept, prompt) case: every image's scores, the top-k and the verdict."""

    key: str
    prompt_index: int
    prompt: str
    src_image: str
    generated_dir: str
    reference_dir: str
    reference_files: list[str]
    files: list[str]
    image_scores: list[float]
    text_scores: list[float]
    baseline_image: float
    baseline_text: float
    top: list[int]  # indices into files, best first
    mean_image: float
    mean_text: float
    passed: bool
    warning: str = ""

    @property
    def combined(self) -> list[float]:
        return [i + TEXT_WEIGHT * t for i, t in zip(self.image_scores, self.text_scores)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        rank = {n: r + 1 for r, n in enumerate(rank_images(self.image_scores, self.text_scores))}
        top = set(self.top)
        d["top"] = [self.files[n] for n in self.top]
        d["images"] = [
            {"file": f, "image": i, "text": t, "combined": c, "rank": rank[n], "top": n in top}
            for n, (f, i, t, c) in enumerate(zip(self.files, self.image_scores, self.text_scores, self.combined))
        ]
        for k in ("files", "image_scores", "text_scores"):
            d.pop(k)
        return d


def evaluate_case(
    img: Sequence[float], txt: Sequence[float], baseline: Sequence[float], k: int = TOP_K, text_weight: float = TEXT_WEIGHT
) -> tuple[list[int], float, float, bool]:
    """The grader's verdict: (top-k indices, mean image of top-k, mean text of top-k, PASS)."""
    if len(img) != len(txt) or not img:
        raise ValueError(f"expected equally many image and text scores (> 0), got {len(img)} and {len(txt)}")
    top = rank_images(img, txt, text_weight)[:k]
    mean_i = sum(float(img[n]) for n in top) / len(top)
    mean_t = sum(float(txt[n]) for n in top) / len(top)
    return top, mean_i, mean_t, bool(mean_i >= baseline[0] and mean_t >= baseline[1])


# ----------------------------------------------------------------------------- inputs
def load_spec(json_path: PathLike) -> list[Concept]:
    """The course ``input.json`` as scoring reads it: every concept needs
    ``prompt_4_clip_eval`` and a matching ``baseline``."""
    return read_course_json(json_path, need="score")


@dataclass
class CasePlan:
    concept: Concept
    prompt_index: int
    generated_dir: Path
    files: list[Path]
    warning: str = ""


@dataclass
class ScorePlan:
    concept_dirs: dict[str, Path]
    reference_files: dict[str, list[Path]]
    cases: list[CasePlan] = field(default_factory=list)


def plan_scoring(concepts: Sequence[Concept], concept_root: PathLike, gen_root: PathLike, expected: int = EXPECTED_IMAGES) -> ScorePlan:
    """Check every folder before any model is loaded; a wrong image count only warns."""
    concept_root, gen_root = Path(concept_root), Path(gen_root)
    for root, what in ((concept_root, "concept image root (concept_root)"), (gen_root, "generated image root (gen_root)")):
        if not root.is_dir():
            raise FileNotFoundError(f"{what} not found: {root}")
    plan = ScorePlan({}, {})
    for c in concepts:
        ref_dir = concept_root / c.key
        if not ref_dir.is_dir():
            raise FileNotFoundError(f"reference folder for concept {c.key!r} not found: {ref_dir}: expected the concept's images")
        refs = list_images(ref_dir)
        if not refs:
            raise ValueError(f"reference folder {ref_dir}: expected images ({', '.join(IMAGE_SUFFIXES)}), found none")
        plan.concept_dirs[c.key], plan.reference_files[c.key] = ref_dir, refs
        for p in range(len(c.eval_prompts)):
            gdir = gen_root / c.key / str(p)
            if not gdir.is_dir():
                raise FileNotFoundError(
                    f"generated folder for concept {c.key!r} prompt {p} not found: {gdir}: expected {expected} images"
                )
            files = list_images(gdir)
            if not files:
                raise ValueError(f"generated folder {gdir}: expected {expected} images, found none")
            warn = "" if len(files) == expected else f"{gdir}: expected {expected} images, found {len(files)}; scoring them anyway"
            plan.cases.append(CasePlan(c, p, gdir, files, warn))
    return plan


# ----------------------------------------------------------------------------- scoring
def score_concepts(
    clip,
    concepts: Sequence[Concept],
    concept_root: PathLike,
    gen_root: PathLike,
    *,
    batch_size: int = 32,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[CaseResult]:
    """Score every (concept, prompt) case with one loaded ``Clip`` (see ``difflab.clip.model``)."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    plan = plan_scoring(concepts, concept_root, gen_root)
    for case in plan.cases:
        if case.warning:
            warn(case.warning)
    ref_feats = {
        c.key: clip.image_features(plan.reference_files[c.key], batch_size, progress, desc=f"references {c.key}")
        for c in concepts
    }
    prompt_feats = {c.key: clip.text_features(c.eval_prompts) for c in concepts}
    results = []
    for case in plan.cases:
        c, p = case.concept, case.prompt_index
        gen = clip.image_features(case.files, batch_size, progress, desc=f"generated {c.key}/{p}")
        img = image_scores(gen, ref_feats[c.key]).tolist()
        txt = text_scores(gen, prompt_feats[c.key][p]).tolist()
        top, mi, mt, ok = evaluate_case(img, txt, c.baselines[p])
        results.append(
            CaseResult(
                key=c.key, prompt_index=p, prompt=c.eval_prompts[p], src_image=c.src_image,
                generated_dir=str(case.generated_dir), reference_dir=str(plan.concept_dirs[c.key]),
                reference_files=[f.name for f in plan.reference_files[c.key]], files=[f.name for f in case.files],
                image_scores=img, text_scores=txt, baseline_image=c.baselines[p][0], baseline_text=c.baselines[p][1],
                top=top, mean_image=mi, mean_text=mt, passed=ok, warning=case.warning,
            )
        )
    return results


# ----------------------------------------------------------------------------- reports
def summary_line(results: Sequence[CaseResult]) -> str:
    return f"You have passed {sum(r.passed for r in results)}/{len(results)} cases"


def format_case(r: CaseResult, show: str = "all") -> str:
    """A text block for one case; ``show`` = 'all' (every image, ranked), 'top' or 'none'."""
    verdict = "PASS" if r.passed else "FAIL"
    lines = [
        f"== concept {r.key} ({r.src_image}), prompt {r.prompt_index}: {r.prompt}",
        f"   {len(r.files)} images in {r.generated_dir}, {len(r.reference_files)} references in {r.reference_dir}",
    ]
    if show != "none":
        order = rank_images(r.image_scores, r.text_scores)
        if show == "top":
            order = order[: len(r.top)]
        width = max(len("file"), *(len(f) for f in r.files))
        lines.append(f"   {'rank':>4}  {'file':<{width}}  {'image':>7}  {'text':>7}  {'img+2.5txt':>10}  top{len(r.top)}")
        top = set(r.top)
        for rank, n in enumerate(order, 1):
            mark = "*" if n in top else ""
            lines.append(
                f"   {rank:>4}  {r.files[n]:<{width}}  {r.image_scores[n]:7.2f}  {r.text_scores[n]:7.2f}"
                f"  {r.combined[n]:10.2f}  {mark}"
            )
    lines.append(
        f"   top-{len(r.top)} mean: image {r.mean_image:.2f} (baseline {r.baseline_image:g}), "
        f"text {r.mean_text:.2f} (baseline {r.baseline_text:g}) -> {verdict}"
    )
    return "\n".join(lines)


def results_json(results: Sequence[CaseResult], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = dict(extra or {})
    out.update(
        text_weight=TEXT_WEIGHT,
        top_k=TOP_K,
        passed=sum(r.passed for r in results),
        total=len(results),
        summary=summary_line(results),
        cases=[r.to_dict() for r in results],
    )
    return out
