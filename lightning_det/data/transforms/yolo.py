"""YOLO training augmentation: mosaic, letterbox, random scale/translate, HSV-style colour jitter, flip."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from lightning_det.data.transforms.common import (
    DetectionTransform,
    MixAugment,
    Resized,
    Sample,
    as_boxes,
    clip_and_filter,
    colour_matrix,
    letterbox_canvas,
    map_resized,
    resize_to_fit,
)

Layout = tuple[Tensor, Tensor, Tensor]  # canvas image, unclipped boxes, visible region per box
STRIDE = 32  # a rectangle's sides are multiples of the networks' largest stride

class YoloTrainTransform(DetectionTransform):
    """Augment one image, or four into a mosaic, into an ``img_size`` square (with ``rect``, a single image into
    its own rectangle). ``mix``: how often the dataset makes a sample of several images (mosaic, mixup,
    copy-paste: :class:`~lightning_det.data.transforms.common.MixAugment`).

    Mosaic: each of the four images is resized so its longer side is ``img_size`` and fills one quadrant of the
    canvas around a random centre (in the middle half), showing the part nearest that centre. Without mosaic the
    image is letterboxed. Then a random affine (zoom in ``1 +- scale``, shift up to ``translate * img_size``),
    the box clipping rule of :func:`~lightning_det.data.transforms.common.clip_and_filter`
    (``min_size``, ``min_visible``), colour jitter (``hsv_h`` hue shift as a fraction of the colour circle,
    ``hsv_s``/``hsv_v`` saturation/brightness factors in ``1 +- gain``), and a horizontal flip with
    probability ``flip``. ``mix.mosaic`` is the probability that the dataset supplies four images.

    Every step works on the ``uint8`` image, and the sample leaves ``uint8``. The colour jitter is one 3 x 3 matrix
    per image (:func:`colour_matrix`), handed over in ``Sample.colour``: collation applies the batch's matrices
    in one product with the float conversion and clips once, about a third of the time a matrix per image took
    with its own float copy. As every image is first resized to
    fit ``img_size``, the dataset may hand over images already at that size (``decode_size``).

    ``rect``: a single image is letterboxed into the smallest rectangle of multiples of ``STRIDE`` around it (a
    1024 x 768 photo at 512 becomes 512 x 384, not 512 x 512), and zoomed and shifted within it. The padding a
    square adds is computed for nothing: a 4:3 image costs 0.75 of the square's pixels, a 16:9 one 0.56. With
    batches of one orientation (``DetectionDataModule(group_aspect_ratio=True)``) the batch keeps that shape; a
    mosaic stays square.
    """

    def __init__(
        self,
        img_size: int | str = 416,  # "auto": set by DetectionDataModule from the training boxes
        mix: MixAugment | Mapping[str, float] | None = None,
        scale: float = 0.5,
        translate: float = 0.1,
        hsv_h: float = 0.015,
        hsv_s: float = 0.7,
        hsv_v: float = 0.4,
        flip: float = 0.5,
        fill: int = 114,
        min_size: float = 2.0,
        min_visible: float = 0.2,
        rect: bool = False,
    ) -> None:
        self.img_size = img_size
        self.stride = STRIDE if rect else None
        self.mix = MixAugment.of(mix)
        self.scale = scale
        self.translate = translate
        self.flip = flip
        self.fill = fill
        self.min_size = min_size
        self.min_visible = min_visible
        self.hsv_h, self.hsv_s, self.hsv_v = hsv_h, hsv_s, hsv_v

    def with_strength(self, strength: float) -> YoloTrainTransform:
        """A copy whose zoom, shift and colour jitter are ``strength`` of this one's (zoom in ``1 +- strength *
        scale``, ...); the flip and the mix stay."""
        if strength == 1:
            return self
        weaker = copy.copy(self)
        weaker.scale, weaker.translate = self.scale * strength, self.translate * strength
        weaker.hsv_h, weaker.hsv_s, weaker.hsv_v = (strength * gain for gain in (self.hsv_h, self.hsv_s, self.hsv_v))
        return weaker

    @property
    def decode_size(self) -> int:
        """The longer side every image is resized to before anything else (see :class:`DetectionDataset`)."""
        return self.img_size

    def __call__(self, samples: list[Sample]) -> Sample:
        first = samples[0]
        if len(samples) == 4:
            image, boxes, regions = self.mosaic(samples)
            image, boxes, regions = self.random_affine(image, boxes, regions, tuple(image.shape[-2:]), (0, 0))
        else:
            image, boxes, regions = self.letterboxed(first)
        boxes, keep = clip_and_filter(boxes, regions, self.min_size, self.min_visible)
        labels = torch.cat([s.labels for s in samples])[keep]
        difficult = torch.cat([s.difficult for s in samples])[keep]
        canvas = tuple(image.shape[-2:])
        boxes = as_boxes(boxes[keep], canvas)
        if torch.rand(()) < self.flip:
            image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        return Sample(
            image=image.as_subclass(Tensor),
            colour=self.random_colour(),
            boxes=boxes.as_subclass(Tensor),
            labels=labels,
            difficult=difficult,
            image_id=first.image_id,
            path=first.path,
            orig_size=canvas,
            mosaic=len(samples) == 4,
        )

    def random_colour(self) -> Tensor:
        """Random brightness, saturation and hue as one colour matrix (:func:`colour_matrix`)."""
        draw = (2 * torch.rand(3) - 1).tolist()  # each in -1..1
        brightness = max(0.0, 1 + self.hsv_v * draw[0])
        saturation = max(0.0, 1 + self.hsv_s * draw[1])
        return colour_matrix(brightness, saturation, self.hsv_h * draw[2])

    def letterboxed(self, sample: Sample) -> Layout:
        """The letterbox and the random affine in one paste: the image is zoomed and shifted within the canvas it
        would be letterboxed into, with no padded copy made first (one copy of the pixels fewer per sample)."""
        resized = resize_to_fit(sample.image, sample.boxes, self.img_size)
        height, width = resized.image.shape[-2:]
        canvas, origin = letterbox_canvas((height, width), self.img_size, self.stride)
        region = torch.tensor([0.0, 0.0, width, height]).expand(len(sample.boxes), 4)
        return self.random_affine(resized.image, resized.boxes.as_subclass(Tensor), region, canvas, origin)

    def mosaic(self, samples: list[Sample]) -> Layout:
        size = self.img_size
        canvas = torch.full((3, size, size), self.fill, dtype=torch.uint8)
        centre_x, centre_y = (size * (0.25 + 0.5 * torch.rand(2))).long().tolist()
        boxes, regions = [], []
        for k, sample in enumerate(samples):  # four tiles: top-left, top-right, bottom-left, bottom-right
            tile: Resized = resize_to_fit(sample.image, sample.boxes, size)
            height, width = tile.image.shape[-2:]
            left, top = k % 2 == 0, k < 2
            origin_x = centre_x - width if left else centre_x
            origin_y = centre_y - height if top else centre_y
            x1, x2 = max(origin_x, 0 if left else centre_x), min(origin_x + width, centre_x if left else size)
            y1, y2 = max(origin_y, 0 if top else centre_y), min(origin_y + height, centre_y if top else size)
            canvas[:, y1:y2, x1:x2] = tile.image[:, y1 - origin_y : y2 - origin_y, x1 - origin_x : x2 - origin_x]
            boxes.append(tile.boxes.as_subclass(Tensor) + torch.tensor([origin_x, origin_y] * 2))
            regions.append(torch.tensor([x1, y1, x2, y2], dtype=torch.float32).repeat(len(sample.boxes), 1))
        return tv_tensors.Image(canvas), torch.cat(boxes), torch.cat(regions)

    def random_affine(
        self, image: Tensor, boxes: Tensor, regions: Tensor, canvas: tuple[int, int], origin: tuple[int, int]
    ) -> Layout:
        """Zoom about the centre of a ``canvas`` (h, w) of ``fill`` grey on which ``image`` sits at ``origin``
        (left, top), and shift; boxes and their visible regions (in ``image`` pixels) move with the image.

        Without rotation or shear the warp is a crop, a resize and a paste (cheap ``uint8`` steps, antialiased
        when zooming out): per axis, the whole image pixels that land inside the canvas are resized onto the whole
        output pixels they cover, and boxes are mapped with exactly that scale and offset.
        """
        zoom = 1 + self.scale * (2 * torch.rand(()).item() - 1)
        height, width = canvas
        shift = (self.translate * torch.tensor([width, height]) * (2 * torch.rand(2) - 1)).round().tolist()
        image_height, image_width = image.shape[-2:]
        (x0, x1, u0, u1), (y0, y1, v0, v1) = (
            self.axis_crop(zoom, t, size, start, start + length)
            for t, size, start, length in zip(shift, canvas[::-1], origin, (image_width, image_height))
        )
        pasted = torch.full((image.shape[0], height, width), self.fill, dtype=image.dtype)
        left, top = origin
        if x1 > x0 and y1 > y0 and u1 > u0 and v1 > v0:
            crop = image[:, y0 - top : y1 - top, x0 - left : x1 - left].contiguous()  # strided: half the speed
            pasted[:, v0:v1, u0:u1] = F.resize(crop, [v1 - v0, u1 - u0], antialias=True)
        source, target = (x0 - left, y0 - top, x1 - left, y1 - top), (u0, v0, u1, v1)
        moved_boxes = map_resized(boxes, source, target)
        lowest = torch.tensor([u0, v0] * 2, dtype=torch.float32)
        highest = torch.tensor([u1, v1] * 2, dtype=torch.float32)
        moved_regions = map_resized(regions, source, target).clamp(min=lowest, max=highest)
        return tv_tensors.Image(pasted), moved_boxes, moved_regions

    @staticmethod
    def axis_crop(zoom: float, shift: float, size: int, start: int, stop: int) -> tuple[int, int, int, int]:
        """Along one axis of a canvas of ``size`` pixels whose pixels ``[start, stop)`` hold the image: those of
        them that stay on the canvas under ``u = (x - c) zoom + c + shift`` (``c`` the centre), ``[x0, x1)``, and
        the output pixels ``[u0, u1)`` they are resized to."""
        centre = size / 2
        x0 = max(start, math.ceil((0 - centre - shift) / zoom + centre - 1e-6))
        x1 = min(stop, math.floor((size - centre - shift) / zoom + centre + 1e-6))
        u0, u1 = (min(size, max(0, round((x - centre) * zoom + centre + shift))) for x in (x0, x1))
        return x0, x1, u0, u1
