"""The SSD pipeline: photometric distortion, zoom-out, minimum-IoU random crop, flip, resize to a square.

The reference's steps (torchvision's ``RandomPhotometricDistort``, ``RandomZoomOut`` and ``RandomIoUCrop``) are
laid out on the boxes first, then done in one pass over the pixels. Zoom-out places the image on a canvas up to
``zoom_out_max`` times larger filled with the mean pixel; the crop is drawn on that canvas by ``RandomIoUCrop``'s
rule (:func:`iou_crop`) and keeps the objects whose centre lies inside it. Only the part of the image that lands
in the crop is resized (``uint8``) onto the output square, and the colour distortion is one affine colour map
applied with the float conversion; the rest of the square is the ``fill`` pixel (the mean pixel). The
canvas is never built, so a 4x zoom-out costs what a plain resize costs.

Evaluation resizes to the square without keeping the aspect ratio and records ``scale`` so detections map back;
``resize="torchvision"`` resizes as torchvision's SSDs do, so their weights see what they were trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms.common import (
    GREY_WEIGHTS,
    DetectionTransform,
    MixAugment,
    ResizeMode,
    Sample,
    check_resize_mode,
    clip_and_filter,
    colour_matrix,
    map_resized,
    resize_as_torchvision,
)

# torchvision's RandomPhotometricDistort ranges
BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.875, 1.125), (0.5, 1.5), (0.5, 1.5), (-0.05, 0.05)


def uniform(low_high: tuple[float, float]) -> float:
    low, high = low_high
    return low + (high - low) * torch.rand(()).item()


def iou_crop(
    boxes: Tensor, width: int, height: int, min_ious: Sequence[float], trials: int,
    scale: tuple[float, float] = (0.3, 1.0), aspect_ratio: tuple[float, float] = (0.5, 2.0),
) -> tuple[int, int, int, int, Tensor]:
    """The SSD random crop of a ``width`` x ``height`` canvas: ``(x0, y0, x1, y1, kept)``.

    torchvision's ``RandomIoUCrop`` rule, with each round's ``trials`` drawn at once: draw a minimum IoU from
    ``min_ious`` (1 or more: keep the whole canvas); a trial has sides of ``scale`` times the canvas', an aspect
    ratio in ``aspect_ratio``, a random place, some box centre strictly inside, and an IoU with one of those boxes
    of at least the drawn value; the first such trial is the crop, else draw again. ``kept``: the boxes whose
    centre lies inside it.
    """
    whole = (0, 0, width, height, torch.ones(len(boxes), dtype=torch.bool))
    if len(boxes) == 0:
        return whole
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    while True:
        min_iou = min_ious[int(torch.randint(len(min_ious), ()))]
        if min_iou >= 1.0:
            return whole
        sides = (scale[0] + (scale[1] - scale[0]) * torch.rand(trials, 2)) * torch.tensor([width, height])
        sides = sides.long()  # truncated, as torchvision does
        corners = ((torch.tensor([width, height]) - sides) * torch.rand(trials, 2)).long()
        crops = torch.cat((corners, corners + sides), 1)  # [T, 4] xyxy
        ratio = sides[:, 0] / sides[:, 1].clamp(min=1)
        inside = ((centres > crops[:, None, :2]) & (centres < crops[:, None, 2:])).all(-1)  # [T, N]
        overlap = box_iou(crops.float(), boxes).masked_fill(~inside, 0.0).amax(1)
        good = (ratio >= aspect_ratio[0]) & (ratio <= aspect_ratio[1]) & (sides > 0).all(1)
        good &= inside.any(1) & (overlap >= min_iou)
        if good.any():
            first = int(good.nonzero()[0])
            x0, y0, x1, y1 = crops[first].tolist()
            return x0, y0, x1, y1, inside[first]


def photometric_map(
    image: Tensor, brightness: float, contrast: float, saturation: float, hue: float, channels: Sequence[int]
) -> Tensor:
    """``uint8 [3, H, W]`` -> ``float`` 0..255: scale by ``brightness``, blend with the mean grey by ``contrast``,
    with each pixel's grey by ``saturation``, turn the hue (see :func:`colour_matrix`), reorder to ``channels``;
    clipped once at the end. Every step is linear and keeps the grey, so together they are one affine colour map
    ``M x + b``, one pass over the pixels. Contrast comes first of its group (torchvision draws whether it goes
    before or after saturation and hue; that changes only which mean grey it blends towards)."""
    pixels = image.float()
    if (brightness, contrast, saturation, hue, list(channels)) == (1.0, 1.0, 1.0, 0.0, [0, 1, 2]):
        return pixels
    matrix = (contrast * colour_matrix(brightness, saturation, hue))[list(channels)]
    mean_grey = brightness * float(torch.tensor(GREY_WEIGHTS) @ pixels.mean((1, 2)))  # after the brightness
    offset = (1 - contrast) * mean_grey  # the grey, kept by saturation, hue and channel order
    return (torch.einsum("ij,jhw->ihw", matrix, pixels) + offset).clamp_(0, 255)


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
        fill: the RGB pixel of the zoom-out canvas (the reference's mean pixel).
        mix: how often the dataset makes a sample of several images (mixup, copy-paste:
            :class:`~lightning_det.data.transforms.common.MixAugment`); no mosaic, which this pipeline's single-image
            crop and zoom-out replace.
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
        fill: Sequence[float] = (123.0, 117.0, 104.0),
        mix: MixAugment | Mapping[str, float] | None = None,
    ) -> None:
        self.mix = MixAugment.of(mix)
        if self.mix.mosaic:
            raise ValueError("the SSD pipeline has no mosaic: set data.pipeline.train_transform.mix.mosaic=0")
        self.img_size = img_size
        self.fill = tuple(float(value) for value in fill)
        self.photometric = photometric
        self.zoom_out, self.zoom_out_max = zoom_out, zoom_out_max
        self.crop_min_iou, self.crop_trials = [*crop_min_iou, 1.0], crop_trials
        self.flip = flip
        self.min_size = min_size

    @property
    def decode_size(self) -> int:
        """Images are kept at most twice the output side (see :class:`DetectionDataset`): a crop of half the
        image or more is never enlarged, and a large photo is not resized from full size for every sample."""
        return 2 * self.img_size

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        height, width = sample.image.shape[-2:]
        canvas_w, canvas_h, left, top = self.zoom_out_layout(width, height)
        boxes = sample.boxes + torch.tensor([left, top] * 2, dtype=torch.float32)
        x0, y0, x1, y1, inside = iou_crop(boxes, canvas_w, canvas_h, self.crop_min_iou, self.crop_trials)
        # the image's part of the crop, in image pixels, and the output pixels it is resized onto
        size = self.img_size
        sx, sy = size / (x1 - x0), size / (y1 - y0)
        src_x0, src_x1 = max(left, x0) - left, min(left + width, x1) - left
        src_y0, src_y1 = max(top, y0) - top, min(top + height, y1) - top
        out_x0, out_x1 = (round((x - x0) * sx) for x in (src_x0 + left, src_x1 + left))
        out_y0, out_y1 = (round((y - y0) * sy) for y in (src_y0 + top, src_y1 + top))
        image = torch.tensor(self.fill).view(3, 1, 1).repeat(1, size, size)
        if out_x1 > out_x0 and out_y1 > out_y0:
            patch = F.resize(sample.image[:, src_y0:src_y1, src_x0:src_x1], [out_y1 - out_y0, out_x1 - out_x0],
                             antialias=True)
            image[:, out_y0:out_y1, out_x0:out_x1] = self.distort_colour(patch)
        on_canvas = (src_x0 + left, src_y0 + top, src_x1 + left, src_y1 + top)
        boxes = map_resized(boxes, on_canvas, (out_x0, out_y0, out_x1, out_y1))
        boxes, keep = clip_and_filter(boxes, torch.tensor([[0.0, 0.0, size, size]]), self.min_size, 0.0)
        keep &= inside
        boxes = boxes[keep]
        if torch.rand(()) < self.flip:
            image = image.flip(-1)
            boxes = torch.stack((size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]), -1)
        return Sample(
            image=image,
            boxes=boxes,
            labels=sample.labels[keep],
            difficult=sample.difficult[keep],
            image_id=sample.image_id,
            path=sample.path,
            orig_size=(size, size),
        )

    def zoom_out_layout(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(canvas_w, canvas_h, left, top)``: RandomZoomOut's canvas and the image's place on it."""
        if torch.rand(()) >= self.zoom_out:
            return width, height, 0, 0
        ratio = uniform((1.0, self.zoom_out_max))
        canvas_w, canvas_h = int(width * ratio), int(height * ratio)
        shift = torch.rand(2)
        return canvas_w, canvas_h, int((canvas_w - width) * shift[0]), int((canvas_h - height) * shift[1])

    def distort_colour(self, patch: Tensor) -> Tensor:
        """The photometric distortion: brightness, contrast, saturation, hue and a channel shuffle, each with
        probability ``photometric`` (torchvision's ranges), as one :func:`photometric_map`."""
        apply = (torch.rand(5) < self.photometric).tolist()
        return photometric_map(
            patch,
            brightness=uniform(BRIGHTNESS) if apply[0] else 1.0,
            contrast=uniform(CONTRAST) if apply[1] else 1.0,
            saturation=uniform(SATURATION) if apply[2] else 1.0,
            hue=uniform(HUE) if apply[3] else 0.0,
            channels=torch.randperm(3).tolist() if apply[4] else [0, 1, 2],
        )


