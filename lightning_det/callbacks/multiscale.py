"""Multi-scale training: every few batches a new random input size, as in the YOLOv3 reference trainers."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lightning_det.data.collate import Labels


class MultiScale(L.Callback):
    """Resize training batches to a random size every ``every_n_batches`` batches.

    The long side is drawn from the multiples of ``stride`` in ``[min_factor, max_factor]`` times the size the
    loader delivers; the batch is resized on the device (no loader work) and its boxes scaled with it. A network
    that sees objects at many scales generalises across them; evaluation keeps the configured size.
    """

    def __init__(
        self, every_n_batches: int = 10, min_factor: float = 0.67, max_factor: float = 1.5, stride: int = 32
    ) -> None:
        self.every_n_batches = every_n_batches
        self.min_factor = min_factor
        self.max_factor = max_factor
        self.stride = stride
        self.long_side: int | None = None

    def sizes(self, base: int) -> list[int]:
        low = max(self.stride, math.ceil(self.min_factor * base / self.stride) * self.stride)
        high = max(low, math.floor(self.max_factor * base / self.stride) * self.stride)
        return list(range(low, high + 1, self.stride))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        images = batch["images"]
        height, width = images.shape[-2:]
        if batch_idx % self.every_n_batches == 0 or self.long_side is None:
            choices = self.sizes(max(height, width))
            self.long_side = choices[int(torch.randint(len(choices), ()))]
        factor = self.long_side / max(height, width)
        new_h = max(self.stride, round(height * factor / self.stride) * self.stride)
        new_w = max(self.stride, round(width * factor / self.stride) * self.stride)
        if (new_h, new_w) == (height, width):
            return
        batch["images"] = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
        labels = batch["labels"].clone()
        Labels.of(labels).boxes.mul_(labels.new_tensor([new_w / width, new_h / height] * 2))
        batch["labels"] = labels
        if "image_size" in batch.get("meta", {}):  # where each image ends inside the padded batch, resized with it
            factors = torch.tensor([new_h / height, new_w / width], device=batch["meta"]["image_size"].device)
            batch["meta"]["image_size"] = (batch["meta"]["image_size"] * factors).round().long()
