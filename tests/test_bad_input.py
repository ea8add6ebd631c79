"""Bad input, faults and hostile files (issue 20): no silent wrong results, no
tracebacks, one line that names the thing. Each test is named after the issue's item."""
import argparse
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from difflab import cli
from difflab.cli import build_parser, main
from difflab.io import save_tensors

REPO = Path(__file__).resolve().parents[1]

# The course's Problem 3 prompts (hw2_data/textual_inversion/input.json).
COURSE_PROMPTS = {
    "<new1>": ["A <new1> shepherd posing proudly on a hilltop with Mount Fuji in the background.",
               "A <new1> perched on a park bench with the Colosseum looming behind."],
    "<new2>": ["The streets of Paris in the style of <new2>.", "Manhattan skyline in the style of <new2>."],
}


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from difflab.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd", seed=3)


@pytest.fixture()
def tiny(tiny_dir):
    from difflab.sd.load import load_sd

    return load_sd(tiny_dir)


@pytest.fixture()
def mini():
    """The shipped mini model (24 text positions, closed vocabulary) with its embeddings."""
    from difflab.assets import SHIPPED_EMBEDDINGS, SHIPPED_MINI_SD
    from difflab.sd.concepts import add_concept, read_embedding_file
    from difflab.sd.load import load_sd

    sd = load_sd(SHIPPED_MINI_SD)
    for f in sorted(SHIPPED_EMBEDDINGS.rglob("*.safetensors")):
        for tok, vec in read_embedding_file(f).items():
            add_concept(sd, tok, vec)
    return sd


def _input_warning():
    from difflab.io import InputWarning

    return InputWarning


def _ids(sd, prompt):
    from difflab.sd.prompts import prompt_ids

    return prompt_ids(sd, [prompt])[0].tolist()


# ------------------------------------------------------------------ 1: case of tokens
def test_issue20_1_a_capitalised_vocabulary_word_is_refused(tiny):
    from difflab.sd.concepts import add_concept

    vec = torch.zeros(1, tiny.text_width)
    with pytest.raises(ValueError, match=r"token 'DOG' is already in the tokenizer's vocabulary \(the tokenizer "
                                         r"reads it as 'dog': it lowercases text\)"):
        add_concept(tiny, "DOG", vec)
    add_concept(tiny, "<new1>", vec)
    with pytest.raises(ValueError, match=r"token '<NEW1>' is the already added token '<new1>'"):
        add_concept(tiny, "<NEW1>", vec + 1)


def test_issue20_1_a_capitalised_concept_token_is_one_token_in_any_case(tiny):
    """A multi-vector token is expanded however the prompt writes it, as the tokenizer reads it."""
    from difflab.sd.concepts import add_concept

    add_concept(tiny, "<NEW1>", torch.randn(2, tiny.text_width, generator=torch.Generator().manual_seed(0)))
    assert _ids(tiny, "a photo of <new1>") == _ids(tiny, "a photo of <NEW1>")
    names = tiny.concepts.ids[0]
    assert [i for i in _ids(tiny, "a photo of <new1>") if i in names] == names  # both vectors


# --------------------------------------------------------------- 2: the text length
def test_issue20_2_the_course_prompts_reach_the_mini_model_whole(mini):
    """Words the mini vocabulary lacks are left out (with a warning naming them), not
    spelled letter by letter until the concept token falls off the end."""
    for token, prompts in COURSE_PROMPTS.items():
        concept = mini.tokenizer.convert_tokens_to_ids(token)
        for p in prompts:
            with pytest.warns(_input_warning(), match="the model's vocabulary has no") as record:
                ids = _ids(mini, p)
            assert concept in ids, p
            assert "'shepherd'" in str(record[0].message) or "shepherd" not in p
    # The issue's example: <new2> used to fall off, making the image equal to <new1>'s.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _input_warning())
        a = mini.encode_text(["The old streets of Paris at night in the style of <new1>."])
        b = mini.encode_text(["The old streets of Paris at night in the style of <new2>."])
    assert not torch.equal(a, b)


def test_issue20_2_a_concept_token_past_the_text_length_is_an_error_naming_the_prompt(mini):
    prompt = "a photo of the digit " + "one two three four five six seven eight nine zero " * 2 + "<new2>"
    with pytest.raises(ValueError, match=r"prompt 'a photo of the digit one .*<new2>' is 26 tokens, but the text "
                                         r"encoder reads 22 .* concept token '<new2>' would be cut off"):
        mini.encode_text([prompt])


