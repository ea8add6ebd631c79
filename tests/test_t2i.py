"""The mini text-to-image model: caption rules, tokenizer, a few training steps, exact
resumption, and the unchanged `ti` commands on its output folder."""
import numpy as np
import pytest
import torch

from difflab.data import BalancedDigits, DigitSet
from difflab.io import load_json, load_tensors
from difflab.t2i.captions import (
    DESCRIPTOR_MARK,
    DIGIT_NAMES,
    HELD_OUT_STYLE,
    VOCAB_WORDS,
    all_training_captions,
    caption,
    check_caption,
    draw_captions,
)
from difflab.t2i.model import MiniConfig, build_tokenizer
from difflab.t2i.train import T2ITrainConfig, train_t2i

TINY = MiniConfig(unet_channels=(32, 32), vae_channels=(32, 32), text_width=32, text_layers=1, attention_head_dim=8)


def test_caption_rules():
    assert caption(3, 0, named=True) == "a photo of the digit three on a textured background"
    assert caption(3, 1, named=True) == "a photo of the digit three"
    assert caption(3, 0, named=False) == "a photo of a digit on a textured background"
    # the held-out digit is never named, and the held-out style phrase never appears
    assert caption(7, 0, named=True) == "a photo of a digit on a textured background"
    assert caption(7, 1, named=True) == "a photo of a digit"
    caps = all_training_captions()
    assert len(caps) == 2 * 9 + 2 + 2 + 1  # named (9 digits x 2 sets), unnamed (2), descriptor (2), empty
    assert caption(7, 0, named=False, descriptor=True) == "a photo of the digit * on a textured background"
    assert caption(2, 1, named=True, descriptor=True) == "a photo of the digit *"
    assert not any("seven" in c.split() or HELD_OUT_STYLE in c for c in caps)
    with pytest.raises(AssertionError):
        check_caption("a photo of the digit seven")
    with pytest.raises(AssertionError):
        check_caption("a photo of the digit one on a house number sign")
    with pytest.raises(ValueError):
        caption(10, 0, named=True)


def test_caption_draw_frequencies():
    n = 20000
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(10, (n,), generator=g)
    sets = torch.randint(2, (n,), generator=g)
    caps = draw_captions(digits, sets, torch.Generator().manual_seed(1), p_unnamed=0.6, p_empty=0.1)
    for c in caps:
        check_caption(c)
    empty = np.array([c == "" for c in caps])
    assert abs(empty.mean() - 0.1) < 0.01
    nonempty = [(c, int(d)) for c, d in zip(caps, digits) if c]
    named = np.array([" the digit " in c for c, d in nonempty if d != 7])
    assert abs(named.mean() - 0.4) < 0.015
    assert not any(" the digit " in c for c, d in nonempty if d == 7)
    # the named digit is the image's digit
    assert all(DIGIT_NAMES[d] in c.split() for c, d in nonempty if " the digit " in c)


def test_descriptor_captions_are_drawn_for_every_digit_and_change_nothing_when_off():
    n = 4000
    g = torch.Generator().manual_seed(0)
    digits, sets = torch.randint(10, (n,), generator=g), torch.randint(2, (n,), generator=g)
    caps = draw_captions(digits, sets, torch.Generator().manual_seed(1), p_unnamed=0.3, p_empty=0.1, p_descriptor=0.3)
    for c in caps:
        check_caption(c)
    nonempty = [(c, int(d)) for c, d in zip(caps, digits) if c]
    marked = np.array([DESCRIPTOR_MARK in c.split() for c, _ in nonempty])
    assert abs(marked.mean() - 0.3) < 0.025
    sevens = np.array([DESCRIPTOR_MARK in c.split() for c, d in nonempty if d == 7])
    assert abs(sevens.mean() - 0.3) < 0.06  # no label decides who gets a descriptor
    # p_descriptor 0 draws exactly what the two-choice rule drew, and leaves the generator where it did
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    off = draw_captions(digits[:50], sets[:50], a, p_unnamed=0.3, p_empty=0.1, p_descriptor=0.0)
    unnamed, empty = torch.rand(50, generator=b) < 0.3, torch.rand(50, generator=b) < 0.1
    assert off == ["" if e else caption(int(d), int(s), named=not u) for d, s, u, e in zip(digits[:50], sets[:50], unnamed, empty)]
    assert torch.equal(a.get_state(), b.get_state())


