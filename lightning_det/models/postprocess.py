"""Non-maximum suppression over a whole batch and the split into per-image detections, shared by detectors."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def rank_within_group(group: Tensor, num_groups: int) -> Tensor:
    """0, 1, 2, ... restarting at each group, for a ``group`` tensor sorted ascending."""
    counts = torch.bincount(group, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    return torch.arange(len(group), device=group.device) - starts[group]


def suppress_and_split(
    boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, batch: int, num_classes: int,
    nms_thresh: float, max_per_image: int, class_agnostic: bool = False,
) -> list[dict[str, Tensor]]:
    """One ``batched_nms`` call for every candidate of the batch (grouped by image, and by class unless
    ``class_agnostic``), then the best ``max_per_image`` of each image as ``{"boxes", "scores", "labels"}``."""
    groups = image if class_agnostic else image * num_classes + labels
    keep = batched_nms(boxes, scores, groups, nms_thresh)  # sorted by decreasing score
    keep = keep[image[keep].argsort(stable=True)]  # grouped by image, still best first within each
    keep = keep[rank_within_group(image[keep], batch) < max_per_image]
    counts = torch.bincount(image[keep], minlength=batch).tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts))
    ]
