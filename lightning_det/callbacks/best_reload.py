"""Go back to the best weights so far when the learning rate steps down.

The Faster R-CNN reference recipe reloads the best-mAP model after epoch 9 and drops the lr x0.1: training at
the lower rate starts from the best point rather than from wherever the last epoch ended. ``ReloadBestAndDecay``
is that recipe (the callback makes the drop); ``RestoreBestOnDecay`` does the reload whenever the configured
scheduler drops the lr (a multistep milestone, a plateau reduction). Any detector can use either.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
#: INFO on rank 0 through this module's logger, so the run folder's train.log (Hydra's handlers) has it too;
#: Lightning's ``rank_zero_info`` reaches the console only.
info = rank_zero_only(log.info)


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
        reload_best(trainer, pl_module, f"epoch {self.epoch}")
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        info(f"epoch {self.epoch}: learning rate x{self.factor}")


class RestoreBestOnDecay(L.Callback):
    """Reload the best checkpoint's weights whenever the scheduler has just decayed the learning rate.

    A decay is a fall of the largest learning rate of the trained (not frozen) parameter groups to at most
    ``drop_ratio`` times its value at the previous step: multistep milestones and plateau reductions qualify,
    the smooth per-step cosine, exponential or polynomial decay does not. The check runs before each training
    batch, so the first step at the lower rate already starts from the best weights. Optimizer state is kept.
    """

    def __init__(self, drop_ratio: float = 0.5) -> None:
        if not 0 < drop_ratio < 1:
            raise ValueError(f"drop_ratio must be in (0, 1), got {drop_ratio}")
        self.drop_ratio = drop_ratio
        self.previous_lr: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
        lr = max((g["lr"] for o in trainer.optimizers for g in o.param_groups if not g.get("frozen")), default=0.0)
        if self.previous_lr is not None and lr <= self.previous_lr * self.drop_ratio:
            reload_best(trainer, pl_module, f"lr {self.previous_lr:.3g} -> {lr:.3g} at step {trainer.global_step}")
        self.previous_lr = lr


def reload_best(trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
    """Load the best checkpoint's weights into ``pl_module`` (a warning when none has been saved yet)."""
    best = best_checkpoint_path(trainer)
    if not best:
        log.warning("%s: no best checkpoint saved yet; going on with the current weights", when)
        return
    state = torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"]
    pl_module.load_state_dict(state)
    info(f"{when}: reloaded the best weights from {best}")


def best_checkpoint_path(trainer: L.Trainer) -> str:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return ""