def test_balanced_held_out_rule_makes_a_digit_mean_any_digit():
    n = 40000
    g = torch.Generator().manual_seed(0)
    digits, sets = torch.randint(10, (n,), generator=g), torch.randint(2, (n,), generator=g)

    def p7_given_a_digit(caps):
        unnamed = [int(d) for c, d in zip(caps, digits) if c and " a digit" in c]
        return np.mean(np.array(unnamed) == 7)

    kw = dict(p_unnamed=0.3, p_empty=0.1, p_descriptor=0.2)
    old = draw_captions(digits, sets, torch.Generator().manual_seed(1), **kw)
    new = draw_captions(digits, sets, torch.Generator().manual_seed(1), p_held_out_unnamed=0.3, **kw)
    # the original rule: every 7 is "a digit", so p(7 | "a digit") = 0.1 / (0.1 + 0.9 * 0.3) = 0.27
    assert abs(p7_given_a_digit(old) - 0.1 / 0.37) < 0.015
    # balanced: "a digit" is drawn as often for a 7 as for any digit, so p(7 | "a digit") = 7s' share
    assert abs(p7_given_a_digit(new) - 0.1) < 0.01
    for c in new:
        check_caption(c)
    # the 7s' other captions are descriptor captions; nothing else changes
    for c_old, c_new, d in zip(old, new, digits.tolist()):
        if d != 7 or c_old == "" or DESCRIPTOR_MARK in c_old.split():
            assert c_new == c_old
        else:
            assert c_new in (c_old, c_old.replace("a digit", f"the digit {DESCRIPTOR_MARK}"))
    # 1.0 is the original rule, drawn identically
    assert draw_captions(digits, sets, torch.Generator().manual_seed(1), p_held_out_unnamed=1.0, **kw) == old
    with pytest.raises(ValueError, match="p_descriptor"):
        draw_captions(digits[:4], sets[:4], g, p_unnamed=0.3, p_held_out_unnamed=0.3)
    with pytest.raises(ValueError, match="p_descriptor"):
        T2ITrainConfig(p_held_out_unnamed=0.3).validate()


def test_descriptor_net_sees_only_the_form_and_never_a_seven():
    from difflab.t2i.descriptor import DescriptorNet, named_only, train_descriptor

    torch.manual_seed(0)
    net = DescriptorNet().eval()
    x = torch.rand(3, 3, 28, 28) * 2 - 1
    v = net.features(x)
    # colour and brightness do not pass: permuted channels and a dimmer, shifted copy give the same vector
    torch.testing.assert_close(net.features(x[:, [2, 0, 1]]), v, atol=1e-4, rtol=0)
    torch.testing.assert_close(net.features(0.5 * x + 0.3), v, atol=2e-2, rtol=0)
    assert not torch.allclose(net.features(x.flip(-1)), v, atol=1e-3)  # the form does
    with torch.no_grad():
        assert bool((net(x).argmax(1) != 7).all()) and float(net(x)[:, 7].max()) < -1e3  # 7 cannot be the answer
    data = tiny_data(200)
    assert any(int((lab == 7).sum()) > 0 for lab in data.labels)
    named = named_only(data)
    assert all(int((lab == 7).sum()) == 0 for lab in named.labels)
    assert [len(lab) for lab in named.labels] == [int((lab != 7).sum()) for lab in data.labels]
    trained, facts = train_descriptor(data, tiny_cfg(descriptor_steps=2), progress=False)
    assert facts["descriptor_steps"] == 2 and not any(p.requires_grad for p in trained.parameters())


