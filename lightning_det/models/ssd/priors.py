"""SSD's default boxes (priors): a few boxes of fixed sizes and shapes centred on every cell of every feature map.

Per location, in this order: a square of side ``min_size``, a square of side ``sqrt(min_size * max_size)``,
then for each aspect ratio ``a`` of the layer a box ``min_size * sqrt(a)`` wide and ``min_size / sqrt(a)`` high
and its transpose. Locations are row-major per map, maps from the finest to the coarsest; the heads flatten
their outputs in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def linear_scale_sizes(
    num_layers: int, image_size: int, s_min: float = 0.2, s_max: float = 0.9
) -> tuple[list[float], list[float]]:
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
    clip: bool = False,
) -> Tensor:
    """All default boxes ``[N, 4]`` as ``(cx, cy, w, h)`` in pixels of an ``image_size`` ``(h, w)`` input.

    Cell ``(i, j)`` of a layer with step ``s`` is centred at ``((j + 0.5) s, (i + 0.5) s)``. ``clip`` limits the
    boxes to the image (as xyxy, then back to centre form).
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
    if clip:
        height, width = image_size
        corners = torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)
        corners = torch.minimum(corners.clamp(min=0), torch.tensor([width, height, width, height], dtype=boxes.dtype))
        boxes = torch.cat(((corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]), 1)
    return boxes
