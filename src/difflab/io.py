"""Everything difflab reads from or writes to disk, one copy each.

- atomic writes (``atomic_path``, ``staged_dir``) and JSON;
- our own weights: safetensors, loaded strictly (``load_state_strict`` names every
  mismatch); foreign PyTorch pickles through one safe reader (``load_torch_state``);
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

import codecs
import collections
import contextlib
import functools
import inspect
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tempfile
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

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


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def load_json(path: PathLike) -> Any:
    """A JSON file; invalid JSON and a key given twice in one object (the second would
    silently win) are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except _DuplicateKey as e:
        raise ValueError(f"{path}: key {e.args[0]!r} appears twice in one object") from None


def _safetensors_api() -> Optional[Tuple[Callable, Callable]]:
    """``safetensors.torch``'s ``(load_file, save_file)``, or None when the package cannot
    be imported (missing, or built for another torch): then ``_read_safetensors`` and
    ``_write_safetensors`` below read and write the same format."""
    try:
        from safetensors.torch import load_file, save_file
    except Exception:
        return None
    return load_file, save_file


def save_tensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat name -> tensor mapping as safetensors, atomically (with the safetensors
    package when it imports, else with ``_write_safetensors``, which writes the same bytes)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) if metadata else None
    api = _safetensors_api()
    if api is None:
        header, order = _safetensors_header(clean, meta, path)
        with atomic_path(path) as tmp:
            _write_safetensors(tmp, header, [clean[k] for k in order])
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
        tensors = _read_safetensors(path)[0]
        try:
            return {k: v.to(device) for k, v in tensors.items()} if torch.device(device).type != "cpu" else tensors
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {path}: {_first_line(e)}") from None
    try:
        return api[0](str(path), device=str(device))
    except Exception as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None


# ------------------------------------------------------ safetensors without the package
# The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
# ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
# padded with spaces, then the little-endian data buffer the offsets point into.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_ST_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _ST_DTYPES.items()}
# Read as: numpy has no bfloat16, and bool bytes are checked to be 0 or 1.
_ST_RAW = {"BF16": torch.int16, "BOOL": torch.uint8}
# The reference writer's entry order: descending dtype (its enum order), then name.
_ST_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
_ST_MAX_HEADER = 100_000_000  # the reference reader's limit


