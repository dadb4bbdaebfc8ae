"""Augmentations that build one training sample from several images: mosaic (in the YOLO pipeline), mixup and
copy-paste (in the YOLO and SSD pipelines).

The dataset supplies the other images (:class:`~lightning_det.data.dataset.DetectionDataset`); this module holds
the pixel and box work.

- **Mixup** (Zhang et al. 2018, as YOLOv4/Ultralytics detectors use it): two augmented samples blended with a
  ratio drawn from Beta(32, 32) (about one half), and the boxes of both kept. A second sample whose canvas
  differs (a rectangle of the other orientation) is first fitted into the first's canvas.
- **Copy-paste** (Ghiasi et al. 2021) with **box crops**, since detection labels have no masks: the pixels of an
  object's box, from another training image, are pasted at a random place of the image before it is augmented,
  where they hide no more than ``MAX_HIDDEN`` of any object already there. A crop carries a little background of
  its own image with it, which a mask would leave out. Which objects are pasted is class-balanced (every class is
  as likely, whatever its count), so rare classes are seen in more places.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms.common import Sample, resize_to_fit

MIXUP_BETA = 32.0  # Beta(32, 32): a mixing ratio near one half, as Ultralytics draws it
MAX_HIDDEN = 0.3  # a pasted crop may cover at most this share of an object already in the image ...
PLACEMENT_TRIES = 10  # ... at one of this many random places, or it is not pasted
MAX_PASTED = 3  # an image that gets copy-paste receives 1 to this many objects




def mixup(first: Sample, second: Sample, fill: float | tuple[float, ...]) -> Sample:
    """``first`` and ``second`` blended with a Beta(32, 32) ratio, with the objects of both. The result keeps the
    first's canvas, pixel type and colour matrix; ``second`` is fitted into that canvas when its size differs."""
    height, width = first.image.shape[-2:]
    image, boxes = second.image, second.boxes
    if tuple(image.shape[-2:]) != (height, width):
        image, boxes = fit_into(image, boxes, height, width, fill)
    ratio = float(torch.distributions.Beta(MIXUP_BETA, MIXUP_BETA).sample())
    blended = first.image.float() * ratio + image.float() * (1 - ratio)
    if first.image.dtype == torch.uint8:
        blended = blended.round_().to(torch.uint8)
    return replace(
        first,
        image=blended,
        boxes=torch.cat((first.boxes, boxes)),
        labels=torch.cat((first.labels, second.labels)),
        difficult=torch.cat((first.difficult, second.difficult)),
        mosaic=first.mosaic or second.mosaic,
        area=None,
    )


def fit_into(image: Tensor, boxes: Tensor, height: int, width: int, fill: float | tuple[float, ...]
             ) -> tuple[Tensor, Tensor]:
    """``image`` resized to fit a ``height`` x ``width`` canvas (aspect ratio kept) at its top left, the rest
    ``fill``; the boxes move with it."""
    scale = min(height / image.shape[-2], width / image.shape[-1])
    resized = resize_to_fit(image, boxes, round(max(image.shape[-2:]) * scale))
    canvas = torch.empty((3, height, width), dtype=image.dtype)
    canvas[:] = torch.tensor(fill, dtype=torch.float32).round().to(image.dtype).view(-1, 1, 1)
    h, w = resized.image.shape[-2:]
    h, w = min(h, height), min(w, width)
    canvas[:, :h, :w] = resized.image[:, :h, :w]
    limits = torch.tensor([width, height] * 2, dtype=torch.float32)
    return canvas, torch.minimum(resized.boxes.as_subclass(Tensor), limits)


@dataclass(frozen=True)
class Donor:
    """An object to paste: the pixels of its box (``uint8 [3, h, w]``) and its label."""

    crop: Tensor
    label: int


def crop_object(image: Tensor, box: Tensor) -> Tensor:
    """The whole pixels of ``image`` an xyxy ``box`` covers (at least one)."""
    height, width = image.shape[-2:]
    x0, y0 = (min(int(v), limit - 1) for v, limit in zip(box[:2].floor().tolist(), (width, height)))
    x1, y1 = (max(min(int(v), limit), start + 1) for v, limit, start in
              zip(box[2:].ceil().tolist(), (width, height), (x0, y0)))
    return image[:, max(y0, 0):y1, max(x0, 0):x1]


def paste_objects(sample: Sample, donors: list[Donor]) -> Sample:
    """``sample`` with each donor's crop pasted (randomly flipped, shrunk to at most half the image's side) at a
    random place where it covers at most ``MAX_HIDDEN`` of any object already there (those pasted before
    included); a donor with no such place among ``PLACEMENT_TRIES`` draws is left out."""
    image = sample.image.clone()
    height, width = image.shape[-2:]
    boxes, labels, difficult = [sample.boxes], [sample.labels], [sample.difficult]
    for donor in donors:
        crop = donor.crop
        longest = max(crop.shape[-2] / height, crop.shape[-1] / width)
        if longest > 0.5:
            h, w = (max(1, int(side * 0.5 / longest)) for side in crop.shape[-2:])
            crop = F.resize(crop, [h, w], antialias=True)
        if torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        h, w = crop.shape[-2:]
        box = free_place(torch.cat(boxes), w, h, width, height)
        if box is None:
            continue
        x0, y0 = int(box[0]), int(box[1])
        image[:, y0:y0 + h, x0:x0 + w] = crop
        boxes.append(box[None])
        labels.append(torch.tensor([donor.label]))
        difficult.append(torch.tensor([False]))
    return replace(sample, image=image, boxes=torch.cat(boxes), labels=torch.cat(labels),
                   difficult=torch.cat(difficult), area=None)


def free_place(boxes: Tensor, w: int, h: int, width: int, height: int) -> Tensor | None:
    """An xyxy box of ``w`` x ``h`` px at a random whole-pixel place in a ``width`` x ``height`` image, covering at
    most ``MAX_HIDDEN`` of each of ``boxes``; None when ``PLACEMENT_TRIES`` draws find none."""
    corners = (torch.rand(PLACEMENT_TRIES, 2) * torch.tensor([width - w + 1, height - h + 1])).floor()
    candidates = torch.cat((corners, corners + torch.tensor([w, h])), 1)
    if len(boxes) == 0:
        return candidates[0]
    top_left = torch.maximum(candidates[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(candidates[:, None, 2:], boxes[None, :, 2:])
    covered = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1).clamp(min=1e-6)
    free = (covered / area <= MAX_HIDDEN).all(1)
    return candidates[int(free.nonzero()[0])] if free.any() else None
