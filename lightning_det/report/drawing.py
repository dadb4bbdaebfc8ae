"""Boxes on images: labels (the image logger, the dataset browser) and detections (the image logger, predict)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from lightning_det.data.collate import Labels


def draw_labels(image: Tensor, rows: Tensor, class_names: Sequence[str], width: int = 1) -> Tensor:
    """Label rows ``(class, x1, y1, x2, y2, difficult)`` of the batch contract on a ``uint8 [3, H, W]`` image,
    named by class: padding rows skipped, difficult (ignored) objects in orange, the rest in green."""
    objects = Labels.of(rows[Labels.of(rows).valid].cpu())
    if len(objects.classes) == 0:  # torchvision would warn that there is nothing to draw
        return image.cpu()
    captions = [class_names[int(c)] for c in objects.classes.tolist()]
    colours = ["orange" if difficult else "lime" for difficult in objects.difficult.tolist()]
    return draw_bounding_boxes(image.cpu(), objects.boxes, labels=captions, colors=colours, width=width)


def draw_detections(image: Tensor, boxes: Tensor, names: Sequence[str], scores: Sequence[float],
                    width: int = 1) -> Tensor:
    """Detections on a ``uint8 [3, H, W]`` image in red, captioned with their class name and score."""
    if len(boxes) == 0:  # torchvision would warn that there is nothing to draw
        return image.cpu()
    captions = [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    return draw_bounding_boxes(image.cpu(), boxes.reshape(-1, 4).cpu(), labels=captions, colors="red", width=width)
