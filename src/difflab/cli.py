"""The ``difflab`` command: argparse front door.

Each problem package has a ``commands`` module with ``NAME``, ``HELP`` and
``register(subparsers)``, which adds its group (``difflab digits ...``) with options
built from its configs (:mod:`difflab.options`). Only the group named on the command
line is registered in full: the others appear with their one-line help, so that
``difflab --help`` imports no torch. Library code never imports this module.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Iterable, Iterator, List, Optional, Sequence

from difflab import __version__
from difflab.options import Threads, config_from_args

# (group module) in the order they appear in --help.
GROUPS = [
    "difflab.digits.commands",
    "difflab.clip.commands",
    "difflab.faces.commands",
    "difflab.personalize.commands",
    "difflab.t2i.commands",
    "difflab.report.commands",
]

# The library's expected failures: bad input, missing or unwritable files (every
# OSError: a full or read-only disk, a path under a file, a symbolic-link loop), memory
# that cannot be had, and a package the command needs that is not installed (diffusers
# in the course's grading environment). A KeyError or any other exception is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, MemoryError, ModuleNotFoundError)
DEBUG_ENV = "DIFFLAB_DEBUG"  # set (non-empty, not 0): show tracebacks, as --debug does
# How torch's CPU and CUDA allocators word a failed allocation (RuntimeError).
OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")


def build_parser(groups: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The whole parser; with ``groups`` (group names), only those groups get their
    commands and options, the others only their name and help."""
    parser = argparse.ArgumentParser(
        prog="difflab", allow_abbrev=False,
        description="Diffusion-model toolkit: digit DDPM/DDIM (digits), the course face UNet (faces), "
        "textual inversion on Stable Diffusion (ti), CLIP scoring (clip), a mini SD-format model on digits (t2i).",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    wanted = None if groups is None else set(groups)
    for name in GROUPS:
        module = importlib.import_module(name)
        if wanted is None or module.NAME in wanted:
            module.register(sub)
        else:
            sub.add_parser(module.NAME, help=module.HELP)
    return parser


def _named_group(argv: Sequence[str]) -> List[str]:
    """The group named on the command line (the first word that is not an option)."""
    return [a for a in argv if not a.startswith("-")][:1]


def _set_threads(args: argparse.Namespace) -> None:
    if "threads" in vars(args):
        threads = config_from_args(Threads, args).threads
        if threads:
            import torch

            torch.set_num_threads(threads)


def _out_of_memory(e: BaseException) -> Optional[str]:
    """The one-line message of a failed allocation (torch raises RuntimeError or its
    OutOfMemoryError subclass), or None when ``e`` is something else."""
    text = str(e)
    first = text.splitlines()[0] if text else type(e).__name__
    lowered = text.lower()
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and any(m in lowered for m in OUT_OF_MEMORY)):
        return f"out of memory: {first}"
    return None


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show the library's InputWarnings as ``difflab: warning: ...`` lines (other
    warnings keep Python's format)."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        from difflab.io import InputWarning

        if issubclass(category, InputWarning):
            print(f"difflab: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_named_group(argv)).parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with _one_line_warnings():
            _set_threads(args)
            return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"difflab: error: {_out_of_memory(e) or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        message = _out_of_memory(e)
        if message is None or debug:
            raise
        print(f"difflab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
