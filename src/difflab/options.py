"""Typed configuration: dataclass fields that carry their help and range, and the
argparse options built from them.

A config is a dataclass that mixes in :class:`Config`; each field is declared with
:func:`option`, so its default, help text and allowed range are written once, beside
the field (a typed version of guided-diffusion's ``add_dict_to_argparser``)::

    @dataclass
    class SampleConfig(Config):
        steps: int = option(10, "DDIM steps, uniform over the T training steps", minimum=1)

    add_config_args(parser, SampleConfig)         # --steps N (default: 10)
    cfg = config_from_args(SampleConfig, args)    # range-checked, naming --steps
    cfg.validate()                                # the same checks, naming the field steps

The library speaks of fields (``steps must be >= 1, got 0``); only the command line
speaks of flags (``--steps must be >= 1, got 0``). The options that every command
shares (``--device``, ``--threads``, ``--seed``, ``--mixed-precision``, ``--quiet``,
``--out``, ``--overwrite``, ``--resume``, ``--guidance-scale``) are declared once, here. This module is
imported by ``difflab --help`` and must not import torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Config", "option", "add_config_args", "config_from_args", "check_value", "flag_of",
    "add_group", "add_command", "device_option", "seed_option", "mixed_precision_option", "quiet_option",
    "out_option", "overwrite_option", "resume_option", "guidance_scale_option", "Threads", "DigitDataRun", "MIXED_PRECISION",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# ----------------------------------------------------------------------------- fields
def option(default: Any = MISSING, help: str = "", *, choices: Optional[Sequence[Any]] = None,
           minimum: Optional[float] = None, maximum: Optional[float] = None, above: Optional[float] = None,
           check: Optional[Callable[[Any], Optional[str]]] = None, metavar: Any = None, flag: Optional[str] = None,
           aliases: Sequence[str] = (), nargs: Optional[str] = None, positional: bool = False, cli: bool = True,
           shared: Optional[str] = None) -> Any:
    """A dataclass field with its command-line description.

    :param default: the default; leave it out for a required option (no default shown).
        Lists, dicts and sets are copied per instance.
    :param help: one help text, used by ``--help``; the default is appended to it.
    :param choices: allowed values (for a sequence field: of each element).
    :param minimum: inclusive lower bound; ``maximum``: inclusive upper bound;
        ``above``: exclusive lower bound (e.g. ``above=0`` for "> 0").
    :param check: ``value -> None or a complaint`` ("must be ...") for other rules.
    :param flag: the option's name when not ``--field-name``; ``aliases``: more names.
    :param nargs: for sequence fields, argparse's nargs when not ``+`` (``*`` if the
        default is empty).
    :param positional: a positional argument instead of an option.
    :param cli: False keeps the field off the command line.
    :param shared: the name of a shared option (``device``...): two configs of one
        command may both declare it, and they then share one option.
    """
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, minimum=minimum,
                maximum=maximum, above=above, check=check, metavar=metavar, flag=flag, aliases=tuple(aliases),
                nargs=nargs, positional=positional, cli=cli, shared=shared)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """How the command line names field ``f``: ``--flag-name`` (or its positional NAME)."""
    if f.metadata.get("positional"):
        return f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _bound(x: float) -> str:
    return format(x, "g") if isinstance(x, float) else str(x)


def _complaint(meta: Mapping[str, Any], v: Any, optional: bool) -> Optional[str]:
    """What is wrong with one value ``v`` under the field's declared range, or None."""
    lo, hi, above, choices = meta.get("minimum"), meta.get("maximum"), meta.get("above"), meta.get("choices")
    if choices is not None and v not in choices:
        return "must be one of " + ", ".join(str(c) for c in choices)
    if isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if lo is not None and hi is not None and not lo <= v <= hi:
            return f"must be in [{_bound(lo)}, {_bound(hi)}]"
        if lo is not None and v < lo:
            return f"must be >= {_bound(lo)}"
        if hi is not None and v > hi:
            return f"must be <= {_bound(hi)}"
        if above is not None and not v > above:
            return f"must be > {_bound(above)}" + (" or none" if optional else "")
    check = meta.get("check")
    return check(v) if check is not None else None


