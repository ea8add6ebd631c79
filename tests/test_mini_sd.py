"""The shipped mini SD-format model (src/difflab/assets/mini_sd) and its two learned
embeddings: size, loading, the two-argument hw2_3.sh path, and (``-m slow``) the
issue's measured bar on textual inversion."""
import importlib.util
import subprocess

import pytest
import torch
from PIL import Image

from conftest import EVALUATORS, HW2_DATA, REPO, requires_evaluators, requires_shared
from difflab.personalize import generate as gen

MINI = gen.SHIPPED_MINI_SD


def shipped_embedding_files():
    return sorted((gen.SHIPPED_EMBEDDINGS / "mini_sd").glob("*.safetensors"))


def test_shipped_mini_model_is_small_and_loads():
    from difflab.io import load_json
    from difflab.sd.load import load_sd

    size = sum(f.stat().st_size for f in MINI.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"shipped mini model is {size / 2**20:.1f} MiB (the issue allows < 30 MB)"
    sd = load_sd(MINI, device="cpu")
    assert (sd.resolution, sd.latent_channels, sd.text_width) == (32, 4, 64)
    facts = load_json(MINI / "mini_sd.json")
    # the recorded run (README), not a test model: 6,000 steps with descriptor captions at 0.4, then 1,500
    # at 0.2, both with the balanced "a digit" rule for 7s
    assert facts["diffusion_steps"] == 7500 and facts["vae_steps"] > 0 and "init" not in facts
    assert facts["legs"] == [{"from_step": 6000, "changed": {
        "p_descriptor": [0.4, 0.2], "steps": [6000, 7500]}}]
    assert facts["train_config"]["p_held_out_unnamed"] == 0.3
    assert facts["train_config"]["p_descriptor"] == 0.2
    # both concepts are shipped for this model's width, and were trained (not left at their init word)
    from difflab.sd.concepts import init_vectors, read_embedding_file

    found = gen.find_embeddings(["<new1>", "<new2>"], sd.text_width)
    files = {tok: f for f in shipped_embedding_files() for tok in read_embedding_file(f)}
    assert set(files) == {"<new1>", "<new2>"}
    from safetensors import safe_open

    for tok, vec in found.items():
        with safe_open(str(files[tok]), framework="pt") as h:
            meta = h.metadata()
        assert vec.shape == (1, 64) and int(meta["step"]) > 0
        start = init_vectors(sd, meta["init_word"], 1)
        assert float((vec - start).norm()) > 0.1 * float(start.norm()), f"{tok} barely moved from its init word"


@requires_evaluators
def test_shipped_mini_model_draws_the_digit_it_is_asked_for():
    """The named MNIST-M digits (7 is never named in training, so it is left out) are
    read as that digit by the course's MNIST-M grader: a measured floor on a small sample."""
    from difflab.digits.evaluate import load_classifier
    from difflab.sd.load import load_sd
    from difflab.sd.sample import sample_images
    from difflab.t2i.captions import DIGIT_NAMES

    sd = load_sd(MINI, device="cpu")
    grader = load_classifier("mnistm", EVALUATORS / "mnistm_classifier.pth")
    digits = [d for d in range(10) if d != 7]
    hits = 0
    for d in digits:
        imgs = sample_images(sd, f"a photo of the digit {DIGIT_NAMES[d]} on a textured background", [0, 1, 2, 3],
                             steps=20, guidance_scale=7.5)
        x = torch.nn.functional.interpolate(imgs, size=(28, 28), mode="bilinear", antialias=True).clamp(0, 1)
        with torch.no_grad():
            hits += int((grader(x).argmax(1) == d).sum())
    assert hits / (4 * len(digits)) >= 0.75, f"{hits}/{4 * len(digits)} named digits recognised"


@requires_shared
def run_hw2_3(json_path, out):
    run = subprocess.run(["bash", str(REPO / "hw2_3.sh"), str(json_path), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.mark.slow
@requires_shared
def test_hw2_3_sh_without_a_checkpoint_uses_the_shipped_mini_model(tmp_path):
    """The course's input.json, two arguments: 25 images for each of the 4 prompts, from
    the shipped model and embeddings (tokens the mini vocabulary lacks are spelled out)."""
    out = tmp_path / "out"
    run_hw2_3(HW2_DATA / "textual_inversion" / "input.json", out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(f"{k}/{p}/source{k}_prompt{p}_{i}.png" for k in "01" for p in range(2) for i in range(25))
    with Image.open(out / "0" / "0" / "source0_prompt0_0.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"


@requires_shared
def test_hw2_3_sh_without_a_checkpoint_one_prompt(tmp_path):
    """The same two-argument path on a reduced case (the default run): the course's first
    concept with its first prompt only gives its 25 images in the course layout."""
    import json

    spec = json.loads((HW2_DATA / "textual_inversion" / "input.json").read_text())
    one = {"0": {**spec["0"], "prompt": spec["0"]["prompt"][:1]}}
    (tmp_path / "input.json").write_text(json.dumps(one))
    out = tmp_path / "out"
    run = run_hw2_3(tmp_path / "input.json", out)
    notes = [line for line in run.stderr.splitlines() if "shipped 32x32 mini digit model" in line]
    assert len(notes) == 1 and "Stable Diffusion v1.4" in notes[0]  # says which model draws, and why
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(f"0/0/source0_prompt0_{i}.png" for i in range(25))
    with Image.open(out / "0" / "0" / "source0_prompt0_0.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mini_world", REPO / "benchmarks" / "mini_world.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@requires_shared
@requires_evaluators
def test_concepts_name_each_style_image_in_its_caption_file(tmp_path):
    """mini_world.py concepts: svhn_named/ holds svhn/'s images, pixel for pixel, each with
    a caption file naming its own csv label, which ti train reads as that image's
    template; no style image shows a 3 or a 7, and the 7s are 7s."""
    import numpy as np

    from difflab.data import read_csv
    from difflab.personalize.textual_inversion import list_concept_images, read_caption_files
    from difflab.t2i.captions import DIGIT_NAMES

    mw = load_benchmark()
    mw.write_concepts(HW2_DATA / "digits", tmp_path)
    labels = dict(read_csv(HW2_DATA / "digits" / "svhn" / "train.csv"))
    files = list_concept_images(tmp_path / "svhn_named")
    assert [f.name for f in files] == [f.name for f in list_concept_images(tmp_path / "svhn")] and len(files) == 5
    own = read_caption_files(files)
    assert set(own) == set(files)
    for f, templates in own.items():
        label = labels[f.stem.split("_", 1)[1] + ".png"]
        assert label not in (3, 7) and int(f.stem.split("_")[0]) == label
        assert templates == (f"a photo of the digit {DIGIT_NAMES[label]} in the style of {{}}",)
        with Image.open(f) as a, Image.open(tmp_path / "svhn" / f.name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(f.name.startswith("7_") for f in list_concept_images(tmp_path / "sevens"))


def test_eval_reports_the_rates_over_all_seeds(monkeypatch, capsys):
    """mini_world.py eval --seeds: each prompt's rate over all its images (the mean of the
    per-seed rates, which have equal counts), beside the per-seed rates."""
    mw = load_benchmark()
    got = {}

    def fake_measure(model, embeddings, data_root, evaluators, *, seeds, **kw):
        got["seeds"] = list(seeds)
        rates = {"learned": [(0.84, 0.04), (0.92, 0.0)], "0 steps": [(0.16, 0.2), (0.2, 0.1)]}  # first, second seed
        rows = [dict(seed=sd, embedding=emb, case="object", prompt="p <new1>", digit=7, rate_digit=r[0], rate_svhn=r[1])
                for emb, per_seed in rates.items() for sd, r in zip(seeds, per_seed)]
        return rows, torch.zeros(1, 2, 3, 32, 32), 0.98

    monkeypatch.setattr(mw, "measure", fake_measure)
    assert mw.main(["eval", "--seeds", "0", "1", "--figure", ""]) == 0
    out = capsys.readouterr().out
    assert got["seeds"] == [0, 1]
    assert "| learned | object | `p <new1>` | 0.84 / 0.92 | 7: 0.88 | 0.02 |" in out
    assert "| 0 steps | object | `p <new1>` | 0.16 / 0.20 | 7: 0.18 | 0.15 |" in out
    assert mw.main(["eval", "--seed", "3", "--figure", ""]) == 0 and got["seeds"] == [3]


@pytest.mark.slow
@requires_shared
@requires_evaluators
def test_shipped_embeddings_pass_the_issue_bar():
    """Issue 7's acceptance numbers, as benchmarks/mini_world.py measures them (DDIM 50,
    s = 7.5), over 200 images per prompt (eight seeds of 25; one 25-image rate has a
    standard error of about 0.07): the object prompt is a 7 at least 90% of the time; the
    style prompt is a 3 and SVHN at least 80% of the time each; learning beats 0 steps; the
    control prompt without the token is a 7 at most 0.25 of the time (measured 0.17; chance is
    0.1; the model shipped before drew 0.28)."""
    mw = load_benchmark()
    rows, _, domain_acc = mw.measure(MINI, shipped_embedding_files(), HW2_DATA / "digits", EVALUATORS, seeds=range(8),
                                     cases=["object", "style", "object control"], log=lambda m: None)
    assert domain_acc > 0.95  # measured 0.982 (1,500 steps)

    r = mw.pooled(rows)
    assert all(len(per_seed) == 8 for per_seed, _, _ in r.values())
    assert r["learned", "object"][1] >= 0.9
    assert r["learned", "style"][1] >= 0.8 and r["learned", "style"][2] >= 0.8
    assert r["learned", "object"][1] > r["0 steps", "object"][1]
    assert r["learned", "object control"][1] <= 0.25


def test_name_spread_is_zero_only_when_the_text_cannot_reach_the_unet(tmp_path):
    """benchmarks/mini_world.py name_spread: 0 for a UNet that cannot see the caption (no
    pooled text path, every cross-attention output zeroed), > 0 for the same UNet with
    its cross-attention intact, and > 0 for the shipped model."""
    from conftest import zero_cross_attention
    from difflab.sd.load import load_sd
    from difflab.t2i.model import MiniConfig, build_text_encoder, build_tokenizer, build_unet

    mw = load_benchmark()
    sd = load_sd(MINI, device="cpu")
    assert mw.name_spread(sd, n=2) > 1e-3
    cfg = MiniConfig(unet_channels=(32, 32), text_width=32, text_layers=1, text_time_embedding=False)
    torch.manual_seed(0)
    sd.tokenizer = build_tokenizer(tmp_path / "tok", cfg.max_length)
    sd.text_encoder, sd.unet = build_text_encoder(cfg, sd.tokenizer).eval(), build_unet(cfg).eval()
    assert mw.name_spread(sd, n=2) > 1e-4
    zero_cross_attention(sd.unet)
    assert mw.name_spread(sd, n=2) == 0.0
