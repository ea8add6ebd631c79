"""The course's Problem 3 generation on a tiny random SD-format model."""
import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import HW2_DATA, requires_shared
from difflab.io import read_course_json
from difflab.personalize import generate as gen
from difflab.sd import sample
from difflab.sd.concepts import save_embedding
from difflab.sd.load import load_sd
from difflab.testing import save_tiny_sd

REPO = Path(__file__).resolve().parents[1]

PROMPTS = {
    "0": {"src_image": "dog", "token_name": "<new1>",
          "prompt": ["A <new1> posing on a hilltop.", "A <new1> on a park bench.", "a photo of <new1>"]},
    "1": {"src_image": "style", "token_name": "<new2>",
          "prompt": ["The streets of Paris in the style of <new2>.", "Manhattan skyline in the style of <new2>.",
                     "a photo of a <new1> in the style of <new2>"]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = save_tiny_sd(root / "sd", seed=2)
    g = torch.Generator().manual_seed(5)
    save_embedding(root / "new1.safetensors", "<new1>", torch.randn(1, 32, generator=g))
    save_embedding(root / "new2.safetensors", "<new2>", torch.randn(2, 32, generator=g))
    (root / "input.json").write_text(json.dumps(PROMPTS))
    return root, model


def parser():
    from difflab.personalize.commands import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="group"))
    return p


def cfg(root, model, out, **kw):
    base = dict(json=str(root / "input.json"), out=str(out), sd=str(model),
                embeddings=(str(root / "new1.safetensors"), str(root / "new2.safetensors")),
                images_per_prompt=2, steps=2, batch_size=2, device="cpu", quiet=True)
    base.update(kw)
    return gen.GenerateConfig(**base)


