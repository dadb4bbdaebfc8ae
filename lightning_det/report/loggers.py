"""Where a run's images go: every logger of the run that takes images (TensorBoard, MLflow, W&B), on rank zero only.

Each of them takes an image its own way; the callbacks and the report call ``log_image`` and need not know which
are configured. Lightning's MLflow and W&B loggers import their packages only when a run configures them, so a run
without the ``[loggers]`` extra never needs them.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, on rank zero only: where PR curves go (the other loggers have no such plot)."""
    if not trainer.is_global_zero:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def pixels(image: Tensor) -> np.ndarray:
    """``uint8 [H, W, 3]`` (``[H, W]`` for one channel) of a ``[C, H, W]`` uint8 or [0, 1] float image: the layout
    MLflow and W&B take."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def to_tensorboard(logger: TensorBoardLogger, tag: str, image: Tensor, step: int) -> None:
    logger.experiment.add_image(tag, image.cpu(), step)


def to_mlflow(logger: MLFlowLogger, tag: str, image: Tensor, step: int) -> None:
    """A run artifact ``images/<tag>+step+<step>...png``, which the MLflow UI shows as an image series."""
    logger.experiment.log_image(logger.run_id, pixels(image), key=tag, step=step)


def to_wandb(logger: WandbLogger, tag: str, image: Tensor, step: int) -> None:
    logger.log_image(tag, [pixels(image)], step=step)


IMAGE_WRITERS: dict[type[Logger], Callable[..., None]] = {
    TensorBoardLogger: to_tensorboard,
    MLFlowLogger: to_mlflow,
    WandbLogger: to_wandb,
}


def image_writer(logger: Logger) -> Callable[..., None] | None:
    return next((write for kind, write in IMAGE_WRITERS.items() if isinstance(logger, kind)), None)


def image_loggers(trainer: L.Trainer) -> list[Logger]:
    """The run's loggers that take images, on rank zero only (an empty list elsewhere, so nothing is drawn there)."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if image_writer(logger) is not None]


def log_image(trainer: L.Trainer, tag: str, image: Tensor, step: int | None = None) -> None:
    """A ``[C, H, W]`` (uint8, or float in [0, 1]) image to every logger of the run that takes images."""
    for logger in image_loggers(trainer):
        image_writer(logger)(logger, tag, image, trainer.global_step if step is None else step)
