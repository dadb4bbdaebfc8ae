"""What every detector family's pipeline shares: the sample type, letterboxing, box clipping, colour, normalisation.

Geometry runs through ``torchvision.transforms.v2`` functionals on ``tv_tensors`` so images and
``BoundingBoxes`` always move together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # the luma of torchvision's rgb_to_grayscale
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def colour_matrix(brightness: float, saturation: float, hue: float) -> Tensor:
    """The RGB matrix that scales brightness by ``brightness``, blends each pixel with its grey by
    ``saturation`` (0: grey, 1: unchanged) and turns the hue by ``hue`` of the colour circle, by rotating the
    chroma plane (I, Q) of YIQ about the luma axis. All three are linear, so one 3 x 3 product does them at once
    (HSV's hue shift is not linear; this rotation is its linear counterpart and keeps the luma)."""
    grey = torch.tensor(GREY_WEIGHTS)
    saturate = saturation * torch.eye(3) + (1 - saturation) * grey.expand(3, 3)
    cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])  # HSV's direction: red -> green
    return brightness * (YIQ_TO_RGB @ rotate @ RGB_TO_YIQ) @ saturate


@dataclass
class Sample:
    """One image with its objects, before (``uint8`` image) or after a transform (``uint8`` or ``float`` pixels
    in 0..255, and optionally a ``colour`` matrix that collation applies to the whole batch at once).

    ``scale``/``pad`` map the image's pixels back to the source image: ``x_orig = (x - pad_x) / scale_x``;
    ``orig_size`` is the ``(h, w)`` that mapping lands in. Evaluation transforms keep this exact; training
    transforms produce augmented views (mosaic, affine, flip) and describe their own canvas instead (identity
    mapping, ``orig_size`` = canvas size).
    """

    image: Tensor  # [3, H, W]
    boxes: Tensor  # float32 [N, 4] xyxy pixels of ``image``
    labels: Tensor  # int64 [N]
    difficult: Tensor  # bool [N]
    image_id: int
    path: str
    orig_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    pad: tuple[float, float] = (0.0, 0.0)
    mosaic: bool = False
    area: Tensor | None = None  # float32 [N]: each object's own area in source pixels (COCO's, 0 where absent),
    # kept by the evaluation transforms so validation bins objects by size as COCO does
    colour: Tensor | None = None  # float32 [3, 3]: a colour matrix still to apply to the pixels (collation does
    # it for the whole batch at once, after the float conversion; see ``collate.pad_and_stack``)


def as_boxes(boxes: Tensor, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    """Unclamped xyxy boxes: clipping is done once, by :func:`clip_and_filter`, with the drop rule."""
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas_size, clamping_mode=None)


class Resized(NamedTuple):
    image: tv_tensors.Image
    boxes: tv_tensors.BoundingBoxes
    scale: tuple[float, float]  # (sx, sy): new size / old size per axis, exact after rounding the size
    pad: tuple[int, int]  # (left, top) padding added, zero when not padded


def resize_to_fit(image: Tensor, boxes: Tensor, size: int) -> Resized:
    """Resize so the longer side is ``size``, keeping the aspect ratio."""
    height, width = image.shape[-2:]
    ratio = size / max(height, width)
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    resized = F.resize(tv_tensors.Image(image), [new_h, new_w], antialias=True)
    moved = F.resize(as_boxes(boxes, (height, width)), [new_h, new_w])
    return Resized(resized, moved, (new_w / width, new_h / height), (0, 0))


#: How an evaluation transform resizes: ``antialias`` (antialiased ``uint8``, as in training) or ``torchvision``
#: (:func:`resize_as_torchvision`, what torchvision's detectors and so their COCO weights expect).
ResizeMode = Literal["antialias", "torchvision"]


def check_resize_mode(resize: str) -> None:
    if resize not in get_args(ResizeMode):
        raise ValueError(f"resize={resize!r}: use one of {', '.join(get_args(ResizeMode))}")


