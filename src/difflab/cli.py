"""The ``difflab`` command: argparse front door.

Each problem package has a ``commands`` module with ``register(subparsers)`` that adds
its group (``difflab digits ...``); handlers import heavy libraries lazily so that
``--help`` stays fast. Library code never imports this module.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# (group module) in the order they appear in --help.
GROUPS = [
    "difflab.digits.commands",
    "difflab.clip.commands",
    "difflab.faces.commands",
    "difflab.personalize.commands",
    "difflab.t2i.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Diffusion-model toolkit: digit DDPM/DDIM (digits), the course face UNet (faces), "
        "textual inversion on Stable Diffusion (ti), CLIP scoring (clip), a mini SD-format model on digits (t2i).",
    )
    sub = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"difflab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
