"""Turning YOLOv3's raw predictions into boxes, and boxes into detections.

A prediction ``(tx, ty, tw, th, to, tc...)`` at cell ``(cx, cy)`` of a level with stride ``s`` and anchor
``(aw, ah)`` is the box centred at ``((sigmoid(tx) + cx) s, (sigmoid(ty) + cy) s)`` of size
``(aw exp(tw), ah exp(th))``, with score ``sigmoid(to) * sigmoid(tc)`` per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from lightning_det.models.boxes import MAX_LOG_SCALE
from lightning_det.models.postprocess import Decoder, top_candidates
from lightning_det.models.yolov3.grid import PredictionGrid


def decode_boxes(raw: Tensor, cell_xy: Tensor, anchor_wh: Tensor, stride: Tensor) -> Tensor:
    """``(tx, ty, tw, th)`` ``[..., N, 4]`` -> xyxy pixel boxes, for predictions at the given cells and anchors."""
    centre = (raw[..., :2].sigmoid() + cell_xy) * stride[:, None]
    size = raw[..., 2:4].clamp(max=MAX_LOG_SCALE).exp() * anchor_wh
    return torch.cat((centre - size / 2, centre + size / 2), -1)


@dataclass
class YOLOv3Decoder(Decoder):
    """The ``decoder`` part: scores, thresholds and non-maximum suppression for a whole batch in one
    ``batched_nms`` call.

    Args:
        score_thresh: drop candidates scoring at or below this (0.001 keeps the low-score tail mAP needs).
        nms_thresh: IoU above which a lower-scored box of the same class (and image) is suppressed.
        pre_nms_topk: candidates per image entering NMS, best first (bounds NMS time at low thresholds).
        max_detections: detections kept per image after NMS, best first.
        multi_label: a box may be reported for every class scoring above ``score_thresh`` (best for mAP);
            otherwise only for its best class.
        class_agnostic: suppress across classes too.
    """

    score_thresh: float = 0.001
    nms_thresh: float = 0.45
    pre_nms_topk: int = 3000
    max_detections: int = 300
    multi_label: bool = True
    class_agnostic: bool = False

    def candidates(
        self, preds: Tensor, grid: PredictionGrid, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``preds [B, N, 5 + C]`` raw -> the batch's (box, score, label, image) candidates entering NMS."""
        num_classes = preds.shape[-1] - 5
        boxes = clip_boxes_to_image(decode_boxes(preds[..., :4], grid.cell_xy, grid.anchor_wh, grid.stride), image_size)
        class_scores = preds[..., 4:5].sigmoid() * preds[..., 5:].sigmoid()
        if self.multi_label:  # every (box, class) pair is a candidate
            scores, box_index, labels, image = top_candidates(
                class_scores.flatten(1), self.pre_nms_topk, self.score_thresh, num_classes
            )
        else:  # each box with its best class
            best_score, best_class = class_scores.max(-1)
            scores, box_index, _, image = top_candidates(best_score, self.pre_nms_topk, self.score_thresh, 1)
            labels = best_class[image, box_index]
        return boxes[image, box_index], scores, labels, image

    def batch_and_classes(self, preds: Tensor, grid: PredictionGrid, image_size: tuple[int, int]) -> tuple[int, int]:
        return preds.shape[0], preds.shape[-1] - 5
