"""Step the learning rate down at a chosen epoch, first going back to the best weights so far.

The Faster R-CNN reference recipe does this (reload the best-mAP model after epoch 9, lr x0.1): a plateau
after the drop starts from the best point rather than from wherever the last epoch ended. Any detector can
use it.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)


class ReloadBestAndDecay(L.Callback):
    """At the start of (0-based) epoch ``epoch``: load the best checkpoint's weights and multiply the learning
    rate by ``factor``.

    The weights come from the trainer's first ``ModelCheckpoint`` with a monitor (the best-mAP one). The lr is
    scaled in the optimizer and in the base lrs of its scheduler (so ``LambdaLR`` schedules keep the drop), and
    both are saved in checkpoints, so a resumed run stays decayed. Optimizer momentum is kept.
    """

    def __init__(self, epoch: int, factor: float = 0.1) -> None:
        self.epoch = epoch
        self.factor = factor

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        best = best_checkpoint_path(trainer)
        if best:
            state = torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"]
            pl_module.load_state_dict(state)
            rank_zero_info(f"epoch {self.epoch}: reloaded the best weights from {best}")
        else:
            log.warning("epoch %d: no best checkpoint saved yet; decaying the lr of the current weights", self.epoch)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        rank_zero_info(f"epoch {self.epoch}: learning rate x{self.factor}")


def best_checkpoint_path(trainer: L.Trainer) -> str:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return ""
