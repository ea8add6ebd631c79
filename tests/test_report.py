"""``difflab report``: tiny settings (2 images per digit, 2 DDIM steps, a tiny random CLIP,
a 24-image zero-shot subset) so the whole report builds in seconds on a CPU."""
import hashlib
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import EVALUATORS, HW2_DATA, requires_evaluators, requires_shared
from difflab.cli import main

pytestmark = [requires_shared, requires_evaluators]


class Page(HTMLParser):
    """Images, <pre> blocks and missing-input notes per section."""

    def __init__(self):
        super().__init__()
        self.images, self.pre, self.missing, self.sections = [], {}, {}, {}
        self._section, self._in = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a["id"]
            self.sections[a["id"]] = a["data-status"]
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "pre":
            self._in = "pre"
            self.pre.setdefault(self._section, []).append("")
        elif tag == "p" and a.get("class") == "missing":
            self._in = "missing"
            self.missing.setdefault(self._section, []).append("")

    def handle_endtag(self, tag):
        if tag in ("pre", "p"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            getattr(self, self._in)[self._section][-1] += data


def _args(out, clip, zs, *extra):
    return ["report", "--out", str(out), "--per-class", "2", "--steps", "2", "--device", "cpu", "--quiet",
            "--images-per-prompt", "2",
            "--evaluators", str(EVALUATORS), "--data", str(HW2_DATA), *(["--clip", str(clip)] if clip else []),
            "--zeroshot-dir", str(zs), *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from difflab.testing import save_random_clip

    root = tmp_path_factory.mktemp("report")
    clip = save_random_clip(root / "clip")
    zs = root / "zs"
    (zs / "val").mkdir(parents=True)
    shutil.copy(HW2_DATA / "clip_zeroshot" / "id2label.json", zs)
    src = sorted((HW2_DATA / "clip_zeroshot" / "val").glob("*.png"))
    for c in range(12):
        for f in [p for p in src if p.name.startswith(f"{c}_")][:2]:
            shutil.copy(f, zs / "val")
    out = root / "R"
    assert main(_args(out, clip, zs)) == 0
    page = Page()
    page.feed((out / "index.html").read_text())
    return out, clip, zs, page


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_report_page_parses_and_every_image_exists(built):
    out, _, _, page = built
    assert page.sections == {"problem1": "ok", "problem2": "missing", "problem3": "ok", "zeroshot": "ok",
                             "multiconcept": "ok"}
    # two grids, two reverse strips, four Problem 3 contact sheets, the zero-shot cases, two composition sheets
    assert len(page.images) == 11
    for src in page.images:
        assert not src.startswith(("/", "http")) and (out / src).is_file(), src
    assert (out / "report.md").read_text().count("![") == 11


def test_report_accuracy_equals_digits_evaluate(built, capsys):
    out, _, _, page = built
    capsys.readouterr()
    assert main(["digits", "evaluate", str(out / "problem1" / "images"), "--device", "cpu",
                 "--mnistm-classifier", str(EVALUATORS / "mnistm_classifier.pth"),
                 "--svhn-classifier", str(EVALUATORS / "svhn_classifier.pth")]) == 0
    printed = capsys.readouterr().out.strip()
    assert page.pre["problem1"][0].strip() == printed
    import json

    nums = json.loads((out / "report.json").read_text())["problem1"]["accuracy"]
    assert f"MNIST-M acc = {nums['mnistm']['acc']:.4f} (correct/total = {nums['mnistm']['correct']}/20)" in printed
    assert printed.endswith(f"acc = {nums['mean']:.4f}")


def test_report_zeroshot_equals_clip_zeroshot(built, capsys):
    _, clip, zs, page = built
    capsys.readouterr()
    assert main(["clip", "zeroshot", "--clip", str(clip), "--val", str(zs / "val"), "--id2label",
                 str(zs / "id2label.json"), "--templates", "cifar100", "--device", "cpu", "--quiet"]) == 0
    printed = [ln for ln in capsys.readouterr().out.strip().splitlines() if not ln.startswith("CLIP:")]
    assert page.pre["zeroshot"][0].strip().splitlines() == printed


def test_report_missing_inputs_are_explained(built, tmp_path):
    out, _, zs, page = built
    faces = page.missing["problem2"][0]
    for words in ("--faces-noise", "--faces-gt", "--unet", "docs/weights.md"):
        assert words in faces
    # without --clip: the zero-shot section explains itself, Problem 1 still builds (from the cache)
    copy = tmp_path / "R"
    shutil.copytree(out, copy)
    assert main(_args(copy, None, zs)) == 0
    p = Page()
    p.feed((copy / "index.html").read_text())
    assert p.sections["problem1"] == "ok" and p.sections["zeroshot"] == "missing"
    assert "--clip" in p.missing["zeroshot"][0] and "docs/weights.md" in p.missing["zeroshot"][0]
    assert not (copy / "zeroshot").exists()


def test_report_second_run_reuses_cached_sections(built, capsys):
    out, clip, zs, _ = built
    before = _digest(out)
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(_args(out, clip, zs)) == 0
    seconds = time.perf_counter() - t0
    assert "problem1: ok (cached)" in capsys.readouterr().out
    assert _digest(out) == before  # the same bytes, page included
    assert seconds < 5, seconds


def test_report_changed_option_rebuilds_only_that_section(built, tmp_path, capsys):
    out, clip, zs, _ = built
    copy = tmp_path / "R"
    shutil.copytree(out, copy)
    capsys.readouterr()
    assert main(_args(copy, clip, zs, "--seed", "1")) == 0
    text = capsys.readouterr().out
    assert "problem1: ok\n" in text and "zeroshot: ok (cached)" in text


def test_report_refuses_a_folder_that_is_not_a_report(tmp_path, capsys):
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "notes.txt").write_text("mine")
    assert main(["report", "--out", str(tmp_path / "R"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "overwrite" in err, err
    assert (tmp_path / "R" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- Problem 2 (tiny random face UNet)
@pytest.fixture(scope="module")
def faces_inputs(tmp_path_factory):
    import torch
    from PIL import Image

    from difflab.nets.face_unet import FaceUNet, FaceUNetConfig

    root = tmp_path_factory.mktemp("faces")
    torch.manual_seed(0)
    unet = root / "UNet.pt"
    torch.save(FaceUNet(FaceUNetConfig.tiny(8)).eval().state_dict(), unet)
    noise, gt = root / "noise", root / "GT"
    noise.mkdir()
    gt.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        torch.save(torch.randn(1, 3, 32, 32, generator=g), noise / f"{i:02d}.pt")
        px = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(gt / f"{i:02d}.png")
    return unet, noise, gt


def test_report_faces_section_equals_faces_mse(built, faces_inputs, tmp_path, capsys):
    import json

    out, clip, zs, _ = built
    unet, noise, gt = faces_inputs
    copy = tmp_path / "R"
    shutil.copytree(out, copy)
    t0 = time.perf_counter()
    assert main(_args(copy, clip, zs, "--faces-noise", str(noise), "--faces-gt", str(gt), "--unet", str(unet))) == 0
    seconds = time.perf_counter() - t0
    p = Page()
    p.feed((copy / "index.html").read_text())
    assert p.sections["problem2"] == "ok", p.missing.get("problem2")
    capsys.readouterr()
    main(["faces", "mse", str(copy / "problem2" / "images"), str(gt)])  # random GT: exit 1 (mean above 20) is fine
    printed = capsys.readouterr().out.strip()
    assert p.pre["problem2"][0].strip() == printed
    nums = json.loads((copy / "report.json").read_text())["problem2"]
    assert printed.splitlines()[-1].startswith(f"mean\t{nums['mse']['mean']:.4f}")
    assert sorted(nums["mse"]) == ["00.png", "01.png", "02.png", "03.png", "mean"]
    for name in ("eta_grid.png", "interpolation.png", "norms.png"):
        assert f"problem2/{name}" in p.images and (copy / "problem2" / name).is_file()
    # the norms printed by `faces interpolate`
    norms = p.pre["problem2"][1].strip().splitlines()
    assert norms[0].startswith("slerp |z|/sqrt(d): 0:") and norms[1].startswith("lerp |z|/sqrt(d): 0:")
    assert main(["faces", "interpolate", "--noise", str(noise), "--unet", str(unet), "--out", str(tmp_path / "interp"),
                 "--device", "cpu", "--quiet"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if "|z|/sqrt(d)" in ln] == norms
    assert seconds < 120, seconds


# ----------------------------------------------------------------------------- Problem 3 and multi-concept (mini model)
@pytest.mark.parametrize("sid, json_name", [("problem3", None), ("multiconcept", "multi.json")])
def test_report_ti_scores_equal_clip_score(built, capsys, sid, json_name):
    import json

    out, clip, _, page = built
    spec = out / sid / json_name if json_name else HW2_DATA / "textual_inversion" / "input.json"
    capsys.readouterr()
    assert main(["clip", "score", "--clip", str(clip), "--json", str(spec), "--concepts",
                 str(HW2_DATA / "textual_inversion"), "--images", str(out / sid / "images"), "--table", "top",
                 "--device", "cpu", "--quiet"]) == 0
    printed = [ln for ln in capsys.readouterr().out.strip().splitlines() if not ln.startswith("CLIP:")]
    assert page.pre[sid][0].strip().splitlines() == printed
    nums = json.loads((out / "report.json").read_text())[sid]
    assert printed[-1] == f"You have passed {nums['passed']}/{nums['total']} cases"
    for v in nums["cases"].values():
        assert f"top-2 mean: image {v['image']:.2f} (baseline {v['baseline'][0]:g}), text {v['text']:.2f}" in "\n".join(printed)
    n_cases = 4 if sid == "problem3" else 2
    assert nums["total"] == n_cases and sum(f"{sid}/" in src for src in page.images) == n_cases
    assert len(list((out / sid / "images").rglob("*.png"))) == 2 * n_cases


def test_report_ti_without_clip_shows_images_and_explains(built, tmp_path):
    out, _, zs, _ = built
    copy = tmp_path / "R"
    shutil.copytree(out, copy)
    assert main(_args(copy, None, zs)) == 0
    p = Page()
    p.feed((copy / "index.html").read_text())
    for sid in ("problem3", "multiconcept"):
        assert p.sections[sid] == "ok" and sid not in p.pre
        note = p.missing[sid][0]
        assert "--clip" in note and "docs/weights.md" in note and "difflab clip score" in note
        assert sum(f"{sid}/" in src for src in p.images) == (4 if sid == "problem3" else 2)