def _st_error(path: PathLike, reason: str) -> ValueError:
    return ValueError(f"cannot read safetensors file {path}: {reason}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _st_header(f, size: int, path: Path) -> Tuple[dict, int]:
    """The parsed JSON header of an open safetensors file of ``size`` bytes, and the
    length of the data buffer after it. Reads at most ``size`` bytes."""
    if size < 8:
        raise _st_error(path, f"the file is {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise _st_error(path, f"the header length {n} is larger than the {size - 8} bytes after it")
    if n > _ST_MAX_HEADER:
        raise _st_error(path, f"the header length {n} is over the limit of {_ST_MAX_HEADER} bytes")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise _st_error(path, "the header is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _st_error(path, f"the header is not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise _st_error(path, f"the header names {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise _st_error(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - n


def _st_metadata(header: dict, path: Path) -> dict[str, str]:
    """Pop and check ``__metadata__`` (absent, null, or an object of strings)."""
    meta = header.pop("__metadata__", None)
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _st_error(path, "__metadata__ must be an object whose values are strings")
    return meta


def _st_entry(name: str, info: Any, buffer_len: int, path: Path) -> Tuple[str, str, list, int, int]:
    """One header entry, checked: known dtype, a shape of non-negative ints, and
    ``[begin, end]`` offsets inside the buffer spanning exactly numel * itemsize bytes."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise _st_error(path, f"entry {name!r} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise _st_error(path, f"entry {name!r} has dtype {dtype!r}; known: {', '.join(_ST_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _st_error(path, f"entry {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _st_error(path, f"entry {name!r} has data_offsets {offsets!r}; expected [begin, end] integers")
    begin, end = offsets
    need = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if end < begin or end - begin != need:
        raise _st_error(path, f"entry {name!r} spans bytes {begin}..{end}, but shape {shape} of {dtype} "
                              f"needs {need} bytes")
    if end > buffer_len:
        raise _st_error(path, f"entry {name!r} spans bytes {begin}..{end}, beyond the {buffer_len}-byte data buffer")
    return name, dtype, shape, begin, end


def _st_entries(header: dict, buffer_len: int, path: Path) -> list:
    """The checked entries in offset order; like the reference reader, they must tile
    the data buffer exactly (no gap, no overlap, nothing after the last)."""
    entries = sorted((_st_entry(name, info, buffer_len, path) for name, info in header.items()),
                     key=lambda e: (e[3], e[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            what = "overlaps the entry before it" if begin < position else f"leaves bytes {position}..{begin} unused"
            raise _st_error(path, f"entry {name!r} starts at byte {begin} and {what}")
        position = end
    if position != buffer_len:
        raise _st_error(path, f"{buffer_len - position} bytes of the data buffer belong to no entry")
    return entries


def _st_read_entry(f, start: int, entry: tuple, path: Path) -> Tensor:
    """Read one checked entry into a new, writable, contiguous tensor."""
    name, dtype, shape, begin, end = entry
    raw = torch.empty(shape, dtype=_ST_RAW.get(dtype, _ST_DTYPES[dtype]))
    flat = raw.numpy().reshape(-1)
    f.seek(start + begin)
    got = f.readinto(flat.view(np.uint8))
    if got != end - begin:
        raise _st_error(path, f"entry {name!r}: the file ended after {got} of its {end - begin} bytes")
    if sys.byteorder == "big":
        flat.byteswap(inplace=True)
    if dtype == "BF16":
        return raw.view(torch.bfloat16)
    if dtype == "BOOL":
        if raw.numel() and int(raw.max()) > 1:
            raise _st_error(path, f"entry {name!r} is BOOL but holds bytes other than 0 and 1")
        return raw.bool()
    return raw


def _read_safetensors(path: Path) -> Tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors (on the CPU, in offset order) and metadata, read
    without the safetensors package. Everything is checked against the file's size
    before anything is allocated, so memory stays bounded by the file; any fault is one
    ``ValueError`` naming the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, buffer_len = _st_header(f, size, path)
            metadata = _st_metadata(header, path)
            entries = _st_entries(header, buffer_len, path)
            start = size - buffer_len
            return {e[0]: _st_read_entry(f, start, e, path) for e in entries}, metadata
    except OSError as e:
        raise _st_error(path, e.strerror or str(e)) from None


def _safetensors_header(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]],
                        path: PathLike) -> Tuple[bytes, list]:
    """The header bytes (length prefix included) the reference writer produces for
    ``tensors``, and the names in data order. Metadata keys are written sorted (the
    reference writes them in hash order, so files with two or more keys differ from its
    output in that order only)."""
    def fail(reason: str) -> ValueError:
        return ValueError(f"cannot write safetensors file {path}: {reason}")

    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise fail(f"tensor name {name!r} is not allowed")
        if not isinstance(t, Tensor) or t.dtype not in _ST_NAMES:
            raise fail(f"entry {name!r} is a {getattr(t, 'dtype', type(t).__name__)}; supported: "
                       + ", ".join(str(d) for d in _ST_NAMES))
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise fail("metadata must map strings to strings")
    order = sorted(tensors, key=lambda k: (_ST_ORDER.index(_ST_NAMES[tensors[k].dtype]), k))
    header: dict = {} if metadata is None else {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _write_safetensors(path: Path, header: bytes, tensors: Sequence[Tensor]) -> None:
    """Write ``header`` and then each tensor's bytes, little-endian, in order."""
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            t = t.detach().cpu().contiguous()
            flat = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1)
            if sys.byteorder == "big":
                flat = flat.byteswap()
            f.write(flat.view(np.uint8))


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


@contextlib.contextmanager
def _on_meta_device() -> Iterator[None]:
    """Tensors made in the block without a device go to the meta device (no memory).
    ``with torch.device("meta")`` where torch has it; else the ``_META_FACTORIES`` of the
    ``torch`` module default to ``device="meta"`` for the block's duration (a process-wide
    change: check_fits runs nothing else meanwhile)."""
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


def check_fits(build: Callable[[], nn.Module], state: Mapping[str, Tensor], source: PathLike) -> None:
    """Build a network with ``build()`` on the meta device (no memory, no init) and raise
    ValueError naming ``source`` unless ``state`` fits it exactly. Call it before building
    the real network from sizes read off a file: widths that claim a network far larger
    than the file's weights are then refused instead of allocated."""
    with _on_meta_device():
        shell = build()
    problem = describe_mismatch(shell, state)
    if problem:
        have = sum(v.numel() for v in state.values())
        want = sum(v.numel() for v in shell.state_dict().values())
        raise ValueError(f"{source} does not fit {type(shell).__name__}: {problem} (the network its config "
                         f"describes has {want} values, the file {have})")


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
class _Inert:
    """Stand-in for a non-tensor Python object inside a checkpoint pickle.

    Calling or building it runs no code from the file; its state is dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert_global(fullname: str):
    module, _, qualname = fullname.rpartition(".")
    cls = type(qualname or "Inert", (_Inert,), {"__module__": module or "__inert__"})
    return (cls, fullname)


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


# torch.load has ``weights_only`` from torch 1.13. Without it (the course's torch 1.11)
# every torch.load here goes through ``_restricted_torch_load``; tests set
# ``_USE_RESTRICTED_UNPICKLER`` to run that path on a newer torch too.
_TORCH_HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters
_USE_RESTRICTED_UNPICKLER = not _TORCH_HAS_WEIGHTS_ONLY

_TYPED_STORAGES = tuple(t for t in (getattr(torch.storage, "TypedStorage", None),
                                    getattr(torch.storage, "_TypedStorage", None)) if isinstance(t, type))
_DTYPE_NAMES = frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))
# Storage classes (torch.FloatStorage, ...) are not listed: torch.load's own Unpickler
# subclass resolves every name holding "Storage" that it knows to a dtype carrier before
# ``find_class`` is asked (torch 1.11 and 2.x alike), so only unknown ones reach it, and
# the real classes, called from a pickle, would allocate any size asked.
# Containers pickle protocol 2 (torch.save's) spells as calls: OrderedDict (every
# state_dict), set and frozenset, and _codecs.encode, which is how it writes bytes.
_SAFE_PLAIN = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
               ("builtins", "frozenset"): frozenset, ("_codecs", "encode"): codecs.encode}


def _check_tensor_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
    """Refuse a pickled tensor whose storage is not a storage, whose shape, stride or
    offset are not non-negative integers, or which reaches past its storage: torch's
    rebuild would grow the storage to fit, allocating whatever the file claims."""
    if not isinstance(storage, _TYPED_STORAGES):
        raise pickle.UnpicklingError(f"a tensor is built on a {type(storage).__name__}, not a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(_is_count(v) for v in (offset, *size, *stride))):
        raise pickle.UnpicklingError(f"a tensor has a malformed shape {size!r}, stride {stride!r} or offset {offset!r}")
    with warnings.catch_warnings():  # TypedStorage.size() warns of its deprecation on torch 2.x
        warnings.simplefilter("ignore")
        have = storage.size()
    reach = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if reach > have:
        raise pickle.UnpicklingError(f"a tensor of shape {list(size)} reaches element {reach} of a storage "
                                     f"holding {have}")


def _bounded_rebuilder(rebuild: Callable) -> Callable:
    """``torch._utils._rebuild_tensor[_v2]`` behind ``_check_tensor_view``."""
    def checked(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> Tensor:
        _check_tensor_view(storage, storage_offset, size, stride)
        return rebuild(storage, storage_offset, tuple(size), tuple(stride), *rest)
    return checked


# Tensor rebuilders (checked) and parameter rebuilders: these wrap an already built
# tensor, set requires_grad and attributes whose values passed this same filter.
# Quantized tensors (_rebuild_qtensor) are left out: no file difflab reads holds them.
_SAFE_REBUILDERS = {name: _bounded_rebuilder(getattr(torch._utils, name))
                    for name in ("_rebuild_tensor", "_rebuild_tensor_v2")}
_SAFE_REBUILDERS.update({name: getattr(torch._utils, name) for name in ("_rebuild_parameter",
                         "_rebuild_parameter_with_state") if hasattr(torch._utils, name)})


def _allowed_global(module: str, name: str) -> Any:
    """What ``module.name`` in a weights pickle resolves to, or None when refused."""
    if module == "torch._utils":
        return _SAFE_REBUILDERS.get(name)
    if module == "torch" and (name in ("Size", "device") or name in _DTYPE_NAMES):
        return getattr(torch, name, None)
    return _SAFE_PLAIN.get((module, name))


def _check_storage_id(saved_id: tuple, file_size: int, records: Optional[dict], seen: dict) -> None:
    """Refuse a storage the file cannot hold before torch allocates it: in the zip format
    its record must hold exactly the claimed bytes; in the legacy format all storages
    together must fit in the file. Views (legacy format) must lie inside their storage."""
    kind = saved_id[0].decode("ascii", "replace") if isinstance(saved_id[0], bytes) else saved_id[0]
    if kind != "storage" or len(saved_id) not in (5, 6):
        raise pickle.UnpicklingError(f"unexpected persistent id {str(saved_id)[:80]}")
    dtype, key, numel = getattr(saved_id[1], "dtype", None), saved_id[2], saved_id[4]
    if not isinstance(dtype, torch.dtype) or not _is_count(numel) or not isinstance(key, (str, int)):
        raise pickle.UnpicklingError(f"malformed storage id {str(saved_id)[:80]}")
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if records is not None and records.get(f"data/{key}") != nbytes:
        raise pickle.UnpicklingError(f"storage {key!r} claims {nbytes} bytes, the file's record holds "
                                     f"{records.get(f'data/{key}', 'none')}")
    seen[key] = nbytes
    if records is None and sum(seen.values()) > file_size:
        raise pickle.UnpicklingError(f"the storages claim {sum(seen.values())} bytes, more than the "
                                     f"{file_size}-byte file")
    view = saved_id[5] if len(saved_id) == 6 else None
    if view is not None and not (isinstance(view, tuple) and len(view) == 3 and _is_count(view[1])
                                 and _is_count(view[2]) and view[1] + view[2] <= numel):
        raise pickle.UnpicklingError(f"storage view {view!r} does not lie inside its storage of {numel}")


def _restricted_pickle(inert: bool, file_size: int, records: Optional[dict]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module to pass as ``torch.load(pickle_module=...)``.
    torch subclasses its ``Unpickler``, resolves storage types itself and hands every
    other global to ``find_class``, which admits only ``_allowed_global``'s list; other
    globals are an ``UnpicklingError`` naming them, or with ``inert`` an ``_Inert`` class.
    The ``persistent_load`` torch installs is wrapped in ``_check_storage_id``."""
    seen: dict = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module = "builtins" if module == "__builtin__" else module  # protocol 2's spelling
            found = _allowed_global(module, name)
            if found is not None:
                return found
            if inert:
                return _inert_global(f"{module}.{name}")[0]
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a weights file "
                                         "may hold only tensors and plain containers")

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "persistent_load" and callable(value):
                value = _checked_persistent_load(value, file_size, records, seen)
            super().__setattr__(name, value)

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("difflab_restricted_pickle")
    module.Unpickler, module.load, module.UnpicklingError = Unpickler, load, pickle.UnpicklingError
    return module


def _checked_persistent_load(load: Callable, file_size: int, records: Optional[dict], seen: dict) -> Callable:
    def persistent_load(saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple):  # only the tar format of early torch releases has others
            raise pickle.UnpicklingError(f"unexpected persistent id {str(saved_id)[:80]} (torch's early tar "
                                         "format is not read)")
        _check_storage_id(saved_id, file_size, records, seen)
        return load(saved_id)
    return persistent_load


def _zip_records(path: Path) -> Optional[dict[str, int]]:
    """For a zip-format torch file, its records' sizes by name below the archive folder
    ('data/0', ...); None for other files. A TorchScript archive is refused: torch.load
    would hand it to torch.jit.load."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # what torch.load tests to choose the zip reader
            return None
    try:
        with zipfile.ZipFile(path) as z:
            records = {info.filename.split("/", 1)[-1]: info.file_size for info in z.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise pickle.UnpicklingError(f"not a readable zip archive: {e}") from None
    if "constants.pkl" in records:
        raise pickle.UnpicklingError("a TorchScript archive, not a file of weights (load it with torch.jit.load "
                                     "if you trust it)")
    return records


def _restricted_torch_load(path: Path, inert: bool = False) -> Any:
    """``torch.load`` on the CPU through ``_restricted_pickle``: the safe reader where
    torch has no ``weights_only``. Refusals are ``pickle.UnpicklingError``."""
    module = _restricted_pickle(inert, os.path.getsize(path), _zip_records(path))
    extra = {"weights_only": False} if _TORCH_HAS_WEIGHTS_ONLY else {}  # the check is ours here
    return torch.load(str(path), map_location="cpu", pickle_module=module, **extra)


def _safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, or ``_restricted_torch_load``."""
    if _USE_RESTRICTED_UNPICKLER:
        return _restricted_torch_load(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _inert_torch_load(path: Path, first: BaseException) -> Any:
    """``_restricted_torch_load`` with refused globals replaced by inert classes."""
    try:
        return _restricted_torch_load(path, inert=True)
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path} safely: the restricted unpickler refused it ({_first_line(first)}), "
            f"and replacing the pickled objects by inert placeholders failed too ({_first_line(e)}). "
            "Convert it to .safetensors in an environment you trust."
        ) from None


def _torch_load(path: Path, inert_fallback: bool) -> Any:
    """``_safe_torch_load``. With ``inert_fallback``, globals the safe unpickler refuses
    (trainer callbacks pickled beside SD weights) are replaced by classes that run no
    code: with ``weights_only``, they are listed without loading and the file is loaded
    again under ``safe_globals`` (torch 2.4+); otherwise by ``_inert_torch_load``."""
    try:
        return _safe_torch_load(path)
    except pickle.UnpicklingError as first:
        if not inert_fallback:
            raise ValueError(f"cannot read {path} as a PyTorch state dict: UnpicklingError: {_first_line(first)}") from None
        if _USE_RESTRICTED_UNPICKLER or not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            return _inert_torch_load(path, first)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {path}: {e}") from None
        try:
            with torch.serialization.safe_globals([_inert_global(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"cannot read checkpoint {path} safely: torch.load(weights_only=True) refused it "
                f"({_first_line(first)}), and replacing the pickled objects {names} by inert "
                f"placeholders failed too ({e}). Convert it to .safetensors in an environment you trust."
            ) from None
    except Exception as e:  # RuntimeError (not a zip/pickle), EOFError, ...
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {type(e).__name__}: {_first_line(e)}") from None


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
    """One tensor saved with ``torch.save``, read safely (``_safe_torch_load``, on the
    CPU) and bounded: a tensor larger than what the file stores, or than
    ``max_elements`` (default 2**26, 256 MB of float32), is refused before anything is
    computed from it. Errors name ``path`` and ``what``; ``expected`` describes the
    tensor wanted when the file holds something else ("a [3, H, W] float tensor")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        obj = _safe_torch_load(path)
    except Exception as e:
        raise ValueError(f"{path}: expected a tensor saved with torch.save ({what}), cannot read it: "
                         f"{type(e).__name__}: {_first_line(e)}") from None
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
        obj = _torch_load(path, inert_fallback)
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
