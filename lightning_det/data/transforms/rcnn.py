"""The Faster R-CNN pipeline: resize so the shorter side is ``min_size`` (the longer at most ``max_size``), flip.

Images keep their aspect ratio, so a batch holds differently shaped images; the collate function pads them
bottom/right to a common size, which leaves the ``scale``/``pad`` mapping of each image valid. An exported
model takes one input size instead: ``canvas`` pastes each image top-left on a square of that side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms.common import (
    DetectionTransform,
    ResizeMode,
    Sample,
    as_boxes,
    check_resize_mode,
    resize_as_torchvision,
)


def resize_shorter_side(
    image: Tensor, boxes: Tensor, min_size: int, max_size: int
) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes, tuple[float, float]]:
    """Scale by ``min(min_size / shorter, max_size / longer)``; returns image, boxes and the exact ``(sx, sy)``."""
    height, width = image.shape[-2:]
    ratio = min(min_size / min(height, width), max_size / max(height, width))
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    resized = F.resize(tv_tensors.Image(image), [new_h, new_w], antialias=True)
    moved = F.resize(as_boxes(boxes, (height, width)), [new_h, new_w])
    return resized, moved, (new_w / width, new_h / height)


class RCNNTransform(DetectionTransform):
    """Resize by the shorter side and flip horizontally with probability ``flip`` (0 for evaluation).

    ``resize``: ``antialias`` resizes with antialiasing to the rounded size; ``torchvision`` resizes as
    torchvision's detectors do (bilinear without antialiasing, the size floored), so that a model given their
    COCO weights sees the images they were trained and scored on.

    Without a flip, ``scale`` maps the boxes back to the original image (evaluation); a flipped image is an
    augmented view and describes its own canvas (identity mapping), as every training transform does.

    ``canvas`` (the input of an exported model): the resized image goes top-left on a ``canvas`` square filled
    with ``fill`` (an RGB pixel; the model's mean pixel normalises to 0, the padding a batch gets in training).
    The mapping back is unchanged, since the image does not move.
    """

    def __init__(
        self,
        min_size: int = 600,
        max_size: int = 1000,
        flip: float = 0.0,
        canvas: int | None = None,
        fill: Sequence[float] = (0.0, 0.0, 0.0),
        resize: ResizeMode = "antialias",
    ) -> None:
        check_resize_mode(resize)
        if min_size > max_size:
            raise ValueError(f"min_size={min_size} is larger than max_size={max_size}")
        if canvas is not None and canvas < max_size:
            raise ValueError(f"canvas={canvas} is smaller than max_size={max_size}: a resized image would not fit")
        self.min_size = min_size
        self.max_size = max_size
        self.flip = flip
        self.canvas = canvas
        self.fill = tuple(fill)
        self.resize = resize

    @staticmethod
    def export_settings(settings: dict[str, Any], img_size: int | None, mean_pixel: list[float]) -> dict[str, Any]:
        """The aspect ratio is kept, so an exported model takes a square ``canvas`` of ``img_size`` (default
        ``max_size``, so every resized image fits; a smaller one lowers ``max_size`` and ``min_size`` to it) filled
        with the model's mean pixel, which normalises to the zero padding of a training batch."""
        side = img_size or settings["max_size"]
        return {**settings, "max_size": min(settings["max_size"], side), "min_size": min(settings["min_size"], side),
                "canvas": side, "fill": mean_pixel}

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        if self.resize == "torchvision":
            image, boxes, scale, _ = resize_as_torchvision(sample.image, sample.boxes, self.min_size, self.max_size)
        else:
            image, boxes, scale = resize_shorter_side(sample.image, sample.boxes, self.min_size, self.max_size)
        flipped = self.flip > 0 and bool(torch.rand(()) < self.flip)
        if flipped:
            image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        resized_size = tuple(image.shape[-2:])
        image = image.as_subclass(Tensor).float()
        if self.canvas is not None:
            image = on_canvas(image, self.canvas, self.fill)
        return Sample(
            image=image,
            boxes=boxes.as_subclass(Tensor),
            labels=sample.labels,
            difficult=sample.difficult,
            image_id=sample.image_id,
            path=sample.path,
            orig_size=resized_size if flipped else sample.orig_size,
            scale=(1.0, 1.0) if flipped else scale,
            area=sample.area,
        )


def on_canvas(image: Tensor, side: int, fill: Sequence[float]) -> Tensor:
    """``image [3, h, w]`` at the top-left of a ``side`` x ``side`` image of the pixel ``fill``."""
    canvas = image.new_tensor(fill).view(3, 1, 1).repeat(1, side, side)
    canvas[:, : image.shape[1], : image.shape[2]] = image
    return canvas
