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
    images_per_prompt: int
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
    def _scores(o: ReportOptions, images: Path, rel: str, device, blocks: list, numbers: dict,
                log: Callable[[str], None]) -> None:
        """The grader's accuracy lines and the fidelity numbers of ``images``, appended."""
        from difflab.digits.evaluate import evaluate_fidelity, evaluate_folder, format_fidelity, format_report

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

    @staticmethod
    def _figures(net, schedule, cfg, folder: Path, rel: str, blocks: list, log: Callable[[str], None]) -> None:
        """The labelled 10x10 grids and reverse-process strips of both datasets, appended."""
        import torch

        from difflab.data import DATASETS
        from difflab.digits.figures import SNAPSHOT_TIMES, digit_grid, reverse_process
        from difflab.report.figures import labelled_grid

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

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:

        from difflab.devices import resolve_device
        from difflab.digits.config import SampleConfig
        from difflab.digits.generate import generate_course_set
        from difflab.digits.model_io import SHIPPED_DIR, load_digit_model

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
        Digits._scores(o, images, rel, device, blocks, numbers, log)
        Digits._figures(net, schedule, cfg, folder, rel, blocks, log)
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
    def _mse(o: ReportOptions, folder: Path, recipe, blocks: list, numbers: dict, log: Callable[[str], None]) -> None:
        """Generate the course faces and append their MSE lines as ``faces mse`` prints them."""
        from difflab.faces.generate import generate_dir
        from difflab.faces.mse import folder_mse

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
        from difflab.faces.generate import FaceSampling, face_denoiser, load_noise_dir
        from difflab.faces.model_io import load_face_unet
        from difflab.io import make_grid
        from difflab.report.figures import labelled_grid, line_plot

        recipe, blocks, numbers = FaceSampling(), [], {}
        Faces._mse(o, folder, recipe, blocks, numbers, log)
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


# ----------------------------------------------------------------------------- Problem 3 and multi-concept
MINI_COMPOSITION = "a photo of the digit <new1> in the style of <new2>"
SD_COMPOSITION = "A <new1> perched on a park bench in the style of <new2>."


def _ti_needs(o: ReportOptions) -> list[str]:
    from difflab.assets import SHIPPED_MINI_SD

    out = []
    if o.json is None or not Path(o.json).is_file():
        out.append(f"the course input.json (hw2_data/textual_inversion/input.json, reference images in folders 0/ and "
                   f"1/ beside it): pass --json ({o.json or 'not given'})")
    if o.sd is None and not (SHIPPED_MINI_SD / "unet" / "config.json").is_file():
        out.append(f"the shipped mini model is missing at {SHIPPED_MINI_SD}: pass --sd with Stable Diffusion v1.4 "
                   f"weights ({WEIGHTS_DOC}, 'Stable Diffusion')")
    elif o.sd is not None and not Path(o.sd).exists():
        out.append(f"the Stable Diffusion weights {o.sd} do not exist: pass --sd ({WEIGHTS_DOC}, 'Stable Diffusion')")
    for e in o.embeddings:
        if not Path(e).is_file():
            out.append(f"the embedding file {e} does not exist (--embeddings)")
    return out


def _ti_key(o: ReportOptions, extra: dict):
    from difflab.assets import SHIPPED_EMBEDDINGS, SHIPPED_MINI_SD

    inputs = {"sd": o.sd or SHIPPED_MINI_SD, "json": o.json, "clip": o.clip,
              "concepts": Path(o.json).parent if o.json else None,
              "shipped_embeddings": SHIPPED_EMBEDDINGS if o.sd is None else None}
    inputs.update({f"embedding{i}": e for i, e in enumerate(o.embeddings)})
    return inputs, {"steps": o.steps, "images_per_prompt": o.images_per_prompt, "seed": o.seed, **extra}


def _ti_generate(o: ReportOptions, json_path: Path, out: Path, log):
    from difflab.personalize.config import GenerateConfig
    from difflab.personalize.generate import generate_from_json
    from difflab.sd.load import quiet_libraries

    quiet_libraries()
    cfg = GenerateConfig(json=str(json_path), out=str(out), sd=o.sd, embeddings=tuple(o.embeddings),
                         images_per_prompt=o.images_per_prompt, seed=o.seed, device=o.device, quiet=o.quiet,
                         **({"steps": o.steps} if o.steps else {}))
    log(f"generating {cfg.images_per_prompt} images per prompt, {cfg.steps} steps")
    generate_from_json(cfg)
    return cfg


