"""The run's loggers that take more than scalars (images, PR curves), on rank zero only."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, on rank zero only: where images, PR curves and confusion matrices go."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def log_image(trainer: L.Trainer, tag: str, image: Tensor, step: int | None = None) -> None:
    """A ``[3, H, W]`` (uint8, or float in [0, 1]) image to every logger of the run that takes images."""
    logger = tensorboard(trainer)
    if logger is not None:
        logger.experiment.add_image(tag, image.cpu(), trainer.global_step if step is None else step)
