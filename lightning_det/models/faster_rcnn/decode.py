"""Test-time boxes: per-class decoding of the RoI head, score threshold, small-box filter, NMS, top-k per image."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from lightning_det.models.boxes import Detections
from lightning_det.models.postprocess import suppress_and_split


class FasterRCNNDecoder:
    """Every (RoI, class) pair scoring above ``score_thresh`` with both sides at least ``min_size`` pixels, then
    NMS at ``nms_thresh`` per class (``class_agnostic``: across classes) and the ``max_detections`` best per
    image: torchvision's ``box_score_thresh`` / ``box_nms_thresh`` / ``box_detections_per_img``."""

    def __init__(
        self,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.3,
        max_detections: int = 100,
        class_agnostic: bool = False,
        min_size: float = 1e-2,
    ) -> None:
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.class_agnostic = class_agnostic
        self.min_size = min_size

    def __call__(
        self, logits: Tensor, boxes: Tensor, image: Tensor, num_images: int, image_size: tuple[int, int]
    ) -> Detections:
        """RoI logits ``[R, C+1]`` and per-class boxes ``[R, C+1, 4]`` of images ``image`` -> per-image detections
        (labels 0..C-1, background dropped)."""
        num_classes = logits.shape[1] - 1
        scores = logits.softmax(1)[:, 1:].flatten()
        boxes = clip_boxes_to_image(boxes[:, 1:].reshape(-1, 4), image_size)
        labels = torch.arange(num_classes, device=logits.device).repeat(len(logits))
        image = image.repeat_interleave(num_classes)
        keep = (scores > self.score_thresh).nonzero()[:, 0]
        keep = keep[remove_small_boxes(boxes[keep], self.min_size)]
        return suppress_and_split(
            boxes[keep], scores[keep], labels[keep], image[keep], num_images, num_classes, self.nms_thresh,
            self.max_detections, self.class_agnostic,
        )
