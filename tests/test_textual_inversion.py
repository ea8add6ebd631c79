"""Textual inversion on a tiny random SD-format model: only the new rows learn."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.personalize import textual_inversion as ti
from difflab.sd import concepts
from difflab.sd.load import load_sd
from difflab.testing import save_tiny_sd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd", seed=1)


@pytest.fixture()
def concept_dir(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):  # non-square, so the centre crop matters
        Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    return folder


def cfg_for(model_dir, concept_dir, out, **kw):
    base = dict(sd=str(model_dir), concept_dir=str(concept_dir), token="<new1>", init_word="dog", out=str(out),
                steps=3, batch_size=2, lr=5e-2, weight_decay=0.1, save_every=100, device="cpu", quiet=True)
    base.update(kw)
    return ti.TrainConfig(**base)


def snapshot(sd):
    return {f"{name}.{k}": v.detach().clone()
            for name, net in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder))
            for k, v in net.state_dict().items()}


def test_only_new_rows_change(model_dir, concept_dir, tmp_path, monkeypatch):
    """AdamW with weight decay: every other parameter and embedding row is bit-identical."""
    sd = load_sd(model_dir)
    other = torch.randn(2, sd.text_width, generator=torch.Generator().manual_seed(3))
    concepts.save_embedding(tmp_path / "other.safetensors", "<other>", other)
    before = snapshot(sd)
    base_rows = sd.text_encoder.get_input_embeddings().weight.detach().clone()

    given = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kw):
        params = list(params)
        given.extend(params)
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    losses = []
    import difflab.schedule as schedule

    orig = schedule.ddpm_loss

    def spy(*a, **k):
        out = orig(*a, **k)
        losses.append(float(out.detach()))
        return out

    monkeypatch.setattr(ti, "ddpm_loss", spy)
    out = tmp_path / "new1.safetensors"
    ti.train_textual_inversion(
        cfg_for(model_dir, concept_dir, out, num_vectors=2, embeddings=[str(tmp_path / "other.safetensors")]), sd=sd
    )
    emb = sd.concepts
    new = emb.concept("<new1>")
    assert len(given) == 1 and given[0] is new and tuple(new.shape) == (2, sd.text_width)
    assert len(losses) == 3 and all(np.isfinite(losses))
    after = snapshot(sd)
    # the text encoder's state now also holds the concept rows; every original entry is unchanged
    for k, v in before.items():
        key = k.replace("text.embeddings.token_embedding.", "text.embeddings.token_embedding.base.").replace(
            "text.text_model.embeddings.token_embedding.", "text.text_model.embeddings.token_embedding.base.")
        assert torch.equal(after[key], v), k
    assert torch.equal(emb.base.weight, base_rows)
    assert torch.equal(emb.concept("<other>").detach(), other)
    init = base_rows[sd.tokenizer("dog", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(new.detach()[0], init) and not torch.equal(new.detach()[1], init)
    saved = concepts.read_embedding_file(out)
    assert list(saved) == ["<new1>"] and torch.equal(saved["<new1>"], new.detach().float())


def test_lookup_splices_new_rows(model_dir):
    sd = load_sd(model_dir)
    vec = torch.randn(3, sd.text_width)
    concepts.add_concept(sd, "<tok>", vec)
    prompt = sd.concepts.expand_prompt("a photo of <tok> on a sign")
    assert prompt == "a photo of <tok> <tok>_1 <tok>_2 on a sign"
    ids = sd.tokenizer(prompt, return_tensors="pt").input_ids
    rows = sd.text_encoder.get_input_embeddings()(ids)[0]
    new_ids = sd.tokenizer.convert_tokens_to_ids(["<tok>", "<tok>_1", "<tok>_2"])
    base = sd.concepts.base.weight
    for pos, i in enumerate(ids[0].tolist()):
        expected = vec[new_ids.index(i)] if i in new_ids else base[i]
        assert torch.equal(rows[pos], expected)
    # the same prompt expansion as diffusers' multi-vector loader (test oracle)
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    assert TextualInversionLoaderMixin._maybe_convert_prompt(None, "a photo of <tok> on a sign", sd.tokenizer) == prompt


def test_embedding_file_is_diffusers_format(model_dir, tmp_path):
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
    from safetensors.torch import load_file

    sd = load_sd(model_dir)
    vec = torch.randn(2, sd.text_width)
    concepts.save_embedding(tmp_path / "e.safetensors", "<new2>", vec)
    tokens, embs = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([None], [load_file(str(tmp_path / "e.safetensors"))], sd.tokenizer)
    tokens, embs = TextualInversionLoaderMixin._extend_tokens_and_embeddings(tokens, embs, sd.tokenizer)
    assert tokens == concepts.token_names("<new2>", 2) == ["<new2>", "<new2>_1"]
    assert all(torch.equal(a, b) for a, b in zip(embs, vec))


def test_resume_continues_exactly(model_dir, concept_dir, tmp_path):
    straight = tmp_path / "a" / "e.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, straight, steps=4), sd=load_sd(model_dir))
    split = tmp_path / "b" / "e.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, split, steps=2), sd=load_sd(model_dir))
    state = ti.state_path(split)
    assert state.is_file()
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, split, steps=4, resume=True), sd=load_sd(model_dir))
    a, b = concepts.read_embedding_file(straight)["<new1>"], concepts.read_embedding_file(split)["<new1>"]
    assert torch.equal(a, b)
    other = tmp_path / "c.safetensors"
    shutil.copyfile(state, ti.state_path(other))  # --resume reads the state beside --out
    with pytest.raises(ValueError, match="holds token '<new1>'"):
        ti.train_textual_inversion(cfg_for(model_dir, concept_dir, other, token="<x>", resume=True), sd=load_sd(model_dir))


def test_snapshots_and_validation_images(model_dir, concept_dir, tmp_path):
    out = tmp_path / "run" / "e.safetensors"
    ti.train_textual_inversion(
        cfg_for(model_dir, concept_dir, out, steps=2, save_every=1, validation_prompt="a <new1> on a bench",
                validation_every=2, validation_images=2, validation_steps=2, property="style"),
        sd=load_sd(model_dir),
    )
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["e-step000001.safetensors", "e-validation", "e.safetensors", "e.state.safetensors"]
    grid = Image.open(out.parent / "e-validation" / "step000002.png")
    assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2)


def test_bad_inputs_fail_before_writing(model_dir, tmp_path):
    out = tmp_path / "out" / "e.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty has no images"):
        ti.train_textual_inversion(cfg_for(model_dir, empty, out))
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "00.png")
    (broken / "01.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*01\.jpg"):
        ti.train_textual_inversion(cfg_for(model_dir, broken, out))
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        ti.train_textual_inversion(cfg_for(model_dir, tmp_path / "missing-folder", out))
    assert not (tmp_path / "out").exists()
    ok = tmp_path / "ok"
    ok.mkdir()
    Image.new("RGB", (8, 8)).save(ok / "00.png")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        ti.train_textual_inversion(cfg_for(model_dir, ok, out, token="dog"))
    with pytest.raises(ValueError, match="--num-vectors"):
        ti.train_textual_inversion(cfg_for(model_dir, ok, out, init_word="photo of"))
    with pytest.raises(ValueError, match="property must be one of"):
        ti.train_textual_inversion(cfg_for(model_dir, ok, out, property="texture"))
    assert not out.exists()


def test_cli_train(model_dir, concept_dir, tmp_path):
    import argparse

    from difflab.personalize.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="group"))
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["ti", "train", "--sd", str(model_dir), "--concept-dir", str(concept_dir), "--token", "<c>",
                              "--init-word", "cat", "--out", str(out), "--steps", "1", "--batch-size", "1", "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    assert tuple(concepts.read_embedding_file(out)["<c>"].shape) == (1, 32)


def test_templates_file_replaces_the_property_templates(model_dir, concept_dir, tmp_path, monkeypatch):
    """--templates: exactly the file's captions (with the token) reach the text encoder,
    and they are recorded in the embedding file's metadata."""
    from safetensors import safe_open

    from difflab.sd import load as sd_module

    lines = ["# my world's captions", "", "a photo of the digit {}", "a photo of the digit {} on a textured background"]
    tpl = tmp_path / "templates.txt"
    tpl.write_text("\n".join(lines) + "\n")
    seen = []
    real = sd_module.StableDiffusion.encode_text

    def recording(self, prompts, *a, **kw):
        seen.extend(prompts)
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(sd_module.StableDiffusion, "encode_text", recording)
    out = tmp_path / "e.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, out, steps=6, batch_size=4, templates=str(tpl)), sd=load_sd(model_dir))
    assert set(seen) == {"a photo of the digit <new1>", "a photo of the digit <new1> on a textured background"}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["templates"].split("\n") == lines[2:]
    for bad, msg in (("a photo of {} and {}", "exactly one"), ("no slot", "exactly one"), ("{x} {}", "no other braces"),
                     ("# only a comment", "has no templates")):
        tpl.write_text(bad + "\n")
        with pytest.raises(ValueError, match=msg):
            ti.train_textual_inversion(cfg_for(model_dir, concept_dir, tmp_path / "bad.safetensors", templates=str(tpl)))
    with pytest.raises(FileNotFoundError, match="templates file not found"):
        ti.train_textual_inversion(cfg_for(model_dir, concept_dir, tmp_path / "bad.safetensors", templates=str(tmp_path / "nope.txt")))
    assert not (tmp_path / "bad.safetensors").exists()