def _ti_flags(o: ReportOptions, cfg) -> str:
    sd = f" --sd {o.sd}" if o.sd else ""
    emb = "".join(f" --embeddings {e}" for e in o.embeddings)
    return f"{sd}{emb} --steps {cfg.steps} --images-per-prompt {cfg.images_per_prompt} --seed {cfg.seed}"


def _ti_score(o: ReportOptions, json_path: Path, concept_root: Path, gen: Path, final_gen: Path, log):
    """Score like `difflab clip score` (clip/commands.py, _score); the printed folders are
    the final ones (``gen`` is the staging copy of ``final_gen``)."""
    from difflab.clip import score as S
    from difflab.clip.model import load_clip

    concepts = S.load_spec(json_path)
    S.plan_scoring(concepts, concept_root, gen, expected=o.images_per_prompt)
    clip = load_clip(o.clip, o.device)
    results = S.score_concepts(clip, concepts, concept_root, gen, progress=not o.quiet, warn=lambda m: None)
    for r in results:
        r.generated_dir = str(final_gen / Path(r.generated_dir).relative_to(gen))
        r.warning = ""
    return results


def _ti_blocks(results, scored_json: Path, concept_root: Path, final_gen: Path, clip: str, rel: str) -> tuple[list, dict]:
    from difflab.clip import score as S

    blocks = [text("CLIP image score (mean 100*cos with the concept's reference images) and text score (100*cos "
                   "with prompt_4_clip_eval) of the 5 images ranked best by image + 2.5*text, against the "
                   "baselines; PASS when both means reach them (the lines `difflab clip score --table top` prints):"),
              pre("\n".join([S.format_case(r, "top") for r in results] + [S.summary_line(results)])),
              command(f"difflab clip score --clip {clip} --json {scored_json} --concepts {concept_root} "
                      f"--images {final_gen} --table top")]
    numbers = {"passed": sum(r.passed for r in results), "total": len(results),
               "cases": {f"{r.key}/{r.prompt_index}": {"image": round(r.mean_image, 2), "text": round(r.mean_text, 2),
                                                      "baseline": [r.baseline_image, r.baseline_text],
                                                      "pass": r.passed, "top": [r.files[n] for n in r.top]}
                         for r in results}}
    return blocks, numbers


def _contact_sheets(concepts, gen: Path, folder: Path, rel: str, results, name: str = "sheet") -> list:
    from difflab.io import list_images
    from difflab.report.figures import contact_sheet

    by_case = {(r.key, r.prompt_index): r for r in results or []}
    blocks = []
    for c in concepts:
        for p, prompt in enumerate(c.prompts):
            files = list_images(gen / c.key / str(p))
            r = by_case.get((c.key, p))
            marks = {n: f"#{k + 1}" for k, n in enumerate(r.top)} if r else {}
            fname = f"{name}_{c.key}_{p}.png"
            contact_sheet(files, folder / fname, marks=marks)
            what = (f"; the top {len(r.top)} by image + 2.5*text are framed in red with their rank "
                    f"({'PASS' if r.passed else 'FAIL'})") if r else "; no CLIP scores (pass --clip)"
            blocks.append(figure(rel, fname, f"Concept {c.key} ({c.src_image}), prompt {p}: \"{prompt}\": "
                                 f"all {len(files)} images, in file order (index under each){what}."))
    return blocks


def _no_clip(rel_cmd: str) -> dict:
    return missing(f"CLIP scores not computed: pass --clip with a Hugging Face CLIP folder or cached id (CLIP "
                   f"ViT-B/32, openai/clip-vit-base-patch32, the grader's model; where it comes from: {WEIGHTS_DOC}, "
                   f"'CLIP ViT-B/32'), or score the images by hand: {rel_cmd}")