def check_value(f: dataclasses.Field, value: Any, name: Optional[str] = None, *, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is in field ``f``'s declared range. ``name``
    is what the message calls the value: the field name (library) or its flag (CLI);
    ``optional``: None is allowed (and named in the message)."""
    if value is None:
        return
    items = value if isinstance(value, (list, tuple)) else (value,)
    for v in items:
        problem = _complaint(f.metadata, v, optional)
        if problem:
            raise ValueError(f"{name or f.name} {problem}, got {v!r}")


# ----------------------------------------------------------------------------- types
def _unwrap(tp: Any) -> Tuple[Any, bool]:
    """(type, optional): ``Optional[X]`` -> (X, True)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config) and dataclasses.is_dataclass(tp)


def _sequence(tp: Any) -> Optional[Tuple[Any, Any]]:
    """(element type, fixed length or None) of a tuple/list annotation, else None."""
    origin = typing.get_origin(tp) or (tp if tp in (tuple, list) else None)
    if origin not in (tuple, list):
        return None
    args = typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return args[0], len(args)
    return (args[0] if args else str), None


def _fields(cls: type) -> Iterator[Tuple[dataclasses.Field, Any, bool]]:
    """(field, type, optional) of every init field of ``cls``, types resolved."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            tp, optional = _unwrap(hints[f.name])
            yield f, tp, optional


def _parser_for(tp: Any, optional: bool) -> Callable[[str], Any]:
    """argparse ``type=``: text -> ``tp``; ``none`` -> None for an optional number."""

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {tp.__name__}{' or none' if optional else ''}, got {text!r}") from None

    parse.__name__ = tp.__name__
    return parse if tp in (int, float) else tp


# ----------------------------------------------------------------------------- the mixin
class Config:
    """Mixin for config dataclasses: plain-dict round trip and declared-range checks."""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: nested configs become dicts, tuples become lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The inverse of :meth:`to_dict`; fields missing from ``d`` keep their defaults.
        Unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        values = {}
        for f, tp, _ in _fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if _is_config(tp) and isinstance(v, Mapping):
                v = tp.from_dict(v)
            elif _sequence(tp) and isinstance(v, (list, tuple)):
                v = tuple(v) if (typing.get_origin(tp) or tp) is tuple else list(v)
            values[f.name] = v
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is outside its declared range;
        nested configs are validated too. Subclasses add cross-field rules after
        ``super().validate()``."""
        for f, _, optional in _fields(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value.validate()
            else:
                check_value(f, value, optional=optional)


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ----------------------------------------------------------------------------- argparse
class _Extend(argparse.Action):
    """Several values that accumulate: ``--x A B`` and ``--x A --x B`` both give
    [A, B]. The first use replaces the default; later uses add to it (argparse's
    ``store`` would silently keep only the last use)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is self.default or current is None:
            current = []
        setattr(namespace, self.dest, list(current) + list(values))


class _Switch(argparse.BooleanOptionalAction):
    """``--x / --no-x`` whose help shows the default in this module's one style."""

    def __init__(self, *args, help=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = help


def _help(f: dataclasses.Field, tp: Any) -> str:
    text = f.metadata.get("help") or ""
    text = text.replace("%", "%%")
    d = f.default
    if d is MISSING and f.default_factory is not MISSING:
        d = f.default_factory()
    if d is MISSING or d is None or d is False or d == "" or d == () or d == [] or "(default" in text:
        return text
    if tp is bool:
        shown = "on"
    elif isinstance(d, (list, tuple)):
        shown = " ".join(str(x) for x in d)
    else:
        shown = str(d)
    return f"{text} (default: {shown})".strip()


def _argument(f: dataclasses.Field, tp: Any, optional: bool) -> Tuple[list, dict]:
    """(names, add_argument keywords) of field ``f``."""
    meta = f.metadata
    default = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else MISSING)
    kw: Dict[str, Any] = {"help": _help(f, tp)}
    seq = _sequence(tp)
    if tp is bool:
        kw["action"] = _Switch if default is True else "store_true"
    elif seq:
        elem, length = seq
        kw["type"] = _parser_for(elem, False)
        kw["nargs"] = length or meta.get("nargs") or ("+" if default else "*")
        if not length and not meta.get("positional"):
            kw["action"] = _Extend
    else:
        kw["type"] = _parser_for(tp, optional)
    if meta.get("choices") is not None:
        kw["choices"] = meta["choices"]
    if meta.get("metavar") is not None:
        kw["metavar"] = meta["metavar"]
    if meta.get("positional"):
        if default is not MISSING:
            kw.update(nargs="?", default=default)
        kw.setdefault("metavar", f.name.upper())
        return [f.name], kw
    kw["dest"] = f.name
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
    return [flag_of(f), *meta.get("aliases", ())], kw


def _cli_fields(cls: type, skip: Sequence[str]) -> Iterator[Tuple[dataclasses.Field, Any, bool]]:
    """The command-line fields of ``cls``; nested configs are flattened into it."""
    for f, tp, optional in _fields(cls):
        if _is_config(tp):
            yield from _cli_fields(tp, skip)
        elif f.metadata.get("cli", True) and f.name not in skip:
            yield f, tp, optional


def add_config_args(parser: Any, cls: type, *, skip: Sequence[str] = ()) -> None:
    """Add one option per field of config dataclass ``cls`` (nested configs flattened)
    to ``parser`` (a parser or an argument group). Fields in ``skip`` stay off.

    Types come from the annotations: ``Optional[X]`` accepts ``none`` for numbers,
    tuples and lists take several values (a repeated option adds to them), ``bool``
    is ``--x`` (default off) or ``--x/--no-x`` (default on). A field without a default
    is a required option.
    Declaring an option twice is an error unless both are the same shared option.
    """
    existing = {a.dest: a for a in parser._actions}
    for f, tp, optional in _cli_fields(cls, skip):
        shared = f.metadata.get("shared")
        if f.name in existing:
            if shared and getattr(existing[f.name], "shared", None) == shared:
                continue
            raise ValueError(f"option {flag_of(f)} of {cls.__name__} is declared twice on {parser.prog}")
        names, kw = _argument(f, tp, optional)
        action = parser.add_argument(*names, **kw)
        action.shared = shared
        existing[f.name] = action


def _coerce(value: Any, tp: Any) -> Any:
    if isinstance(value, list) and (typing.get_origin(tp) or tp) is tuple:
        return tuple(value)
    return value


def _values_from_args(cls: type, args: argparse.Namespace, skip: Sequence[str], overrides: Mapping[str, Any]) -> dict:
    values: Dict[str, Any] = {}
    for f, tp, optional in _fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif _is_config(tp):
            values[f.name] = tp(**_values_from_args(tp, args, skip, overrides))
        elif f.metadata.get("cli", True) and f.name not in skip:
            value = _coerce(getattr(args, f.name), tp)
            check_value(f, value, flag_of(f), optional=optional)
            values[f.name] = value
    return values


def config_from_args(cls: type, args: argparse.Namespace, *, skip: Sequence[str] = (), **overrides: Any):
    """Build ``cls`` from parsed ``args`` (as added by :func:`add_config_args` with the
    same ``skip``). Each value is range-checked first, with errors naming its flag;
    then the config's own :meth:`Config.validate` runs. ``overrides`` set fields directly."""
    cfg = cls(**_values_from_args(cls, args, skip, overrides))
    if isinstance(cfg, Config):
        cfg.validate()
    return cfg


def add_group(subparsers: Any, name: str, help: str, description: Optional[str] = None) -> Any:
    """``difflab NAME COMMAND ...``: a group parser; returns its subparsers."""
    group = subparsers.add_parser(name, help=help, description=description or help, allow_abbrev=False)
    return group.add_subparsers(dest="command", metavar="COMMAND", required=True)


def add_command(subparsers: Any, name: str, handler: Callable[[argparse.Namespace], int], configs: Sequence[type],
                *, help: str, description: Optional[str] = None, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """One command: its options come from ``configs`` (in order); ``handler(args)`` runs it."""
    p = subparsers.add_parser(name, help=help, description=description or help, allow_abbrev=False)
    for cls in configs:
        add_config_args(p, cls, skip=skip)
    p.set_defaults(func=handler)
    return p


# ----------------------------------------------------------------------------- shared options
def _device_complaint(v: Any) -> Optional[str]:
    return None if isinstance(v, str) and _DEVICE.fullmatch(v) else "must be auto, cpu, cuda or cuda:N"


def device_option(note: str = "") -> Any:
    """``--device``: auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    return option("auto", "where to compute: auto (cuda when available, else cpu), cpu, cuda or cuda:N" + note,
                  check=_device_complaint, metavar="DEVICE", shared="device")


def seed_option() -> Any:
    """``--seed``: every random draw of the command follows from it."""
    return option(0, "seed of every random draw; the same seed gives the same output", minimum=0, shared="seed")


def min_lr_ratio_option() -> Any:
    """``--min-lr-ratio`` of a trainer with warm-up and cosine decay (:func:`difflab.training.cosine_lr`)."""
    return option(0.05, "the cosine decay ends at this fraction of --lr", minimum=0.0, maximum=1.0)


def grad_clip_option() -> Any:
    """``--grad-clip`` of a trainer (:func:`difflab.training.optimizer_step`)."""
    return option(1.0, "clip the gradient norm to this (0: no clipping)", minimum=0.0)


def mixed_precision_option() -> Any:
    """``--mixed-precision`` of a trainer (Accelerate's names)."""
    return option("no", "Accelerate mixed precision: no, fp16 or bf16 (fp16 and bf16 on a GPU)",
                   choices=MIXED_PRECISION, shared="mixed_precision")


def quiet_option() -> Any:
    """``--quiet``: no progress bars."""
    return option(False, "no progress bars", shared="quiet")


def out_option(help: str, default: Any = MISSING) -> Any:
    """``--out``: what the command writes (required unless a default is given)."""
    return option(default, help, metavar="OUT")


def overwrite_option(note: str = "") -> Any:
    """``--overwrite`` of every command that writes a set of files to --out: without it an
    --out that already holds files is refused; with it that output is replaced whole."""
    return option(False, "replace an output folder that already holds files" + note, shared="overwrite")


def resume_option() -> Any:
    """``--resume`` of every trainer."""
    return option(False, "continue the earlier run that wrote --out from the newest state it saved "
                  "(without --resume, an --out that holds a run is refused)", shared="resume")


@dataclass(kw_only=True)
class DigitDataRun(Config):
    """What the trainers on the course's digit data share (``digits train``, ``t2i train``);
    each adds its own ``--out``."""

    data: str = option(help="folder in the course layout: mnistm/ and svhn/ with train.csv and data/")
    resume: bool = resume_option()
    quiet: bool = quiet_option()


def guidance_scale_option(default: float, note: str = "") -> Any:
    """``--guidance-scale S`` (SD and diffusers' convention: 1 = no guidance)."""
    return option(default, "classifier-free guidance scale S: eps = eps_uncond + S (eps_cond - eps_uncond); "
                  "S = 1 is no guidance" + note, minimum=0.0, metavar="S", shared="guidance_scale")


@dataclass
class Threads(Config):
    """``--threads`` of every command that computes; the CLI applies it once, before the
    command runs (``torch.set_num_threads``)."""

    threads: Optional[int] = option(None, "torch CPU threads (torch.set_num_threads); none: torch's choice",
                                    minimum=1, metavar="N", shared="threads")
