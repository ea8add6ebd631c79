"""PyTorch pickles read without running code from them.

``torch.load(weights_only=True)`` where torch has it (1.13 and later); otherwise (the
course's torch 1.11) a restricted unpickler passed as ``torch.load``'s ``pickle_module``,
which admits tensors, their storages and plain containers only, and bounds every storage
and tensor by what the file holds before torch allocates it. ``inert`` loading replaces
pickled Python objects (trainer callbacks beside SD weights) by classes that run nothing.
"""
from __future__ import annotations

import codecs
import collections
import inspect
import os
import pickle
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _Inert:
    """Stand-in for a non-tensor Python object inside a checkpoint pickle.

    Calling or building it runs no code from the file; its state is dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def inert_global(fullname: str):
    module, _, qualname = fullname.rpartition(".")
    cls = type(qualname or "Inert", (_Inert,), {"__module__": module or "__inert__"})
    return (cls, fullname)


def first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


# torch.load has ``weights_only`` from torch 1.13. Without it (the course's torch 1.11)
# every torch.load here goes through ``restricted_torch_load``; tests set
# ``USE_RESTRICTED_UNPICKLER`` to run that path on a newer torch too.
TORCH_HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters
USE_RESTRICTED_UNPICKLER = not TORCH_HAS_WEIGHTS_ONLY

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
                return inert_global(f"{module}.{name}")[0]
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


def restricted_torch_load(path: Path, inert: bool = False) -> Any:
    """``torch.load`` on the CPU through ``_restricted_pickle``: the safe reader where
    torch has no ``weights_only``. Refusals are ``pickle.UnpicklingError``."""
    module = _restricted_pickle(inert, os.path.getsize(path), _zip_records(path))
    extra = {"weights_only": False} if TORCH_HAS_WEIGHTS_ONLY else {}  # the check is ours here
    return torch.load(str(path), map_location="cpu", pickle_module=module, **extra)


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, or ``restricted_torch_load``."""
    if USE_RESTRICTED_UNPICKLER:
        return restricted_torch_load(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _inert_torch_load(path: Path, first: BaseException) -> Any:
    """``restricted_torch_load`` with refused globals replaced by inert classes."""
    try:
        return restricted_torch_load(path, inert=True)
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path} safely: the restricted unpickler refused it ({first_line(first)}), "
            f"and replacing the pickled objects by inert placeholders failed too ({first_line(e)}). "
            "Convert it to .safetensors in an environment you trust."
        ) from None


def torch_load(path: Path, inert_fallback: bool) -> Any:
    """``safe_torch_load``. With ``inert_fallback``, globals the safe unpickler refuses
    (trainer callbacks pickled beside SD weights) are replaced by classes that run no
    code: with ``weights_only``, they are listed without loading and the file is loaded
    again under ``safe_globals`` (torch 2.4+); otherwise by ``_inert_torch_load``."""
    try:
        return safe_torch_load(path)
    except pickle.UnpicklingError as first:
        if not inert_fallback:
            raise ValueError(f"cannot read {path} as a PyTorch state dict: UnpicklingError: {first_line(first)}") from None
        if USE_RESTRICTED_UNPICKLER or not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            return _inert_torch_load(path, first)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {path}: {e}") from None
        try:
            with torch.serialization.safe_globals([inert_global(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"cannot read checkpoint {path} safely: torch.load(weights_only=True) refused it "
                f"({first_line(first)}), and replacing the pickled objects {names} by inert "
                f"placeholders failed too ({e}). Convert it to .safetensors in an environment you trust."
            ) from None
    except Exception as e:  # RuntimeError (not a zip/pickle), EOFError, ...
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {type(e).__name__}: {first_line(e)}") from None
