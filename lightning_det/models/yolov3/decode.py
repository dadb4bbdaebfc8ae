"""Turning YOLOv3's raw predictions into boxes, and boxes into detections.

A prediction ``(tx, ty, tw, th, to, tc...)`` at cell ``(cx, cy)`` of a level with stride ``s`` and anchor
``(aw, ah)`` is the box centred at ``((sigmoid(tx) + cx) s, (sigmoid(ty) + cy) s)`` of size
``(aw exp(tw), ah exp(th))``, with score ``sigmoid(to) * sigmoid(tc)`` per class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from lightning_det.models.postprocess import PaddedDetections, suppress_and_pad, suppress_and_split
from lightning_det.models.yolov3.anchors import PredictionGrid

# Cap on tw, th before exp (torchvision's bbox_xform_clip): a box at most 62.5x its anchor, and never inf.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def decode_boxes(raw: Tensor, cell_xy: Tensor, anchor_wh: Tensor, stride: Tensor) -> Tensor:
    """``(tx, ty, tw, th)`` ``[..., N, 4]`` -> xyxy pixel boxes, for predictions at the given cells and anchors."""
    centre = (raw[..., :2].sigmoid() + cell_xy) * stride[:, None]
    size = raw[..., 2:4].clamp(max=MAX_LOG_SCALE).exp() * anchor_wh
    return torch.cat((centre - size / 2, centre + size / 2), -1)


class YOLOv3Decoder:
    """Scores, thresholds and non-maximum suppression for a whole batch in one ``batched_nms`` call.

    Args:
        conf_thresh: drop candidates scoring at or below this (0.001 keeps the low-score tail mAP needs).
        nms_thresh: IoU above which a lower-scored box of the same class (and image) is suppressed.
        nms_topk: detections kept per image after NMS, best first.
        pre_nms_topk: candidates per image entering NMS, best first (bounds NMS time at low thresholds).
        multi_label: a box may be reported for every class scoring above ``conf_thresh`` (best for mAP);
            otherwise only for its best class.
        force_suppress: suppress across classes too (class-agnostic NMS).
    """

    def __init__(
        self,
        conf_thresh: float = 0.001,
        nms_thresh: float = 0.45,
        nms_topk: int = 300,
        pre_nms_topk: int = 3000,
        multi_label: bool = True,
        force_suppress: bool = False,
    ) -> None:
        self.conf_thresh = conf_thresh
        self.nms_thresh = nms_thresh
        self.nms_topk = nms_topk
        self.pre_nms_topk = pre_nms_topk
        self.multi_label = multi_label
        self.force_suppress = force_suppress

    def __call__(self, preds: Tensor, grid: PredictionGrid, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """``preds [B, N, 5 + C]`` raw -> per image ``{"boxes", "scores", "labels"}`` in batch pixels."""
        return suppress_and_split(*self.candidates(preds, grid, image_size), *self.suppression(preds))

    def padded(self, preds: Tensor, grid: PredictionGrid, image_size: tuple[int, int]) -> PaddedDetections:
        """The same detections as ``__call__`` in fixed-shape tensors of ``nms_topk`` rows per image (for export)."""
        return suppress_and_pad(*self.candidates(preds, grid, image_size), *self.suppression(preds))

    def candidates(
        self, preds: Tensor, grid: PredictionGrid, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's (box, score, label, image) candidates entering NMS, flat over images."""
        batch, _, channels = preds.shape
        num_classes = channels - 5
        boxes = clip_boxes_to_image(decode_boxes(preds[..., :4], grid.cell_xy, grid.anchor_wh, grid.stride), image_size)
        class_scores = preds[..., 4:5].sigmoid() * preds[..., 5:].sigmoid()
        if self.multi_label:
            scores = class_scores.flatten(1)  # [B, N * C]: every (box, class) pair is a candidate
        else:
            scores, best_class = class_scores.max(-1)

        scores, candidate = scores.topk(min(self.pre_nms_topk, scores.shape[1]), dim=1)
        image = torch.arange(batch, device=preds.device)[:, None].expand_as(candidate)
        above = scores > self.conf_thresh
        scores, candidate, image = scores[above], candidate[above], image[above]
        if self.multi_label:
            box_index, labels = candidate // num_classes, candidate % num_classes
        else:
            box_index, labels = candidate, best_class[image, candidate]
        return boxes[image, box_index], scores, labels, image

    def suppression(self, preds: Tensor) -> tuple[int, int, float, int, bool]:
        """The NMS arguments after the candidates: batch size, class count, IoU threshold, cap, class-agnostic."""
        return preds.shape[0], preds.shape[-1] - 5, self.nms_thresh, self.nms_topk, self.force_suppress
