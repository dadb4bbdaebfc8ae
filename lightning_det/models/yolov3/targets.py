"""YOLOv3 target assignment: which flattened prediction learns which ground-truth box.

All objects of the batch are matched at once. For each object (a non-padding row of the ``[B, P, 6]`` labels):

1. the *shape IoU* (widths and heights only, both boxes centred together) with every anchor of every level;
2. it goes to every anchor whose shape IoU exceeds ``positive_iou`` (Ultralytics' early YOLOv3), and always to its
   best anchor so no object is left without a positive; with ``best_anchor_only`` to its single best anchor
   across all levels and nothing else (the original YOLOv3);
3. on that anchor's level, the cell holding the box centre: ``floor(centre / stride)``.

Two objects landing on the same prediction (same image, level, anchor and cell) would pull it two ways; the one
with the higher shape IoU keeps it, ties going to the object listed first. Difficult objects (VOC ``difficult``,
COCO ``iscrowd``) never become positives: the predictions they would take are returned as *ignored*, so the
loss neither rewards nor penalises objectness there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_det.data.collate import Labels
from lightning_det.models.yolov3.grid import PredictionGrid


@dataclass(frozen=True)
class Targets:
    """Positives (one row per assigned prediction) and the predictions to leave out of the objectness loss."""

    image: Tensor  # [T] image of each positive
    index: Tensor  # [T] its flattened prediction index (see PredictionGrid)
    boxes: Tensor  # [T, 4] the assigned ground truth, xyxy batch pixels
    classes: Tensor  # [T] its class
    ignore_image: Tensor  # [I] predictions that difficult objects would take
    ignore_index: Tensor  # [I]


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes ``[K, 2]`` and ``[M, 2]`` given by width and height only, as if sharing one centre: ``[K, M]``."""
    inter = torch.minimum(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter)


@dataclass
class YOLOv3Assigner:
    """The ``assigner`` part: shape-IoU matching of objects to anchors, then to the cell holding their centre.

    Args:
        positive_iou: an object trains every anchor whose shape IoU exceeds this, plus its best anchor. It is also the
            recall threshold ``anchors: auto`` is checked against (``YOLOv3.fit_to_data``), so a swapped assigner
            used with ``auto`` anchors has a ``positive_iou`` too.
        best_anchor_only: train only the single best anchor over all levels (the original YOLOv3).
    """

    positive_iou: float = 0.2
    best_anchor_only: bool = False

    def __call__(self, labels: Tensor, grid: PredictionGrid) -> Targets:
        """Assign the objects of padded batch labels ``[B, P, 6]`` to the predictions laid out by ``grid``."""
        image, row = Labels.of(labels).valid.nonzero(as_tuple=True)
        objects = labels[image, row]
        boxes = Labels.of(objects).boxes
        iou = shape_iou((boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6), grid.anchors)
        matched = torch.zeros_like(iou, dtype=torch.bool)
        matched[torch.arange(len(iou), device=iou.device), iou.argmax(1)] = True
        if not self.best_anchor_only:
            matched |= iou > self.positive_iou
        obj, anchor = matched.nonzero(as_tuple=True)

        centre = (boxes[obj, :2] + boxes[obj, 2:]) / 2
        cell = (centre / grid.anchor_stride[anchor, None]).floor().long()
        cell = torch.minimum(cell.clamp(min=0), grid.anchor_grid_wh[anchor] - 1)
        index = grid.flat_index(anchor, cell[:, 0], cell[:, 1])

        difficult = objects[obj, 5] > 0
        positive = unique_predictions(image[obj] * len(grid.stride) + index, iou[obj, anchor], ~difficult)
        return Targets(
            image=image[obj[positive]],
            index=index[positive],
            boxes=boxes[obj[positive]],
            classes=objects[obj[positive], 0].long(),
            ignore_image=image[obj[difficult]],
            ignore_index=index[difficult],
        )


def unique_predictions(key: Tensor, quality: Tensor, eligible: Tensor) -> Tensor:
    """Indices of the eligible assignments to keep: per prediction ``key``, the highest ``quality``.

    Sorting first by quality (descending) then, stably, by key puts each prediction's best claim first in its run;
    equal qualities keep their original order, so the earlier object wins.
    """
    candidates = eligible.nonzero().squeeze(1)
    order = candidates[quality[candidates].argsort(descending=True, stable=True)]
    order = order[key[order].argsort(stable=True)]
    sorted_key = key[order]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return order[first]