def test_flip_p_mirrors_the_training_images(model_dir, concept_dir, tmp_path):
    """--flip-p 1 trains on mirrored images only: exactly what --flip-p 0 learns from the
    mirrored files. --flip-p 0 on the originals learns something else (digits, text and
    other asymmetric concepts need it); bad values fail before anything is written."""
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for f in sorted(concept_dir.iterdir()):
        with Image.open(f) as im:
            im.transpose(Image.FLIP_LEFT_RIGHT).save(mirrored / f.name)
    learned = {}
    for name, folder, p in (("always", concept_dir, 1.0), ("mirror-files", mirrored, 0.0), ("never", concept_dir, 0.0)):
        out = tmp_path / f"{name}.safetensors"
        ti.train_textual_inversion(cfg_for(model_dir, folder, out, flip_p=p, steps=4))
        learned[name] = concepts.read_embedding_file(out)["<new1>"]
    assert torch.allclose(learned["always"], learned["mirror-files"], atol=1e-5)
    assert float((learned["always"] - learned["never"]).abs().max()) > 1e-3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "never.safetensors"), framework="pt") as h:
        assert h.metadata()["flip_p"] == "0.0"
    with pytest.raises(ValueError, match=r"flip_p must be in \[0, 1\], got 1.5"):
        ti.train_textual_inversion(cfg_for(model_dir, concept_dir, tmp_path / "bad.safetensors", flip_p=1.5))
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_follows_the_cpu_run(model_dir, concept_dir, tmp_path):
    """Every random draw comes from the CPU generator, so a CUDA run takes the same steps as
    the CPU one up to rounding. (The VAE posteriors once stayed on the GPU while the batch
    indices were drawn on the CPU: 'Expected all tensors to be on the same device'.)"""
    cpu_out, gpu_out = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, cpu_out), sd=load_sd(model_dir))
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, gpu_out, device="cuda"), sd=load_sd(model_dir))
    sd = load_sd(model_dir)
    init = concepts.init_vectors(sd, "dog", 1)
    a, b = concepts.read_embedding_file(cpu_out)["<new1>"], concepts.read_embedding_file(gpu_out)["<new1>"]
    assert torch.isfinite(b).all()
    moved = (a - init).abs().mean()
    assert moved > 0
    assert (b - a).abs().mean() < 0.1 * moved


