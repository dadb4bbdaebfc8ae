"""Test-time boxes: per-class decoding of the RoI head, score threshold, per-class NMS, top-k per image."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from lightning_det.models.detector import Detections
from lightning_det.models.faster_rcnn.rpn import rank_within_images


def decode_detections(
    logits: Tensor,
    boxes: Tensor,
    image: Tensor,
    num_images: int,
    image_size: tuple[int, int],
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_image: int = 100,
    min_size: float = 1e-2,
) -> Detections:
    """RoI logits ``[R, C+1]`` and per-class boxes ``[R, C+1, 4]`` of images ``image`` -> per-image detections
    (labels 0..C-1, background dropped)."""
    num_classes = logits.shape[1] - 1
    scores = logits.softmax(1)[:, 1:].flatten()
    boxes = clip_boxes_to_image(boxes[:, 1:].reshape(-1, 4), image_size)
    labels = torch.arange(num_classes, device=logits.device).repeat(len(logits))
    image = image.repeat_interleave(num_classes)
    keep = (scores > score_thresh).nonzero()[:, 0]
    keep = keep[remove_small_boxes(boxes[keep], min_size)]
    keep = keep[batched_nms(boxes[keep], scores[keep], image[keep] * num_classes + labels[keep], nms_thresh)]
    keep = keep[scores[keep].argsort(descending=True)]
    keep = keep[rank_within_images(image[keep]) < detections_per_image]
    keep = keep[image[keep].argsort(stable=True)]
    counts = torch.bincount(image[keep], minlength=num_images).tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts))
    ]