def test_issue20_2_other_truncation_is_a_warning_naming_the_words_cut(mini):
    prompt = "a photo of <new1> " + "one two three four five six seven eight nine zero " * 2
    with pytest.warns(_input_warning(), match=r"is 24 tokens, but the text encoder reads 22; cut: 'nine zero'"):
        ids = _ids(mini, prompt)
    expected = mini.tokenizer([prompt], padding="max_length", max_length=24, truncation=True).input_ids[0]
    assert ids == expected  # cut exactly where SD v1 cuts


def test_prompts_that_fit_tokenize_exactly_as_before(tiny):
    """No unknown words (an open vocabulary) and no cut: the tokenizer's own ids."""
    assert not tiny.closed_vocabulary
    for p in ["", "a photo of a dog", "A shepherd posing proudly on a hilltop with Mount Fuji in the background."]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ids = _ids(tiny, p)
        assert ids == tiny.tokenizer([p], padding="max_length", max_length=32, truncation=True).input_ids[0]


# ------------------------------------------------------------ 3: repeated --embeddings
@pytest.mark.parametrize("argv", [["--embeddings", "A", "--embeddings", "B"], ["--embeddings", "A", "B"]])
def test_issue20_3_repeating_embeddings_keeps_every_file(argv):
    from difflab.options import config_from_args
    from difflab.personalize.config import GenerateConfig

    args = build_parser(["ti"]).parse_args(["ti", "generate", "--json", "j", "--out", "o", *argv])
    assert args.embeddings == ["A", "B"]
    assert config_from_args(GenerateConfig, args, skip=(), out="o").embeddings == ("A", "B")
    args = build_parser(["ti"]).parse_args(["ti", "train", "--sd", "s", "--concept-dir", "c", "--token", "<t>",
                                            "--init-word", "dog", "--out", "o.safetensors", *argv])
    assert args.embeddings == ["A", "B"]
    # a default is replaced by the first use, then added to
    args = build_parser(["faces"]).parse_args(["faces", "eta-grid", "--noise", "n", "--unet", "u", "--out", "o",
                                               "--names", "04", "--names", "05"])
    assert args.names == ["04", "05"]


# -------------------------------------------------------------- 4: every option's range
def _cli_configs():
    from difflab import options as O

    seen = []
    real = O.add_config_args

    def spy(parser, cls, *, skip=()):
        seen.append((parser.prog, cls, skip))
        return real(parser, cls, skip=skip)

    O.add_config_args = spy
    try:
        build_parser()
    finally:
        O.add_config_args = real
    return seen


def test_issue20_4_every_numeric_option_has_a_range():
    from difflab import options as O

    unbounded = []
    for prog, cls, skip in _cli_configs():
        for f, tp, _ in O._cli_fields(cls, skip):
            seq = O._sequence(tp)
            if (seq[0] if seq else tp) in (int, float) and not any(
                    f.metadata.get(k) is not None for k in ("minimum", "maximum", "above", "choices", "check")):
                unbounded.append(f"{prog} {O.flag_of(f)}")
    assert not unbounded, f"numeric options without a declared range: {unbounded}"


