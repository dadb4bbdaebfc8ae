"""Test-time boxes: per-class decoding of the RoI head, score threshold, small-box filter, NMS, top-k per image,
as per-image dicts or as the padded tensors of an exported graph."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import remove_small_boxes

from lightning_det.models.boxes import clip_to_images
from lightning_det.models.postprocess import Decoder


class FasterRCNNDecoder(Decoder):
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

    def candidates(
        self, logits: Tensor, boxes: Tensor, image: Tensor, num_images: int, image_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RoI logits ``[R, C+1]`` and per-class boxes ``[R, C+1, 4]`` of images ``image`` -> the (RoI, class)
        pairs entering NMS: boxes (clipped to their image's ``(h, w)`` of ``image_sizes [B, 2]``), scores, labels
        0..C-1 (background dropped) and image, flat."""
        scores = logits.softmax(1)[:, 1:]
        boxes = clip_to_images(boxes[:, 1:], image, image_sizes)
        roi, labels = (scores > self.score_thresh).nonzero().unbind(1)
        boxes, scores, image = boxes[roi, labels], scores[roi, labels], image[roi]
        keep = remove_small_boxes(boxes, self.min_size)
        return boxes[keep], scores[keep], labels[keep], image[keep]

    def batch_and_classes(
        self, logits: Tensor, boxes: Tensor, image: Tensor, num_images: int, image_sizes: Tensor
    ) -> tuple[int, int]:
        return num_images, logits.shape[1] - 1
