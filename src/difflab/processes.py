"""Work shared by every launched process (``torchrun`` / ``accelerate launch``): which
process does which batches, gathering to the main process, and publishing one folder.
One process, the main one, when not launched with several."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch

from difflab.devices import resolve_device
from difflab.io import PathLike

T = TypeVar("T")


def main_process() -> bool:
    """Whether this is the main process (``RANK`` 0, or not launched with several)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes this one was launched with (``WORLD_SIZE``, which ``accelerate
    launch`` and ``torchrun`` set; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_CLOSE_REGISTERED = False


def close_at_exit() -> None:
    """Destroy the process group at interpreter exit, once nothing holds a distributed
    model: gloo aborts the process ("terminate called without an active exception") when
    it is torn down with the interpreter instead."""
    global _CLOSE_REGISTERED
    if _CLOSE_REGISTERED or launched_processes() <= 1:
        return
    _CLOSE_REGISTERED = True

    def close() -> None:
        import gc

        import torch.distributed as dist

        gc.collect()  # frees DistributedDataParallel wrappers still in reference cycles
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(close)


class Processes:
    """This process's part in a job shared by every launched process (one process, the
    main one, when not launched with several).

    Work is shared out as whole units (batches) with Accelerate's
    ``split_between_processes``, so each unit is computed exactly as one process computes
    it; :meth:`gather` brings every process's results to the main process, which writes.

    :param device: the device asked for; with several processes and a GPU each process
        uses its own (``cuda:LOCAL_RANK``, :attr:`device`).
    """

    def __init__(self, device: Optional[torch.device | str] = None):
        requested = resolve_device(device)
        self.state = None
        self.count, self.index, self.device = 1, 0, requested
        if launched_processes() > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=requested.type == "cpu")
            close_at_exit()
            self.count, self.index = self.state.num_processes, self.state.process_index
            self.device = self.state.device if requested.type == self.state.device.type else requested

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's units: contiguous, in order, the first processes one more when
        they do not divide evenly."""
        if self.state is None:
            return list(units)
        with self.state.split_between_processes(list(units)) as mine:
            return list(mine)

    def gather(self, results: list) -> Optional[list]:
        """Every process's ``results`` concatenated in process order, on the main process
        (None on the others). Each process calls it once, with picklable results."""
        if self.state is None:
            return results
        import torch.distributed as dist

        parts = [None] * self.count if self.is_main else None
        dist.gather_object(results, parts, dst=0)
        return [r for part in parts for r in part] if self.is_main else None

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def publish_folder(out_dir: PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a staging folder beside ``out_dir`` with ``write(folder)`` and move it into place:
    one rename when ``out_dir`` does not exist or is empty; into an existing folder, each
    file replaces its namesake atomically and other files are left alone. On error nothing
    of this run reaches ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
            try:
                os.replace(tmp, out_dir)  # rename(2) may replace an empty folder
                return out_dir
            except OSError:
                pass  # an empty folder that cannot be replaced (a mount point, another OS): file by file
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = out_dir / f.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)
        return out_dir
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
