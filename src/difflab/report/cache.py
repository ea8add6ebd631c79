"""Section keys: a hash of a section's inputs (file contents, or for big folders the
listing of names, sizes and modification times) and options."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

KEY_VERSION = 1
HASH_LIMIT = 64 * 1024 * 1024  # files larger than this are keyed on size and mtime


def fingerprint(path: os.PathLike | str | None) -> Any:
    """A JSON-able fingerprint of ``path``: None when absent, the sha256 of a file's bytes,
    or the sorted (relative name, size, mtime_ns) listing of a folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        if st.st_size > HASH_LIMIT:
            return ["file", str(p.resolve()), st.st_size, st.st_mtime_ns]
        return ["sha256", hashlib.sha256(p.read_bytes()).hexdigest()]
    if p.is_dir():
        h = hashlib.sha256()
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                q = Path(root) / f
                st = q.stat()
                h.update(f"{q.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return ["dir", str(p.resolve()), h.hexdigest()]
    return ["missing", str(p)]


def section_key(section: str, inputs: dict[str, Any], options: dict[str, Any]) -> str:
    from difflab import __version__  # another difflab may draw or score differently

    body = {"v": KEY_VERSION, "difflab": __version__, "section": section, "inputs": {k: fingerprint(v) for k, v in inputs.items()},
            "options": options}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
