"""Faster training steps without changing what the model computes: the channels-last memory layout and
``torch.compile``. Callbacks, so one name switches each on for every detector family."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class ChannelsLast(Callback):
    """Stores the model's 4-D weights as NHWC, so convolutions run in oneDNN's (CPU) and cuDNN's preferred layout
    and their outputs, the activations, follow it. The values are the same; only the strides change, so
    checkpoints and predictions are unaffected (up to float rounding)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


class Compile(Callback):
    """``torch.compile`` of the model's forward (the network; the loss and target assignment stay eager, as
    their shapes change with every batch). The first steps are slow while the graph compiles, and new input
    shapes (multi-scale training, rectangular evaluation) compile again, so it pays off on long runs. Parameter
    names are unchanged, so checkpoints load into an uncompiled model."""

    def __init__(self, **options: Any) -> None:
        self.options = options  # passed to torch.compile, e.g. mode="max-autotune", dynamic=False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.compile(**self.options)