@pytest.mark.parametrize("argv, message", [
    (["digits", "generate", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["digits", "generate", "--eta", "inf"], "--eta must be a finite number, got inf"),
    (["digits", "train", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["digits", "train", "--ckpt-every", "-1"], "--ckpt-every must be >= 0, got -1"),
    (["digits", "train", "--steps", "-5"], "--steps must be >= 1, got -5"),
    (["digits", "train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["digits", "train", "--p-uncond-digit", "2"], "--p-uncond-digit must be in [0, 1], got 2.0"),
    (["digits", "train", "--svhn-share", "1.5"], "--svhn-share must be in [0, 1], got 1.5"),
    (["digits", "train", "--channels", "1000000"], "--channels must be in [1, 4096], got 1000000"),
    (["digits", "generate", "--guidance-interval", "-5", "10"], "--guidance-interval must be >= 0, got -5"),
    (["faces", "interpolate", "--noise", "n", "--unet", "u", "--alphas", "0.5", "1.5"],
     "--alphas must be in [0, 1], got 1.5"),
    (["faces", "generate", "--noise", "n", "--unet", "u", "--eta", "nan"], "--eta must be a finite number, got nan"),
    (["ti", "generate", "--json", "j", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
])
def test_issue20_4_bad_numbers_exit_2_naming_the_flag(tmp_path, capsys, argv, message):
    extra = ["--data", str(tmp_path)] if argv[1] == "train" else []
    assert main(argv + extra + ["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"difflab: error: {message}\n"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- 5: NaN in, error out
def test_issue20_5_nan_network_weights_are_refused(tmp_path):
    from difflab.digits.model_io import SHIPPED_DIR, load_digit_model
    from difflab.faces.model_io import load_face_unet
    from difflab.io import load_json, load_tensors, save_json
    from difflab.nets.face_unet import FaceUNet, FaceUNetConfig

    state = FaceUNet(FaceUNetConfig.tiny()).state_dict()
    state["out.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "UNet.pt")
    with pytest.raises(ValueError, match=r"UNet\.pt: weight 'out\.2\.weight' holds 1 NaN or infinite value"):
        load_face_unet(tmp_path / "UNet.pt")

    digits = tmp_path / "digits"
    weights = load_tensors(SHIPPED_DIR / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_tensors(weights, digits / "model.safetensors")
    save_json(load_json(SHIPPED_DIR / "config.json"), digits / "config.json")
    with pytest.raises(ValueError, match=rf"model\.safetensors: weight '{name}' holds \d+ NaN or infinite values"):
        load_digit_model(digits)


def test_issue20_5_nan_sd_weights_and_embeddings_are_refused(tiny_dir, tiny, tmp_path):
    import shutil

    from difflab.sd.concepts import add_concept, read_embedding_file, save_embedding
    from difflab.sd.load import load_sd

    bad = torch.ones(1, tiny.text_width)
    bad[0, 3] = float("nan")
    save_embedding(tmp_path / "nan.safetensors", "<nan>", bad)
    with pytest.raises(ValueError, match=r"nan\.safetensors: entry '<nan>' holds 1 NaN or infinite value"):
        read_embedding_file(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="'<nan>' holds 1 NaN"):
        add_concept(tiny, "<nan>", bad)

    copy = tmp_path / "sd"
    shutil.copytree(tiny_dir, copy)
    from safetensors.torch import load_file, save_file

    f = next((copy / "text_encoder").glob("*.safetensors"))
    weights = load_file(f)
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, f)
    with pytest.raises(ValueError, match=r"\(text_encoder\): weight '.*' holds \d+ NaN"):
        load_sd(copy)


def test_issue20_5_nan_guidance_and_nan_images_are_refused(tmp_path):
    from difflab.guidance import guided
    from difflab.io import save_png

    with pytest.raises(ValueError, match="guidance scale must be a finite number, got nan"):
        guided(lambda x, t, c: x, float("nan"), None)
    img = torch.zeros(3, 4, 4)
    img[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"out\.png: the image holds 1 NaN or infinite values"):
        save_png(img, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------ 6: resume keeps the options
TINY_DIGITS = ["--channels", "16", "--channel-mults", "1", "2", "--num-res-blocks", "1", "--attention-levels", "1",
               "--groups", "8", "--patch", "2"]


def _digit_layout(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("mnistm", 12), ("svhn", 4)):
        (root / name / "data").mkdir(parents=True)
        rows = ["image_name,label"]
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / name / "data" / f"{i:05d}.png")
            rows.append(f"{i:05d}.png,{i % 10}")
        (root / name / "train.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def digit_run(tmp_path, monkeypatch):
    """(argv of a tiny `digits train` into RUN, RUN), stopped after 2 of its 4 steps."""
    from difflab.digits.config import TrainConfig
    from difflab.digits.train import train
    from difflab.options import config_from_args

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    run, data = tmp_path / "run", _digit_layout(tmp_path / "d")
    argv = ["digits", "train", "--data", str(data), "--out", str(run), "--steps", "4", "--warmup", "1",
            "--ckpt-every", "2", "--keep-checkpoints", "0", "--sample-every", "0", "--batch-size", "4", "--seed", "3",
            "--lr", "0.001", "--device", "cpu", "--quiet", *TINY_DIGITS]
    train(data, run, config_from_args(TrainConfig, build_parser(["digits"]).parse_args(argv)), stop_at=2, progress=False)
    return argv, run


@pytest.mark.parametrize("change, message", [
    (["--seed", "4"], "seed 3 -> 4"),
    (["--lr", "0.002"], "lr 0.001 -> 0.002"),
    (["--batch-size", "8"], "batch_size 4 -> 8"),
    (["--seed", "4", "--lr", "0.002"], "lr 0.001 -> 0.002, seed 3 -> 4"),
    (["--steps", "3"], "steps 4 -> 3"),
    (["--channels", "32"], "model.channels 16 -> 32"),
])
def test_issue20_6_a_resume_that_changes_the_results_is_refused(digit_run, capsys, change, message):
    """A resumed `digits train` with another seed, lr, batch size (same processes), model or
    fewer steps is refused in one line naming each change, saved -> asked; nothing is
    rewritten."""
    argv, run = digit_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(argv + ["--resume", *change]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difflab: error: --resume: {run} was trained with other options: {message} (saved -> asked)")
    assert err.count("\n") == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # train_config.json too


def test_issue20_6_a_resume_may_add_steps_and_change_reporting_and_records_the_leg(digit_run, capsys):
    from difflab.io import load_json

    argv, run = digit_run
    assert main(argv + ["--resume", "--ckpt-every", "1", "--keep-checkpoints", "1", "--device", "cpu"]) == 0
    assert "legs" not in load_json(run / "train_config.json")  # reporting only: not a change
    assert "legs" not in load_json(run / "checkpoints" / "step_0000004" / "state.json")
    assert main(argv + ["--resume", "--steps", "6"]) == 0
    leg = [{"from_step": 4, "changed": {"steps": [4, 6]}}]
    state = load_json(run / "checkpoints" / "step_0000006" / "state.json")
    config = load_json(run / "train_config.json")
    assert state["legs"] == leg and config["legs"] == leg and config["steps"] == 6


def test_issue20_6_one_helper_records_the_legs_of_both_trainers():
    import difflab.t2i.train as T
    from difflab import training

    assert T.config_changes is training.config_changes
    assert training.config_changes({"a": 1, "device": "cpu", "model": {"w": 2}},
                                   {"a": 2, "device": "cuda", "model": {"w": 3}}) == {"a": [1, 2], "model.w": [2, 3]}
    training.refuse_changes("r", {"steps": [4, 6], "batch_size": [4, 8]}, may_change=("batch_size",))
    with pytest.raises(ValueError, match=r"^--resume: r was trained with other options: steps 6 -> 4 \(saved -> asked\)"):
        training.refuse_changes("r", {"steps": [6, 4]})
    assert training.add_leg([], 3, {}) == [] and training.add_leg([], 3, {"a": [1, 2]}) == [
        {"from_step": 3, "changed": {"a": [1, 2]}}]


# ---------------------------------------------------------- 7: outputs checked first
@pytest.mark.parametrize("kind", ["under a file", "a file"])
def test_issue20_7_an_unwritable_output_fails_before_the_work(tmp_path, capsys, monkeypatch, kind):
    import difflab.digits.commands as D
    import difflab.faces.commands as F

    def never(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(D, "_load", never)
    monkeypatch.setattr(F, "_load", never)
    import difflab.faces.generate as G
    monkeypatch.setattr(G, "generate_dir", never)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub" if kind == "under a file" else blocker
    expected = f"lies under {blocker}, which is a file" if kind == "under a file" else "is a file; expected a folder"
    for argv in (["digits", "generate", "--out", str(out)], ["digits", "figures", "--out", str(out)],
                 ["faces", "generate", "--noise", "n", "--unet", "u", "--out", str(out)],
                 ["faces", "interpolate", "--noise", "n", "--unet", "u", "--out", str(out)],
                 ["ti", "generate", "--json", "j", "--out", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("difflab: error: ") and expected in err and err.count("\n") == 1, (argv, err)


def test_issue20_7_check_output_names_links_and_kinds(tmp_path):
    from difflab.io import check_output

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match="symbolic-link loop"):
        check_output(tmp_path / "loop" / "x", "dir", "out")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"out .*d is a folder; expected a file path"):
        check_output(tmp_path / "d", "file", "out")
    assert check_output(tmp_path / "new" / "deeper", "dir", "out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".difflab-write-check*"))


# ------------------------------------------- 8: a whole set or nothing, never mixed with an old one
def _ti_inputs(root: Path, width: int) -> list:
    """argv of a tiny `ti generate` (1 concept, 2 prompts, 2 images each) without --sd/--out."""
    from difflab.sd.concepts import save_embedding

    root.mkdir(parents=True, exist_ok=True)
    save_embedding(root / "new1.safetensors", "<new1>", torch.randn(1, width, generator=torch.Generator().manual_seed(0)))
    (root / "input.json").write_text(json.dumps({"0": {"token_name": "<new1>", "prompt": ["a photo of <new1>",
                                                                                          "a <new1> on a bench"]}}))
    return ["ti", "generate", "--json", str(root / "input.json"), "--embeddings", str(root / "new1.safetensors"),
            "--images-per-prompt", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_issue20_8_ti_generate_refuses_a_folder_with_files_and_overwrite_replaces_it_whole(tiny_dir, tiny, tmp_path,
                                                                                          capsys, monkeypatch):
    import difflab.personalize.generate as gen

    argv = _ti_inputs(tmp_path / "in", tiny.text_width) + ["--sd", str(tiny_dir)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"an earlier run's image")
    real_load = gen.load_sd

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(gen, "load_sd", never)
    assert main(argv + ["--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"difflab: error: out {out} already holds files (old.png); pass --overwrite to "
                                       "replace the folder whole, or choose another output folder\n")
    monkeypatch.setattr(gen, "load_sd", real_load)
    assert main(argv + ["--out", str(out), "--overwrite"]) == 0
    expected = sorted(f"0/{p}/source0_prompt{p}_{i}.png" for p in range(2) for i in range(2))
    assert sorted(_files(out)) == expected  # no old file beside the new ones
    first = _files(out)

    # a failure part-way leaves the earlier set as it was, and no partial set anywhere
    calls = {"n": 0}
    real_sample = gen.sample_images

    def dies_on_the_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_sample(*a, **k)

    monkeypatch.setattr(gen, "sample_images", dies_on_the_second_batch)
    assert main(argv + ["--out", str(out), "--overwrite", "--seed", "1"]) == 2
    assert _files(out) == first
    calls["n"] = 0
    assert main(argv + ["--out", str(tmp_path / "new"), "--seed", "1"]) == 2
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging folder left behind


def test_issue20_8_the_three_generate_commands_refuse_and_replace_alike(tmp_path, capsys, monkeypatch):
    import difflab.digits.commands as D
    from difflab.processes import publish_folder

    def never(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(D, "_load", never)
    import difflab.faces.generate as G
    monkeypatch.setattr(G, "generate_dir", never)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"x")
    errors = []
    for argv in (["digits", "generate"], ["faces", "generate", "--noise", "n", "--unet", "u"],
                 ["ti", "generate", "--json", "j"]):
        assert main(argv + ["--out", str(out)]) == 2, argv
        errors.append(capsys.readouterr().err.replace("--out ", "out ", 1))
        args = build_parser([argv[0]]).parse_args(argv + ["--out", str(out), "--overwrite"])
        assert args.overwrite is True
        command = dict(_leaf_parsers(build_parser([argv[0]])))[f"{argv[0]} generate"]
        help_text = next(a.help for a in command._actions if a.dest == "overwrite")
        assert help_text == "replace an output folder that already holds files"
    assert len(set(errors)) == 1 and "already holds files (stale.png); pass --overwrite" in errors[0], errors

    # the one publisher: refuses, or replaces whole; a failed write changes nothing
    with pytest.raises(FileExistsError, match="already holds files"):
        publish_folder(out, lambda folder: (folder / "new.png").write_bytes(b"n"))
    assert _files(out) == {"stale.png": b"x"}

    def half(folder):
        (folder / "a.png").write_bytes(b"a")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        publish_folder(out, half, overwrite=True)
    assert _files(out) == {"stale.png": b"x"}
    publish_folder(out, lambda folder: (folder / "new.png").write_bytes(b"n"), overwrite=True)
    assert _files(out) == {"new.png": b"n"}
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_folder(empty, lambda folder: (folder / "a.png").write_bytes(b"a"))  # an empty folder is not refused
    assert _files(empty) == {"a.png": b"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


@pytest.fixture()
def concept(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "concept"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    return folder


def _ti_train(tiny_dir, concept, out, *extra):
    return ["ti", "train", "--sd", str(tiny_dir), "--concept-dir", str(concept), "--token", "<new1>", "--init-word",
            "dog", "--out", str(out), "--steps", "2", "--save-every", "1", "--batch-size", "1", "--device", "cpu",
            "--quiet", *extra]


def test_issue20_8_ti_train_refuses_an_existing_embedding_unless_resume_or_overwrite(tiny_dir, concept, tmp_path, capsys):
    out = tmp_path / "emb.safetensors"
    assert main(_ti_train(tiny_dir, concept, out)) == 0
    old = sorted(p.name for p in tmp_path.iterdir())
    assert old == ["concept", "emb-step000001.safetensors", "emb.safetensors", "emb.state.safetensors"]
    before = out.read_bytes()
    capsys.readouterr()
    assert main(_ti_train(tiny_dir, concept, out)) == 2
    assert capsys.readouterr().err == (f"difflab: error: out {out} already exists; pass --resume to continue that run, "
                                       "--overwrite to replace it, or choose another out\n")
    assert out.read_bytes() == before
    out.unlink()  # an interrupted run: only its resume state is left
    assert main(_ti_train(tiny_dir, concept, out)) == 2
    assert f"an earlier run left {tmp_path / 'emb.state.safetensors'}" in capsys.readouterr().err
    assert main(_ti_train(tiny_dir, concept, out, "--resume", "--overwrite")) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert main(_ti_train(tiny_dir, concept, out, "--steps", "3", "--save-every", "2")) == 2
    # --overwrite starts afresh and leaves none of the earlier run's files beside the new ones
    assert main(_ti_train(tiny_dir, concept, out, "--steps", "3", "--save-every", "2", "--overwrite")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept", "emb-step000002.safetensors", "emb.safetensors",
                                                          "emb.state.safetensors"]


# ------------------------------------------------------- 9: one training per run folder
HOLD_LOCK = """
import sys, time
from difflab.training import run_lock
with run_lock(sys.argv[1], "run folder " + sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_issue20_9_a_second_training_into_a_locked_run_folder_is_refused(digit_run, capsys):
    """Another process trains into RUN (it holds RUN/.lock): a second run is refused in one
    line naming the folder and that process's id, and touches nothing; once the holder
    is killed (-9: no clean-up), the kernel has released the lock and the run goes on."""
    import os
    import subprocess
    import sys

    argv, run = digit_run
    assert not (run / ".lock").exists()  # released, and removed, by the run that ended
    before = _files(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock"), str(run)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")}, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(argv + ["--resume"]) == 2
        assert capsys.readouterr().err == (f"difflab: error: run folder {run} is in use by another training (pid "
                                           f"{holder.pid}, lock {run / '.lock'}); wait for it to end, or train into "
                                           "another --out\n")
        assert _files(run) == {**before, ".lock": f"{holder.pid}\n".encode()}
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # left by the killed holder, but no longer locked
    assert main(argv + ["--resume"]) == 0
    assert not (run / ".lock").exists()


def test_issue20_9_every_trainer_locks_its_output(tmp_path, tiny_dir, concept):
    import os

    from difflab.digits.config import TrainConfig as DigitConfig
    from difflab.digits.train import train
    from difflab.personalize import textual_inversion as ti
    from difflab.t2i.train import T2ITrainConfig, train_t2i
    from difflab.training import RunLocked, run_lock

    pid = os.getpid()  # a lock held through another open file of this process conflicts as another process's would
    with run_lock(tmp_path / "d" / ".lock", "run folder d"):
        with pytest.raises(RunLocked, match=rf"^run folder {tmp_path / 'd'} is in use by another training \(pid {pid}, "):
            train(tmp_path / "no-data", tmp_path / "d", DigitConfig(device="cpu"), progress=False)
    with run_lock(tmp_path / "t" / ".lock", "run folder t"):
        with pytest.raises(RunLocked, match=rf"^run folder {tmp_path / 't'} is in use by another training \(pid {pid}, "):
            train_t2i(tmp_path / "no-data", tmp_path / "t", T2ITrainConfig(device="cpu"), progress=False)
    out = tmp_path / "emb.safetensors"
    cfg = ti.TrainConfig(sd=str(tiny_dir), concept_dir=str(concept), token="<new1>", init_word="dog", out=str(out),
                         device="cpu", quiet=True)
    with run_lock(tmp_path / "emb.lock", "x"):
        with pytest.raises(RunLocked, match=rf"^--out {out} is in use by another training \(pid {pid}, lock "
                                            rf"{tmp_path / 'emb.lock'}\)"):
            ti.train_textual_inversion(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept"]  # nothing written, no lock or folder left
    # a run that fails leaves no folder made for its lock
    with pytest.raises(FileNotFoundError):
        train(tmp_path / "no-data", tmp_path / "d", DigitConfig(device="cpu"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept"]


# -------------------------------------------------------------- 10: one line, exit 2
@pytest.mark.parametrize("error, message", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 120000000000 bytes."),
     "out of memory: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
     "tried to allocate 120000000000 bytes."),
    (MemoryError(), "out of memory: MemoryError"),
    (NotADirectoryError(20, "Not a directory", "out/afile/x"), "[Errno 20] Not a directory: 'out/afile/x'"),
    (OSError(28, "No space left on device", "out/x.png"), "[Errno 28] No space left on device: 'out/x.png'"),
])
def test_issue20_10_expected_failures_are_one_line(monkeypatch, capsys, tmp_path, error, message):
    import difflab.digits.commands as D

    def fail(args):
        raise error

    monkeypatch.setattr(D, "_export", fail)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["digits", "export", "run", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"difflab: error: {message}\n"
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the environment variable shows the traceback too
    with pytest.raises(type(error)):
        main(["digits", "export", "run", "--out", str(tmp_path)])


def test_issue20_10_input_warnings_are_one_line(monkeypatch, capsys, tmp_path):
    import difflab.digits.commands as D

    def warn(args):
        warnings.warn("prompt 'x': cut: 'y'", _input_warning())
        return 0

    monkeypatch.setattr(D, "_export", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["digits", "export", "run", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "difflab: warning: prompt 'x': cut: 'y'\n"


# ---------------------------------------------------------- 11: messages name the file
def test_issue20_11_a_broken_scheduler_config_is_named(tiny_dir, tmp_path):
    import shutil

    from difflab.sd.load import load_sd

    copy = tmp_path / "sd"
    shutil.copytree(tiny_dir, copy)
    (copy / "scheduler").mkdir()
    (copy / "scheduler" / "scheduler_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"scheduler_config\.json is not valid JSON"):
        load_sd(copy)


def test_issue20_11_a_broken_digit_checkpoint_names_the_file(tmp_path):
    from difflab.digits.model_io import SHIPPED_DIR, load_digit_model
    from difflab.io import load_json, save_json

    folder = tmp_path / "model"
    save_json(load_json(SHIPPED_DIR / "config.json"), folder / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"missing {folder / 'model.safetensors'}"):
        load_digit_model(folder)
    meta = load_json(SHIPPED_DIR / "config.json")
    meta["model"]["widht"] = 3
    save_json(meta, folder / "config.json")
    (folder / "model.safetensors").write_bytes((SHIPPED_DIR / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: unknown DigitUNetConfig fields: \['widht'\]"):
        load_digit_model(folder)


def test_issue20_11_the_same_embedding_file_twice_and_nul_keys(tmp_path):
    from difflab.io import read_course_json
    from difflab.personalize.config import GenerateConfig

    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"^embeddings: .*a\.safetensors and .*link\.safetensors are one file, given "
                                         r"twice; give each file once$"):
        GenerateConfig(json="j", out=str(tmp_path / "out"),
                       embeddings=(str(tmp_path / "a.safetensors"), str(tmp_path / "link.safetensors"))).validate()
    with pytest.raises(ValueError, match=r"^embeddings: .*a\.safetensors is given twice"):
        GenerateConfig(json="j", out=str(tmp_path / "out"), embeddings=(str(tmp_path / "a.safetensors"),) * 2).validate()
    (tmp_path / "nul.json").write_text(json.dumps({"a\u0000b": {"token_name": "<t>", "prompt": ["a <t>"]}}))
    with pytest.raises(ValueError, match=r"concept key 'a\\x00b' cannot be a folder name: it holds a control character"):
        read_course_json(tmp_path / "nul.json")


# ------------------------------------------------------------------- 12: hostile sizes
def test_issue20_12_a_tensor_claiming_more_than_its_storage_is_refused(tmp_path):
    from difflab.io import load_tensor_file, load_torch_state

    torch.save(torch.zeros(1).expand(3, 100000, 100000), tmp_path / "00.pt")
    assert (tmp_path / "00.pt").stat().st_size < 4000
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"00\.pt claims shape \[3, 100000, 100000\] \(30000000000 values\) but the "
                                         r"file stores only 1"):
        load_tensor_file(tmp_path / "00.pt", "noise file")
    assert time.perf_counter() - start < 5
    torch.save({"w": torch.zeros(2).expand(1000, 2)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: entry 'w' claims shape \[1000, 2\]"):
        load_torch_state(tmp_path / "state.pt")
    torch.save(torch.zeros(3, 64, 64), tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"big\.pt has shape \[3, 64, 64\] \(12288 values\), more than the 1000"):
        load_tensor_file(tmp_path / "big.pt", max_elements=1000)
    assert load_tensor_file(tmp_path / "big.pt").shape == (3, 64, 64)


def test_issue20_12_widths_read_off_a_file_are_checked_before_allocating(tmp_path, monkeypatch):
    import difflab.digits.model_io as DM
    import difflab.faces.model_io as FM
    from difflab.io import load_json, load_tensors, save_json
    from difflab.nets.face_unet import FaceUNet, FaceUNetConfig

    def meta_only(real):
        def build(cfg):
            if torch.empty(0).device.type != "meta":
                raise AssertionError(f"a network was allocated from sizes read off a hostile file: {cfg}")
            return real(cfg)
        return build

    state = FaceUNet(FaceUNetConfig.tiny()).state_dict()
    state["down1.weight"] = torch.zeros(4096, 3, 3, 3)  # claims 4096 base channels
    state["down1.bias"] = torch.zeros(4096)
    torch.save(state, tmp_path / "UNet.pt")
    monkeypatch.setattr(FM, "FaceUNet", meta_only(FaceUNet))
    with pytest.raises(ValueError, match=r"UNet\.pt does not fit FaceUNet: shape conflicts .* \(the network its "
                                         r"config describes has \d{11,} values, the file \d+\)$"):
        FM.load_face_unet(tmp_path / "UNet.pt")

    folder = tmp_path / "digits"
    meta = load_json(DM.SHIPPED_DIR / "config.json")
    meta["model"]["channels"] = 4096
    save_json(meta, folder / "config.json")
    save_tensors(load_tensors(DM.SHIPPED_DIR / "model.safetensors"), folder / "model.safetensors")
    monkeypatch.setattr(DM, "DigitUNet", meta_only(DM.DigitUNet))
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit DigitUNet"):
        DM.load_digit_model(folder)
    meta["model"]["channels"] = 1000000
    save_json(meta, folder / "config.json")
    with pytest.raises(ValueError, match=r"config\.json: channels must be in \[1, 4096\], got 1000000"):
        DM.load_digit_model(folder)


# ------------------------------------------------------------------------------ 13: data
def _digits(tmp_path, rows, header="image_name,label", bom=False):
    from PIL import Image

    base = tmp_path / "mnistm"
    (base / "data").mkdir(parents=True)
    Image.new("RGB", (28, 28)).save(base / "data" / "a.png")
    Image.new("RGB", (28, 28)).save(base / "data" / "b.png")
    text = "\n".join([header] + rows) + "\n"
    (base / "train.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return base / "train.csv"


@pytest.mark.parametrize("rows, message", [
    (["a.png,1", "b.png,2", "a.png,3"], r"train\.csv:4: image a\.png is listed with label 1 and again with label 3 "
                                        r"\(first on line 2\)"),
    (["a.png,1", "a.png,1"], r"train\.csv:3: image a\.png is listed twice"),
    (["../secret.png,1"], r"train\.csv:2: image name '\.\./secret\.png' is not a file in data/: it leaves data/"),
    (["/etc/passwd,1"], r"train\.csv:2: image name '/etc/passwd' is not a file in data/: it is an absolute path"),
])
def test_issue20_13_bad_label_files_are_refused(tmp_path, rows, message):
    from difflab.data import read_csv

    with pytest.raises(ValueError, match=message):
        read_csv(_digits(tmp_path, rows))


def test_issue20_13_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    from difflab.data import read_csv

    assert read_csv(_digits(tmp_path, ["a.png,1", "b.png,2"], bom=True)) == [("a.png", 1), ("b.png", 2)]


def test_issue20_13_upper_case_suffixes_are_listed(tmp_path):
    from difflab.io import list_files

    for name in ("00.pt", "01.PT", "02.Pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_files(tmp_path, (".pt",), "noise folder")] == ["00.pt", "01.PT", "02.Pt"]


def test_issue20_13_a_concept_like_word_without_an_embedding_is_an_error(tiny):
    from difflab.sd.concepts import add_concept

    add_concept(tiny, "<new1>", torch.zeros(1, tiny.text_width))
    with pytest.raises(ValueError, match=r"prompt 'a <new1> and a <new9>': '<new9>' looks like a concept token, but "
                                         r"no embedding is loaded for it \(loaded concepts: <new1>\)"):
        tiny.encode_text(["a <new1> and a <new9>"])


def test_issue20_13_duplicate_keys_in_json_are_an_error(tmp_path):
    from difflab.io import read_course_json

    entry = '{"token_name": "<new1>", "prompt": ["a <new1>"]}'
    (tmp_path / "input.json").write_text(f'{{"0": {entry}, "0": {entry}}}')
    with pytest.raises(ValueError, match=r"input\.json: key '0' appears twice in one object"):
        read_course_json(tmp_path / "input.json")


# ------------------------------------------------------------------------------ 14: claims
def _leaf_parsers(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaf_parsers(sub, path + (name,))
    if len(path) == 2:
        yield " ".join(path), parser


def test_issue20_14_batch_size_help_says_exactly_what_holds():
    """Images change with the batch size only by floating-point rounding: no help text
    claims they do not depend on it without saying so."""
    claims = []
    for command, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            text = (action.help or "").lower()
            if ("not depend" in text or "independent" in text) and "rounding" not in text:
                claims.append(f"{command} {action.option_strings}: {action.help}")
    assert not claims, claims
    ti = dict(_leaf_parsers(build_parser(["ti"])))["ti generate"]
    help_text = next(a.help for a in ti._actions if a.dest == "batch_size")
    assert "one of 255 levels" in help_text and "rounding" in help_text


def test_issue20_8_overwrite_never_replaces_the_working_folder_or_a_parent(tmp_path, monkeypatch):
    from difflab.io import check_fresh_output

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (".", str(work), str(tmp_path)):
        with pytest.raises(ValueError, match="working folder, one of its parents or the home folder"):
            check_fresh_output(target, "out", overwrite=True)
    (work / "sub").mkdir()
    assert check_fresh_output("sub", "out", overwrite=True) == Path("sub")
    assert (work / "keep.txt").is_file()
