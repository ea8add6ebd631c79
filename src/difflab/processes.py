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
from difflab.io import PathLike, check_fresh_output

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


def publish_folder(out_dir: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Fill a staging folder beside ``out_dir`` with ``write(folder)``, then move it into
    place: one rename when ``out_dir`` does not exist or is empty. An ``out_dir`` that holds
    files is refused (:func:`difflab.io.check_fresh_output`, checked again here in case it
    filled meanwhile) unless ``overwrite``, which replaces it whole: the old folder is moved
    aside, the new one renamed into place, the old one deleted, so no old file is left
    beside the new ones. On error nothing of this run reaches ``out_dir``."""
    given, out_dir = Path(out_dir), Path(os.path.abspath(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    old, moved = None, []
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        check_fresh_output(given, "out", overwrite)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced-", dir=out_dir.parent))
            try:
                os.replace(out_dir, old / out_dir.name)
                moved = [(out_dir, old / out_dir.name)]
            except OSError:  # a folder that cannot be moved (a mount point): empty it instead
                for entry in sorted(out_dir.iterdir()):
                    os.replace(entry, old / entry.name)
                    moved.append((entry, old / entry.name))
        try:
            try:
                os.replace(tmp, out_dir)  # rename(2) may replace an empty folder
            except OSError:  # an empty folder that cannot be replaced (a mount point, another OS): entry by entry
                for entry in sorted(tmp.iterdir()):
                    os.replace(entry, out_dir / entry.name)
        except BaseException:
            for back, aside in reversed(moved):  # put the old set back as it was
                if back == out_dir and out_dir.exists():
                    shutil.rmtree(out_dir, ignore_errors=True)
                elif back.exists():
                    shutil.rmtree(back, ignore_errors=True) if back.is_dir() else back.unlink()
                os.replace(aside, back)
            raise
        return given
    finally:
        for folder in (tmp, old):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
