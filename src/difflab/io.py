"""Everything difflab reads from or writes to disk, one copy each.

- atomic writes (``atomic_path``, ``staged_dir``) and JSON;
- our own weights: safetensors, loaded strictly (``load_state_strict`` names every
  mismatch), with the safetensors package or, where it is missing, with
  :mod:`difflab.safetensors_file`; foreign PyTorch pickles through one safe reader
  (``load_torch_state``, on :mod:`difflab.pickles`: ``weights_only`` or, on torch < 1.13,
  a restricted unpickler);
- images: the one suffix list, listing, opening with an error that names the file,
  tensor <-> PNG with torchvision ``save_image`` rounding, grids;
- caption/prompt template files (``read_templates``) and the course ``input.json``
  (``read_course_json``, one ``Concept``);
- checks before the expensive work: outputs that can be written (``check_output``) and
  hold no earlier run's files (``check_fresh_output``),
  values that are finite (``check_finite``), tensors no larger than what the file
  stores (``check_tensor_size``, ``load_tensor_file``).

``save_image`` semantics: a float image in [0, 1] becomes
``uint8(clamp(x * 255 + 0.5, 0, 255))`` (round half up, then truncate).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from difflab.pickles import first_line, safe_torch_load, torch_load
from difflab.safetensors_file import DuplicateKey, no_duplicate_keys, read_safetensors, safetensors_header, write_safetensors

PathLike = Union[str, os.PathLike]


class InputWarning(UserWarning):
    """Input that is used, but not all of it (words cut from a prompt, ...); the CLI
    prints it as one ``difflab: warning: ...`` line."""


# Every image reader of the project lists these (any case): the course grader's
# extensions plus .webp for concept photos.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash or exception inside the block leaves ``path`` untouched and removes the
    temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_dir(final: Path, prefix: Optional[str] = None) -> Iterator[Path]:
    """A temporary folder beside ``final`` (named ``prefix`` + random) to write into; on
    success it replaces ``final`` in one rename, on error it is removed and ``final`` is
    left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------- output checks
def check_output(path: PathLike, kind: str = "dir", what: str = "output") -> Path:
    """Check, before any expensive work, that ``path`` can be written as a folder
    (``kind="dir"``) or a file (``kind="file"``): it is not the other kind, no folder
    above it is a file, it is not a dangling or looping link, and the nearest existing
    folder accepts a new file (probed with a temporary file that is removed at once).
    Errors name ``what`` and the path; returns ``path``."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path)
    if os.path.lexists(path) and not os.path.exists(path):
        raise ValueError(f"{what} {path} is a broken symbolic link or a symbolic-link loop")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise ValueError(f"{what} {path} is a file; expected a folder")
        if kind == "file" and path.is_dir():
            raise ValueError(f"{what} {path} is a folder; expected a file path")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        if os.path.lexists(existing):
            raise ValueError(f"{what} {path}: {existing} is a broken symbolic link or a symbolic-link loop")
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} lies under {existing}, which is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".difflab-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {existing}: {e.strerror or e}") from None
    return path


def check_fresh_output(path: PathLike, what: str = "output", overwrite: bool = False) -> Path:
    """Refuse (FileExistsError) an output folder that already holds files, unless
    ``overwrite``: a command writes its whole set and never mixes it with an earlier
    run's files. The message names ``what``, the folder and a file in it; returns ``path``.
    ``overwrite`` never replaces the working folder, one of its parents or the home folder."""
    path = Path(path)
    if overwrite and path.is_dir():
        here, target = Path.cwd().resolve(), path.resolve()
        if target == here or target in here.parents or target == Path.home().resolve():
            raise ValueError(f"{what} {path} is the working folder, one of its parents or the home folder; "
                             "--overwrite replaces a folder whole, so give a folder of its own")
    if overwrite or not path.is_dir():
        return path
    held = sorted(os.listdir(path))
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise FileExistsError(f"{what} {path} already holds files ({shown}); pass --overwrite to replace the folder "
                              "whole, or choose another output folder")
    return path


# ----------------------------------------------------------------- JSON and weights
def save_json(obj: Any, path: PathLike) -> None:
    """Write JSON atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: PathLike) -> Any:
    """A JSON file; invalid JSON and a key given twice in one object (the second would
    silently win) are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except DuplicateKey as e:
        raise ValueError(f"{path}: key {e.args[0]!r} appears twice in one object") from None


def _safetensors_api() -> Optional[Tuple[Callable, Callable]]:
    """``safetensors.torch``'s ``(load_file, save_file)``, or None when the package cannot
    be imported (missing, or built for another torch): then ``read_safetensors`` and
    ``write_safetensors`` below read and write the same format."""
    try:
        from safetensors.torch import load_file, save_file
    except Exception:
        return None
    return load_file, save_file


def save_tensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat name -> tensor mapping as safetensors, atomically (with the safetensors
    package when it imports, else with ``write_safetensors``, which writes the same bytes)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) if metadata else None
    api = _safetensors_api()
    if api is None:
        header, order = safetensors_header(clean, meta, path)
        with atomic_path(path) as tmp:
            write_safetensors(tmp, header, [clean[k] for k in order])
        return
    with atomic_path(path) as tmp:
        api[1](clean, str(tmp), metadata=meta)


def load_tensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file, in the file's order, on ``device``. Any fault is
    one ``ValueError("cannot read safetensors file PATH: ...")``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    api = _safetensors_api()
    if api is None:
        tensors = read_safetensors(path)[0]
        try:
            return {k: v.to(device) for k, v in tensors.items()} if torch.device(device).type != "cpu" else tensors
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {path}: {first_line(e)}") from None
    try:
        return api[0](str(path), device=str(device))
    except Exception as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None


def describe_mismatch(module: nn.Module, state: Mapping[str, Tensor]) -> str:
    """A readable account of how ``state`` fails to fit ``module`` ('' when it fits)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    parts = []

    def show(title, items):
        if items:
            head = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            parts.append(f"{title} ({len(items)}): {head}")

    show("missing keys", missing)
    show("unexpected keys", unexpected)
    show("shape conflicts", shapes)
    return "; ".join(parts)


