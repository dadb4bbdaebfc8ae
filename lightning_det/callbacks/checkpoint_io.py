"""Checkpoint files that are never half-written and never replace a good state with a non-finite one.

Lightning (through fsspec) writes a checkpoint to a temporary file in ``$TMPDIR`` and then moves it: with the run
folder on another filesystem the move is a copy, so a kill during it leaves the old ``last.ckpt`` truncated and the
temporary file behind. Here the temporary file lives beside the target (``.<name>.tmp-<pid>``), is flushed and
synced, and then renamed over it (atomic on one filesystem); on any error it is removed and the old file stays.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from lightning_det.io import free_space, write_atomically

log = logging.getLogger(__name__)


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
        try:
            write_atomically(path, lambda file: torch.save(checkpoint, file))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise OSError(errno.ENOSPC, disk_full_message(Path(path))) from error

    def remove_checkpoint(self, path: Any) -> None:
        if self.refused:
            log.warning("keeping %s: its replacement %s was not saved", path, self.refused)
            return
        super().remove_checkpoint(path)


def disk_full_message(path: Path) -> str:
    """What a save that filled the disk left: the checkpoints saved before it, whole, and the newest to resume from."""
    kept = sorted(path.parent.glob("*.ckpt"), key=lambda file: file.stat().st_mtime)
    then = f"then resume with ckpt_path={kept[-1]}" if kept else "then start again (no checkpoint was saved before)"
    return (f"saving {path} failed: the disk holding {path.parent} is full (No space left on device, "
            f"{free_space(path.parent)} free); the previous file, if any, is unchanged, and the checkpoints saved "
            f"before are kept ({', '.join(file.name for file in kept) or 'none'}). Free space there, {then}")
