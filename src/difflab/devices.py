"""Device selection shared by every command: the project's one copy."""
from __future__ import annotations

from typing import Optional, Union

import torch


def resolve_device(name: Optional[Union[str, torch.device]] = "auto") -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; anything else is passed to torch.

    Asking for cuda where there is none is an error naming the request.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
    return dev
