"""Exponential moving average of the weights, with the warm-up ramp of the YOLOv3 reference trainers."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor


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


class ModelEMA(WeightAveraging):
    """Lightning's weight averaging with the ramped EMA decay, updated after every optimizer step.

    Validation and the saved checkpoints use the averaged weights (``state_dict``); the raw weights are kept in
    the checkpoint as ``current_model_state`` so a resumed run continues training them.
    """

    def __init__(self, decay: float = 0.9999, ramp: float = 2000.0, use_buffers: bool = True) -> None:
        super().__init__(use_buffers=use_buffers, avg_fn=RampedDecay(decay, ramp))