def test_descriptor_aux_loss_is_added_and_its_parameters_train():
    """train_descriptor's ``aux`` hook (used by benchmarks/descriptor_probe.py): a zero aux
    loss leaves the network exactly as without the hook; a real one changes it and its
    own parameters are optimised."""
    from difflab.t2i.descriptor import train_descriptor

    data, cfg = tiny_data(60), tiny_cfg(descriptor_steps=3)

    class Aux(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale, self.w = scale, torch.nn.Parameter(torch.ones(()))
            self.steps = []

        def forward(self, net, step):
            self.steps.append(step)
            return self.scale * self.w * net.norm(net.body(net.form(data.batch(torch.Generator().manual_seed(step), 8)[0]))).pow(2).mean()

    plain, _ = train_descriptor(data, cfg, progress=False)
    made = {}
    zero, _ = train_descriptor(data, cfg, progress=False, aux=lambda net: made.setdefault("zero", Aux(0.0)))
    real, _ = train_descriptor(data, cfg, progress=False, aux=lambda net: made.setdefault("real", Aux(1.0)))
    for a, b in zip(plain.state_dict().values(), zero.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), real.state_dict().values()))
    assert made["real"].steps == [0, 1, 2] and float(made["real"].w.detach()) != 1.0 and float(made["zero"].w.detach()) != 1.0


def test_splice_replaces_only_the_mark(tmp_path):
    from difflab.t2i.descriptor import splice_descriptors
    from difflab.t2i.model import build_text_encoder

    tok = build_tokenizer(tmp_path, 24)
    text = build_text_encoder(TINY, tok).eval()
    mark = tok.convert_tokens_to_ids(DESCRIPTOR_MARK + "</w>")
    assert mark != tok.unk_token_id
    caps = ["a photo of the digit * on a textured background", "a photo of the digit three", "a photo of the digit *"]
    ids = tok(caps, padding="max_length", max_length=24, return_tensors="pt").input_ids
    plain = text(ids)[0]
    vectors = torch.randn(3, 32, requires_grad=True)
    state, handle = splice_descriptors(text, mark)
    state["vectors"] = vectors
    spliced = text(ids)[0]
    handle.remove()
    assert torch.equal(spliced[1], plain[1])  # no mark: untouched
    slot = (ids[0] == mark).nonzero().item()
    assert torch.equal(spliced[0, :slot], plain[0, :slot])  # causal: tokens before the mark cannot see it
    assert not torch.allclose(spliced[0, slot:], plain[0, slot:])
    spliced[[0, 2]].sum().backward()
    assert vectors.grad[1].abs().sum() == 0 and vectors.grad[0].abs().sum() > 0 and vectors.grad[2].abs().sum() > 0


def test_tokenizer_has_one_token_per_word(tmp_path):
    tok = build_tokenizer(tmp_path, 24)
    for w in VOCAB_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    longest = max(all_training_captions(), key=len)
    ids = tok(longest).input_ids
    assert len(ids) == len(longest.split()) + 2 <= 24
    # text outside the word list still encodes (character tokens)
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1


def tiny_data(n=40, seed=0):
    """Digit-like synthetic images: a flat random colour with a bright vertical bar."""
    rng = np.random.default_rng(seed)
    sets = []
    for name in ("mnistm", "svhn"):
        images = np.repeat(np.repeat(rng.integers(0, 160, (n, 1, 1, 3), dtype=np.uint8), 28, 1), 28, 2)
        for i, col in enumerate(rng.integers(4, 20, n)):
            images[i, 4:24, col : col + 4] = 250
        sets.append(DigitSet(name, images, rng.integers(0, 10, n)))
    return BalancedDigits(sets)


def tiny_cfg(**kw):
    base = dict(steps=6, batch_size=4, vae_steps=3, vae_batch_size=4, ckpt_every=3, sample_every=0, keep_checkpoints=3,
                device="cpu", model=TINY)
    base.update(kw)
    return T2ITrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "mini"
    losses = train_t2i(None, out, tiny_cfg(), data=tiny_data(), progress=False)
    return out, losses


