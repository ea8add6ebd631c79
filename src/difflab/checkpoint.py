"""Our own weights: safetensors plus a small JSON, written atomically, loaded strictly."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.imageio import atomic_path

PathLike = Union[str, os.PathLike]


def save_json(obj: Any, path: PathLike) -> None:
    """Write JSON atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save_tensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat name -> tensor mapping as safetensors, atomically."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        return load_file(str(path), device=str(device))
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


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: PathLike) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and every mismatch."""
    problem = describe_mismatch(module, state)
    if problem:
        raise ValueError(f"{source} does not fit {type(module).__name__}: {problem}")
    module.load_state_dict(state, strict=True)


@contextmanager
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