def check_finite(tensors: Mapping[str, Tensor], source: Any, what: str = "tensor") -> None:
    """Raise ValueError naming ``source`` and the first entry that holds NaN or an
    infinity (a network with such weights computes garbage without an error)."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source}: {what} {name!r} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")


# ``with torch.device(...)`` exists from torch 2.0; tests flip this to run the fallback.
_DEVICE_IS_CONTEXT = hasattr(torch.device, "__enter__")
# The factory functions (called as ``torch.<name>``) that modules use for their
# parameters and buffers and that have meta kernels on torch 1.11 (``eye`` has none).
_META_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "linspace",
                   "logspace", "tensor")


def _default_to_meta(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def on_meta(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return factory(*args, **kwargs)
    return on_meta


def _skip_init(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return tensor


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers return their tensor untouched in the block."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, _skip_init)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Tensors made in the block without a device go to the meta device (no memory), and
    ``torch.nn.init``'s initialisers do nothing: a meta tensor holds no values, and torch's
    meta kernels for random fills are Python that takes over a second to import on first
    use (most of a small network's load time). ``with torch.device("meta")`` where torch
    has it; else the ``_META_FACTORIES`` of the ``torch`` module default to
    ``device="meta"``. Both changes are process-wide for the block's duration: the block
    builds one network and runs nothing else."""
    with _initialisers_skipped():
        if _DEVICE_IS_CONTEXT:
            with torch.device("meta"):
                yield
            return
        saved = {name: getattr(torch, name) for name in _META_FACTORIES}
        try:
            for name, factory in saved.items():
                setattr(torch, name, _default_to_meta(factory))
            yield
        finally:
            for name, factory in saved.items():
                setattr(torch, name, factory)


def check_fits(build: Callable[[], nn.Module], state: Mapping[str, Tensor], source: PathLike) -> nn.Module:
    """Build a network with ``build()`` on the meta device (no memory, no init) and raise
    ValueError naming ``source`` unless ``state`` fits it exactly; return that meta shell.
    Call it before building the real network from sizes read off a file: widths that
    claim a network far larger than the file's weights are then refused instead of
    allocated."""
    with meta_device():
        shell = build()
    problem = describe_mismatch(shell, state)
    if problem:
        have = sum(v.numel() for v in state.values())
        want = sum(v.numel() for v in shell.state_dict().values())
        raise ValueError(f"{source} does not fit {type(shell).__name__}: {problem} (the network its config "
                         f"describes has {want} values, the file {have})")
    return shell