def test_caption_files_give_each_image_its_own_templates(model_dir, concept_dir, tmp_path, monkeypatch):
    """IMAGE.txt beside an image: its templates, and only its, caption that image (the
    latents are marked with the image's index to see which image each prompt went
    with); images without one use --templates. Caption files equal to the shared
    templates learn exactly what no caption files learn; a bad one fails, naming it."""
    import json

    from safetensors import safe_open

    import difflab.schedule as schedule
    from difflab.sd import load as sd_module

    tpl = tmp_path / "templates.txt"
    tpl.write_text("a photo of the digit {}\n")
    own = {0: ["a photo of the digit two in the style of {}", "a photo of the digit {}"], 1: ["a photo of a {}"]}
    for k, lines in own.items():
        (concept_dir / f"{k:02d}.txt").write_text("# caption\n" + "\n".join(lines) + "\n")

    def marked(sd, files, resolution):
        n, c, r = len(files), sd.latent_channels, resolution // sd.vae_downsample
        return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1).expand(n, 2, c, r, r).clone(), torch.zeros(n, 2, c, r, r)

    seen = []
    real_encode = sd_module.StableDiffusion.encode_text
    real_loss = schedule.ddpm_loss

    def recording_encode(self, prompts, *a, **kw):
        seen.append(list(prompts))
        return real_encode(self, prompts, *a, **kw)

    def recording_loss(denoiser, sched, z0, *a, **kw):
        seen[-1] = list(zip(seen[-1], z0.flatten(1)[:, 0].tolist()))
        return real_loss(denoiser, sched, z0, *a, **kw)

    monkeypatch.setattr(ti, "encode_concept_images", marked)
    monkeypatch.setattr(sd_module.StableDiffusion, "encode_text", recording_encode)
    monkeypatch.setattr(ti, "ddpm_loss", recording_loss)
    sd = load_sd(model_dir)
    out = tmp_path / "own.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, out, steps=12, batch_size=4, templates=str(tpl)), sd=sd)
    expected = {k: {t.format("<new1>") for t in lines} for k, lines in {**own, 2: ["a photo of the digit {}"]}.items()}
    pairs = [(p, round(z / sd.latent_scale)) for step in seen for p, z in step]
    assert len(pairs) == 48
    for prompt, image in pairs:
        assert prompt in expected[image], (prompt, image)
    used = {(p, i) for p, i in pairs}
    assert used == {(p, i) for i, ps in expected.items() for p in ps}  # every image and template came up
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["captions"]) == {"00.png": own[0], "01.png": own[1]}

    # Caption files that say what --templates says: the very same draws and embedding.
    monkeypatch.undo()
    tpl.write_text("a photo of the digit {}\na photo of a {}\n")
    for k in range(3):
        (concept_dir / f"{k:02d}.txt").write_text("a photo of the digit {}\na photo of a {}\n")
    same = tmp_path / "same.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, same, templates=str(tpl)))
    for k in range(3):
        (concept_dir / f"{k:02d}.txt").unlink()
    plain = tmp_path / "plain.safetensors"
    ti.train_textual_inversion(cfg_for(model_dir, concept_dir, plain, templates=str(tpl)))
    assert torch.equal(concepts.read_embedding_file(same)["<new1>"], concepts.read_embedding_file(plain)["<new1>"])

    (concept_dir / "01.txt").write_text("a photo of {} and {}\n")
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"01\.txt, line 1: a template needs exactly one"):
        ti.train_textual_inversion(cfg_for(model_dir, concept_dir, bad))
    assert not bad.exists() and not ti.state_path(bad).exists()
