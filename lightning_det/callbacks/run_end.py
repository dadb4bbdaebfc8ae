"""Say why a training run ended: early stopping, the time budget, ``max_epochs`` or ``max_steps``, a non-finite
loss, or an interrupt.

Lightning ends ``fit`` the same quiet way whichever of them set ``trainer.should_stop``, so a budgeted run that
early stopping ended looks like one the clock ended. This callback reads the state that Lightning and the other
callbacks already keep (``EarlyStopping.stopping_reason``, the ``Timer``, ``TimeBudget``'s cap, the detector's
``nonfinite_loss``), logs one ``run ended: ...`` line on rank 0, and keeps it for ``final_metrics.json``.
Epochs are counted as run (``after 42 of 100 epochs``); an event inside an epoch is placed as the log places it
(``at epoch 3, step 120``: Lightning's epoch index and optimizer step).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_det.callbacks.time_budget import TimeBudget

log = logging.getLogger(__name__)


class RunEnd(L.Callback):
    """Logs ``run ended: <why>`` when ``fit`` ends or is interrupted; ``stopped_by`` (a key: ``early_stopping``,
    ``time_budget``, ``max_epochs``, ``max_steps``, ``non_finite_loss``, ``interrupted``, ``should_stop``) and
    ``reason`` (the sentence) stay on the callback for the run's summary."""

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.reason: str | None = None
        self.batch_at = (0, 0)  # (epoch, step) of the last batch: a non-finite loss stops training after it

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_at = (trainer.current_epoch, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stopped_by, why = self.ending(trainer, pl_module)
        self.report(trainer, why)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            cause = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
            self.stopped_by = "interrupted"
            self.report(trainer, f"interrupted ({cause}) at epoch {trainer.current_epoch}, step {trainer.global_step}")

    def summary(self) -> dict[str, str]:
        """The ending for ``final_metrics.json``; empty when training never ran (``max_epochs=0``)."""
        return {"stopped_by": self.stopped_by, "run_ended": self.reason} if self.reason else {}

    def report(self, trainer: L.Trainer, why: str) -> None:
        """Keep ``why`` with the budget left (a run under a budget that ended otherwise) and log it on rank 0."""
        timer = budget_timer(trainer)
        if timer is not None and self.stopped_by != "time_budget":
            total = timer.time_elapsed() + timer.time_remaining()
            why += f", {share(timer.time_remaining(), total)} of the budget left"
        self.reason = why
        if trainer.is_global_zero:
            log.info("run ended: %s", why)

    def ending(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str, str]:
        """``(stopped_by, the sentence)`` for a ``fit`` that returned, in order of precedence."""
        epochs, max_epochs = trainer.current_epoch, trainer.max_epochs
        if getattr(pl_module, "nonfinite_loss", None):  # set by the detector's training step
            return "non_finite_loss", "non-finite loss at epoch {}, step {}".format(*self.batch_at)
        early = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping) and stopped_it(c, trainer)), None)
        if early is not None:
            return "early_stopping", f"early stopping after {epochs} of {max_epochs} epochs ({early_cause(early)})"
        timer = budget_timer(trainer)
        if timer is not None and (timer.time_remaining() <= 0 or laid_by_budget(trainer)):
            total = timer.time_elapsed() + timer.time_remaining()
            return "time_budget", f"time budget spent after {epochs} epochs ({share(timer.time_elapsed(), total)})"
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return "max_steps", f"max_steps {trainer.max_steps} reached after {epochs} epochs"
        if trainer.should_stop:  # a callback of the user's stopped it
            return "should_stop", f"trainer.should_stop set after {epochs} of {max_epochs} epochs"
        return "max_epochs", f"max_epochs {max_epochs} reached"


def stopped_it(early: EarlyStopping, trainer: L.Trainer) -> bool:
    """Whether ``early`` stopped this run at its last epoch (its state from a resumed run may be an old stop)."""
    return (trainer.should_stop and early.stopping_reason != EarlyStoppingReason.NOT_STOPPED
            and early.stopped_epoch == trainer.current_epoch - 1)


def budget_timer(trainer: L.Trainer) -> Timer | None:
    """Lightning's ``Timer`` when ``trainer.max_time`` gave the run a budget, else None."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return timer if timer is not None and timer.time_remaining() is not None else None


def laid_by_budget(trainer: L.Trainer) -> bool:
    """Whether the run reached a ``max_epochs`` that ``TimeBudget`` lowered to the epochs that fit the budget."""
    budget = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)
    if budget is None or budget.timer is None or trainer.current_epoch < trainer.max_epochs:
        return False
    return budget.max_epochs_cap is None or trainer.max_epochs < budget.max_epochs_cap


def early_cause(early: EarlyStopping) -> str:
    """Why ``EarlyStopping`` stopped, short: patience in validations, else Lightning's own message."""
    if early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        count = f"{early.wait_count} validation{'s' * (early.wait_count != 1)}"
        return f"{early.monitor} no better in the last {count}, best {float(early.best_score):.4f}"
    return (early.stopping_reason_message or early.stopping_reason.name).removesuffix(" Signaling Trainer to stop.")


def share(seconds: float, total: float) -> str:
    """``3.6 of 12.0 min`` (``40 of 90 s`` for budgets under two minutes), ``seconds`` held to ``[0, total]``."""
    seconds = min(max(seconds, 0.0), total)
    return f"{seconds / 60:.1f} of {total / 60:.1f} min" if total >= 120 else f"{seconds:.0f} of {total:.0f} s"
