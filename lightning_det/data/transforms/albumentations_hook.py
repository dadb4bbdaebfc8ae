"""An optional albumentations step: a user's list of albumentations transforms applied to each training image,
with its boxes kept in step, before the family's own pipeline.

As Ultralytics does when albumentations is installed, and for the same reason: the photometric and blur
transforms users know (``Blur``, ``CLAHE``, ``ToGray``, ``RandomFog``...) without porting them. It runs on the
decoded ``uint8`` image (already reduced to the pipeline's ``decode_size``), so it works in the YOLO, SSD and
Faster R-CNN pipelines alike; a spatial transform moves the boxes through albumentations' own box handling, and
the boxes it drops leave with their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from lightning_det.data.transforms.common import Sample

INSTALL_HINT = "data.albumentations needs the albumentations package: pip install albumentations"


class AlbumentationsStep:
    """``Sample -> Sample`` through ``albumentations.Compose(transforms)`` with pixel (``pascal_voc``) boxes."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        try:
            import albumentations
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error
        self.compose = albumentations.Compose(
            list(transforms),
            bbox_params=albumentations.BboxParams(format="pascal_voc", label_fields=["objects"], clip=True),
        )

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample.image.shape[-2:]
        boxes = sample.boxes.clamp(min=0).minimum(torch.tensor([width, height] * 2, dtype=sample.boxes.dtype))
        pixels = np.ascontiguousarray(sample.image.permute(1, 2, 0).numpy())  # a copy: the image may be a cached one
        out = self.compose(image=pixels, bboxes=boxes.numpy(),
                           objects=np.arange(len(boxes)))
        kept = torch.as_tensor(np.asarray(out["objects"], dtype=np.int64))
        image = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1).contiguous()
        return replace(
            sample,
            image=image,
            boxes=torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32)).reshape(-1, 4),
            labels=sample.labels[kept],
            difficult=sample.difficult[kept],
            area=None if sample.area is None else sample.area[kept],
        )