def resize_as_torchvision(
    image: Tensor, boxes: Tensor, min_size: int, max_size: int, fixed_size: tuple[int, int] | None = None
) -> Resized:
    """torchvision's ``GeneralizedRCNNTransform`` resize, op for op, so a model given torchvision's weights sees
    what torchvision's model sees: bilinear ``interpolate`` without antialiasing on float pixels, to
    ``fixed_size`` (h, w) when given, else by ``min(min_size / shorter, max_size / longer)`` with the size floored
    by ``recompute_scale_factor``. Interpolation is linear, so resizing pixels and then normalising (here) equals
    torchvision's normalising and then resizing up to float rounding."""
    height, width = image.shape[-2:]
    if fixed_size is not None:
        size, factor = list(fixed_size), None
    else:
        size, factor = None, min(min_size / min(height, width), max_size / max(height, width))
    resized = torch.nn.functional.interpolate(
        image[None].float(), size=size, scale_factor=factor, mode="bilinear",
        recompute_scale_factor=None if factor is None else True, align_corners=False,
    )[0]
    new_h, new_w = resized.shape[-2:]
    moved = F.resize(as_boxes(boxes, (height, width)), [new_h, new_w])
    return Resized(tv_tensors.Image(resized), moved, (new_w / width, new_h / height), (0, 0))


