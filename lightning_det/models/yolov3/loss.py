"""The YOLOv3 loss: box regression, objectness and classification over the assigned predictions.

Terms (each multiplied by its gain; the returned ``loss`` is their sum):

- ``box``: ``giou``: ``1 - GIoU`` of the decoded positive boxes with their objects
  (``torchvision.ops.generalized_box_iou_loss``); ``xywh``: the classic YOLOv3 split, binary cross-entropy of
  ``sigmoid(tx, ty)`` against the centre's offset inside its cell (gain ``xy``) plus squared error of
  ``tw, th`` against ``log(object size / anchor size)`` (gain ``wh``).
- ``obj``: binary cross-entropy with logits over every prediction, target 1 on positives and 0 elsewhere,
  positives weighted by ``obj_pw``. With ``ignore_thresh`` set, a non-positive prediction whose decoded box
  overlaps any object of its image (difficult ones included) with IoU above it is left out, as in the YOLOv3
  paper: it found an object, just not the one it was assigned. Predictions that difficult objects would take
  are left out too.
- ``cls``: binary cross-entropy with logits (one-vs-all, so multi-label data works) on the positives'
  class logits against one-hot targets, positives weighted by ``cls_pw``. Its gain is the one tuned on COCO's
  80 classes, scaled by ``num_classes / 80`` as Ultralytics' YOLOv3 does: the BCE averages over the classes, so
  with few classes each one would weigh more.

Normalisation, chosen to match Ultralytics' YOLOv3 (whose default gains these are): every term is a *mean per
feature level, summed over the levels*. ``box`` and ``cls`` average over the level's positives (``cls`` also over
classes), ``obj`` over all the level's predictions of the batch (left-out ones count as zero). No term is
multiplied by the batch size, so the learning rate does not depend on it; a level without positives adds nothing
to ``box`` and ``cls``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from lightning_det.data.collate import Labels
from lightning_det.models.yolov3.decode import decode_boxes
from lightning_det.models.yolov3.grid import PredictionGrid
from lightning_det.models.yolov3.targets import Targets

BOX_LOSSES = ("giou", "xywh")
COCO_CLASSES = 80  # the class count the default gains were tuned for


# IoU entries (prediction x object pairs) computed at once by the ignore rule: bounds its memory in dense scenes
# (1,000 objects x 10,647 predictions x 4 images would be 170 MB per intermediate) at 4 MB per intermediate.
IOU_CHUNK_ELEMENTS = 1 << 20


def max_iou_with_objects(boxes: Tensor, objects: Tensor, valid: Tensor) -> Tensor:
    """Per xyxy box ``[B, N, 4]``, its largest IoU with the ``valid [B, P]`` objects ``[B, P, 4]`` of its image:
    ``[B, N]`` (0 without objects). Objects are taken in chunks, so no ``[B, N, P]`` tensor is ever whole; each
    chunk is laid out ``[B, objects, N]`` so every step runs along the long, contiguous prediction axis."""
    best = boxes.new_zeros(boxes.shape[:2])
    x1, y1, x2, y2 = (side.unsqueeze(1).contiguous() for side in boxes.unbind(-1))  # [B, 1, N]
    area = (x2 - x1).clamp_(min=0) * (y2 - y1).clamp_(min=0)
    objects = objects.masked_fill(~valid[..., None], 0.0)  # an empty box: IoU 0 with everything
    chunk = max(1, IOU_CHUNK_ELEMENTS // max(1, boxes.shape[0] * boxes.shape[1]))
    for start in range(0, objects.shape[1], chunk):
        ox1, oy1, ox2, oy2 = objects[:, start : start + chunk, :, None].unbind(2)  # [B, K, 1]
        inter = (torch.minimum(x2, ox2) - torch.maximum(x1, ox1)).clamp_(min=0)
        inter *= (torch.minimum(y2, oy2) - torch.maximum(y1, oy1)).clamp_(min=0)
        union = (area + (ox2 - ox1).clamp(min=0) * (oy2 - oy1).clamp(min=0) - inter).clamp_(min=1e-9)
        best = torch.maximum(best, (inter / union).amax(1))
    return best


class YOLOv3Loss:
    """The ``loss`` part: computes the terms; see the module docstring for what each gain and option does.

    ``num_classes`` is the data's class count, given by the module; it scales the ``cls`` gain (80: as given).
    """

    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"box_loss": tuple(BOX_LOSSES)}

    def __init__(
        self,
        box_loss: str = "giou",
        giou: float = 3.54,
        xy: float = 3.54,
        wh: float = 3.54,
        obj: float = 64.3,
        cls: float = 37.4,
        obj_pw: float = 1.0,
        cls_pw: float = 1.0,
        ignore_thresh: float | None = 0.7,
        num_classes: int = COCO_CLASSES,
    ) -> None:
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.box_loss = box_loss
        self.gains = {"giou": giou, "xy": xy, "wh": wh, "obj": obj, "cls": cls * num_classes / COCO_CLASSES}
        self.obj_pw = obj_pw
        self.cls_pw = cls_pw
        self.ignore_thresh = ignore_thresh

    def __call__(self, preds: Tensor, grid: PredictionGrid, targets: Targets, labels: Tensor) -> dict[str, Tensor]:
        """``preds [B, N, 5 + C]`` raw predictions, ``labels [B, P, 6]`` the batch labels the targets came from."""
        positive = preds[targets.image, targets.index]
        level = grid.level[targets.index]
        per_level = torch.bincount(level, minlength=grid.num_levels).clamp(min=1)
        positive_weight = 1.0 / per_level[level]  # sums of weighted positives are per-level means

        box = (self._box_term(positive, grid, targets) * positive_weight).sum()  # gains applied inside
        cls = self.gains["cls"] * (self._cls_term(positive, targets) * positive_weight).sum()
        obj = self.gains["obj"] * self._obj_term(preds, grid, targets, labels)
        return {"loss": box + obj + cls, "box": box, "obj": obj, "cls": cls}

    def _box_term(self, positive: Tensor, grid: PredictionGrid, targets: Targets) -> Tensor:
        """Per positive, already multiplied by its gain (two gains for ``xywh``)."""
        at = targets.index
        cell_xy, anchor_wh, stride = grid.cell_xy[at], grid.anchor_wh[at], grid.stride[at]
        if self.box_loss == "giou":
            boxes = decode_boxes(positive[:, :4], cell_xy, anchor_wh, stride)
            return self.gains["giou"] * generalized_box_iou_loss(boxes, targets.boxes, reduction="none")
        centre = (targets.boxes[:, :2] + targets.boxes[:, 2:]) / 2
        size = (targets.boxes[:, 2:] - targets.boxes[:, :2]).clamp(min=1e-6)
        xy = F.binary_cross_entropy_with_logits(positive[:, :2], centre / stride[:, None] - cell_xy, reduction="none")
        wh = F.mse_loss(positive[:, 2:4], torch.log(size / anchor_wh), reduction="none")
        return self.gains["xy"] * xy.mean(1) + self.gains["wh"] * wh.mean(1)

    def _cls_term(self, positive: Tensor, targets: Targets) -> Tensor:
        logits = positive[:, 5:]
        one_hot = F.one_hot(targets.classes, logits.shape[1]).to(logits)
        pos_weight = logits.new_tensor(self.cls_pw)
        return F.binary_cross_entropy_with_logits(logits, one_hot, pos_weight=pos_weight, reduction="none").mean(1)

    def _obj_term(self, preds: Tensor, grid: PredictionGrid, targets: Targets, labels: Tensor) -> Tensor:
        logits = preds[..., 4]
        target = torch.zeros_like(logits)
        target[targets.image, targets.index] = 1.0
        counted = torch.ones_like(logits, dtype=torch.bool)
        if self.ignore_thresh is not None:
            counted &= ~self._overlaps_an_object(preds, grid, labels)
        counted[targets.ignore_image, targets.ignore_index] = False
        counted[targets.image, targets.index] = True
        pos_weight = logits.new_tensor(self.obj_pw)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
        return (bce * counted * grid.level_weight).sum() / len(preds)

    @torch.no_grad()
    def _overlaps_an_object(self, preds: Tensor, grid: PredictionGrid, labels: Tensor) -> Tensor:
        """``[B, N]``: the prediction's decoded box has IoU above ``ignore_thresh`` with an object of its image."""
        boxes = decode_boxes(preds[..., :4], grid.cell_xy, grid.anchor_wh, grid.stride)
        objects = Labels.of(labels)
        return max_iou_with_objects(boxes, objects.boxes, objects.valid) > self.ignore_thresh
