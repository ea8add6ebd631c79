"""The command line: built from the typed configs, shared options mean the same
everywhere, errors are one line, and ``difflab --help`` stays light."""
import argparse
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from difflab import __version__, cli
from difflab.cli import build_parser, main
from difflab.options import Config, add_config_args, config_from_args, option

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("digits train", "t2i train", "ti train")
SHARED = ("device", "threads", "seed", "mixed_precision", "quiet", "resume", "guidance_scale")


def _walk(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
    yield path, parser


def _commands():
    """{'digits train': parser, ...} of every command (leaf parser)."""
    out = {}
    for path, parser in _walk(build_parser()):
        if len(path) == 2:
            out[" ".join(path)] = parser
    return out


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_option_has_help():
    commands = list(_walk(build_parser()))
    names = {" ".join(p) for p, _ in commands}
    for expected in ("digits train", "digits generate", "digits evaluate", "digits figures",
                     "faces generate", "ti train", "ti generate", "clip score", "clip zeroshot"):
        assert expected in names, f"missing command {expected!r}; have {sorted(names)}"
    missing = []
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help and action.help.strip()):
                missing.append(f"{' '.join(path)}: {action.dest}")
    assert not missing, f"options without help: {missing}"


def test_defaults_are_shown_once_and_never_for_required_options():
    for name, parser in _commands().items():
        for a in _options(parser):
            assert a.help.count("(default") <= 1, (name, a.dest, a.help)
            if a.required or (not a.option_strings and a.nargs is None):
                assert "(default" not in a.help, (name, a.dest)
        text = parser.format_help()  # every help string formats (no stray %)
        assert text


def test_shared_options_mean_the_same_everywhere():
    seen = {}
    for name, parser in _commands().items():
        for a in _options(parser):
            if a.dest in SHARED:
                seen.setdefault(a.dest, []).append((name, a))
    for dest, uses in seen.items():
        flags = {tuple(a.option_strings) for _, a in uses}
        assert flags == {("--" + dest.replace("_", "-"),)}, (dest, flags)
        if dest != "guidance_scale":  # the default scale is each model's own
            assert len({repr(a.default) for _, a in uses}) == 1, (dest, [(n, a.default) for n, a in uses])
        # one help text, which a command may extend with a note (never contradict)
        base = min((a.help.split(" (default")[0] for _, a in uses), key=len).split(";")[0].split(" (several")[0]
        assert all(a.help.startswith(base) for _, a in uses), (dest, [a.help for _, a in uses])
    assert {a.default for _, a in seen["device"]} == {"auto"}
    computing = [n for n in _commands() if n not in ("digits export", "t2i export", "faces mse")]
    for n in computing:
        assert any(a.dest == "threads" for a in _options(_commands()[n])), f"{n} has no --threads"
    for n in TRAINERS:
        resume = next(a for a in _options(_commands()[n]) if a.dest == "resume")
        assert resume.nargs == 0 and resume.default is False, n  # a flag in every trainer


def test_every_output_is_out_and_no_input_is_called_an_output():
    for name, parser in _commands().items():
        for a in _options(parser):
            for s in a.option_strings:
                if re.search(r"^--out|[-_]out$|output", s) and s != "--out":
                    assert s == "--output_dir" and a.dest == "images", (name, s)  # the course grader's name
            if not a.option_strings:
                assert "out" not in a.dest, (name, a.dest)


def test_clip_score_accepts_the_grader_names():
    parser = build_parser(["clip"])
    grader = parser.parse_args(["clip", "score", "--json_path", "in.json", "--input_dir", "refs", "--output_dir", "gen",
                                "--clip", "c"])
    clear = parser.parse_args(["clip", "score", "--json", "in.json", "--concepts", "refs", "--images", "gen", "--clip", "c"])
    assert vars(grader) == vars(clear)
    assert (clear.json, clear.concepts, clear.images) == ("in.json", "refs", "gen")


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "difflab", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert not [m for m in imported if m.split(".")[0] == "torch"]
    for group in ("digits", "faces", "ti", "clip", "t2i"):
        assert group in out.stdout


