"""Exponential moving average of the weights, with the warm-up ramp of the YOLOv3 reference trainers, sized to the
run it averages."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from lightning_det.callbacks.time_budget import optimizer_steps_per_epoch

AUTO = "auto"
MAX_WINDOW = 10_000  # optimizer steps: Ultralytics' decay of 0.9999
RAMP_SHARE = 0.2  # of the window: Ultralytics' ramp of 2,000 steps at its 10,000-step window


class RampedDecay:
    """``avg_fn`` for ``AveragedModel``: decay ``d * (1 - exp(-updates / ramp))``.

    A fixed 0.9999 decay would keep the random initial weights in the average for thousands of steps; the ramp
    lets the average follow the model closely early on and smooth it later (Ultralytics' ModelEMA).
    """

    def __init__(self, decay: float, ramp: float) -> None:
        self.decay = decay
        self.ramp = ramp

    def factor(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.ramp))

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        d = self.factor(int(num_averaged))
        return averaged * d + current * (1 - d)


def window_for(planned_steps: int, share: float) -> float:
    """The average's window, ``1 / (1 - decay)`` optimizer steps, for a run of ``planned_steps``: ``share`` of it,
    at most ``MAX_WINDOW``, at least one step."""
    return min(MAX_WINDOW, max(1.0, share * planned_steps))


def planned_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps the run plans now (``max_epochs``, which a time budget refits, or ``max_steps``)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    epochs = trainer.fit_loop.max_epochs
    if epochs is None or epochs < 0 or not math.isfinite(trainer.num_training_batches):
        return None
    return epochs * optimizer_steps_per_epoch(trainer)


class ModelEMA(WeightAveraging):
    """Lightning's weight averaging with the ramped EMA decay, updated after every optimizer step.

    Validation and the saved checkpoints use the averaged weights (``state_dict``); the raw weights are kept in
    the checkpoint as ``current_model_state`` so a resumed run continues training them.

    ``decay: auto`` sizes the average to the run: its window ``1 / (1 - decay)`` is ``window_share`` of the
    optimizer steps the run plans (re-read every epoch, as a time budget refits them), at most 10,000 (0.9999), and
    its ramp a fifth of the window. A long GPU run gets Ultralytics' 0.9999 with its 2,000-step ramp; a 2,000-step
    CPU run averages about its last 100 steps, where a fixed 0.9999 with that ramp would barely average at all
    (decay 0.63 at step 2,000).
    """

    def __init__(self, decay: float | str = AUTO, ramp: float | str = AUTO, window_share: float = 0.05,
                 use_buffers: bool = True) -> None:
        if decay != AUTO and not 0 <= float(decay) < 1:
            raise ValueError(f"callbacks.ema.decay must be auto or in [0, 1), got {decay!r}")
        self.auto_decay, self.auto_ramp = decay == AUTO, ramp == AUTO
        self.window_share = window_share
        self.ramped = RampedDecay(1 - 1 / MAX_WINDOW if self.auto_decay else float(decay),
                                  MAX_WINDOW * RAMP_SHARE if self.auto_ramp else float(ramp))
        super().__init__(use_buffers=use_buffers, avg_fn=self.ramped)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = planned_steps(trainer)
        if steps is None:
            return
        window = window_for(steps, self.window_share)
        if self.auto_decay:
            self.ramped.decay = 1 - 1 / window
        if self.auto_ramp:
            self.ramped.ramp = max(1.0, RAMP_SHARE * (window if self.auto_decay else 1 / (1 - self.ramped.decay)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The model keeps the average; the averaged copy is dropped, so a later ``trainer.validate`` of the best
        checkpoint validates that checkpoint and not the last average swapped in."""
        super().on_train_end(trainer, pl_module)
        self._average_model = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.ramped.decay, "ramp": self.ramped.ramp}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.ramped.decay = state_dict.get("decay", self.ramped.decay)
        self.ramped.ramp = state_dict.get("ramp", self.ramped.ramp)
