"""Lay the run's schedule over the epochs that fit in ``trainer.max_time``, as Ultralytics' ``time`` does.

Lightning's ``max_time`` only stops the run. Alone it cuts a cosine schedule planned for ``max_epochs`` wherever
the clock runs out, often just after the warm-up, with the learning rate near its peak. This callback measures
the epochs as they go and sets ``max_epochs`` to the number that fits, then re-lays the learning-rate schedule
(warm-up and decay) over it; ``close_mosaic`` and the augmentation's strength (``full_augment_passes``) follow,
since they are read from ``max_epochs``. A ``max_epochs`` given as well stays an upper bound. Under a budget,
:class:`BudgetedEarlyStopping` does not stop the run: the schedule anneals only at the budget's end.

Validation is paid from the same budget. Where it is costly (aquarium's 127 validation photos on a CPU: a quarter
of each epoch), validating after every epoch spends a quarter of the budget, mostly on scores of early weights
nobody keeps. So the callback validates every k-th epoch, k the smallest that holds validation to
``validation_share`` of the time, and every epoch of the run's last fifth, where the best weights are.
"""

from __future__ import annotations

import logging
import math
import time
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
    """With ``trainer.max_time`` set, fit ``max_epochs``, the schedule and the validations to the time left; else do
    nothing.

    The estimate is made at every epoch end from the mean training time of an epoch so far and the last
    validation's time. Not from the first batches: the first epoch also pays for loader start-up and for filling
    the decoded-image cache, and a plan laid over it would squeeze warm-up and decay into too few epochs.

    Args:
        validation_share: validate every k-th epoch, k the smallest that keeps validation at most this share of
            the run's time, and every epoch of the last fifth (at least the last ``FINAL_EPOCHS``); ``None``, or a
            ``trainer.check_val_every_n_epoch`` other than 1: validate as the trainer is configured.
    """

    FINAL_EPOCHS = 5  # validated whatever the cost: the best checkpoint and the best-vs-last-5 gap come from them

    def __init__(self, validation_share: float | None = 0.1) -> None:
        if validation_share is not None and not 0 < validation_share < 1:
            raise ValueError(f"validation_share must be between 0 and 1 (or null), got {validation_share}")
        self.validation_share = validation_share
        self.timer: Timer | None = None
        self.max_epochs_cap: int | None = None
        self.interval = 1  # validate every this many epochs before the final ones
        self.validation_seconds = 0.0  # all validations of the run so far (a resume restores it)
        self.last_validation = 0.0  # the latest validation's seconds
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer = budget_timer(trainer)
        cap = trainer.max_epochs
        self.max_epochs_cap = cap if cap is not None and cap > 0 else None
        if trainer.check_val_every_n_epoch != 1:
            self.validation_share = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.last_validation = time.perf_counter() - self.started
            self.validation_seconds += self.last_validation

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate after this epoch or not. Set before the epoch, as Lightning's checkpoint callbacks read the
        same setting at its end to know whether a validation ran."""
        if self.timer is not None and self.validation_share is not None:
            epoch = trainer.current_epoch
            validate = validated(epoch, trainer.fit_loop.max_epochs, self.interval)
            trainer.check_val_every_n_epoch = 1 if validate else epoch + 2  # Lightning: (epoch + 1) % n == 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.timer is None:
            return
        done = trainer.current_epoch + 1  # the Timer's elapsed time covers epochs before a resume too
        remaining = self.timer.time_remaining()
        if self.validation_share is None:  # validations as the trainer has them, in the mean epoch
            training, validation = max(self.timer.time_elapsed(), 1e-6) / done, 0.0
        else:
            training = max(self.timer.time_elapsed() - self.validation_seconds, 1e-6) / done
            validation = self.last_validation
        interval = self.validation_interval(training, validation)
        epochs = done + max(0, math.floor(remaining / training))
        if self.max_epochs_cap is not None:
            epochs = min(epochs, self.max_epochs_cap)
        while epochs > done and cost(done, epochs, interval, training, validation) > remaining:
            epochs -= 1
        epochs, interval = trainer.strategy.broadcast((epochs, interval))  # every rank validates the same epochs
        epochs = max(int(epochs), done)
        if epochs != trainer.fit_loop.max_epochs or interval != self.interval:
            every = f"; validation every {ordinal(interval)} epoch until the last {final_epochs(epochs)}"
            log.info("time budget: %.1f s per epoch, %.0f s left, so %d epochs%s; schedule laid over them",
                     training + validation / interval, remaining, epochs, every if interval > 1 else "")
        self.interval = interval
        trainer.fit_loop.max_epochs = epochs
        steps = epochs * optimizer_steps_per_epoch(trainer)
        for schedule in schedules_of(trainer):
            schedule.fit_to(steps)

    def validation_interval(self, training: float, validation: float) -> int:
        """The fewest epochs between validations that keep them at most ``validation_share`` of the time."""
        if self.validation_share is None or validation <= 0:
            return 1
        share = self.validation_share
        return max(1, math.ceil(validation * (1 - share) / (share * training) - 1e-9))

    def state_dict(self) -> dict[str, Any]:
        return {"validation_seconds": self.validation_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validation_seconds = state_dict.get("validation_seconds", 0.0)


def final_epochs(epochs: int) -> int:
    """The last epochs of a run of ``epochs`` that are validated whatever the cost: its last fifth, at least 5."""
    return max(TimeBudget.FINAL_EPOCHS, math.ceil(epochs / 5))


def validated(epoch: int, epochs: int, interval: int) -> bool:
    """Whether ``epoch`` (from 0) of a run of ``epochs`` ends with a validation."""
    return epoch >= epochs - final_epochs(epochs) or (epoch + 1) % interval == 0


def cost(done: int, epochs: int, interval: int, training: float, validation: float) -> float:
    """Seconds the epochs after the ``done`` ones take, to the end of a run of ``epochs``, validations included."""
    final_start = max(done, epochs - final_epochs(epochs))
    validations = (epochs - final_start) + final_start // interval - done // interval  # (epoch + 1) % interval == 0
    return (epochs - done) * training + validations * validation


def ordinal(n: int) -> str:
    """2nd, 3rd, 4th, ... (small numbers)."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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