def test_layout_and_identical_rerun(setup, tmp_path):
    root, model = setup
    out1 = tmp_path / "out1"
    args = parser().parse_args(["ti", "generate", "--json", str(root / "input.json"), "--out", str(out1), "--sd", str(model),
                                "--embeddings", str(root / "new1.safetensors"), str(root / "new2.safetensors"),
                                "--images-per-prompt", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    expected = sorted(f"{k}/{p}/source{k}_prompt{p}_{i}.png" for k in ("0", "1") for p in range(3) for i in range(2))
    found = sorted(str(p.relative_to(out1)) for p in out1.rglob("*") if p.is_file())
    assert found == expected
    from PIL import Image

    with Image.open(out1 / expected[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    out2 = tmp_path / "out2"
    gen.generate_from_json(cfg(root, model, out2))
    for rel in expected:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel
    # a different seed gives different images
    out3 = tmp_path / "out3"
    gen.generate_from_json(cfg(root, model, out3, seed=1, images_per_prompt=1))
    assert (out3 / expected[0]).read_bytes() != (out1 / expected[0]).read_bytes()


def test_images_do_not_depend_on_batching(setup):
    root, model = setup
    sd = load_sd(model)
    seeds = [gen.image_seed(0, "0", 0, i) for i in range(3)]
    together = sample.sample_images(sd, "a photo of a dog", seeds, steps=3)
    alone = torch.cat([sample.sample_images(sd, "a photo of a dog", [s], steps=3) for s in seeds])
    # same noise per image; only the network's float rounding may differ between batch sizes
    assert (together - alone).abs().max().item() < 1e-4
    assert len({gen.image_seed(0, k, p, i) for k in "01" for p in range(3) for i in range(25)}) == 150


def test_ddim_matches_diffusers_scheduler(setup):
    """Our DDIM + guidance against a loop over diffusers' DDIMScheduler (test oracle)
    configured as SD v1: scaled_linear betas, steps_offset 1, set_alpha_to_one False."""
    from diffusers import DDIMScheduler

    _, model = setup
    sd = load_sd(model)
    seeds, steps, s = [11, 12], 5, 7.5
    ours = sample.sample_latents(sd, "a photo of a cat", seeds, steps=steps, guidance_scale=s)

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == [801, 601, 401, 201, 1]
    x = sample.initial_noise(seeds, (4, 8, 8))
    with torch.no_grad():
        cond = sd.encode_text(["a photo of a cat"] * 2)
        uncond = sd.encode_text([""] * 2)
        for t in sched.timesteps:
            eps = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_u, eps_c = eps.chunk(2)
            x = sched.step(eps_u + s * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_bad_inputs_write_nothing(setup, tmp_path, monkeypatch):
    root, model = setup
    out = tmp_path / "out"
    monkeypatch.setattr(gen, "SHIPPED_EMBEDDINGS", tmp_path / "no-shipped-embeddings")  # only the files given here

    def write(name, data):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)

    no_prompt = write("no_prompt.json", {"0": {"token_name": "<new1>"}})
    with pytest.raises(ValueError, match=r"no_prompt\.json: concept '0' has no 'prompt'"):
        gen.generate_from_json(cfg(root, model, out, json=no_prompt))
    no_token = write("no_token.json", {"0": {"prompt": ["a <new1>"]}})
    with pytest.raises(ValueError, match=r"no_token\.json: concept '0' has no 'token_name'"):
        gen.generate_from_json(cfg(root, model, out, json=no_token))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        gen.generate_from_json(cfg(root, model, out, json=str(bad)))
    # a token without an embedding, before any image
    with pytest.raises(ValueError, match=r"no embedding for token '<new2>'"):
        gen.generate_from_json(cfg(root, model, out, embeddings=(str(root / "new1.safetensors"),)))
    narrow = tmp_path / "narrow.safetensors"
    save_embedding(narrow, "<new2>", torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"narrow\.safetensors: '<new2>' has width 16, but the text encoder's is 32"):
        gen.generate_from_json(cfg(root, model, out, embeddings=(str(root / "new1.safetensors"), str(narrow))))
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        gen.generate_from_json(cfg(root, model, out, embeddings=(str(tmp_path / "absent.safetensors"),)))
    from safetensors.torch import save_file

    not_sd = tmp_path / "not_sd.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(not_sd))
    with pytest.raises(ValueError, match=r"not_sd\.safetensors is not a Stable Diffusion v1 checkpoint"):
        gen.generate_from_json(cfg(root, model, out, sd=str(not_sd)))
    assert not out.exists()


def test_shipped_embeddings_are_found_by_width(setup, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    (shipped / "mini").mkdir(parents=True)
    save_embedding(shipped / "a_other_model.safetensors", "<new1>", torch.zeros(1, 64))
    save_embedding(shipped / "mini" / "new1.safetensors", "<new1>", torch.ones(1, 32))
    save_embedding(shipped / "wide.safetensors", "<wide>", torch.ones(1, 64))
    monkeypatch.setattr(gen, "SHIPPED_EMBEDDINGS", shipped)
    found = gen.find_embeddings(["<new1>"], 32)
    assert list(found) == ["<new1>"] and torch.equal(found["<new1>"], torch.ones(1, 32))
    explicit = tmp_path / "mine.safetensors"
    save_embedding(explicit, "<new1>", torch.full((2, 32), 3.0))
    assert torch.equal(gen.find_embeddings(["<new1>"], 32, [explicit])["<new1>"], torch.full((2, 32), 3.0))
    with pytest.raises(ValueError, match=r"'<wide>' has the wrong width for this text encoder \(32\)"):
        gen.find_embeddings(["<wide>"], 32)
    # a known token used in a prompt is loaded too (composition prompts)
    assert set(gen.find_embeddings([], 32, prompts=["a <new1> in some style"])) == {"<new1>"}


def test_hw2_3_sh_calls_ti_generate(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "difflab"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(REPO / "hw2_3.sh"), "in put.json", "out dir", "sd.ckpt"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split("--") == ["ti generate ", "json in put.json ", "out out dir ", "sd sd.ckpt\n"]
    # two arguments: no --sd, i.e. the shipped mini model
    run = subprocess.run(["bash", str(REPO / "hw2_3.sh"), "in.json", "out"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split("--") == ["ti generate ", "json in.json ", "out out\n"]
    for args in (["only-one"], ["a", "b", "c", "d"]):
        run = subprocess.run(["bash", str(REPO / "hw2_3.sh"), *args], env=env, capture_output=True, text=True)
        assert run.returncode == 2 and "usage" in run.stderr


def test_default_model_is_the_shipped_mini_model(setup, tmp_path, monkeypatch):
    """Without --sd, generation loads SHIPPED_MINI_SD and finds the shipped embeddings by width."""
    root, model = setup
    shipped_emb = tmp_path / "emb"
    shipped_emb.mkdir()
    save_embedding(shipped_emb / "new1.safetensors", "<new1>", torch.randn(1, 32))
    monkeypatch.setattr(gen, "SHIPPED_EMBEDDINGS", shipped_emb)
    monkeypatch.setattr(gen, "SHIPPED_MINI_SD", tmp_path / "absent")
    js = tmp_path / "in.json"
    js.write_text(json.dumps({"0": {"token_name": "<new1>", "prompt": ["a photo of a <new1>"]}}))
    c = gen.GenerateConfig(json=str(js), out=str(tmp_path / "o"), images_per_prompt=1, steps=2, device="cpu", quiet=True)
    with pytest.raises(FileNotFoundError, match="no sd model given and the shipped mini model is missing"):
        gen.generate_from_json(c)
    monkeypatch.setattr(gen, "SHIPPED_MINI_SD", model)
    paths = gen.generate_from_json(c)
    assert [p.relative_to(tmp_path / "o").as_posix() for p in paths] == ["0/0/source0_prompt0_0.png"]


@requires_shared
def test_course_input_json_and_concept_images():
    ti_dir = HW2_DATA / "textual_inversion"
    from difflab.personalize.textual_inversion import list_concept_images, load_concept_image

    concepts = read_course_json(ti_dir / "input.json")
    assert [(c.key, c.token, len(c.prompts)) for c in concepts] == [("0", "<new1>", 2), ("1", "<new2>", 2)]
    for key, count in (("0", 5), ("1", 4)):
        files = list_concept_images(ti_dir / key)
        assert len(files) == count
        img = load_concept_image(files[0], 64)
        assert img.shape == (3, 64, 64) and -1 <= img.min() < img.max() <= 1


def test_embeddings_from_the_environment(setup, tmp_path, monkeypatch):
    """$DIFFLAB_EMBEDDINGS (files or folders, os.pathsep-separated) gives hw2_3.sh learned
    embeddings without copying them into the package; a missing entry is an error."""
    import os

    root, model = setup
    monkeypatch.setattr(gen, "SHIPPED_EMBEDDINGS", tmp_path / "none")
    folder = tmp_path / "emb"
    folder.mkdir()
    save_embedding(folder / "a.safetensors", "<new1>", torch.ones(1, 32))
    single = tmp_path / "b.safetensors"
    save_embedding(single, "<new2>", torch.ones(1, 32))
    monkeypatch.setenv("DIFFLAB_EMBEDDINGS", f"{folder}{os.pathsep}{single}")
    explicit, _ = gen.embedding_files()
    assert explicit == [folder / "a.safetensors", single]
    assert set(gen.find_embeddings(["<new1>", "<new2>"], 32)) == {"<new1>", "<new2>"}
    monkeypatch.setenv("DIFFLAB_EMBEDDINGS", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"\$DIFFLAB_EMBEDDINGS names .*absent"):
        gen.embedding_files()
