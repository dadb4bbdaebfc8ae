"""Test-time boxes: per-class decoding of the RoI head, score threshold, per-class NMS, top-k per image."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from lightning_det.models.boxes import Detections
from lightning_det.models.postprocess import suppress_and_split


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
    return suppress_and_split(
        boxes[keep], scores[keep], labels[keep], image[keep], num_images, num_classes, nms_thresh, detections_per_image
    )