class SSDEvalTransform(DetectionTransform):
    """Resize to an ``img_size`` square (no padding, aspect ratio not kept); ``scale`` maps boxes back exactly.

    ``resize``: ``"antialias"`` resizes the ``uint8`` image with antialiasing (the training pipeline's resize);
    ``"torchvision"`` as torchvision's SSDs (``GeneralizedRCNNTransform`` with a ``fixed_size``): bilinear, no
    antialiasing, on float pixels (:func:`~lightning_det.data.transforms.common.resize_as_torchvision`).
    """

    def __init__(self, img_size: int = 300, resize: ResizeMode = "antialias") -> None:
        check_resize_mode(resize)
        self.img_size = img_size
        self.resize = resize

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        height, width = sample.image.shape[-2:]
        image, boxes = self.resized(sample.image, sample.boxes)
        return Sample(
            image=image.as_subclass(Tensor).float(),
            boxes=boxes.as_subclass(Tensor).float(),
            labels=sample.labels,
            difficult=sample.difficult,
            image_id=sample.image_id,
            path=sample.path,
            orig_size=sample.orig_size,
            scale=(self.img_size / width, self.img_size / height),
            area=sample.area,
        )

    def resized(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """``image`` and its xyxy ``boxes`` on the ``img_size`` square, by the ``resize`` mode."""
        side = self.img_size
        if self.resize == "torchvision":
            moved = resize_as_torchvision(image, boxes, side, side, fixed_size=(side, side))
            return moved.image, moved.boxes
        height, width = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        return F.resize(tv_tensors.Image(image), [side, side], antialias=True), F.resize(boxes, [side, side])
