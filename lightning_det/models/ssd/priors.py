"""SSD's default boxes (priors): a few boxes of fixed sizes and shapes centred on every cell of every feature map.

Per location, in this order: a square of side ``min_size``, a square of side ``sqrt(min_size * max_size)``,
then for each aspect ratio ``a`` of the layer a box ``min_size * sqrt(a)`` wide and ``min_size / sqrt(a)`` high
and its transpose. Locations are row-major per map, maps from the finest to the coarsest; the heads flatten
their outputs in the same order.

torchvision's ``DefaultBoxGenerator`` (its ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large``) is one layout
of these: give its scales times the input side as ``min_sizes`` / ``max_sizes`` and ``clip="size"``
(``conf/model/ssd300_vgg16_coco.yaml``, ``ssdlite320_coco.yaml``; ``tests/test_torchvision_ssd.py`` compares the
boxes). It cannot describe every layout these configs use, so the layout stays here:

- it takes one list of scales, the extra square of layer ``k`` using scale ``k + 1``: ``max_sizes`` independent
  of the next layer's ``min_sizes`` cannot be given; its own scale rule ends that list with 1.0 where the paper's
  (and ``linear_scale_sizes``) extrapolates one step past ``s_max``;
- its ``clip`` limits each box's width and height to the image's around an unmoved centre (our ``clip="size"``);
  ``clip=True`` clips the box's corners instead, as Caffe SSD's and MXNet's prior layers do;
- its sizes are fractions of each image side (a square turns oblong on an oblong input); ours are pixels, the
  scale rule a fraction of the shorter side. On a square input the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Per feature map, finest first, the aspect ratios besides 1 of SSD300's default boxes.
SSD300_ASPECT_RATIOS = ([2], [2, 3], [2, 3], [2, 3], [2], [2])
#: ``clip`` values: none, the corners (Caffe SSD), or the width and height around the centre (torchvision).
CLIP_MODES = (False, True, "size")


class DefaultBoxes:
    """The prior part: ``(feature_sizes, image_size) -> [N, 4]`` default boxes (cx, cy, w, h) in input pixels.

    Args:
        aspect_ratios: per feature map, the ratios besides 1 (each adds a box and its transpose).
        min_sizes, max_sizes: per feature map, default-box sizes in input pixels; ``None``: the linear scale
            rule from ``s_min`` to ``s_max`` of the shorter input side.
        s_min, s_max: the scale rule's first and last scale.
        fit_scales: check ``s_min``/``s_max`` against the training boxes before training and refit them where
            their default boxes match too few (``SSD.fit_to_data``); the result is stored in the checkpoint.
        steps: per feature map, the distance in pixels between default-box centres; ``None``: input / map size.
        clip: ``True``: clip each default box's corners to the image; ``"size"``: limit its width and height to
            the image's around an unmoved centre (torchvision's ``DefaultBoxGenerator(clip=True)``); ``False``: none.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]] = SSD300_ASPECT_RATIOS,
        min_sizes: Sequence[float] | None = None,
        max_sizes: Sequence[float] | None = None,
        s_min: float = 0.2,
        s_max: float = 0.9,
        fit_scales: bool = False,
        steps: Sequence[float] | None = None,
        clip: bool | str = False,
    ) -> None:
        if clip not in CLIP_MODES:
            raise ValueError(f"prior.clip={clip!r}: use false, true (clip the corners) or size (limit the sides)")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        if (min_sizes is None) != (max_sizes is None):
            raise ValueError("give both min_sizes and max_sizes, or neither (the linear scale rule is then used)")
        for name, values in (("min_sizes", min_sizes), ("max_sizes", max_sizes), ("steps", steps)):
            if values is not None and len(values) != len(self.aspect_ratios):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.aspect_ratios)} feature maps")
        self.min_sizes, self.max_sizes, self.steps = min_sizes, max_sizes, steps
        self.s_min, self.s_max, self.fit_scales, self.clip = s_min, s_max, fit_scales, clip

    @property
    def boxes_per_location(self) -> list[int]:
        return boxes_per_location(self.aspect_ratios)

    def __call__(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> Tensor:
        """The default boxes of maps ``feature_sizes`` on an ``image_size`` ``(h, w)`` input."""
        min_sizes, max_sizes = self.min_sizes, self.max_sizes
        if min_sizes is None:
            min_sizes, max_sizes = linear_scale_sizes(len(self.aspect_ratios), min(image_size), self.s_min, self.s_max)
        steps = self.steps or [image_size[1] / cols for _, cols in feature_sizes]
        return default_boxes(feature_sizes, image_size, steps, list(min_sizes), list(max_sizes), self.aspect_ratios,
                             self.clip)


def linear_scale_sizes(num_layers: int, image_size: int, s_min: float, s_max: float) -> tuple[list[float], list[float]]:
    """The paper's scale rule: layer ``k`` has scale ``s_min + (s_max - s_min) k / (m - 1)``.

    Returns per-layer ``min_sizes`` and ``max_sizes`` in pixels; the extra square of layer ``k`` uses the
    next layer's scale (extrapolated one step past ``s_max`` for the last layer).
    """
    step = (s_max - s_min) / max(1, num_layers - 1)
    scales = [s_min + step * k for k in range(num_layers + 1)]
    return [s * image_size for s in scales[:-1]], [s * image_size for s in scales[1:]]


def boxes_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """Two squares plus two boxes per aspect ratio, per layer (4 with ratios {2}, 6 with {2, 3})."""
    return [2 + 2 * len(ratios) for ratios in aspect_ratios]


def default_boxes(
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    steps: Sequence[float],
    min_sizes: Sequence[float],
    max_sizes: Sequence[float],
    aspect_ratios: Sequence[Sequence[float]],
    clip: bool | str = False,
) -> Tensor:
    """All default boxes ``[N, 4]`` as ``(cx, cy, w, h)`` in pixels of an ``image_size`` ``(h, w)`` input.

    Cell ``(i, j)`` of a layer with step ``s`` is centred at ``((j + 0.5) s, (i + 0.5) s)``. ``clip`` limits the
    boxes to the image: ``True`` their corners (as xyxy, then back to centre form), ``"size"`` their width and height.
    """
    if not len(feature_sizes) == len(steps) == len(min_sizes) == len(max_sizes) == len(aspect_ratios):
        raise ValueError(
            f"SSD default boxes need one step, min size, max size and aspect-ratio list per feature map: got "
            f"{len(feature_sizes)} maps, {len(steps)} steps, {len(min_sizes)} min sizes, {len(max_sizes)} max sizes, "
            f"{len(aspect_ratios)} aspect-ratio lists"
        )
    layers = []
    for (rows, cols), step, small, large, ratios in zip(feature_sizes, steps, min_sizes, max_sizes, aspect_ratios):
        root = torch.tensor([float(r) for r in ratios]).sqrt()
        widths = torch.cat((torch.tensor([small, (small * large) ** 0.5]), small * root, small / root))
        heights = torch.cat((torch.tensor([small, (small * large) ** 0.5]), small / root, small * root))
        order = torch.tensor([0, 1] + [i for k in range(len(ratios)) for i in (2 + k, 2 + len(ratios) + k)])
        sizes = torch.stack((widths[order], heights[order]), 1)  # [A, 2]
        cy, cx = torch.meshgrid(
            (torch.arange(rows) + 0.5) * step, (torch.arange(cols) + 0.5) * step, indexing="ij"
        )
        centres = torch.stack((cx, cy), -1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        layers.append(torch.cat((centres, sizes.expand_as(centres)), -1).reshape(-1, 4))
    boxes = torch.cat(layers)
    height, width = image_size
    if clip == "size":
        return torch.cat((boxes[:, :2], torch.minimum(boxes[:, 2:], torch.tensor([float(width), float(height)]))), 1)
    if clip:
        corners = torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)
        corners = torch.minimum(corners.clamp(min=0), torch.tensor([width, height, width, height], dtype=boxes.dtype))
        boxes = torch.cat(((corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]), 1)
    return boxes