def test_version():
    out = subprocess.run([sys.executable, "-m", "difflab", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"difflab {__version__}"


def test_module_entry_point_runs():
    bad = subprocess.run([sys.executable, "-m", "difflab", "digits", "generate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--out" in bad.stderr


def test_guidance_scale_reaches_the_digit_sampler_as_w(monkeypatch):
    import torch

    from difflab.digits import generate as G
    from difflab.digits.config import SampleConfig

    parser = build_parser(["digits"])
    default = config_from_args(SampleConfig, parser.parse_args(["digits", "generate", "--out", "x"]))
    assert default == SampleConfig() and default.guidance_scale == 4.0  # the course's w = 3
    cfg = config_from_args(SampleConfig, parser.parse_args(["digits", "generate", "--out", "x", "--guidance-scale", "2.5"]))
    assert cfg.guidance_scale == 2.5

    seen = {}

    class Stop(Exception):
        pass

    def fake_guided(denoiser, w, null, **options):
        seen["w"] = w
        raise Stop

    monkeypatch.setattr(G, "guided", fake_guided)
    for c, w in ((default, 3.0), (cfg, 1.5), (SampleConfig(guidance_scale=1.0), 0.0)):
        with pytest.raises(Stop):
            G.sample_digits(torch.nn.Linear(1, 1), None, torch.zeros(1), torch.zeros(1), torch.zeros(1, 3, 28, 28), c)
        assert seen.pop("w") == w


@pytest.mark.parametrize("argv, message", [
    (["digits", "train", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["digits", "train", "--p-uncond-digit", "1.5"], "--p-uncond-digit must be in [0, 1], got 1.5"),
    (["digits", "train", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["digits", "train", "--channel-mults", "1", "0"], "--channel-mults must be in [1, 64], got 0"),
    (["digits", "generate", "--clip-x0", "0"], "--clip-x0 must be > 0 or none, got 0.0"),
])
def test_a_bad_range_exits_2_with_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    extra = ["--data", str(tmp_path)] if argv[1] == "train" else []
    rc = main(argv + extra + ["--out", str(tmp_path / "run")])
    assert rc == 2
    assert capsys.readouterr().err == f"difflab: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_library_validation_names_the_field():
    from difflab.digits.config import SampleConfig, TrainConfig
    from difflab.nets.digit_unet import DigitUNetConfig

    with pytest.raises(ValueError, match=r"^steps must be >= 1, got 0$"):
        SampleConfig(steps=0).validate()
    with pytest.raises(ValueError, match=r"^clip_x0 must be > 0 or none, got -1.0$"):
        SampleConfig(clip_x0=-1.0).validate()
    SampleConfig(clip_x0=None).validate()
    with pytest.raises(ValueError, match=r"^patch must be in \[1, 28\], got 0$"):  # nested configs are checked too
        TrainConfig(model=DigitUNetConfig(patch=0)).validate()


def test_clip_x0_is_switched_off_one_way():
    from difflab.digits.config import SampleConfig
    from difflab.faces.generate import FaceSampling

    for group, command, cls, extra in (("digits", "generate", SampleConfig, ["--out", "x"]),
                                       ("faces", "generate", FaceSampling, ["--out", "x", "--noise", "n", "--unet", "u"])):
        args = build_parser([group]).parse_args([group, command, "--clip-x0", "none", *extra])
        assert config_from_args(cls, args).clip_x0 is None


def test_threads_are_applied_once_by_the_cli(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    args = build_parser(["digits"]).parse_args(["digits", "generate", "--out", "x", "--threads", "3"])
    cli._set_threads(args)
    assert calls == [3]
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        cli._set_threads(build_parser(["digits"]).parse_args(["digits", "generate", "--out", "x", "--threads", "0"]))


def test_bugs_keep_their_traceback_and_debug_shows_errors(monkeypatch, tmp_path, capsys):
    import difflab.digits.commands as D

    def buggy(args):
        raise KeyError("foo")

    def failing(args):
        raise FileNotFoundError(f"no model in {tmp_path}")

    monkeypatch.setattr(D, "_export", buggy)
    with pytest.raises(KeyError):
        main(["digits", "export", "run", "--out", str(tmp_path)])
    monkeypatch.setattr(D, "_export", failing)
    assert main(["digits", "export", "run", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"difflab: error: no model in {tmp_path}\n"
    with pytest.raises(FileNotFoundError):
        main(["--debug", "digits", "export", "run", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the Config mixin
@dataclass
class Inner(Config):
    sizes: tuple[int, ...] = option((1, 2), "sizes", minimum=1)
    name: str = option("a", "a name", choices=("a", "b"))


@dataclass
class Outer(Config):
    path: str = option(help="a required input")
    rate: Optional[float] = option(0.5, "a rate", above=0.0)
    on: bool = option(True, "a switch")
    files: list = option([], "files")
    inner: Inner = field(default_factory=Inner)


def test_config_round_trip_and_unknown_fields():
    cfg = Outer(path="p", rate=None, on=False, files=["x"], inner=Inner(sizes=(3, 4, 5), name="b"))
    d = cfg.to_dict()
    assert d == {"path": "p", "rate": None, "on": False, "files": ["x"], "inner": {"sizes": [3, 4, 5], "name": "b"}}
    back = Outer.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and isinstance(back.inner.sizes, tuple)
    assert Outer.from_dict({"path": "p"}) == Outer(path="p")
    with pytest.raises(ValueError, match=r"unknown Outer fields: \['colour', 'size'\]"):
        Outer.from_dict({"path": "p", "size": 1, "colour": 2})
    with pytest.raises(ValueError, match=r"unknown Inner fields: \['x'\]"):
        Outer.from_dict({"path": "p", "inner": {"x": 1}})


def test_the_project_configs_round_trip():
    from difflab.digits.config import TrainConfig
    from difflab.nets.digit_unet import DigitUNetConfig
    from difflab.t2i.config import T2ITrainConfig
    from difflab.t2i.model import MiniConfig

    for cfg in (TrainConfig(steps=7, model=DigitUNetConfig(channel_mults=(1, 3), attention_levels=())),
                T2ITrainConfig(p_descriptor=0.2, model=MiniConfig(unet_channels=(32, 32), text_time_embedding=False))):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields: \['bogus'\]"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown DigitUNetConfig fields: \['nope'\]"):
        TrainConfig.from_dict({"model": {"nope": 1}})


def test_options_from_a_config():
    parser = argparse.ArgumentParser(prog="t")
    add_config_args(parser, Outer)
    args = parser.parse_args(["--path", "p", "--rate", "none", "--no-on", "--sizes", "4", "5", "--name", "b"])
    assert config_from_args(Outer, args) == Outer(path="p", rate=None, on=False, inner=Inner(sizes=(4, 5), name="b"))
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --path is required
    with pytest.raises(ValueError, match=r"^--sizes must be >= 1, got 0$"):
        config_from_args(Outer, parser.parse_args(["--path", "p", "--sizes", "0"]))
    with pytest.raises(ValueError, match="declared twice"):
        add_config_args(parser, Inner)


# ----------------------------------------------------------------------------- course scripts
@pytest.mark.parametrize("script, argv, expected", [
    ("hw2_1.sh", ["o"], ["digits", "generate", "--out", "o"]),
    ("hw2_2.sh", ["n d", "o", "u.pt"], ["faces", "generate", "--noise", "n d", "--out", "o", "--unet", "u.pt"]),
    ("hw2_3.sh", ["in.json", "o"], ["ti", "generate", "--json", "in.json", "--out", "o"]),
    ("hw2_3.sh", ["in.json", "o", "sd"], ["ti", "generate", "--json", "in.json", "--out", "o", "--sd", "sd"]),
])
def test_course_scripts_find_the_package_beside_them_without_difflab_on_path(tmp_path, script, argv, expected):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\necho "$PYTHONPATH"\nprintf "%s|" "$@"\n')
    (fake / "python3").chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{fake}:/usr/bin:/bin", PYTHONPATH="/elsewhere")
    r = subprocess.run(["bash", str(REPO / script), *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pythonpath, called = r.stdout.splitlines()
    assert pythonpath == f"{REPO}/src:/elsewhere"
    assert called == "|".join(["-m", "difflab", *expected]) + "|"


def test_course_env_script_refuses_a_folder_that_is_not_an_environment(tmp_path):
    """tools/course_env.sh removes DIR before a rebuild, so a folder holding anything but a
    Python environment (or a file) is refused, untouched, before anything is built."""
    keep = tmp_path / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    for target, message in ((keep, "exists and is not a Python environment"), (tmp_path / "afile", "is a file")):
        r = subprocess.run(["bash", str(REPO / "tools" / "course_env.sh"), str(target)], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert (keep / "notes.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "x"
    r = subprocess.run(["bash", str(REPO / "tools" / "course_env.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage: bash tools/course_env.sh DIR")
