"""SSD's default-box scales checked against a dataset: the share of training boxes some default box matches.

The paper's scales (``s_min`` 0.2 of the input side for the finest map) suit VOC and COCO. On a dataset of small
objects no default box overlaps them by the matching threshold, so each trains only through the "best box of every
object" rule. Before training, :func:`fit_scales` measures that share (the recall the matching allows) per class
and, when some class's is low, picks the ``s_min``/``s_max`` of a small grid whose default boxes match the most
boxes per class on average. Per class, because mAP is a class mean: on a set of many large objects and few small
ones (BCCD's 4155 red cells and 361 platelets) the share over all boxes can be 0.92 while the small class gets none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import box_convert

from lightning_det.data.records import as_table
from lightning_det.models.boxes import pairwise_iou

if TYPE_CHECKING:
    from lightning_det.data.records import AnnotationRecord

log = logging.getLogger(__name__)

S_MIN_CHOICES = (0.04, 0.07, 0.1, 0.15, 0.2, 0.3)
S_MAX_CHOICES = (0.5, 0.7, 0.8, 0.9, 0.95)
MAX_BOXES = 4000  # a seeded sample of the training boxes is enough to rank scale choices


def square_resized_boxes(
    records: Sequence[AnnotationRecord], img_size: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Training boxes ``[N, 4]`` xyxy as SSD's pipeline feeds them (each image resized to an ``img_size``
    square), and their labels ``[N]``."""
    table = as_table(records)
    heights, widths = torch.from_numpy(table.object_image_sizes()).unbind(1)
    scales = torch.stack((img_size / widths, img_size / heights), 1).repeat(1, 2)
    boxes, labels = (torch.from_numpy(table.boxes) * scales).float(), torch.from_numpy(table.labels)
    if len(boxes) > MAX_BOXES:
        keep = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:MAX_BOXES]
        boxes, labels = boxes[keep], labels[keep]
    return boxes, labels


def class_recalls(boxes: Tensor, labels: Tensor, priors: Tensor, threshold: float) -> Tensor:
    """Per class present in ``labels`` (in label order), the share of its ``boxes`` (xyxy) whose best default box
    (``priors``, cx cy w h) overlaps them by ``threshold``."""
    hits = matched(boxes, priors, threshold).float()
    return torch.stack([hits[labels == c].mean() for c in labels.unique()]) if len(boxes) else torch.ones(1)


def matched(boxes: Tensor, priors: Tensor, threshold: float) -> Tensor:
    return pairwise_iou(boxes[None], box_convert(priors, "cxcywh", "xyxy"))[0].amax(1) >= threshold


def fit_scales(
    boxes: Tensor, labels: Tensor, priors_for: Callable[[float, float], Tensor], s_min: float, s_max: float,
    threshold: float, min_recall: float = 0.9,
) -> tuple[float, float]:
    """The configured ``(s_min, s_max)`` if their default boxes match ``min_recall`` of every class's ``boxes``,
    else the grid choice with the best mean of the class recalls (the configured pair wins ties); logged."""
    configured = class_recalls(boxes, labels, priors_for(s_min, s_max), threshold)
    message = (f"SSD default boxes s_min {s_min}, s_max {s_max}: match {configured.min():.3f} of the worst class's "
               f"training boxes at IoU {threshold:.2f} (class mean {configured.mean():.3f}, {len(boxes)} boxes)")
    if configured.min() >= min_recall:
        log.info("%s: kept", message)
        return s_min, s_max
    scored = [(class_recalls(boxes, labels, priors_for(lo, hi), threshold), lo, hi)
              for lo in S_MIN_CHOICES for hi in S_MAX_CHOICES if hi > 2 * lo]
    recalls, lo, hi = max(scored, key=lambda item: float(item[0].mean()))
    if recalls.mean() <= configured.mean():
        log.info("%s; no other scale does better: kept", message)
        return s_min, s_max
    log.info("%s < %.2f: refitted to s_min %s, s_max %s (worst class %.3f, class mean %.3f)", message, min_recall,
             lo, hi, recalls.min(), recalls.mean())
    return lo, hi
