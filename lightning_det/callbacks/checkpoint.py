"""Lightning's ``ModelCheckpoint`` with the two things a resumed or score-less run needs.

- Resuming with ``ckpt_path=<old run>/checkpoints/last.ckpt`` starts a new run folder. Lightning then drops the
  best score ("dirpath has changed") and saves the next epoch as best even when it is worse, while early stopping
  keeps the old best. Here the best score and the top-k files carry over: the old best checkpoints are copied into
  the new folder when training starts, so the new run is complete on its own.
- An epoch whose monitored value is NaN (VOC mAP when no validation image holds an object) is never saved as best.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_det.io import write_atomically

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps its best score across a resume into a new folder and skips NaN scores."""

    @property
    def state_key(self) -> str:
        """The key Lightning's own ``ModelCheckpoint`` uses, so checkpoints of either class resume with the other."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.last_model_path = state_dict.get("last_model_path", "")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.adopt_best_k_models(trainer.is_global_zero)

    def adopt_best_k_models(self, copy_files: bool) -> None:
        """Bring the resumed run's top-k checkpoints that live in another folder into this one (same names)."""
        if not self.dirpath or not self.best_k_models:
            return
        folder = Path(self.dirpath)
        moved: dict[str, str] = {}
        for old in self.best_k_models:
            if Path(old).parent.resolve() != folder.resolve():
                moved[old] = str(folder / Path(old).name)
        for old, new in moved.items():
            if copy_files and Path(old).is_file():
                write_atomically(new, lambda file, source=old: copy_file(source, file))
            log.info("resumed best checkpoint %s -> %s (%s %s)", old, new, self.monitor,
                     f"{float(self.best_k_models[old]):.4f}")
        self.best_k_models = {moved.get(path, path): score for path, score in self.best_k_models.items()}
        self.best_model_path = moved.get(self.best_model_path, self.best_model_path)
        self.kth_best_model_path = moved.get(self.kth_best_model_path, self.kth_best_model_path)

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        if isinstance(current, Tensor) and torch.isnan(current):
            return False
        return super().check_monitor_top_k(trainer, current)


def copy_file(source: str, destination: Any) -> None:
    with open(source, "rb") as file:
        shutil.copyfileobj(file, destination)
