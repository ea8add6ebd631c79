"""CLIP tools on randomly initialised CLIP models (no CLIP weights exist offline).

Oracles: the course grader's own computation written directly with transformers in the
test (CLIPProcessor + CLIPModel forward / get_image_features + cosine_similarity), CLIP's
documented preprocessing written with PIL + numpy, and hand-computed ranking numbers.
"""
from __future__ import annotations

import ast
import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflab.cli as cli
from difflab.clip import score as S
from difflab.clip import zeroshot as Z
from difflab.clip.model import check_clip_folder, load_clip
from difflab.clip.templates import CIFAR100_TEMPLATES, COURSE_TEMPLATE
from difflab.testing import save_random_clip

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: any socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, "cpu")


def random_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_images(folder: Path, n: int, seed: int, ext: str = ".png", size=(40, 48)) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:02d}{ext}"
        random_image(rng, *size).save(p)
        paths.append(p)
    return paths


def run_cli(monkeypatch, argv):
    monkeypatch.setattr(cli, "GROUPS", ["difflab.clip.commands"])  # only this group: others may be absent
    return cli.main(argv)


# ----------------------------------------------------------------------------- loading
def test_preprocessing_is_clip_recipe(clip):
    """Shortest side -> 224 bicubic, centre crop 224, /255, normalise with CLIP mean/std."""
    im = random_image(np.random.default_rng(1), 48, 64)  # H=48, W=64 -> 224 x 298
    w = int(224 * 64 / 48)
    resized = np.asarray(im.resize((w, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    left = (w - 224) // 2
    crop = resized[:, left : left + 224]
    expected = torch.from_numpy(((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())
    got = clip.preprocess([im])[0]
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_loader_errors_name_the_folder(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_clip(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as e:
        check_clip_folder(partial)
    msg = str(e.value)
    assert str(partial) in msg and "weights" in msg and "preprocessor_config.json" in msg and "tokenizer" in msg


def test_tokenizer_covers_prompts(clip):
    ids = clip.tokenizer(["A dog perched on a park bench with the Colosseum looming behind."])["input_ids"][0]
    eos = clip.model.config.text_config.eos_token_id
    assert ids[0] == clip.model.config.text_config.bos_token_id and ids[-1] == eos
    assert eos not in ids[1:-1]  # no word fell back to the unknown (= end-of-text) token


# ----------------------------------------------------------------------------- score: math
def test_ranking_and_verdict_known_numbers():
    img = [80, 70, 90, 60, 85, 50, 75]
    txt = [30, 40, 20, 35, 33, 10, 36]
    # combined = img + 2.5 txt = 155, 170, 140, 147.5, 167.5, 75, 165
    assert S.rank_images(img, txt) == [1, 4, 6, 0, 3, 2, 5]
    top, mi, mt, ok = S.evaluate_case(img, txt, [74, 34.8])
    assert top == [1, 4, 6, 0, 3]  # the best image score (90, index 2) is not in the top 5
    assert mi == pytest.approx(74.0) and mt == pytest.approx(34.8)
    assert ok  # both baselines reached exactly
    assert not S.evaluate_case(img, txt, [74.01, 30])[3]
    assert not S.evaluate_case(img, txt, [70, 34.81])[3]


def test_cosine_scores_are_100_cos():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    expected = torch.tensor([[100 * 24 / 25, 100 * 4 / 5], [100 * 4 / 5, 0.0]])
    torch.testing.assert_close(S.cosine_scores(a, b), expected)
    torch.testing.assert_close(S.image_scores(a, b), expected.mean(1))
    torch.testing.assert_close(S.text_scores(a, b[1]), expected[:, 1])


# ----------------------------------------------------------------------------- score: data
def make_case(tmp_path: Path, counts: dict[tuple[str, int], int], refs: dict[str, int]) -> tuple[Path, Path, Path]:
    concept_root, gen_root = tmp_path / "concepts", tmp_path / "gen"
    spec = {}
    for n, (key, nref) in enumerate(refs.items()):
        write_images(concept_root / key, nref, seed=100 + n, ext=".jpg")
        prompts = [f"A photo of thing {key} number {p}." for p in range(2)]
        spec[key] = {"src_image": f"src{key}", "prompt_4_clip_eval": prompts, "baseline": [[60, 20], [0, -100]]}
    for (key, p), n in counts.items():
        write_images(gen_root / key / str(p), n, seed=10 * int(key) + p)
    (tmp_path / "input.json").write_text(json.dumps(spec))
    return tmp_path / "input.json", concept_root, gen_root


class FakeClip:
    """Features looked up from fixed vectors; counts how often each image is embedded."""

    def __init__(self, vectors: dict[str, torch.Tensor], text: dict[str, torch.Tensor]):
        self.vectors, self.text, self.calls = vectors, text, []

    def image_features(self, images, batch_size=32, progress=False, desc=""):
        self.calls.append([str(p) for p in images])
        return torch.stack([self.vectors[str(p)] for p in images])

    def text_features(self, texts):
        return torch.stack([self.text[t] for t in texts])


def test_score_concepts_wiring_with_known_features(tmp_path):
    js, croot, groot = make_case(tmp_path, {("0", 0): 6, ("0", 1): 6}, {"0": 2})
    concepts = S.load_spec(js)
    # references: e1 and e2; generated image i: (cos a_i, sin a_i, 0) -> image score = 50 (cos a + sin a)
    vec = {str(croot / "0" / "00.jpg"): torch.tensor([1.0, 0, 0]), str(croot / "0" / "01.jpg"): torch.tensor([0, 2.0, 0])}
    angles = [0.1 * i for i in range(6)]
    for p in range(2):
        for i, a in enumerate(angles):
            vec[str(groot / "0" / str(p) / f"{i:02d}.png")] = torch.tensor([math.cos(a), math.sin(a), 0.0]) * (i + 1)
    text = {concepts[0].eval_prompts[0]: torch.tensor([0, 0, 1.0]), concepts[0].eval_prompts[1]: torch.tensor([1.0, 0, 0])}
    fake = FakeClip(vec, text)
    res = S.score_concepts(fake, concepts, croot, groot, warn=lambda m: None)
    ref_calls = [c for c in fake.calls if str(croot) in c[0]]
    assert len(ref_calls) == 1  # reference features computed once per concept, not once per prompt
    r0, r1 = res
    np.testing.assert_allclose(r0.image_scores, [50 * (math.cos(a) + math.sin(a)) for a in angles], atol=1e-4)
    np.testing.assert_allclose(r0.text_scores, [0.0] * 6, atol=1e-4)
    np.testing.assert_allclose(r1.text_scores, [100 * math.cos(a) for a in angles], atol=1e-4)
    # prompt 0: text is 0, so ranking is by image score, which grows with the angle up to pi/4
    assert r0.top == [5, 4, 3, 2, 1]
    # prompt 1: 50(cos a + sin a) + 2.5 * 100 cos a = 300 cos a + 50 sin a
    #   = 300.0, 303.5, 303.9, 301.4, 295.8, 287.2 for a = 0, 0.1, ..., 0.5
    assert r1.top == [2, 1, 3, 0, 4]
    # prompt 0: baseline [60, 20], top-5 text mean 0 -> FAIL; prompt 1: baseline [0, -100] -> PASS
    assert r0.mean_text == pytest.approx(0.0, abs=1e-4) and r0.passed is False
    assert r1.passed is True


def test_score_concepts_verdicts_and_warning(tmp_path, clip):
    js, croot, groot = make_case(tmp_path, {("0", 0): 25, ("0", 1): 3}, {"0": 2})
    concepts = S.load_spec(js)
    with pytest.warns(UserWarning, match=r"0/1: expected 25 images, found 3"):
        res = S.score_concepts(clip, concepts, croot, groot)
    assert [len(r.files) for r in res] == [25, 3]
    assert res[1].warning and not res[0].warning
    assert len(res[1].top) == 3  # fewer than 5 images: all of them are the "top"
    for r in res:
        expect = r.mean_image >= r.baseline_image and r.mean_text >= r.baseline_text
        assert r.passed == expect
    assert S.summary_line(res) == f"You have passed {sum(r.passed for r in res)}/2 cases"


def test_scores_equal_direct_transformers_grader(tmp_path, clip, clip_dir):
    """Our scores == the grader's computation written directly with transformers."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    js, croot, groot = make_case(tmp_path, {("0", 0): 7, ("0", 1): 7, ("1", 0): 7, ("1", 1): 7}, {"0": 3, "1": 2})
    concepts = S.load_spec(js)
    res = S.score_concepts(clip, concepts, croot, groot, batch_size=4, warn=lambda m: None)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(clip_dir), tokenizer=CLIPTokenizer.from_pretrained(clip_dir))

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    for r in res:
        gen = [Image.open(groot / r.key / str(r.prompt_index) / f).convert("RGB") for f in r.files]
        refs = [Image.open(croot / r.key / f).convert("RGB") for f in r.reference_files]
        with torch.no_grad():
            inputs = proc(text=[r.prompt], images=gen, return_tensors="pt", padding=True)
            logits = model(**inputs).logits_per_image[:, 0]
            text_direct = logits * 100.0 / model.logit_scale.exp()  # grader: logits_per_image with exp(scale) = 100
            g = feats(model.get_image_features(**proc(images=gen, return_tensors="pt")))
            per_ref = [
                100 * torch.nn.functional.cosine_similarity(g, feats(model.get_image_features(**proc(images=[x], return_tensors="pt"))))
                for x in refs
            ]
            image_direct = torch.stack(per_ref).mean(0)
        np.testing.assert_allclose(r.text_scores, text_direct.numpy(), atol=2e-4)
        np.testing.assert_allclose(r.image_scores, image_direct.numpy(), atol=2e-4)
        order = sorted(range(len(gen)), key=lambda i: -(image_direct[i] + 2.5 * text_direct[i]))
        assert r.top == order[:5]


def test_spec_and_folder_errors(tmp_path):
    js, croot, groot = make_case(tmp_path, {("0", 0): 2, ("0", 1): 2}, {"0": 1})
    spec = json.loads(js.read_text())
    bad = tmp_path / "bad.json"
    for mutate, pattern in [
        (lambda d: d["0"].pop("baseline"), "missing key 'baseline'"),
        (lambda d: d["0"].pop("prompt_4_clip_eval"), "missing key 'prompt_4_clip_eval'"),
        (lambda d: d["0"].update(baseline=[[1, 2]]), "one \\[image, text\\] pair per prompt"),
        (lambda d: d["0"].update(baseline=[[1, 2], [3]]), "\\[image_baseline, text_baseline\\]"),
    ]:
        d = json.loads(json.dumps(spec))
        mutate(d)
        bad.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=pattern) as e:
            S.load_spec(bad)
        assert str(bad) in str(e.value) and "'0'" in str(e.value)
    concepts = S.load_spec(js)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        S.plan_scoring(concepts, tmp_path / "none", groot)
    (groot / "0" / "1" / "00.png").unlink()
    (groot / "0" / "1" / "01.png").unlink()
    with pytest.raises(ValueError, match="found none"):
        S.plan_scoring(concepts, croot, groot)
    (groot / "0" / "1").rmdir()
    with pytest.raises(FileNotFoundError, match=str(groot / "0" / "1")):
        S.plan_scoring(concepts, croot, groot)


def test_cli_score(tmp_path, clip_dir, monkeypatch, capsys):
    js, croot, groot = make_case(tmp_path, {("0", 0): 6, ("0", 1): 5}, {"0": 2})
    out = tmp_path / "scores.json"
    rc = run_cli(monkeypatch, ["clip", "score", "--json", str(js), "--concepts", str(croot), "--images", str(groot),
                               "--clip", str(clip_dir), "--device", "cpu", "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "expected 25 images, found 6" in cap.err and "expected 25 images, found 5" in cap.err
    data = json.loads(out.read_text())
    assert data["total"] == 2 and cap.out.strip().splitlines()[-2] == data["summary"]
    assert data["summary"] == f"You have passed {data['passed']}/2 cases"
    case = data["cases"][0]
    assert len(case["images"]) == 6 and sum(i["top"] for i in case["images"]) == 5
    assert sorted(i["rank"] for i in case["images"]) == list(range(1, 7))
    for i in case["images"]:
        assert i["combined"] == pytest.approx(i["image"] + 2.5 * i["text"])
    top = [i for i in case["images"] if i["top"]]
    assert case["mean_image"] == pytest.approx(sum(i["image"] for i in top) / 5)
    assert "*" in cap.out and "top-5 mean" in cap.out
    # a missing reference folder fails before CLIP is loaded, with exit code 2
    rc = run_cli(monkeypatch, ["clip", "score", "--json", str(js), "--input_dir", str(tmp_path), "--output_dir", str(groot),
                               "--clip", str(tmp_path / "no-clip")])
    assert rc == 2 and str(tmp_path / "0") in capsys.readouterr().err


# ----------------------------------------------------------------------------- zero-shot
def make_val(tmp_path: Path, names: dict[int, str], per_class: int = 3) -> tuple[Path, Path]:
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(7)
    for cid in names:
        for i in range(per_class):
            random_image(rng, 32, 32).save(val / f"{cid}_{i + 1:03d}.png")
    id2 = tmp_path / "id2label.json"
    id2.write_text(json.dumps({str(k): v for k, v in names.items()}))
    return val, id2


NAMES = {0: "bicycle", 3: "willow_tree", 5: "aquarium_fish", 7: "fox", 9: "maple_tree", 11: "sweet_pepper"}


def test_zeroshot_is_argmax_of_cosine(tmp_path, clip, clip_dir):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    val, id2 = make_val(tmp_path, NAMES)
    res = Z.run_zeroshot(clip, val, Z.load_id2label(id2), CIFAR100_TEMPLATES[:3], batch_size=5)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok, ip = CLIPTokenizer.from_pretrained(clip_dir), CLIPImageProcessorPil.from_pretrained(clip_dir)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    names = [NAMES[k].replace("_", " ") for k in sorted(NAMES)]
    prompts = [f"A photo of {n}." for n in names]
    assert prompts[1] == "A photo of willow tree."
    with torch.no_grad():
        t = feats(model.get_text_features(**tok(prompts, padding=True, return_tensors="pt")))
        images = [Image.open(f).convert("RGB") for f in res.files]
        x = feats(model.get_image_features(**ip(images=images, return_tensors="pt")))
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    torch.testing.assert_close(res.cos["single"], cos, atol=1e-5, rtol=0)
    assert torch.equal(res.cos["single"].argmax(1), cos.argmax(1))
    targets = torch.tensor([sorted(NAMES).index(Z.label_from_name(f)) for f in res.files])
    assert torch.equal(res.targets, targets)
    assert res.accuracy("single")[1] == pytest.approx(float((cos.argmax(1) == targets).float().mean()))
    top5 = cos.topk(5, dim=1).indices
    assert res.accuracy("single")[5] == pytest.approx(float((top5 == targets[:, None]).any(1).float().mean()))
    probs = res.probabilities("single")
    torch.testing.assert_close(probs, torch.softmax(model.logit_scale.exp() * cos, dim=1), atol=1e-5, rtol=0)

    # the ensemble: per class, mean of the normalised features of the 3 prompts, renormalised
    with torch.no_grad():
        per = [feats(model.get_text_features(**tok([tp.format(n) for tp in CIFAR100_TEMPLATES[:3]], padding=True, return_tensors="pt"))) for n in names]
    w = torch.stack([torch.nn.functional.normalize(torch.nn.functional.normalize(p, dim=-1).mean(0), dim=0) for p in per])
    cos_e = torch.nn.functional.normalize(x, dim=-1) @ w.T
    torch.testing.assert_close(res.cos["ensemble"], cos_e, atol=1e-5, rtol=0)


def test_ensemble_averages_normalised_features():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 8, generator=g)
    e = Z.ensemble_text_features(f)
    unit = f / f.norm(dim=-1, keepdim=True)
    m = unit.mean(1)
    torch.testing.assert_close(e, m / m.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    # rescaling one template's features changes a plain mean but not the ensemble
    scaled = f.clone()
    scaled[:, 0] *= 50
    torch.testing.assert_close(Z.ensemble_text_features(scaled), e)
    plain = scaled.mean(1) / scaled.mean(1).norm(dim=-1, keepdim=True)
    assert not torch.allclose(plain, e, atol=1e-3)
    # one template: the ensemble is just the normalised feature
    torch.testing.assert_close(Z.ensemble_text_features(f[:, :1]), unit[:, 0])


def test_topk_accuracy_known_matrix():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    y = torch.tensor([0, 1, 2])
    acc = Z.topk_accuracy(s, y, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(1.0) and acc[5] == 1.0


def test_labels_and_id2label_errors(tmp_path):
    assert Z.label_from_name("13_010.png") == 13 and Z.label_from_name(Path("x/0_1.png")) == 0
    with pytest.raises(ValueError, match="cat.png"):
        Z.label_from_name("cat.png")
    val, id2 = make_val(tmp_path, {0: "a", 1: "b"}, per_class=1)
    random_image(np.random.default_rng(0), 8, 8).save(val / "9_001.png")
    with pytest.raises(ValueError, match="9_001.png: class id 9 is not in id2label"):
        Z.list_labelled_images(val, Z.load_id2label(id2))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero": "bicycle"}))
    with pytest.raises(ValueError, match=str(bad)):
        Z.load_id2label(bad)
    with pytest.raises(FileNotFoundError, match="validation folder not found"):
        Z.list_labelled_images(tmp_path / "nothing", {0: "a"})


def test_templates_module_is_data_only():
    src = Path(sys.modules["difflab.clip.templates"].__file__).read_text()
    body = ast.parse(src).body
    assert all(isinstance(n, (ast.Assign, ast.Expr)) for n in body)  # no functions, no imports
    assert len(CIFAR100_TEMPLATES) == 18 and len(set(CIFAR100_TEMPLATES)) == 18
    assert all(t.count("{}") == 1 for t in CIFAR100_TEMPLATES)
    assert COURSE_TEMPLATE.format("willow tree") == "A photo of willow tree."


def test_cli_zeroshot_with_cases(tmp_path, clip_dir, monkeypatch, capsys):
    val, id2 = make_val(tmp_path, NAMES)
    cases = tmp_path / "cases"
    preds = cases / "predictions.json"
    rc = run_cli(monkeypatch, ["clip", "zeroshot", "--val", str(val), "--id2label", str(id2), "--clip", str(clip_dir),
                               "--templates", "cifar100", "--cases", "2", "--out", str(cases),
                               "--quiet", "--batch-size", "7"])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'prompt "A photo of {object}."' in out and "ensemble of 18 templates (cifar100)" in out
    data = json.loads(preds.read_text())
    assert set(data["methods"]) == {"single", "ensemble"} and data["images"] == 18
    cj = json.loads((cases / "cases.json").read_text())
    assert cj["method"] == "ensemble"
    for c in cj["successes"]:
        assert c["prediction"] == c["truth"] and c["probability"] == pytest.approx(c["truth_probability"])
    for c in cj["failures"]:
        assert c["prediction"] != c["truth"] and c["probability"] >= c["truth_probability"]
    assert len(cj["successes"]) + len(cj["failures"]) >= 2
    for group in ("successes", "failures"):  # most confident first
        p = [c["probability"] for c in cj[group]]
        assert p == sorted(p, reverse=True)
    assert (cases / "cases.csv").read_text().splitlines()[0] == "kind,file,prediction,truth,probability,truth_probability,correct"
    with Image.open(cases / "cases.png") as im:
        assert im.width >= 2 * 128 and im.height >= 2 * 128
    # the accuracies printed are the ones in the JSON
    acc1 = 100 * data["methods"]["single"]["top1"]
    assert f"top-1 {acc1:6.2f}%" in out


@pytest.mark.slow
def test_real_vit_b_32_config_forward(tmp_path):
    """The openai/clip-vit-base-patch32 architecture (random weights) through our loader path."""
    d = save_random_clip(tmp_path / "vitb32", "vit-b-32", seed=0)
    c = load_clip(d, "cpu")
    cfg = c.model.config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads) == (512, 12, 8)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == (768, 12, 32)
    assert cfg.vision_config.image_size == 224 and cfg.projection_dim == 512
    n = sum(p.numel() for p in c.model.parameters())
    assert 150e6 < n < 152e6  # CLIP ViT-B/32 has about 151M parameters
    x = c.image_features([random_image(np.random.default_rng(0), 50, 70)])
    t = c.text_features(["A photo of willow tree."])
    assert x.shape == (1, 512) and t.shape == (1, 512) and torch.isfinite(x).all() and torch.isfinite(t).all()


def test_every_option_has_help():
    import argparse

    from difflab.clip import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    group = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["clip"]
    subs = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"score", "zeroshot"}
    for name, p in subs.items():
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, f"clip {name} {a.option_strings} has no help"
    # commands.py imports nothing heavy at module level (difflab --help stays fast)
    src = Path(commands.__file__).read_text().split("def _score")[0]
    assert "import torch" not in src and "transformers" not in src
