"""A detector that answers from the labels with seeded noise: a known, non-trivial mAP without training, for
checks of the evaluation machinery (DDP synchronisation) through the real train.py."""

from __future__ import annotations

import torch
from torch import nn

from lightning_det.models.detector import Detector


class OracleDetector(Detector):
    def __init__(self, num_classes, class_names=None, optimizer=None, scheduler=None, metric=None, **_ignored):
        super().__init__(num_classes, class_names, optimizer, scheduler, metric)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return images.mean() * self.weight

    def loss(self, outputs, batch):
        return {"loss": outputs + self.weight.square().sum()}

    def decode(self, outputs, batch):
        detections = []
        for image_id, rows in zip(batch["meta"]["image_id"].tolist(), batch["labels"]):
            rows = rows[rows[:, 0] >= 0]
            g = torch.Generator().manual_seed(image_id)
            noisy = rows[:, 1:5] + torch.randn(len(rows), 4, generator=g) * 2
            boxes = torch.cat([noisy[:, :2].minimum(noisy[:, 2:]), noisy[:, :2].maximum(noisy[:, 2:])], 1)
            labels = torch.where(torch.rand(len(rows), generator=g) < 0.2, (rows[:, 0] + 1) % self.num_classes, rows[:, 0])
            strays = torch.rand(2, 4, generator=g).sort(1).values * 100
            detections.append({
                "boxes": torch.cat([boxes, strays[:, [0, 2, 1, 3]]]).to(rows),
                "scores": torch.rand(len(rows) + 2, generator=g).to(rows),
                "labels": torch.cat([labels.long(), torch.randint(self.num_classes, (2,), generator=g)]).to(rows.device),
            })
        return detections
