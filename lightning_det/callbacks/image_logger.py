"""Draw validation images with ground truth and predicted boxes into the run's image loggers once per epoch, and
the matrices a family accumulates in training (``Detector.training_matrices``) as heat maps."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchvision.utils import make_grid

from lightning_det.data.transforms.common import displayable
from lightning_det.report.confusion import heat_map
from lightning_det.report.drawing import draw_detections, draw_labels
from lightning_det.report.loggers import image_loggers, log_image


class ValidationImageLogger(L.Callback):
    """Logs a grid of the first validation batch: ground truth in green (difficult in orange), detections above
    ``score_thresh`` in red; and once, the first training batch with its labels, as augmented
    (``train/first_batch``); after each training epoch, the model's ``training_matrices`` as heat maps.

    Seeing boxes is the quickest check that labels, letterboxing and decoding agree; a falling loss alone
    does not show a transposed box or an off-by-a-stride anchor.
    """

    def __init__(self, max_images: int = 8, score_thresh: float = 0.3) -> None:
        self.max_images = max_images
        self.score_thresh = score_thresh

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        if trainer.global_step != 1 or not image_loggers(trainer):
            return
        n = min(self.max_images, batch["images"].shape[0])
        no_detections = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * n
        images = displayable(batch["images"][:n])
        log_image(trainer, "train/first_batch", self.render(images, batch["labels"][:n], no_detections, pl_module), step=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrices = getattr(pl_module, "training_matrices", dict)()  # computed on every rank: it syncs under DDP
        for tag, matrix in matrices.items():
            log_image(trainer, tag, heat_map(matrix))

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not image_loggers(trainer):
            return
        log_image(trainer, "val/images", self.predictions(trainer, pl_module, batch))

    def predictions(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> torch.Tensor:
        """The grid of the batch's first ``max_images`` images with their labels and the model's detections."""
        n = min(self.max_images, batch["images"].shape[0])
        images = batch["images"][:n]
        with torch.no_grad():
            detections = pl_module.decode(pl_module(pl_module.normalise(images)), {**batch, "images": images})
        return self.render(displayable(images), batch["labels"][:n], detections, pl_module)

    def render(self, images: torch.Tensor, labels: torch.Tensor, detections: list[dict], pl_module: Any) -> torch.Tensor:
        names = pl_module.class_names
        drawn = []
        for image, rows, det in zip(images.cpu(), labels.cpu(), detections):
            image = draw_labels(image, rows, names)
            keep = det["scores"] >= self.score_thresh
            image = draw_detections(image, det["boxes"][keep], [names[c] for c in det["labels"][keep].tolist()],
                                    det["scores"][keep].tolist())
            drawn.append(image)
        return make_grid(drawn, nrow=4)
