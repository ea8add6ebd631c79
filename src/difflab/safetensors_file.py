"""The safetensors file format, read and written without the safetensors package (the
course's grading environment may lack it); ``difflab.io`` uses the package when it imports.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
padded with spaces, then the little-endian data buffer the offsets point into.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]


class DuplicateKey(Exception):
    pass


def no_duplicate_keys(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


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
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError:
        raise _st_error(path, "the header is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _st_error(path, f"the header is not valid JSON ({e})") from None
    except DuplicateKey as e:
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


def read_safetensors(path: Path) -> Tuple[dict[str, Tensor], dict[str, str]]:
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


def safetensors_header(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]],
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


def write_safetensors(path: Path, header: bytes, tensors: Sequence[Tensor]) -> None:
    """Write ``header`` and then each tensor's bytes, little-endian, in order."""
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            t = t.detach().cpu().contiguous()
            flat = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1)
            if sys.byteorder == "big":
                flat = flat.byteswap()
            f.write(flat.view(np.uint8))