def assign_state(build: Callable[[], nn.Module], state: Mapping[str, Tensor], source: PathLike) -> nn.Module:
    """The network ``build()`` makes, holding ``state``'s own tensors: built on the meta
    device (no memory, no random init), checked to fit ``state`` exactly (as
    ``check_fits``) and to be finite, then each parameter and buffer replaced by the
    file's tensor, with no copy (a tensor of another dtype is converted, as
    ``load_state_dict`` would). What ``load_state_dict(assign=True)`` (torch 2.1+) does,
    on any torch: a multi-GB network then costs its weights once, not twice."""
    module = check_fits(build, state, source)
    check_finite(state, source, "weight")
    dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    for name, tensor in state.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        # As load_state_dict's copy: the network's dtype, a dense layout (no-ops when the
        # file's tensor already has them, which is the usual case: no copy then).
        tensor = tensor.to(dtypes[name]).contiguous()
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            sub._buffers[leaf] = tensor
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{source}: {type(module).__name__} keeps {len(left)} tensors the file does not hold, "
                         f"e.g. {left[0]} (a buffer outside its state dict)")
    return module


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: PathLike) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and every mismatch;
    weights holding NaN or infinities are refused too."""
    problem = describe_mismatch(module, state)
    if problem:
        raise ValueError(f"{source} does not fit {type(module).__name__}: {problem}")
    check_finite(state, source, "weight")
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------ images
def to_uint8(img: Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, C] uint8 with save_image rounding (C = 1 or 3).
    An image holding NaN or infinities is an error (it would become black pixels)."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a [C, H, W] image with C in (1, 3), got shape {tuple(img.shape)}")
    if img.is_floating_point() and not bool(torch.isfinite(img).all()):
        bad = int((~torch.isfinite(img)).sum())
        raise ValueError(f"the image holds {bad} NaN or infinite values (the network's output is not a number); "
                         "nothing is saved")
    arr = img.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def from_uint8(arr: np.ndarray) -> Tensor:
    """[H, W, C] uint8 -> [C, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float().div_(255)


def minmax_normalize(x: Tensor) -> Tensor:
    """Per-image min-max normalisation of a [B, C, H, W] batch to [0, 1]."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def save_png(img: Tensor, path: PathLike) -> None:
    """Write one [C, H, W] image in [0, 1] as an 8-bit PNG, atomically; an image
    holding NaN is refused, naming ``path``."""
    try:
        arr = to_uint8(img)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    mode = "L" if arr.shape[2] == 1 else "RGB"
    pil = Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def open_rgb(path: PathLike) -> Image.Image:
    """Open an image file as RGB (``Image.open(p).convert('RGB')``), decoded in full; a
    missing or unreadable file is an error naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read image {path}: {e}") from None


def read_rgb(path: PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as an [H, W, 3] uint8 array; optionally check its (H, W)."""
    arr = np.asarray(open_rgb(path))
    if size is not None and arr.shape[:2] != tuple(size):
        raise ValueError(f"image {path} is {arr.shape[0]}x{arr.shape[1]}, expected {size[0]}x{size[1]}")
    return arr


def load_png(path: PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as [3, H, W] float in [0, 1]; optionally check its (H, W)."""
    return from_uint8(read_rgb(path, size))


def list_files(folder: PathLike, suffixes: Sequence[str], what: str = "folder") -> list[Path]:
    """Files directly in ``folder`` whose suffix is one of ``suffixes`` in any case
    (``01.PT`` is a ``.pt`` file), sorted by name. ``what`` names the folder in the error
    when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    wanted = {s.lower() for s in suffixes}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in wanted)


def list_images(folder: PathLike, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder`` (``IMAGE_SUFFIXES``, any case), sorted by name.
    ``what`` names the folder in the error when it does not exist."""
    return list_files(folder, IMAGE_SUFFIXES, what)


def make_grid(images: Union[Tensor, Sequence[Tensor]], nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """Tile a [B, C, H, W] batch into one [C, H', W'] image, ``nrow`` images per row,
    with ``padding`` pixels of ``pad_value`` around every tile (torchvision's layout)."""
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    if images.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = int(math.ceil(b / ncol))
    H, W = h + padding, w + padding
    grid = images.new_full((c, nrows * H + padding, ncol * W + padding), pad_value)
    for k in range(b):
        r, col = divmod(k, ncol)
        grid[:, r * H + padding : r * H + padding + h, col * W + padding : col * W + padding + w] = images[k]
    return grid


def save_grid(images: Union[Tensor, Sequence[Tensor]], path: PathLike, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> None:
    """``make_grid`` then ``save_png`` (what torchvision's ``save_image`` does with a batch)."""
    save_png(make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value), path)


# ---------------------------------------------------------------- foreign state dicts
def check_tensor_size(t: Tensor, where: str, max_elements: Optional[int] = None) -> None:
    """Refuse a tensor read from a file that claims more values than the file stores (a
    view with stride 0 or overlapping strides: a few bytes on disk can claim [3, 100000,
    100000], and the first copy allocates all of it), or more than ``max_elements``.
    ``where`` names the file and entry in the error."""
    if hasattr(t, "untyped_storage"):
        nbytes = t.untyped_storage().nbytes()
    else:  # torch < 2.0: a typed storage of the tensor's dtype
        nbytes = t.storage().size() * t.storage().element_size()
    stored = nbytes // max(t.element_size(), 1)
    shape = list(t.shape)
    if t.numel() > stored:
        raise ValueError(f"{where} claims shape {shape} ({t.numel()} values) but the file stores only {stored}; "
                         "refusing a tensor larger than its storage")
    if max_elements is not None and t.numel() > max_elements:
        raise ValueError(f"{where} has shape {shape} ({t.numel()} values), more than the {max_elements} allowed")


def load_tensor_file(path: PathLike, what: str = "tensor file", max_elements: int = 1 << 26,
                     expected: str = "a tensor") -> Tensor:
    """One tensor saved with ``torch.save``, read safely (``safe_torch_load``, on the
    CPU) and bounded: a tensor larger than what the file stores, or than
    ``max_elements`` (default 2**26, 256 MB of float32), is refused before anything is
    computed from it. Errors name ``path`` and ``what``; ``expected`` describes the
    tensor wanted when the file holds something else ("a [3, H, W] float tensor")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        obj = safe_torch_load(path)
    except Exception as e:
        raise ValueError(f"{path}: expected a tensor saved with torch.save ({what}), cannot read it: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    if not isinstance(obj, Tensor):
        raise ValueError(f"{path}: expected {expected}, got a {type(obj).__name__}")
    check_tensor_size(obj, str(path), max_elements)
    return obj


def load_torch_state(path: PathLike, what: str = "checkpoint", *, inert_fallback: bool = False,
                     drop_non_tensors: bool = False) -> dict[str, Tensor]:
    """The flat ``name -> tensor`` mapping of a foreign weights file, read safely.

    ``.safetensors`` is read directly; anything else with ``torch.load(weights_only=True)``
    or, on torch < 1.13, the restricted unpickler (see ``_torch_load`` for ``inert_fallback``).
    A top-level ``state_dict`` entry is unwrapped and a ``module.`` prefix on every key
    (DataParallel) is removed. Entries
    that are not tensors are an error, or dropped with ``drop_non_tensors``.
    ``what`` names the file's role in errors ("face UNet weights").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    if path.suffix == ".safetensors":
        obj: Any = load_tensors(path)
    else:
        obj = torch_load(path, inert_fallback)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    if drop_non_tensors:
        obj = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: expected a state dict of tensors, but {len(bad)} entries are not, e.g. {bad[0]!r}")
    for k, v in obj.items():
        check_tensor_size(v, f"{path}: entry {k!r}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------- text inputs
def parse_templates(text: str, source: str) -> Tuple[str, ...]:
    """Templates, one per line, each with exactly one ``{}`` (where the token or class
    name goes) and no other braces; blank lines and lines starting with ``#`` are
    skipped. ``source`` names the file in errors."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
            raise ValueError(f"{source}, line {n}: a template needs exactly one '{{}}' and no other braces, got {line!r}")
        out.append(line)
    if not out:
        raise ValueError(f"templates file {source} has no templates")
    return tuple(out)


def read_templates(path: PathLike) -> Tuple[str, ...]:
    """Templates from a text file (``parse_templates``'s format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file not found: {path}")
    return parse_templates(path.read_text(encoding="utf-8"), str(path))


@dataclass(frozen=True)
class Concept:
    """One concept of the course ``input.json``.

    ``prompts`` (``prompt``) hold the concept token and are what generation draws;
    ``eval_prompts`` (``prompt_4_clip_eval``) and ``baselines`` ([image, text] per
    prompt) are what CLIP scoring needs; ``src_image`` names the reference folder.
    """

    key: str
    token: str
    prompts: Tuple[str, ...]
    src_image: str
    eval_prompts: Tuple[str, ...] = ()
    baselines: Tuple[Tuple[float, float], ...] = ()


def _folder_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be one folder name inside an output folder (None if it can)."""
    if not name or not name.strip():
        return "it is empty"
    if any(c in name for c in "/\\"):
        return "it holds a path separator"
    if name in (".", ".."):
        return "it names a folder outside"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    return None


def _string_list(value: Any, where: str, name: str) -> Tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where}: {name!r} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _course_concept(path: Path, key: str, entry: Any, need: str) -> Concept:
    where = f"{path}: concept {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    problem = _folder_name_problem(key)
    if problem:
        raise ValueError(f"{path}: concept key {key!r} cannot be a folder name: {problem}")
    required = ("token_name", "prompt") if need == "generate" else ("prompt_4_clip_eval", "baseline")
    for name in required:
        if name not in entry:
            raise ValueError(f"{where} has no {name!r} (missing key {name!r} of the course format)")
    token = entry.get("token_name", "")
    if "token_name" in entry and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"{where}: 'token_name' must be a non-empty string, got {token!r}")
    prompts = _string_list(entry["prompt"], where, "prompt") if "prompt" in entry else ()
    eval_prompts, pairs = (), ()
    if "prompt_4_clip_eval" in entry:
        eval_prompts = _string_list(entry["prompt_4_clip_eval"], where, "prompt_4_clip_eval")
    if "baseline" in entry:
        base = entry["baseline"]
        if not isinstance(base, list) or len(base) != len(eval_prompts):
            raise ValueError(f"{where}: 'baseline' must hold one [image, text] pair per prompt ({len(eval_prompts)}), got {base!r}")
        for b in base:
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, (int, float)) for v in b)):
                raise ValueError(f"{where}: each baseline must be [image_baseline, text_baseline], got {b!r}")
        pairs = tuple((float(b[0]), float(b[1])) for b in base)
    src_image = entry.get("src_image", key)
    problem = _folder_name_problem(src_image) if isinstance(src_image, str) else "it is not a string"
    if problem:
        raise ValueError(f"{where}: 'src_image' must be a folder name, got {src_image!r} ({problem})")
    return Concept(key, str(token), prompts, src_image, eval_prompts, pairs)


def read_course_json(path: PathLike, need: str = "generate") -> list[Concept]:
    """The course's ``input.json``: ``{key: {"token_name", "prompt": [...], "src_image",
    "prompt_4_clip_eval": [...], "baseline": [[image, text], ...]}}``.

    :param need: ``"generate"`` checks what generation reads (``token_name``, ``prompt``),
        ``"score"`` what CLIP scoring reads (``prompt_4_clip_eval``, ``baseline``).
    """
    if need not in ("generate", "score"):
        raise ValueError(f"need must be 'generate' or 'score', got {need!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt JSON not found: {path}")
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty object of concepts, got {type(data).__name__}")
    return [_course_concept(path, str(key), entry, need) for key, entry in data.items()]


# ------------------------------------------------------------------ local model folders
def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def resolve_model_path(spec: PathLike, what: str, how_to_get: str) -> Path:
    """A model given as a local path or as a Hugging Face id (``owner/name``) that is
    already in the local Hugging Face cache (``$HF_HOME``/``$HF_HUB_CACHE``); nothing is
    downloaded. Neither: ``FileNotFoundError`` naming ``what`` and ``how_to_get``."""
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if _looks_like_hub_id(text):
        try:
            from huggingface_hub import snapshot_download

            cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at huggingface_hub's import
            return Path(snapshot_download(repo_id=text, local_files_only=True, cache_dir=cache))
        except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
            raise FileNotFoundError(
                f"{what} {text!r} is neither a local path nor in the local Hugging Face cache; {how_to_get}"
            ) from None
    raise FileNotFoundError(f"{what} not found: {path}; {how_to_get}")
