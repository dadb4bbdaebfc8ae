"""Anchor shapes for a dataset: k-means over its box sizes with 1 - IoU as the distance (YOLOv2/v3 papers).

Boxes are first scaled as the letterbox will scale them (long image side to ``img_size``), so the anchors come
out in network-input pixels, ready for ``model.anchors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_det.data.records import as_table
from lightning_det.models.yolov3.targets import shape_iou

if TYPE_CHECKING:
    from lightning_det.data.records import AnnotationRecord

log = logging.getLogger(__name__)

#: k-means runs on a seeded sample of at most this many boxes: nine medians are as well placed, and COCO's 860k
#: boxes would take a minute (BENCHMARKS.md, "COCO scale"). The recall check always sees every box.
MAX_KMEANS_BOXES = 50_000


def letterboxed_sizes(records: Sequence[AnnotationRecord], img_size: int) -> Tensor:
    """``[N, 2]`` widths and heights of the records' boxes after the letterbox resize of their images."""
    table = as_table(records)
    boxes = torch.from_numpy(table.boxes).double()
    scales = img_size / torch.from_numpy(table.object_image_sizes()).amax(1, keepdim=True).double()
    return ((boxes[:, 2:] - boxes[:, :2]) * scales).float().clamp(min=1.0)


def kmeans_anchors(wh: Tensor, k: int, iterations: int = 300, seed: int = 0) -> Tensor:
    """``k`` anchor shapes ``[k, 2]`` sorted by area. Each box joins the anchor it overlaps most (shape IoU);
    each anchor moves to the median shape of its boxes, which resists the few huge or tiny outliers. Fitted on a
    seeded sample of :data:`MAX_KMEANS_BOXES` when there are more."""
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes cannot give {k} anchors")
    generator = torch.Generator().manual_seed(seed)
    if len(wh) > MAX_KMEANS_BOXES:
        wh = wh[torch.randperm(len(wh), generator=generator)[:MAX_KMEANS_BOXES]]
    centroids = wh[torch.randperm(len(wh), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = shape_iou(wh, centroids).argmax(1)
        updated = torch.stack([
            wh[assignment == j].median(0).values if (assignment == j).any() else centroids[j] for j in range(k)
        ])
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids[centroids.prod(1).argsort()]


def anchor_fitness(wh: Tensor, anchors: Tensor, positive_iou: float) -> dict[str, float]:
    """Mean best shape IoU, and best possible recall: the share of boxes whose best anchor exceeds ``positive_iou``."""
    best = shape_iou(wh, anchors).amax(1)
    return {"mean_iou": best.mean().item(), "best_possible_recall": (best > positive_iou).float().mean().item()}


def check_anchors(wh: Tensor, anchors: Tensor, positive_iou: float, min_recall: float = 0.98, seed: int = 0
                  ) -> Tensor:
    """The configured anchors ``[L, A, 2]`` if their best possible recall on the training boxes ``wh`` reaches
    ``min_recall`` (Ultralytics' rule), else k-means anchors of the same layout; both figures are logged."""
    before = anchor_fitness(wh, anchors.reshape(-1, 2), positive_iou)
    message = (f"anchors: best possible recall {before['best_possible_recall']:.3f} (mean best IoU "
               f"{before['mean_iou']:.3f}) on {len(wh)} training boxes at positive_iou {positive_iou}")
    if before["best_possible_recall"] >= min_recall or len(wh) < anchors.shape[0] * anchors.shape[1]:
        log.info("%s: keeping the configured anchors", message)
        return anchors
    fitted = kmeans_anchors(wh, anchors.shape[0] * anchors.shape[1], seed=seed).round().clamp(min=1)
    after = anchor_fitness(wh, fitted, positive_iou)
    if after["best_possible_recall"] <= before["best_possible_recall"]:
        log.info("%s; k-means does no better (%.3f): keeping the configured anchors", message,
                 after["best_possible_recall"])
        return anchors
    fitted = fitted.view_as(anchors)
    log.info("%s < %.2f: refitted by k-means to recall %.3f (mean best IoU %.3f): %s", message, min_recall,
             after["best_possible_recall"], after["mean_iou"], fitted.int().view(len(anchors), -1).tolist())
    return fitted
