"""Boxes on images: labels (the image logger, the dataset browser) and detections (the image logger, predict)."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

from matplotlib import font_manager
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from lightning_det.data.collate import Labels


@functools.cache
def caption_font() -> str:
    """A scalable font that matplotlib (a dependency) ships; looked up once, when predict first draws, not when a
    training run imports the image logger (a first lookup builds matplotlib's font cache)."""
    return font_manager.findfont("DejaVu Sans")


def draw_labels(image: Tensor, rows: Tensor, class_names: Sequence[str], width: int = 1) -> Tensor:
    """Label rows ``(class, x1, y1, x2, y2, difficult)`` of the batch contract on a ``uint8 [3, H, W]`` image,
    named by class: padding rows skipped, difficult (ignored) objects in orange, the rest in green."""
    objects = Labels.present(rows.cpu())
    if len(objects.classes) == 0:  # torchvision would warn that there is nothing to draw
        return image.cpu()
    captions = [class_names[int(c)] for c in objects.classes.tolist()]
    colours = ["orange" if difficult else "lime" for difficult in objects.difficult.tolist()]
    return draw_bounding_boxes(image.cpu(), objects.boxes, labels=captions, colors=colours, width=width)


def draw_detections(image: Tensor, boxes: Tensor, names: Sequence[str], scores: Sequence[float],
                    width: int = 1) -> Tensor:
    """Detections on a ``uint8 [3, H, W]`` image in red, captioned with their class name and score (validation
    grids: red against the green of the labels)."""
    if len(boxes) == 0:  # torchvision would warn that there is nothing to draw
        return image.cpu()
    captions = [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    return draw_bounding_boxes(image.cpu(), boxes.reshape(-1, 4).cpu(), labels=captions, colors="red", width=width)


#: Distinct colours for classes (Tableau's ten, then Set2's), as RGB.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (102, 194, 165), (252, 141, 98))


def class_colour(name: str) -> tuple[int, int, int]:
    """The colour of a class, the same in every image and run (chosen by the name's checksum)."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def draw_predictions(image: Tensor, boxes: Tensor, names: Sequence[str], scores: Sequence[float]) -> Tensor:
    """``predict``'s drawing: each class in its own colour, lines and captions sized to the image (a 4000 px
    photo gets readable labels), captions inside their box."""
    if len(boxes) == 0:
        return image.cpu()
    side = min(image.shape[-2:])
    captions = [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    return draw_bounding_boxes(image.cpu(), boxes.reshape(-1, 4).cpu(), labels=captions,
                               colors=[class_colour(name) for name in names], width=max(2, round(side / 300)),
                               font=caption_font(), font_size=max(12, round(side / 40)))
