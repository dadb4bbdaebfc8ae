"""Save a checkpoint when training is interrupted (Ctrl-C, or SIGTERM from a cluster's pre-emption) and print the
command that resumes it.

Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary (on every rank) and Ctrl-C into
``KeyboardInterrupt``; both reach ``on_exception``. Other errors are not interrupts: their state may be what
failed, so nothing is saved for them (a NaN loss keeps the last finite ``last.ckpt``).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C or SIGTERM during ``fit``: save ``<dirpath>/<filename>.ckpt`` (by default over ``last.ckpt``: the
    interrupted state is the newest) and log ``python train.py <the run's overrides> ckpt_path=<it>``."""

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            cause = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
            log.warning("%s at epoch %d, step %d: saved %s. Resume with:\n    %s", cause, trainer.current_epoch,
                        trainer.global_step, self.path, resume_command(self.path))


def resume_command(checkpoint: Path) -> str:
    """The command line of this run with ``ckpt_path`` set to ``checkpoint`` (Hydra's recorded overrides)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return " ".join(["python train.py", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={checkpoint.resolve()}")])
