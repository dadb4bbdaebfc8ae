"""The smallest detector-shaped module: what the callback, checkpoint and fault tests drive through a Trainer."""

from __future__ import annotations

import torch

from lightning_det.models.detector import Detector


class TinyDetector(Detector):
    """A conv + batch-norm ``body`` and a 1x1 ``head`` with a quadratic loss, trained by SGD at a constant lr.

    With ``scores``, validation logs ``val/mAP`` from that list, one value per epoch: the checkpoint logic then
    sees the scores a real run would log, with no detector in the way.
    """

    def __init__(self, scores: list[float] | None = None, lr: float = 0.1, momentum: float = 0.0):
        super().__init__(
            num_classes=1,
            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": momentum},
            scheduler={"_target_": "lightning_det.optim.constant", "_partial_": True},
            pixel_std=(1.0, 1.0, 1.0),  # the synthetic batches are the network's input as they are
        )
        self.scores = scores or []
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Conv2d(4, 1, 1)

    def forward(self, images):
        return self.head(self.body(images))

    def loss(self, outputs, batch):
        return {"loss": (outputs - 1).square().mean()}

    def on_validation_epoch_end(self) -> None:
        if self.scores:
            self.log("val/mAP", self.scores[self.current_epoch])
