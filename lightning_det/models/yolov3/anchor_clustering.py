"""Anchor shapes for a dataset: k-means over its box sizes with 1 - IoU as the distance (YOLOv2/v3 papers).

Boxes are first scaled as the letterbox will scale them (long image side to ``img_size``), so the anchors come
out in network-input pixels, ready for ``model.anchors``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_det.models.yolov3.targets import shape_iou


def letterboxed_sizes(boxes: list[Tensor], image_sizes: list[tuple[int, int]], img_size: int) -> Tensor:
    """``[N, 2]`` box widths and heights after the letterbox resize of their images (``(h, w)`` each)."""
    scales = [img_size / max(h, w) for h, w in image_sizes]
    return torch.cat([(b[:, 2:] - b[:, :2]) * s for b, s in zip(boxes, scales)]).clamp(min=1.0)


def kmeans_anchors(wh: Tensor, k: int, iterations: int = 300, seed: int = 0) -> Tensor:
    """``k`` anchor shapes ``[k, 2]`` sorted by area. Each box joins the anchor it overlaps most (shape IoU);
    each anchor moves to the median shape of its boxes, which resists the few huge or tiny outliers."""
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes cannot give {k} anchors")
    generator = torch.Generator().manual_seed(seed)
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


def anchor_fitness(wh: Tensor, anchors: Tensor, iou_t: float) -> dict[str, float]:
    """Mean best shape IoU, and best possible recall: the share of boxes whose best anchor exceeds ``iou_t``."""
    best = shape_iou(wh, anchors).amax(1)
    return {"mean_iou": best.mean().item(), "best_possible_recall": (best > iou_t).float().mean().item()}