def letterbox_canvas(
    content: tuple[int, int], size: int, stride: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``(height, width)`` canvas a resized image of ``content`` ``(h, w)`` is letterboxed into (``size``
    square, or with ``stride`` the next multiples of it), and the ``(left, top)`` offset that centres it."""
    new_h, new_w = content
    height, width = (size, size) if stride is None else (-(-side // stride) * stride for side in (new_h, new_w))
    return (height, width), ((width - new_w) // 2, (height - new_h) // 2)


def letterbox(image: Tensor, boxes: Tensor, size: int, fill: int = 114, stride: int | None = None) -> Resized:
    """Resize to fit a ``size`` x ``size`` square and pad the rest evenly with ``fill``; with ``stride``, pad
    only up to the next multiple of it on each side (the smallest rectangle the network takes)."""
    resized = resize_to_fit(image, boxes, size)
    new_h, new_w = resized.image.shape[-2:]
    (height, width), (left, top) = letterbox_canvas((new_h, new_w), size, stride)
    padding = [left, top, width - new_w - left, height - new_h - top]
    return Resized(
        F.pad(resized.image, padding, fill=fill), F.pad(resized.boxes, padding), resized.scale, (left, top)
    )


def map_resized(boxes: Tensor, source: tuple[int, int, int, int], target: tuple[int, int, int, int]) -> Tensor:
    """xyxy ``boxes`` (``[N, 4]``) moved as the pixels of ``source`` (x0, y0, x1, y1) move when they are resized
    onto ``target``: the exact per-axis scale and offset of that resize (an empty source keeps the scale finite)."""
    (x0, y0, x1, y1), (u0, v0, u1, v1) = source, target
    scale = torch.tensor([(u1 - u0) / max(x1 - x0, 1), (v1 - v0) / max(y1 - y0, 1)] * 2)
    origin = torch.tensor([x0, y0] * 2, dtype=torch.float32)
    return (boxes - origin) * scale + torch.tensor([u0, v0] * 2, dtype=torch.float32)


def clip_and_filter(
    boxes: Tensor, regions: Tensor, min_size: float = 2.0, min_visible: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clip boxes to the part of the canvas their image occupies and decide which are still worth learning.

    ``regions`` ``[N, 4]`` is, per box, the rectangle where its source image is visible (the letterbox content
    area, or its mosaic tile, moved by the same augmentation as the box). A box is kept when, after clipping,
    both sides are at least ``min_size`` px and at least ``min_visible`` of its unclipped area remains.
    Returns the clipped boxes and the keep mask.
    """
    full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = torch.maximum(torch.minimum(boxes, regions[:, [2, 3, 2, 3]]), regions[:, [0, 1, 0, 1]])
    width = (clipped[:, 2] - clipped[:, 0]).clamp(min=0)
    height = (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
    keep = (width >= min_size) & (height >= min_size) & (width * height >= min_visible * full_area)
    return clipped, keep


@dataclass(frozen=True)
class MixAugment:
    """How often a training sample is made of several images: ``mosaic`` (four images, YOLO pipeline only),
    ``mixup`` (two augmented samples blended) and ``copy_paste`` (objects of other images pasted in), each a
    probability per sample. ``close_mosaic`` turns all three off for the last epochs."""

    mosaic: float = 0.0
    mixup: float = 0.0
    copy_paste: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mosaic", "mixup", "copy_paste"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"train_transform.mix.{name} is a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def of(cls, mix: MixAugment | Mapping[str, float] | None) -> MixAugment:
        """The settings from a config node (a mapping), an instance, or None (no mixing)."""
        return mix if isinstance(mix, MixAugment) else cls(**(mix or {}))


NO_MIX = MixAugment()


@dataclass(frozen=True)
class EpochAugment:
    """What the main process decides for an epoch's training samples. The training sampler sends it with every
    index, so loader workers follow it even when they are persistent and hold their own copy of the transform.

    ``mix``: the multi-image augmentations are allowed (``close_mosaic`` turns them off for the last epochs).
    ``strength``: the share of the transform's random zoom, shift and colour jitter to use
    (``pipeline.full_augment_passes``).
    """

    mix: bool = True
    strength: float = 1.0


class DetectionTransform:
    """Base of every pipeline: ``__call__(samples) -> Sample`` with the image as pixels (0..255), ``uint8`` or
    ``float``; collation turns a batch into ``float`` once (:func:`~lightning_det.data.collate.pad_and_stack`).

    The pipeline does not normalise: the model does (``Detector.normalise``), so a checkpoint carries its own
    mean and std and a pretrained backbone brings its normalisation with it. ``mix`` tells the dataset how often
    to build a sample from several images (:mod:`~lightning_det.data.transforms.mix`), and ``fill`` is the pixel
    of padding.
    """

    mix: MixAugment = NO_MIX
    fill: int | tuple[float, ...] = 0

    def __call__(self, samples: list[Sample]) -> Sample:
        raise NotImplementedError

    def with_strength(self, strength: float) -> DetectionTransform:
        """This transform with ``strength`` of its random distortions' width; one that has none to weaken is
        itself."""
        return self

    @staticmethod
    def export_settings(settings: dict[str, Any], img_size: int | None, mean_pixel: list[float]) -> dict[str, Any]:
        """This evaluation transform's config (``settings``) as it makes the fixed square input of an exported
        model: at ``img_size`` when given, rectangles off. ``mean_pixel`` is the model's, for a transform that
        pads."""
        exported = {**settings, "rect": False} if settings.get("rect") else dict(settings)
        return exported if img_size is None else {**exported, "img_size": img_size}


def displayable(images: Tensor) -> Tensor:
    """Batch images (float pixels) as ``uint8``, for drawing."""
    return images.round().clamp(0, 255).to(torch.uint8)


class LetterboxTransform(DetectionTransform):
    """Evaluation: letterbox to ``img_size`` with grey (114) padding, no augmentation; meta maps back exactly.

    ``rect``: the longer side becomes ``img_size`` and the shorter is padded only to a multiple of ``stride``,
    so a 4:3 image is evaluated at 416 x 320 rather than 416 x 416 (with ``DetectionDataModule(rect_eval=True)``
    batching images of similar shape together).
    """

    def __init__(
        self, img_size: int | str = 416, fill: int = 114, rect: bool = False, stride: int = 32,
    ) -> None:
        self.img_size = img_size
        self.fill = fill
        self.stride = stride if rect else None

    def __call__(self, samples: list[Sample]) -> Sample:
        (sample,) = samples
        boxed = letterbox(sample.image, sample.boxes, self.img_size, self.fill, self.stride)
        return Sample(
            image=boxed.image.as_subclass(Tensor).float(),
            boxes=boxed.boxes.as_subclass(Tensor),
            labels=sample.labels,
            difficult=sample.difficult,
            image_id=sample.image_id,
            path=sample.path,
            orig_size=sample.orig_size,
            scale=boxed.scale,
            pad=(float(boxed.pad[0]), float(boxed.pad[1])),
            area=sample.area,
        )
