"""The report's sections. Each has ``needs(o)`` (what is missing, as the text shown on the
page), ``key_parts(o)`` (the inputs and options its cache key hashes) and
``build(o, folder, rel)``, which writes its files into ``folder`` (a fresh staging
folder) and returns its record (see :mod:`difflab.report.html`). Numbers on the page are
the very lines the corresponding command prints, made by the same library functions."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DOC = "docs/weights.md"


def shared_root() -> Path:
    """``$DIFFLAB_SHARED``, else ``../shared`` beside the working folder or the checkout."""
    if os.environ.get("DIFFLAB_SHARED"):
        return Path(os.environ["DIFFLAB_SHARED"])
    for c in (Path.cwd().parent / "shared", Path(__file__).resolve().parents[4] / "shared"):
        if c.is_dir():
            return c
    return Path.cwd().parent / "shared"


@dataclass
class ReportOptions:
    """What the report is built from (paths already resolved; None: not given)."""

    data: Path
    evaluators: Path
    ckpt: str | None
    faces_noise: Path | None
    faces_gt: Path | None
    unet: str | None
    sd: str | None
    json: Path | None
    embeddings: tuple
    clip: str | None
    zeroshot_dir: Path
    per_class: int
    steps: int | None
    seed: int
    device: str
    quiet: bool


def _rec(sid: str, title: str, blocks: list, numbers: dict, status: str = "ok") -> dict:
    return {"id": sid, "title": title, "status": status, "blocks": blocks, "numbers": numbers}


def text(t: str) -> dict:
    return {"kind": "text", "text": t}


def pre(t: str) -> dict:
    return {"kind": "pre", "text": t}


def command(t: str) -> dict:
    return {"kind": "command", "text": t}


def missing(t: str) -> dict:
    return {"kind": "missing", "text": t}


def figure(rel: str, name: str, caption: str) -> dict:
    return {"kind": "figure", "file": f"{rel}/{name}", "caption": caption}


# ----------------------------------------------------------------------------- Problem 1
class Digits:
    id, title = "problem1", "Problem 1: conditional digit diffusion"

    @staticmethod
    def needs(o: ReportOptions) -> list[str]:
        from difflab.assets import SHIPPED_DIGITS

        ckpt = Path(o.ckpt) if o.ckpt else SHIPPED_DIGITS
        if not ckpt.exists():
            return [f"the digit model {ckpt} does not exist: give a model folder, run folder or model.safetensors with "
                    "--ckpt (none: the shipped model in src/difflab/assets/digits)"]
        return []

    @staticmethod
    def _classifiers(o: ReportOptions) -> dict[str, Path]:
        return {"mnistm": o.evaluators / "mnistm_classifier.pth", "svhn": o.evaluators / "svhn_classifier.pth"}

    @staticmethod
    def key_parts(o: ReportOptions):
        from difflab.assets import SHIPPED_DIGITS

        c = Digits._classifiers(o)
        inputs = {"ckpt": o.ckpt or SHIPPED_DIGITS, "mnistm": c["mnistm"], "svhn": c["svhn"],
                  "data": o.data / "digits" if Digits._fidelity_ok(o) else None}
        return inputs, {"per_class": o.per_class, "steps": o.steps, "seed": o.seed}

    @staticmethod
    def _fidelity_ok(o: ReportOptions) -> bool:
        return o.per_class >= 4 and (o.data / "digits" / "mnistm").is_dir() and (o.data / "digits" / "svhn").is_dir()

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:
        import torch

        from difflab.data import DATASETS
        from difflab.devices import resolve_device
        from difflab.digits.config import SampleConfig
        from difflab.digits.evaluate import evaluate_fidelity, evaluate_folder, format_fidelity, format_report
        from difflab.digits.figures import SNAPSHOT_TIMES, digit_grid, reverse_process
        from difflab.digits.generate import generate_course_set
        from difflab.digits.model_io import SHIPPED_DIR, load_digit_model
        from difflab.report.figures import labelled_grid

        device = resolve_device(o.device)
        cfg = SampleConfig(seed=o.seed, device=o.device, **({"steps": o.steps} if o.steps else {}))
        net, schedule, _ = load_digit_model(o.ckpt or SHIPPED_DIR, device=device)
        ckpt_flag = f" --ckpt {o.ckpt}" if o.ckpt else ""
        steps_flag = f" --steps {o.steps}" if o.steps else ""
        blocks, numbers = [], {}
        images = folder / "images"
        log(f"problem 1: generating {20 * o.per_class} images")
        generate_course_set(net, schedule, images, cfg, per_class=o.per_class, progress=not o.quiet)
        blocks.append(text(f"{o.per_class} images per digit per dataset ({20 * o.per_class} in all) in R/{rel}/images (R: this report folder), "
                           f"DDIM {cfg.steps} steps, guidance scale {cfg.guidance_scale:g}, seed {cfg.seed}."))
        blocks.append(command(f"difflab digits generate{ckpt_flag} --out OUT --per-class {o.per_class}{steps_flag} "
                              f"--seed {o.seed}"))
        c = Digits._classifiers(o)
        if all(p.is_file() for p in c.values()):
            acc = evaluate_folder(images, c["mnistm"], c["svhn"], device=device)
            blocks.append(text("Accuracy of the course's classifiers (the grader's lines):"))
            blocks.append(pre(format_report(acc)))
            blocks.append(command(f"difflab digits evaluate R/{rel}/images"))
            numbers["accuracy"] = {k: {"correct": v.correct, "total": v.total, "acc": round(v.acc, 4)} for k, v in acc.items()}
            numbers["accuracy"]["mean"] = round((acc["mnistm"].acc + acc["svhn"].acc) / 2, 4)
        else:
            absent = ", ".join(str(p) for p in c.values() if not p.is_file())
            blocks.append(missing(f"Accuracy not computed: missing classifier weights {absent}. They come with the "
                                  "course material (../shared/evaluators); point --evaluators (or $DIFFLAB_SHARED) there."))
        if Digits._fidelity_ok(o) and all(p.is_file() for p in c.values()):
            log("problem 1: fidelity")
            fid = evaluate_fidelity(images, o.data / "digits", c, per_class=o.per_class, seed=o.seed, device=device)
            blocks.append(text("Fidelity against balanced real images in the classifiers' penultimate features, and "
                               "the floor of two disjoint real sets:"))
            blocks.append(pre(format_fidelity(fid)))
            blocks.append(command(f"difflab digits evaluate R/{rel}/images --real {o.data / 'digits'} "
                                  f"--per-class {o.per_class} --seed {o.seed}"))
            numbers["fidelity"] = {n: {k: {"frechet": round(f.frechet, 3), "kid": round(f.kid_mean, 4),
                                           "precision": round(f.precision, 3), "recall": round(f.recall, 3)}
                                       for k, f in rows.items()} for n, rows in fid.items()}
        else:
            blocks.append(missing(f"Fidelity not computed: it needs the real digits in the course layout at "
                                  f"{o.data / 'digits'} (mnistm/, svhn/; --data) and --per-class 4 or more "
                                  f"(given {o.per_class})."))
        with torch.inference_mode():
            for s, name in enumerate(DATASETS):
                log(f"problem 1: figures {name}")
                grid = digit_grid(net, schedule, s, cfg)
                labelled_grid(grid, 10, 10, 28, folder / f"grid_{name}.png", row_labels=[str(d) for d in range(10)],
                              col_labels=[str(c) for c in range(10)], row_title="digit", col_title="noise input")
                blocks.append(figure(rel, f"grid_{name}.png", f"{name}: 10x10 grid, row r is digit r, column c uses "
                                     f"noise input c (shared across rows); DDIM {cfg.steps} steps, seed {cfg.seed}."))
                strip = reverse_process(net, schedule, s, cfg)
                labelled_grid(strip, 1, len(SNAPSHOT_TIMES), 28, folder / f"reverse_{name}.png",
                              col_labels=[f"t={t}" for t in SNAPSHOT_TIMES], col_title="timestep", tile_inches=0.9)
                blocks.append(figure(rel, f"reverse_{name}.png", f"{name}: the reverse process of the first '0' "
                                     f"({name}/0_001.png): x_t after the sampler step that reaches each labelled "
                                     "timestep; t=1000 is the starting noise, t=0 the final image."))
        blocks.append(command(f"difflab digits figures{ckpt_flag} --out OUT{steps_flag} --seed {o.seed}"))
        return _rec(Digits.id, Digits.title, blocks, numbers)


# ----------------------------------------------------------------------------- Problem 2
class Faces:
    id, title = "problem2", "Problem 2: DDIM with the course face UNet"

    @staticmethod
    def needs(o: ReportOptions) -> list[str]:
        out = []
        if o.faces_noise is None or not Path(o.faces_noise).is_dir():
            out.append(f"the face noise folder (*.pt, e.g. hw2_data/face/noise): pass --faces-noise "
                       f"({o.faces_noise or 'not given'})")
        if o.faces_gt is None or not Path(o.faces_gt).is_dir():
            out.append(f"the ground-truth faces (e.g. hw2_data/face/GT): pass --faces-gt ({o.faces_gt or 'not given'})")
        if o.unet is None or not Path(o.unet).is_file():
            out.append(f"the course face UNet weights UNet.pt: pass --unet; where it comes from: {WEIGHTS_DOC}, "
                       f"'The course face UNet' ({o.unet or 'not given'})")
        return out

    @staticmethod
    def key_parts(o: ReportOptions):
        return {"noise": o.faces_noise, "gt": o.faces_gt, "unet": o.unet}, {"seed": o.seed}

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:
        import torch

        from difflab.devices import resolve_device
        from difflab.faces.figures import (
            DEFAULT_ALPHAS,
            DEFAULT_ETAS,
            eta_grid,
            interpolate_noises,
            interpolation_rows,
            relative_norms,
        )
        from difflab.faces.generate import FaceSampling, face_denoiser, generate_dir, load_noise_dir
        from difflab.faces.model_io import load_face_unet
        from difflab.faces.mse import folder_mse
        from difflab.io import make_grid
        from difflab.report.figures import labelled_grid, line_plot

        recipe, blocks, numbers = FaceSampling(), [], {}
        log("problem 2: generating faces")
        generate_dir(o.faces_noise, folder / "images", o.unet, recipe, device=o.device, seed=o.seed, progress=not o.quiet)
        scores = folder_mse(folder / "images", o.faces_gt)
        mean = sum(scores.values()) / len(scores)
        lines = [f"{n}\t{v:.4f}" for n, v in scores.items()]
        lines.append(f"mean\t{mean:.4f}\t({len(scores)} images, max 20: {'ok' if mean <= 20 else 'FAIL'})")
        blocks += [text("MSE on 0-255 RGB pixels against the ground truth, per image and mean:"), pre("\n".join(lines)),
                   command(f"difflab faces generate --noise {o.faces_noise} --unet {o.unet} --out OUT && "
                           f"difflab faces mse OUT {o.faces_gt}")]
        numbers["mse"] = {n: round(v, 4) for n, v in scores.items()}
        numbers["mse"]["mean"] = round(mean, 4)
        dev = resolve_device(o.device)
        den = face_denoiser(load_face_unet(o.unet), dev)
        names = ("00", "01", "02", "03")
        _, noise = load_noise_dir(o.faces_noise, names)
        with torch.inference_mode():
            log("problem 2: eta grid")
            g = eta_grid(den, noise, DEFAULT_ETAS, recipe, seed=o.seed, device=dev, progress=not o.quiet)
            n_eta, n = g.shape[:2]
            size = g.shape[-1]
            labelled_grid(make_grid(g.reshape(n_eta * n, *g.shape[2:]), nrow=n), n_eta, n, size, folder / "eta_grid.png",
                          row_labels=[f"eta={e:g}" for e in DEFAULT_ETAS], col_labels=[f"{m}.pt" for m in names],
                          row_title="eta", col_title="noise", tile_inches=1.6)
            blocks.append(figure(rel, "eta_grid.png", "DDIM with eta 0, 0.25, 0.5, 0.75, 1 (rows) from noises "
                                 "00-03 (columns); eta 0 is the graded deterministic recipe."))
            blocks.append(command(f"difflab faces eta-grid --noise {o.faces_noise} --unet {o.unet} --out eta.png"))
            _, pair = load_noise_dir(o.faces_noise, ("00", "01"))
            z0, z1 = pair[0:1], pair[1:2]
            norms = {m: relative_norms(interpolate_noises(z0, z1, DEFAULT_ALPHAS, m)) for m in ("slerp", "lerp")}
            log("problem 2: interpolation")
            rows = interpolation_rows(den, z0, z1, DEFAULT_ALPHAS, recipe, device=dev, seed=o.seed, progress=not o.quiet)
        a = len(DEFAULT_ALPHAS)
        labelled_grid(make_grid(torch.cat([rows["slerp"], rows["lerp"]]), nrow=a), 2, a, rows["slerp"].shape[-1],
                      folder / "interpolation.png", row_labels=["slerp", "lerp"],
                      col_labels=[f"{x:g}" for x in DEFAULT_ALPHAS], col_title="alpha", tile_inches=1.0)
        blocks.append(figure(rel, "interpolation.png", "Noises 00 and 01 interpolated by slerp (top) and lerp (bottom) "
                             "at alpha 0, 0.1, ..., 1, then DDIM."))
        line_plot(DEFAULT_ALPHAS, norms, folder / "norms.png", xlabel="alpha", ylabel="|z| / sqrt(d)",
                  title="norm of the interpolated noise")
        blocks.append(figure(rel, "norms.png", "|z|/sqrt(d) along both paths: slerp stays near 1 (a typical Gaussian "
                             "sample), lerp dips towards alpha 0.5, which is why its middle images wash out."))
        blocks.append(pre("\n".join(f"{m} |z|/sqrt(d): " + " ".join(f"{x:g}:{v:.3f}" for x, v in zip(DEFAULT_ALPHAS, ns))
                                    for m, ns in norms.items())))
        blocks.append(command(f"difflab faces interpolate --noise {o.faces_noise} --unet {o.unet} --out OUT"))
        numbers["norms"] = {m: [round(v, 3) for v in ns] for m, ns in norms.items()}
        return _rec(Faces.id, Faces.title, blocks, numbers)


# ----------------------------------------------------------------------------- CLIP zero-shot
class ZeroShot:
    id, title = "zeroshot", "CLIP zero-shot classification"
    CASES = 5
    TEMPLATES = "cifar100"

    @staticmethod
    def needs(o: ReportOptions) -> list[str]:
        out = []
        if o.clip is None:
            out.append(f"a CLIP model: pass --clip with a Hugging Face CLIP folder or a cached id such as "
                       f"openai/clip-vit-base-patch32; where it comes from: {WEIGHTS_DOC}, 'CLIP ViT-B/32'")
        if not (o.zeroshot_dir / "val").is_dir() or not (o.zeroshot_dir / "id2label.json").is_file():
            out.append(f"the zero-shot set: a folder with val/ ({{class_id}}_{{image_id}}.png) and id2label.json; pass "
                       f"--zeroshot-dir (looked in {o.zeroshot_dir})")
        return out

    @staticmethod
    def key_parts(o: ReportOptions):
        return {"clip": o.clip, "val": o.zeroshot_dir / "val", "id2label": o.zeroshot_dir / "id2label.json"}, {}

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:
        from difflab.clip import zeroshot as Z
        from difflab.clip.model import load_clip
        from difflab.clip.templates import COURSE_TEMPLATE

        val, id2 = o.zeroshot_dir / "val", o.zeroshot_dir / "id2label.json"
        id2label = Z.load_id2label(id2)
        templates = Z.resolve_templates(ZeroShot.TEMPLATES)
        log("zero-shot: loading CLIP")
        clip = load_clip(o.clip, o.device)
        result = Z.run_zeroshot(clip, val, id2label, templates, progress=not o.quiet)
        # The lines `difflab clip zeroshot` prints (clip/commands.py, _print_accuracies).
        labels = {"single": f'prompt "{COURSE_TEMPLATE.format("{object}")}"',
                  "ensemble": f"ensemble of {len(templates)} templates ({ZeroShot.TEMPLATES})"}
        width = max(len(v) for v in labels.values())
        lines = [f"{len(result.files)} images, {len(result.class_ids)} classes"]
        numbers = {"images": len(result.files), "classes": len(result.class_ids)}
        for m, label in labels.items():
            acc = result.accuracy(m)
            lines.append(f"{label:<{width}}  top-1 {100 * acc[1]:6.2f}%  top-5 {100 * acc[5]:6.2f}%")
            numbers[m] = {"top1": round(100 * acc[1], 2), "top5": round(100 * acc[5], 2)}
        good, bad = Z.select_cases(result, "ensemble", ZeroShot.CASES)
        Z.write_cases(folder, val, good, bad, "ensemble")
        blocks = [text(f"CLIP: {o.clip}. Top-1 and top-5 accuracy with the course's single prompt and with the "
                       f"{ZeroShot.TEMPLATES} prompt ensemble:"), pre("\n".join(lines)),
                  figure(rel, "cases.png", f"The {len(good)} most confident successes and {len(bad)} most confident "
                         "failures of the ensemble classifier (prediction, truth and probability under each image)."),
                  command(f"difflab clip zeroshot --clip {o.clip} --val {val} --id2label {id2} --templates "
                          f"{ZeroShot.TEMPLATES} --cases {ZeroShot.CASES} --out OUT")]
        return _rec(ZeroShot.id, ZeroShot.title, blocks, numbers)


# ----------------------------------------------------------------------------- not built yet
class Personalize:
    id, title = "problem3", "Problem 3: textual inversion against the baselines"

    @staticmethod
    def needs(o: ReportOptions) -> list[str]:
        return ["this section is not implemented in this version of `difflab report`. Run it by hand: "
                "`difflab ti generate --json INPUT_JSON --out GEN` (the shipped mini model and embeddings, or --sd and "
                f"--embeddings, see {WEIGHTS_DOC}) then `difflab clip score --clip CLIP --json INPUT_JSON "
                "--concepts hw2_data/textual_inversion --images GEN`"]

    key_parts = staticmethod(lambda o: ({}, {}))


class MultiConcept:
    id, title = "multiconcept", "Multi-concept composition"

    @staticmethod
    def needs(o: ReportOptions) -> list[str]:
        return ["this section is not implemented in this version of `difflab report` (it needs a composition "
                "prompt with both concept tokens, generated with `difflab ti generate` and scored with `difflab clip "
                "score`)"]

    key_parts = staticmethod(lambda o: ({}, {}))


SECTIONS = (Digits, Faces, Personalize, ZeroShot, MultiConcept)
