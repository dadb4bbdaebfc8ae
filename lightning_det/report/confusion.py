"""Detection confusion matrix with a background row and column, for every detector family.

Matching (class-agnostic, so a box found with the wrong class shows up off the diagonal): each detection scoring at
least ``conf`` takes the ground-truth box of its image it overlaps most; a box claimed by several detections keeps
the one of highest IoU; pairs below ``iou_threshold`` are not matches. One detection per object: the others are
false positives. Rows are the predicted class, columns the true class; index ``num_classes`` is background:
unmatched detections go to the background column, missed objects to the background row. A detection matched to a
difficult object counts nowhere, and a missed difficult object is not missed (as in the VOC metric).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_det.metrics.voc import best_ground_truth
from lightning_det.models.boxes import Detections


def _stack(items: Detections, key: str, width: int) -> tuple[Tensor, Tensor]:
    """``item[key]`` of every image as ``[total, width]`` rows, and each row's image index."""
    parts = [item[key].detach().cpu().reshape(-1, width) for item in items]
    counts = torch.tensor([len(p) for p in parts], dtype=torch.long)
    rows = torch.cat(parts) if parts else torch.zeros(0, width)
    return rows.double(), torch.arange(len(parts)).repeat_interleave(counts)


def confusion_matrix(
    detections: Detections, targets: Detections, num_classes: int, conf: float = 0.25, iou_threshold: float = 0.5
) -> Tensor:
    """``[num_classes + 1, num_classes + 1]`` counts, rows predicted, columns true (see the module docstring)."""
    det_boxes, det_image = _stack(detections, "boxes", 4)
    scores, _ = _stack(detections, "scores", 1)
    det_labels, _ = _stack(detections, "labels", 1)
    kept = scores[:, 0] >= conf
    det_boxes, det_image, det_labels = det_boxes[kept], det_image[kept], det_labels[kept, 0].long()
    gt_boxes, gt_image = _stack(targets, "boxes", 4)
    gt_labels = _stack(targets, "labels", 1)[0][:, 0].long()
    difficult = torch.cat(
        [t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)).cpu().reshape(-1) for t in targets]
    ) if targets else torch.zeros(0, dtype=torch.bool)

    best_iou, best_gt = best_ground_truth(det_boxes, det_image, gt_boxes, gt_image, plus_one=False)
    background = num_classes
    # One sentinel box past the end: best_gt = -1 (no box in the image) reads background and not difficult.
    gt_labels = torch.cat([gt_labels, torch.tensor([background])])
    difficult = torch.cat([difficult, torch.tensor([False])])
    box = torch.where(best_gt >= 0, best_gt, len(gt_boxes))
    candidate = (best_iou >= iou_threshold) & (best_gt >= 0)
    # A box claimed by several candidates keeps the one of highest IoU, the first on ties.
    box_best = torch.full((len(gt_boxes) + 1,), -1.0, dtype=best_iou.dtype).scatter_reduce(
        0, box[candidate], best_iou[candidate], "amax"
    )
    at_best = candidate & (best_iou == box_best[box])
    index = torch.arange(len(det_boxes))
    first = torch.full((len(gt_boxes) + 1,), len(det_boxes)).scatter_reduce(0, box[at_best], index[at_best], "amin")
    matched = at_best & (first[box] == index)
    found = torch.zeros(len(gt_boxes) + 1, dtype=torch.bool)
    found[box[matched]] = True

    size = num_classes + 1
    true_class = torch.where(matched, gt_labels[box], background)
    counted = ~(matched & difficult[box])
    missed = ~found & ~difficult
    missed[-1] = False
    cells = torch.cat([det_labels[counted] * size + true_class[counted], background * size + gt_labels[missed]])
    return torch.bincount(cells, minlength=size * size).view(size, size)


def heat_map(matrix: Tensor, cell: int = 16) -> Tensor:
    """Row-normalised counts (rows: truth, columns: prediction) as a ``[1, N*cell, N*cell]`` image in 0..1."""
    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    return rows.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(0)
