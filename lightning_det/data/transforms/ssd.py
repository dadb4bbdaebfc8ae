"""The SSD pipeline: photometric distortion, zoom-out, minimum-IoU random crop, flip, resize to a square.

Built from ``torchvision.transforms.v2``'s own SSD pieces (``RandomPhotometricDistort``, ``RandomZoomOut``,
``RandomIoUCrop``). Zoom-out places the image on a canvas up to ``zoom_out_max`` times larger filled with the
mean pixel, so after normalisation the border is zero; the crop keeps objects whose centre lies inside it.
Evaluation resizes to the square without keeping the aspect ratio and records ``scale`` so detections map back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms.common import DetectionTransform, Sample


class SSDTrainTransform(DetectionTransform):
    """Augment one image into an ``img_size`` square (see the module docstring).

    Args:
        img_size: output side (300 or 512 for the VGG networks).
        photometric: probability of each step of the photometric distortion (brightness, contrast, saturation,
            hue, channel order).
        zoom_out: probability of the zoom-out; ``zoom_out_max``: the largest canvas-to-image side ratio.
        crop_min_iou: the minimum-IoU choices of the random crop: a crop must overlap some object by at least the
            drawn value (0: any crop); keeping the whole image is always a choice too, so ``[]`` turns cropping
            off. ``crop_trials``: attempts per drawn value.
        flip: probability of a horizontal flip.
        min_size: boxes with a side shorter than this (px, after resizing) are dropped.
        mean, std: normalisation in pixel units; ``mean`` also fills the zoom-out canvas.
    """

    def __init__(
        self,
        img_size: int = 300,
        photometric: float = 0.5,
        zoom_out: float = 0.5,
        zoom_out_max: float = 4.0,
        crop_min_iou: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9),
        crop_trials: int = 40,
        flip: float = 0.5,
        min_size: float = 1.0,
        mean: Sequence[float] = (123.0, 117.0, 104.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.img_size = img_size
        fill = {tv_tensors.Image: [round(m) for m in self.mean], "others": 0}
        self.augment = v2.Compose([
            v2.RandomPhotometricDistort(p=photometric),
            v2.RandomZoomOut(fill=fill, side_range=(1.0, zoom_out_max), p=zoom_out),
            v2.RandomIoUCrop(sampler_options=[*crop_min_iou, 1.0], trials=crop_trials),
            v2.RandomHorizontalFlip(p=flip),
            v2.Resize((img_size, img_size), antialias=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=lambda s: (s["labels"], s["difficult"])),
        ])

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        height, width = sample.image.shape[-2:]
        out = self.augment({
            "image": tv_tensors.Image(sample.image),
            "boxes": tv_tensors.BoundingBoxes(sample.boxes, format="XYXY", canvas_size=(height, width)),
            "labels": sample.labels,
            "difficult": sample.difficult,
        })
        return Sample(
            image=self.normalize(out["image"].as_subclass(Tensor)),
            boxes=out["boxes"].as_subclass(Tensor).float(),
            labels=out["labels"],
            difficult=out["difficult"],
            image_id=sample.image_id,
            path=sample.path,
            orig_size=(self.img_size, self.img_size),
        )


class SSDEvalTransform(DetectionTransform):
    """Resize to an ``img_size`` square (no padding, aspect ratio not kept); ``scale`` maps boxes back exactly."""

    def __init__(
        self, img_size: int = 300, mean: Sequence[float] = (123.0, 117.0, 104.0), std: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.img_size = img_size

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        height, width = sample.image.shape[-2:]
        size = [self.img_size, self.img_size]
        image = F.resize(tv_tensors.Image(sample.image), size, antialias=True)
        boxes = F.resize(tv_tensors.BoundingBoxes(sample.boxes, format="XYXY", canvas_size=(height, width)), size)
        return Sample(
            image=self.normalize(image.as_subclass(Tensor)),
            boxes=boxes.as_subclass(Tensor).float(),
            labels=sample.labels,
            difficult=sample.difficult,
            image_id=sample.image_id,
            path=sample.path,
            orig_size=sample.orig_size,
            scale=(self.img_size / width, self.img_size / height),
            area=sample.area,
        )