def test_training_writes_a_loadable_sd_folder(trained):
    from difflab.sd.load import load_sd
    from difflab.sd.sample import sample_images

    out, losses = trained
    assert len(losses) == 6 and all(np.isfinite(losses))
    sd = load_sd(out)
    assert sd.resolution == 32 and sd.text_width == 32 and sd.latent_channels == 4
    assert "_name_or_path" not in load_json(out / "vae" / "config.json")
    facts = load_json(out / "mini_sd.json")
    assert sd.latent_scale == pytest.approx(facts["latent_scale"]) and facts["diffusion_steps"] == 6
    # the exported UNet is the EMA of the last checkpoint (stored in fp16)
    ema = load_tensors(out / "checkpoints" / "step_0000006" / "unet_ema.safetensors")
    got = {k: v.float() for k, v in sd.unet.state_dict().items()}
    assert set(got) == set(ema)
    assert all(torch.allclose(got[k], ema[k].half().float()) for k in ema)
    img = sample_images(sd, "a photo of the digit three", [0, 1], steps=3, guidance_scale=2.0)
    assert img.shape == (2, 3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_resume_reproduces_an_uninterrupted_run(trained, tmp_path):
    out, _ = trained
    part = tmp_path / "part"
    first = train_t2i(None, part, tiny_cfg(), stop_at=3, data=tiny_data(), progress=False)
    rest = train_t2i(None, part, tiny_cfg(), resume=True, data=tiny_data(), progress=False)
    full = load_tensors(out / "checkpoints" / "step_0000006" / "unet_ema.safetensors")
    resumed = load_tensors(part / "checkpoints" / "step_0000006" / "unet_ema.safetensors")
    assert len(first) == 3 and len(rest) == 6
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train_t2i(None, part, tiny_cfg(), data=tiny_data(), progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_t2i(None, tmp_path / "empty", tiny_cfg(), resume=True, data=tiny_data(), progress=False)


def test_a_resumed_leg_with_other_options_is_recorded(tmp_path):
    """mini_sd.json keeps the history: resuming with the same options adds nothing; a leg
    that changes options records the step it started at and each change, before -> now."""
    out = tmp_path / "run"
    train_t2i(None, out, tiny_cfg(), stop_at=3, data=tiny_data(), progress=False)
    train_t2i(None, out, tiny_cfg(), resume=True, data=tiny_data(), progress=False)
    assert "legs" not in load_json(out / "mini_sd.json")
    train_t2i(None, out, tiny_cfg(steps=8, p_unnamed=0.5, ckpt_every=4), resume=True, data=tiny_data(), progress=False)
    facts = load_json(out / "mini_sd.json")
    assert facts["legs"] == [{"from_step": 6, "changed": {"p_unnamed": [0.3, 0.5], "steps": [6, 8]}}]
    assert facts["diffusion_steps"] == 8 and facts["train_config"]["p_unnamed"] == 0.5


def test_descriptor_training_resumes_exactly_and_exports_plain_sd(tmp_path):
    cfg = lambda **kw: tiny_cfg(p_descriptor=0.5, descriptor_steps=2, **kw)  # noqa: E731
    full = tmp_path / "full"
    losses = train_t2i(None, full, cfg(), data=tiny_data(), progress=False)
    part = tmp_path / "part"
    train_t2i(None, part, cfg(), stop_at=3, data=tiny_data(), progress=False)
    train_t2i(None, part, cfg(), resume=True, data=tiny_data(), progress=False)
    for name in ("unet_ema", "projection_raw", "text_raw"):
        a = load_tensors(full / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        b = load_tensors(part / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the projection was trained (it started at the mean digit name)
    start = train_t2i(None, tmp_path / "one", cfg(steps=1, ckpt_every=1, lr=0.0), data=tiny_data(), progress=False)
    p0 = load_tensors(tmp_path / "one" / "checkpoints" / "step_0000001" / "projection_raw.safetensors")
    p6 = load_tensors(full / "checkpoints" / "step_0000006" / "projection_raw.safetensors")
    assert not torch.allclose(p0["weight"], p6["weight"]) and len(start) == 1 and len(losses) == 6
    # the exported folder is plain SD: no descriptor network among the networks ti loads
    for sub in ("unet", "text_encoder", "vae"):
        assert not any("descriptor" in f.name or "projection" in f.name for f in (full / sub).iterdir())
    with pytest.raises(ValueError, match="cannot switch descriptor captions"):
        train_t2i(None, part, tiny_cfg(steps=9), resume=True, data=tiny_data(), progress=False)


def test_init_from_starts_at_the_given_model(trained, tmp_path):
    """With lr 0 a run started from a model folder keeps exactly that model's weights."""
    src, _ = trained
    out = tmp_path / "ft"
    train_t2i(None, out, tiny_cfg(init_from=str(src), lr=0.0, steps=2, ckpt_every=2), data=tiny_data(), progress=False)
    for sub in ("unet", "text_encoder", "vae"):
        a = load_tensors(src / sub / ("diffusion_pytorch_model.safetensors" if sub != "text_encoder" else "model.safetensors"))
        b = load_tensors(out / sub / ("diffusion_pytorch_model.safetensors" if sub != "text_encoder" else "model.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), sub
    assert "_name_or_path" not in load_json(out / "vae" / "config.json")
    facts = load_json(out / "mini_sd.json")
    assert facts["init"]["from"] == str(src) and facts["init"]["diffusion_steps"] == 6 and facts["diffusion_steps"] == 2
    other = MiniConfig(unet_channels=(32, 64), vae_channels=(32, 32), text_width=32, text_layers=1, attention_head_dim=8)
    with pytest.raises(ValueError, match="does not fit"):
        train_t2i(None, tmp_path / "bad", tiny_cfg(init_from=str(src), model=other), data=tiny_data(), progress=False)
    with pytest.raises(FileNotFoundError, match="no vae/config.json"):
        train_t2i(None, tmp_path / "bad2", tiny_cfg(init_from=str(tmp_path / "nothing")), data=tiny_data(), progress=False)


def test_vae_stage_learns(tmp_path):
    """Reconstruction error falls over 60 VAE steps on a fixed set of images."""
    from accelerate import Accelerator

    from difflab.t2i.model import build_vae
    from difflab.t2i.vae import to_model_size, train_vae, vae_loss

    data = tiny_data(n=8)
    cfg = tiny_cfg(vae_steps=60, vae_batch_size=8, vae_lr=2e-3)
    x = to_model_size(torch.cat([torch.from_numpy(s.images) for s in data.sets]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        before = float(vae_loss(build_vae(TINY).eval(), x, torch.Generator().manual_seed(0), 0.0)[1])
    vae, facts = train_vae(data, cfg, Accelerator(cpu=True), progress=False)
    with torch.no_grad():
        after = float(vae_loss(vae, x, torch.Generator().manual_seed(0), 0.0)[1])
    assert after < 0.5 * before, (before, after)
    assert facts["vae_steps"] == 60


def test_textual_inversion_runs_on_the_mini_folder(trained, tmp_path):
    from PIL import Image

    from difflab.personalize.textual_inversion import TrainConfig, train_textual_inversion
    from difflab.sd.concepts import read_embedding_file

    out, _ = trained
    concept = tmp_path / "sevens"
    concept.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(concept / f"{i}.png")
    emb = tmp_path / "new1.safetensors"
    train_textual_inversion(TrainConfig(sd=str(out), concept_dir=str(concept), token="<new1>", init_word="digit",
                                        out=str(emb), steps=2, batch_size=2, device="cpu", quiet=True))
    vec = read_embedding_file(emb)["<new1>"]
    assert vec.shape == (1, 32) and torch.isfinite(vec).all()


def test_cli_bad_input_names_the_problem_and_writes_nothing(tmp_path, capsys):
    from difflab.cli import main

    out = tmp_path / "run"
    assert main(["t2i", "train", "--data", str(tmp_path / "nope"), "--out", str(out), "--quiet"]) == 2
    assert "digit data folder not found" in capsys.readouterr().err and not out.exists()
    assert main(["t2i", "train", "--data", str(tmp_path), "--out", str(out), "--p-empty", "1.5", "--quiet"]) == 2
    assert "--p-empty must be in [0, 1]" in capsys.readouterr().err and not out.exists()
    assert main(["t2i", "train", "--data", str(tmp_path), "--out", str(out), "--attention-levels", "5", "--quiet"]) == 2
    assert "attention_levels" in capsys.readouterr().err and not out.exists()


def test_export_copies_the_model_without_training_state(trained, tmp_path, capsys):
    from difflab.cli import main
    from difflab.sd.load import load_sd

    run, _ = trained
    dest = tmp_path / "assets" / "mini_sd"
    assert main(["t2i", "export", str(run), "--out", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["unet", "vae", "text_encoder", "tokenizer", "scheduler", "mini_sd.json"])
    a, b = load_sd(run), load_sd(dest)
    for net in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # exporting again replaces the folder; a folder that is no run is refused and nothing is written
    (dest / "stale.txt").write_text("x")
    assert main(["t2i", "export", str(run), "--out", str(dest)]) == 0 and not (dest / "stale.txt").exists()
    assert main(["t2i", "export", str(tmp_path / "assets"), "--out", str(tmp_path / "x")]) == 2
    assert "missing unet" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _caption_effect_without_cross_attention(unet, cond):
    """Largest change of the noise prediction between two text encodings ``cond`` [2, L, d]
    when every cross-attention's output is zeroed (so text can only enter another way)."""
    from conftest import zero_cross_attention

    zero_cross_attention(unet)
    torch.manual_seed(0)
    with torch.no_grad():
        eps = unet(torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1), torch.tensor([500, 500]), cond).sample
    return float((eps[0] - eps[1]).abs().max())


def test_text_time_embedding_reaches_the_resnet_blocks():
    """With --text-time-embedding the caption also enters through the time embedding. Added
    as a bias before a GroupNorm with one channel per group (TINY: 32 channels, 32 groups),
    it is cancelled exactly; --time-scale-shift applies it after the norm, where it acts."""
    from dataclasses import replace

    from difflab.t2i.model import build_unet

    cond = torch.randn(2, 24, TINY.text_width, generator=torch.Generator().manual_seed(0))
    effect = {}
    for name, cfg in (("none", replace(TINY, text_time_embedding=False, time_scale_shift=False)),
                      ("bias", replace(TINY, text_time_embedding=True, time_scale_shift=False)),
                      ("scale_shift", replace(TINY, text_time_embedding=True, time_scale_shift=True))):
        torch.manual_seed(0)
        effect[name] = _caption_effect_without_cross_attention(build_unet(cfg).eval(), cond)
    assert effect["none"] < 1e-5 and effect["bias"] < 1e-5, effect
    assert effect["scale_shift"] > 1e-2, effect


def test_text_time_embedding_option(tmp_path, monkeypatch):
    """A run with --text-time-embedding --time-scale-shift (the defaults) trains, exports and
    loads through the SD loader with those UNet settings; a config that leaves the options
    out gets today's defaults (issue 19: it used to get the old UNet layout silently); the
    CLI flags reach the config."""
    from dataclasses import replace

    from difflab.cli import main
    from difflab.sd.load import load_sd

    old = TINY.to_dict()
    del old["text_time_embedding"], old["time_scale_shift"]
    partial = MiniConfig.from_dict(old)
    assert partial == replace(TINY, text_time_embedding=MiniConfig().text_time_embedding,
                              time_scale_shift=MiniConfig().time_scale_shift)
    assert MiniConfig.from_dict({}) == MiniConfig()
    assert MiniConfig.from_dict(TINY.to_dict()) == TINY

    cfg = replace(TINY, text_time_embedding=True, time_scale_shift=True)
    out = tmp_path / "mini"
    losses = train_t2i(None, out, tiny_cfg(model=cfg), data=tiny_data(), progress=False)
    assert len(losses) == 6 and all(np.isfinite(losses))
    sd = load_sd(out)
    assert sd.unet.config.addition_embed_type == "text" and sd.unet.config.resnet_time_scale_shift == "scale_shift"
    assert MiniConfig.from_dict(load_json(out / "mini_sd.json")["train_config"]["model"]) == cfg
    ids = sd.tokenizer(["a photo of the digit three", "a photo of the digit eight"], padding="max_length",
                       max_length=sd.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = sd.text_encoder(ids)[0]
    assert _caption_effect_without_cross_attention(sd.unet, cond) > 1e-3

    seen = {}
    monkeypatch.setattr("difflab.t2i.train.train_t2i", lambda data, o, c, **kw: seen.setdefault("cfg", c))
    args = ["t2i", "train", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--quiet"]
    assert main(args) == 0
    assert seen.pop("cfg").model == replace(MiniConfig(), text_time_embedding=True, time_scale_shift=True)
    assert main(args + ["--no-text-time-embedding", "--no-time-scale-shift"]) == 0
    assert seen.pop("cfg").model == replace(MiniConfig(), text_time_embedding=False, time_scale_shift=False)
