"""The command line: every group loads, and every option of every command has help text."""
import argparse
import subprocess
import sys

from difflab.cli import build_parser


def _walk(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
    yield path, parser


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


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "difflab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for group in ("digits", "faces", "ti", "clip"):
        assert group in out.stdout
    bad = subprocess.run([sys.executable, "-m", "difflab", "digits", "generate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--out" in bad.stderr
