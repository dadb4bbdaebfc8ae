"""Checkpoint files that are never half-written and never replace a good state with a non-finite one.

Lightning (through fsspec) writes a checkpoint to a temporary file in ``$TMPDIR`` and then moves it: with the run
folder on another filesystem the move is a copy, so a kill during it leaves the old ``last.ckpt`` truncated and the
temporary file behind. Here the temporary file lives beside the target (``.<name>.tmp-<pid>``), is flushed and
synced, and then renamed over it (atomic on one filesystem); on any error it is removed and the old file stays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

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
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, f"writing {path} failed ({error.strerror}); the previous file, if any, is "
                                       f"unchanged") from error
        raise
    sync_folder(path.parent)


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


def nonfinite_tensors(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point weights and buffers holding NaN or inf: the model's ``state_dict`` and, with
    weight averaging, the raw weights it keeps beside it."""
    names = []
    for key in ("state_dict", "current_model_state"):
        for name, tensor in (checkpoint.get(key) or {}).items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                names.append(name)
    return names


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` writing local checkpoints atomically, and refusing checkpoints with non-finite weights.

    A refused checkpoint leaves the file it would have replaced as it was (after a NaN loss, ``last.ckpt`` stays
    the last finite state). The removal of an older checkpoint that Lightning asks for right after a refused save
    is skipped too, so a refused new best never costs the previous best.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused: str | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = nonfinite_tensors(checkpoint)
        if bad:
            self.refused = str(path)
            log.warning("not saving %s: %d weights or buffers hold NaN or inf (%s); the file on disk, if any, is "
                        "kept", path, len(bad), ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else ""))
            return
        self.refused = None
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported for local checkpoints ({path})")
        write_atomically(path, lambda file: torch.save(checkpoint, file))

    def remove_checkpoint(self, path: Any) -> None:
        if self.refused:
            log.warning("keeping %s: its replacement %s was not saved", path, self.refused)
            return
        super().remove_checkpoint(path)

