"""Files written whole or not at all, checkpoints read without executing code, and large files read without the
garbage collector in the way: the ground floor every part that reads or writes a file stands on.

A temporary file beside the target (``.<name>.tmp-<pid>``) is written, flushed and synced, and then renamed over
the target (atomic on one filesystem); on any error it is removed and the old file stays.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger(__name__)

TEMPORARY = ".{name}.tmp-{pid}"


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, sync it and rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one, whatever kills the writer. Temporary
    files left by writers that were killed (their process is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = path.parent / TEMPORARY.format(name=path.name, pid=os.getpid())
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = os_error(error) if isinstance(error, Exception) else None
        if cause is None:
            raise
        if cause.errno == errno.ENOSPC:
            raise OSError(cause.errno, f"writing {path} failed: the disk holding {path.parent} is full (No space "
                                       f"left on device, {free_space(path.parent)} free); the previous file, if "
                                       "any, is unchanged") from error
        raise OSError(cause.errno, f"writing {path} failed ({cause.strerror}); the previous file, if any, is "
                                   "unchanged") from error
    sync_folder(path.parent)


def os_error(error: BaseException) -> OSError | None:
    """The operating system's error behind ``error``, if any. ``torch.save`` into a file that fails to grow raises
    its own ``RuntimeError`` (``inline_container.cc ... unexpected pos``) while handling the file's ``OSError``."""
    seen: BaseException | None = error
    while seen is not None and not (isinstance(seen, OSError) and seen.errno is not None):
        seen = seen.__cause__ or seen.__context__
    return seen


def free_space(folder: Path) -> str:
    """E.g. ``"3.2 MiB"``: what is left on the filesystem holding ``folder``."""
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"


def sync_folder(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new name)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files of ``path`` whose writing process no longer runs."""
    prefix = TEMPORARY.format(name=path.name, pid="")
    for candidate in path.parent.glob(f"{prefix}*"):
        pid = candidate.name[len(prefix):]
        if pid.isdigit() and not process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            log.info("removed %s, left by a writer that was stopped", candidate)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (also a decorator): for reading or building millions
    of objects that form no reference cycles (a COCO json, COCOeval's dicts). Its collections, triggered by the
    allocations, re-scan the whole heap again and again: reading train2017's json took 1.7x as long with it on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used by the run that names it."""


def is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive (or, before 1.6, a pickle); anything else is another format."""
    with path.open("rb") as file:
        start = file.read(2)
    return start == b"PK" or start[:1] == b"\x80"


def read_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """The content of a ``torch.save`` file, loaded without executing code; one error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{key}={path} is empty (0 bytes), not a checkpoint (an interrupted save leaves such a file). Use "
            "another checkpoint of the run (e.g. best-*.ckpt)"
        )
    if not is_torch_file(path):
        with path.open("rb") as file:
            start = file.read(16)
        raise CheckpointError(
            f"{key}={path} is not a PyTorch checkpoint (a torch.save file starts with 'PK'; this one with "
            f"{start!r}). Give a .ckpt written by train.py"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{key}={path} is truncated or damaged ({size} bytes; {reason}). Use another checkpoint of the run "
            "(e.g. best-*.ckpt), or copy the file again"
        ) from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{key}={path} holds a {type(content).__name__}, not a checkpoint or a state dict")
    return content
