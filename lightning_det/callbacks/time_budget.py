"""Lay the run's schedule over the epochs that fit in ``trainer.max_time``, as Ultralytics' ``time`` does.

Lightning's ``max_time`` only stops the run. Alone it cuts a cosine schedule planned for ``max_epochs`` wherever
the clock runs out, often just after the warm-up, with the learning rate near its peak. This callback measures
the epochs as they go and sets ``max_epochs`` to the number that fits, then re-lays the learning-rate schedule
(warm-up and decay) over it; ``close_mosaic`` and the augmentation's strength (``full_augment_passes``) follow,
since they are read from ``max_epochs``. A ``max_epochs`` given as well stays an upper bound. Under a budget,
:class:`BudgetedEarlyStopping` does not stop the run: the schedule anneals only at the budget's end.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, Timer

from lightning_det.optim.schedules import BurnIn, Schedule

log = logging.getLogger(__name__)


def schedules_of(trainer: L.Trainer) -> list[Schedule]:
    """The per-step schedules behind the trainer's schedulers (``LambdaLR`` factors or a ``BurnIn``)."""
    found = []
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, BurnIn):
            found.append(scheduler.schedule)
        found += [f for f in getattr(scheduler, "lr_lambdas", []) if isinstance(f, Schedule)]
    return found


def optimizer_steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps an epoch of the trainer's training batches makes (at least one)."""
    return max(1, int(trainer.num_training_batches) // trainer.accumulate_grad_batches)


def budget_timer(trainer: L.Trainer) -> Timer | None:
    """The Timer Lightning adds for ``trainer.max_time``, when the run has one."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return timer if timer is not None and timer.time_remaining() is not None else None


class TimeBudget(L.Callback):
    """With ``trainer.max_time`` set, fit ``max_epochs`` and the schedule to the time left; else do nothing.

    The estimate is made at every epoch end from the mean epoch time so far, validation and checkpoints
    included. Not from the first batches: the first epoch also pays for loader start-up and for filling the
    decoded-image cache, and a plan laid over it would squeeze warm-up and decay into too few epochs.
    """

    def __init__(self) -> None:
        self.timer: Timer | None = None
        self.max_epochs_cap: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer = budget_timer(trainer)
        cap = trainer.max_epochs
        self.max_epochs_cap = cap if cap is not None and cap > 0 else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.timer is None:
            return
        done = trainer.current_epoch + 1  # the Timer's elapsed time covers epochs before a resume too
        epoch_seconds = self.timer.time_elapsed() / done
        epochs = done + max(0, math.floor(self.timer.time_remaining() / max(epoch_seconds, 1e-6)))
        if self.max_epochs_cap is not None:
            epochs = min(epochs, self.max_epochs_cap)
        epochs = max(int(trainer.strategy.broadcast(epochs)), done)
        if epochs != trainer.fit_loop.max_epochs:
            log.info("time budget: %.1f s per epoch, %.0f s left, so %d epochs; schedule laid over them",
                     epoch_seconds, self.timer.time_remaining(), epochs)
        trainer.fit_loop.max_epochs = epochs
        steps = epochs * optimizer_steps_per_epoch(trainer)
        for schedule in schedules_of(trainer):
            schedule.fit_to(steps)


class BudgetedEarlyStopping(EarlyStopping):
    """Lightning's early stopping, off under ``trainer.max_time``.

    A budgeted run lays its learning-rate schedule over the epochs that fit, so the rate anneals only at the end
    of the budget, and the best weights come from those last epochs. A stop on a plateau before that ends the run
    at a high rate on weights a lucky validation chose: on a 69-image set (16 validation tiles) patience 30 ended
    a 12-minute run at 8.4 minutes. The budget is the stop; without one, ``patience`` counts as in Lightning.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budgeted = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.budgeted = budget_timer(trainer) is not None
        if self.budgeted:
            log.info("early stopping is off under trainer.max_time: the run ends at its budget, after the "
                     "learning-rate schedule has annealed")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.budgeted:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.budgeted:
            super().on_validation_end(trainer, pl_module)
