"""YOLOv3's anchors and the layout of its flattened predictions.

The network predicts, per feature level, a map ``[B, A, H, W, 5 + C]``. Loss and decoding work on all levels at
once by flattening them into ``[B, N, 5 + C]`` (level by level, then anchor, row, column); ``PredictionGrid`` says
where each of the ``N`` predictions sits, so no code loops over levels, images or objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Darknet's COCO anchors (k-means on COCO boxes at 416 px), in pixels, smallest level first: the start of a
# training from scratch (yolov3-tiny's as in its current cfg and Ultralytics' yolov3-tiny.yaml; the three-level
# tiny takes yolov3's nine).
COCO_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
DEFAULT_ANCHORS = {
    "yolov3": COCO_ANCHORS,
    "tiny": [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169, 344, 319]],
    "tiny3": COCO_ANCHORS,
}
# The anchors Darknet's published COCO weights were trained with. yolov3-tiny.weights used ``mask = 1,2,3`` on
# the stride-16 level (pjreddie/darknet 481d9d98), so (81, 82) serves both levels and (10, 14) none; decoding it
# with the later cfg's 0,1,2 (f86901f6) halves its COCO mAP (0.332 -> 0.178, ultralytics/yolov3#256). No COCO
# weights were published for the three-level tiny: a ``.weights`` file of it gets the anchors of its cfg.
DARKNET_ANCHORS = {
    "yolov3": COCO_ANCHORS,
    "tiny": [[23, 27, 37, 58, 81, 82], [81, 82, 135, 169, 344, 319]],
    "tiny3": [[4, 7, 7, 15, 13, 25], [25, 42, 41, 67, 75, 94], [91, 162, 158, 205, 250, 332]],
}


def configured_anchors(anchors: str | Sequence[Sequence[float]] | None, variant: str) -> Sequence[Sequence[float]]:
    """The anchor list a config names: a list as given; ``"auto"`` (before it was refitted to a dataset),
    ``"default"`` or ``None`` give Darknet's anchors of the variant, ``"darknet"`` those its published weights
    were trained with."""
    if anchors is None or isinstance(anchors, str):
        if anchors not in (None, "auto", "default", "darknet"):
            raise ValueError(f"model.anchors={anchors!r}: use auto, default, darknet, or a list of (w, h) pixels per "
                             "level")
        return (DARKNET_ANCHORS if anchors == "darknet" else DEFAULT_ANCHORS)[variant]
    return anchors


def anchors_tensor(anchors: Sequence[Sequence[float]]) -> Tensor:
    """Per-level anchors as ``[L, A, 2]`` (w, h) pixels, from flat ``w, h, w, h, ...`` lists or ``[w, h]`` pairs."""
    try:
        # Plain floats first: Hydra hands over its own list type, which torch does not read.
        levels = [
            [float(v) for item in level for v in (item if isinstance(item, Sequence) else [item])] for level in anchors
        ]
        table = torch.tensor(levels).reshape(len(levels), -1, 2)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"anchors must list, per level, the same number of (w, h) pixel pairs, e.g. {DEFAULT_ANCHORS['yolov3']};"
            f" got {anchors}"
        ) from error
    if (table <= 0).any():
        raise ValueError(f"anchor sizes must be positive pixels; got {anchors}")
    return table


@dataclass(frozen=True)
class PredictionGrid:
    """Per prediction (``N`` rows) and per anchor (``L * A`` rows) facts of one set of feature-map sizes."""

    cell_xy: Tensor  # [N, 2] column, row of the prediction's cell
    anchor_wh: Tensor  # [N, 2] its anchor in pixels
    stride: Tensor  # [N] its level's stride in pixels
    level_weight: Tensor  # [N] 1 / (number of predictions on its level): turns sums into per-level means
    level: Tensor  # [N] its level index
    anchors: Tensor  # [L*A, 2] every anchor in pixels
    anchor_stride: Tensor  # [L*A] the stride of each anchor's level
    anchor_grid_wh: Tensor  # [L*A, 2] the (W, H) of each anchor's feature map
    anchor_offset: Tensor  # [L*A] flat index of each anchor's cell (0, 0); cell (x, y) is offset + y * W + x
    num_levels: int

    def flat_index(self, anchor: Tensor, cell_x: Tensor, cell_y: Tensor) -> Tensor:
        """Index into the ``N`` flattened predictions of anchor ``anchor`` (of ``L * A``) at a cell."""
        return self.anchor_offset[anchor] + cell_y * self.anchor_grid_wh[anchor, 0] + cell_x


def make_grid(feature_sizes: Sequence[tuple[int, int]], anchors: Tensor, strides: Sequence[int]) -> PredictionGrid:
    """The ``PredictionGrid`` for feature maps of ``(H, W)`` sizes with ``anchors [L, A, 2]`` and strides."""
    device = anchors.device
    num_anchors = anchors.shape[1]
    cell_xy, anchor_wh, stride, level, weight, offsets = [], [], [], [], [], []
    start = 0
    for i, (h, w) in enumerate(feature_sizes):
        count = num_anchors * h * w
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        cell_xy.append(torch.stack((xs, ys), -1).reshape(1, h * w, 2).expand(num_anchors, -1, -1).reshape(-1, 2))
        anchor_wh.append(anchors[i].repeat_interleave(h * w, dim=0))
        stride.append(torch.full((count,), float(strides[i]), device=device))
        level.append(torch.full((count,), i, device=device))
        weight.append(torch.full((count,), 1.0 / count, device=device))
        offsets.append(start + torch.arange(num_anchors, device=device) * h * w)
        start += count
    grid_wh = torch.tensor([[w, h] for h, w in feature_sizes], device=device)
    return PredictionGrid(
        cell_xy=torch.cat(cell_xy).float(),
        anchor_wh=torch.cat(anchor_wh),
        stride=torch.cat(stride),
        level_weight=torch.cat(weight),
        level=torch.cat(level),
        anchors=anchors.reshape(-1, 2),
        anchor_stride=torch.tensor(strides, dtype=torch.float32, device=device).repeat_interleave(num_anchors),
        anchor_grid_wh=grid_wh.repeat_interleave(num_anchors, dim=0),
        anchor_offset=torch.cat(offsets),
        num_levels=len(feature_sizes),
    )
