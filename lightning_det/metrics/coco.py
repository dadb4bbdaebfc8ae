"""COCO mAP through torchmetrics' ``MeanAveragePrecision`` on the faster_coco_eval backend, in our naming.

Only the edges are ours: difficult targets become COCO ``iscrowd`` regions (detections on them are ignored), a
target's optional ``area`` (the annotation's own, e.g. COCO's mask area) bins it into small / medium / large as
COCOeval does (``w * h`` where it is absent or 0),
labels are range-checked, and the result is renamed to the keys the training loop logs (``mAP``, ``AP50`` ...)
with ``AP_per_class`` aligned to ``0 .. num_classes - 1``. Values COCOeval leaves undefined (-1: no ground truth
for a class or an area range) become NaN, as in ``VOCMeanAP``.

Two choices keep the numbers official and the epoch end short:

- the IoU and recall thresholds are passed as COCOeval builds them (float64 ``np.linspace``); torchmetrics'
  defaults come from a float32 ``torch.linspace`` (0.550000011920929 ...), which moves a few matches and recall
  samples away from pycocotools' results;
- AP per class is read from the precision array of the one evaluation (what COCOeval's summary does for a single
  category) instead of torchmetrics' ``class_metrics``, which evaluates again once per class: 20 VOC classes made
  the epoch end about 1.5x slower.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from lightning_det.metrics.common import PerClassVector, check_labels, check_target_boxes
from lightning_det.models.boxes import Detections

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()


class COCOMeanAP(PerClassVector, MeanAveragePrecision):
    """COCO box mAP@[.5:.95] with AP50, AP75, APs/APm/APl, AR100 and AP per class.

    Takes the same ``update(preds, targets)`` formats as ``VOCMeanAP``; ``**kwargs`` go to torchmetrics' ``Metric``
    (e.g. ``dist_sync_fn``).
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            box_format="xyxy",
            iou_type="bbox",
            iou_thresholds=COCO_IOU_THRESHOLDS,
            rec_thresholds=COCO_RECALL_THRESHOLDS,
            extended_summary=True,
            backend="faster_coco_eval",
            **kwargs,
        )
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        # COCO scores the best 100 detections per image by definition (maxDets); YOLOv3 and SSD keep 300 and 200 so
        # that the VOC metrics see their low-score tail, which is not a mistake to warn about every evaluation.
        self.warn_on_many_detections = False

    def update(self, preds: Detections, targets: Detections) -> None:  # type: ignore[override]
        """Store one batch; a target's ``difficult`` flags (optional) become ``iscrowd``, its ``area`` (optional, 0:
        none) sets the object's area range."""
        if preds:
            check_labels(torch.cat([p["labels"].reshape(-1) for p in preds]), self.num_classes, "prediction")
        if targets:
            check_labels(torch.cat([t["labels"].reshape(-1) for t in targets]), self.num_classes, "target")
            check_target_boxes(torch.cat([t["boxes"].reshape(-1, 4) for t in targets]))
        crowd_targets = [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "iscrowd": t.get("difficult", torch.zeros_like(t["labels"])).long(),
                "area": t.get("area", torch.zeros(len(t["labels"]))).float(),
            }
            for t in targets
        ]
        super().update(preds, crowd_targets)

    def compute(self) -> dict[str, Tensor]:
        """The summary values and AP per class (NaN where undefined)."""
        raw = super().compute()
        max_dets = self.max_detection_thresholds[-1]
        names = {
            "mAP": "map",
            "AP50": "map_50",
            "AP75": "map_75",
            "APs": "map_small",
            "APm": "map_medium",
            "APl": "map_large",
            f"AR{max_dets}": f"mar_{max_dets}",
        }
        results = {ours: _undefined_to_nan(raw[theirs].reshape(())) for ours, theirs in names.items()}
        results["AP_per_class"] = torch.full((self.num_classes,), torch.nan)
        if "precision" in raw:  # absent when no image was seen
            # [IoU thresholds, recall thresholds, observed classes, area ranges, max detections]; -1 = undefined
            precision = raw["precision"][:, :, :, 0, -1]
            defined = precision > -1
            ap = (precision * defined).sum((0, 1)) / defined.sum((0, 1))
            results["AP_per_class"][raw["classes"].long().reshape(-1)] = ap.float()
        return results


def _undefined_to_nan(values: Tensor) -> Tensor:
    return torch.where(values < 0, torch.nan, values.float())