class Personalize:
    id, title = "problem3", "Problem 3: textual inversion against the baselines"

    needs = staticmethod(_ti_needs)

    @staticmethod
    def key_parts(o: ReportOptions):
        return _ti_key(o, {})

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:
        from difflab.io import read_course_json

        final = folder.parent / rel
        json_path = Path(o.json).resolve()
        concept_root = json_path.parent
        gen = folder / "images"
        cfg = _ti_generate(o, json_path, gen, lambda m: log(f"problem 3: {m}"))
        concepts = read_course_json(json_path)
        model = f"Stable Diffusion {o.sd}" if o.sd else "the shipped 32x32 mini digit model (no --sd) and its embeddings"
        blocks = [text(f"Images from {model}: {cfg.images_per_prompt} per prompt, {cfg.sampler} {cfg.steps} steps, "
                       f"guidance {cfg.guidance_scale:g}, seed {cfg.seed}, in R/{rel}/images/KEY/P (R: this report "
                       "folder)." + ("" if o.sd else " The mini model draws digits, not the course's dog and painting "
                                     "style: its scores against the course references are expected to fail.")),
                  command(f"difflab ti generate --json {json_path} --out GEN{_ti_flags(o, cfg)}")]
        numbers: dict = {"images_per_prompt": cfg.images_per_prompt, "steps": cfg.steps}
        results = None
        if o.clip:
            log("problem 3: CLIP scores")
            results = _ti_score(o, json_path, concept_root, gen, final / "images", log)
            b, n = _ti_blocks(results, json_path, concept_root, final / "images", o.clip, rel)
            blocks += b
            numbers.update(n)
        else:
            blocks.append(_no_clip(f"`difflab clip score --clip CLIP --json {json_path} --concepts {concept_root} "
                                   f"--images R/{rel}/images`"))
        blocks += _contact_sheets(concepts, gen, folder, rel, results)
        return _rec(Personalize.id, Personalize.title, blocks, numbers)


class MultiConcept:
    id, title = "multiconcept", "Multi-concept composition"

    needs = staticmethod(_ti_needs)

    @staticmethod
    def prompt(o: ReportOptions) -> str:
        return SD_COMPOSITION if o.sd else MINI_COMPOSITION

    @staticmethod
    def key_parts(o: ReportOptions):
        return _ti_key(o, {"prompt": MultiConcept.prompt(o)})

    @staticmethod
    def build(o: ReportOptions, folder: Path, rel: str, log: Callable[[str], None]) -> dict:
        import json

        from difflab.io import read_course_json

        final = folder.parent / rel
        json_path = Path(o.json).resolve()
        concept_root = json_path.parent
        course = {c.key: c for c in read_course_json(json_path)}
        spec = json.loads(json_path.read_text())
        by_token = {c.token: c for c in course.values()}
        if "<new1>" not in by_token or "<new2>" not in by_token:
            raise ValueError(f"{json_path}: the composition needs concepts with tokens <new1> and <new2>, found "
                             f"{', '.join(sorted(by_token))}")
        prompt = MultiConcept.prompt(o)
        eval_prompt = prompt
        for tok, c in by_token.items():
            eval_prompt = eval_prompt.replace(tok, c.src_image)
        # the composition prompt under each concept's key: `ti generate` draws it for both (different seeds) and
        # `clip score` scores each key's images against that concept's references; baselines: each concept's
        # first prompt's, for comparison
        pair = (by_token["<new1>"], by_token["<new2>"])
        multi = {c.key: {"src_image": c.src_image, "token_name": c.token, "prompt": [prompt],
                         "prompt_4_clip_eval": [eval_prompt], "baseline": [list(spec[c.key]["baseline"][0])]}
                 for c in pair}
        (folder / "multi.json").write_text(json.dumps(multi, indent=2) + "\n")
        gen = folder / "images"
        cfg = _ti_generate(o, folder / "multi.json", gen, lambda m: log(f"multi-concept: {m}"))
        blocks = [text(f"The composition prompt \"{prompt}\" with both learned tokens (CLIP text: \"{eval_prompt}\"), "
                       f"drawn under each concept's key (different seeds): {cfg.images_per_prompt} images each, "
                       f"{cfg.sampler} {cfg.steps} steps, seed {cfg.seed}, in R/{rel}/images/KEY/0; R/{rel}/multi.json "
                       "is the prompt file. Each key's images are scored against that concept's references; the "
                       "baselines are each concept's first prompt's, for comparison."),
                  command(f"difflab ti generate --json R/{rel}/multi.json --out GEN{_ti_flags(o, cfg)}")]
        numbers: dict = {"prompt": prompt, "images_per_prompt": cfg.images_per_prompt}
        results = None
        if o.clip:
            log("multi-concept: CLIP scores")
            results = _ti_score(o, folder / "multi.json", concept_root, gen, final / "images", log)
            b, n = _ti_blocks(results, final / "multi.json", concept_root, final / "images", o.clip, rel)
            blocks += b
            numbers.update(n)
        else:
            blocks.append(_no_clip(f"`difflab clip score --clip CLIP --json R/{rel}/multi.json --concepts "
                                   f"{concept_root} --images R/{rel}/images`"))
        blocks += _contact_sheets(read_course_json(folder / "multi.json"), gen, folder, rel, results, "composition")
        return _rec(MultiConcept.id, MultiConcept.title, blocks, numbers)


SECTIONS = (Digits, Faces, Personalize, ZeroShot, MultiConcept)
