"""SSD's default-box scales checked against a dataset: the share of training boxes some default box matches.

The paper's scales (``s_min`` 0.2 of the input side for the finest map) suit VOC and COCO. On a dataset of small
objects no default box overlaps them by the matching threshold, so each trains only through the "best box of every
object" rule. Before training, :func:`fit_scales` measures that share (the recall the matching allows) and, when it
is low, picks the ``s_min``/``s_max`` of a small grid whose default boxes match the most boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_det.models.ssd.targets import cxcywh_to_xyxy, pairwise_iou

if TYPE_CHECKING:
    from lightning_det.data.records import AnnotationRecord

log = logging.getLogger(__name__)

S_MIN_CHOICES = (0.04, 0.07, 0.1, 0.15, 0.2, 0.3)
S_MAX_CHOICES = (0.5, 0.7, 0.8, 0.9, 0.95)
MAX_BOXES = 4000  # a seeded sample of the training boxes is enough to rank scale choices


def square_resized_boxes(records: Sequence[AnnotationRecord], img_size: int, seed: int = 0) -> Tensor:
    """Training boxes ``[N, 4]`` xyxy as SSD's pipeline feeds them: each image resized to an ``img_size`` square."""
    boxes = [torch.as_tensor(r.boxes) * torch.tensor([img_size / r.width, img_size / r.height] * 2)
             for r in records if len(r.boxes)]
    boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
    if len(boxes) > MAX_BOXES:
        boxes = boxes[torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:MAX_BOXES]]
    return boxes


def match_recall(boxes: Tensor, priors: Tensor, threshold: float) -> float:
    """Share of ``boxes`` (xyxy) whose best default box (``priors``, cx cy w h) overlaps them by ``threshold``."""
    if not len(boxes):
        return 1.0
    best = pairwise_iou(boxes[None], cxcywh_to_xyxy(priors))[0].amax(1)
    return (best >= threshold).float().mean().item()


def fit_scales(
    boxes: Tensor, priors_for: Callable[[float, float], Tensor], s_min: float, s_max: float, threshold: float,
    min_recall: float = 0.9,
) -> tuple[float, float]:
    """The configured ``(s_min, s_max)`` if their default boxes match ``min_recall`` of ``boxes``, else the grid
    choice that matches the most (the configured pair wins ties); both recalls are logged."""
    configured = match_recall(boxes, priors_for(s_min, s_max), threshold)
    message = f"SSD default boxes s_min {s_min}, s_max {s_max}: match {configured:.3f} of {len(boxes)} training boxes"
    if configured >= min_recall:
        log.info("%s at IoU %.2f: kept", message, threshold)
        return s_min, s_max
    scored = [(match_recall(boxes, priors_for(lo, hi), threshold), lo, hi)
              for lo in S_MIN_CHOICES for hi in S_MAX_CHOICES if hi > 2 * lo]
    recall, lo, hi = max(scored, key=lambda item: item[0])
    if recall <= configured:
        log.info("%s at IoU %.2f; no other scale does better: kept", message, threshold)
        return s_min, s_max
    log.info("%s at IoU %.2f < %.2f: refitted to s_min %s, s_max %s (match %.3f)", message, threshold, min_recall,
             lo, hi, recall)
    return lo, hi
