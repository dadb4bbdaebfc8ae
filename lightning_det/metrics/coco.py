"""COCO box mAP as a torchmetrics ``Metric`` scored by faster_coco_eval's ``COCOeval_faster``, in our naming.

The states are flat tensors gathered with ``"cat"`` (as in ``VOCMeanAP``), so DDP sync is torchmetrics' own. At the
epoch end the whole epoch becomes the two COCO datasets in one pass over whole-epoch columns, and COCOeval runs once.

Our edges: difficult targets become COCO ``iscrowd`` regions (detections on them are ignored), a target's optional
``area`` (the annotation's own, e.g. COCO's mask area) bins it into small / medium / large as COCOeval does
(``w * h`` where it is absent or 0), labels are range-checked, and the result uses the keys the training loop logs
(``mAP``, ``AP50`` ...) with ``AP_per_class`` aligned to ``0 .. num_classes - 1``. Values COCOeval leaves
undefined (-1: no ground truth for a class or an area range) become NaN, as in ``VOCMeanAP``.

The numbers are pycocotools' (tested): COCOeval's own float64 IoU and recall thresholds (a float32 0.55 would miss
an IoU of exactly 0.55), boxes turned into xywh in float32, the precision they are stored in, and the summary and AP
per class read from the one evaluation's precision and recall arrays as COCOeval's summary reads them.

What keeps the epoch end no slower than faster_coco_eval fed directly (``bench/metrics.py``):

- the library needs one Python dict per object; they are built from whole-epoch ``tolist()`` columns, and no
  result list goes through ``loadRes`` (which adds a polygon to every detection);
- only ``maxDets=[100]`` is evaluated: AR1 and AR10 are not reported, and accumulating them too costs COCOeval's
  C++ part about a quarter more time;
- Python's cyclic garbage collector is paused while the half-million acyclic dicts of a VOC-sized epoch are built
  and scored: its full collections, triggered by the allocations, re-scan the whole process heap and cost more than
  building the dicts.
"""

from __future__ import annotations

from typing import Any

import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor

from lightning_det.io import collector_paused
from lightning_det.metrics.common import DetectionMetric

MAX_DETECTIONS = 100  # COCO scores the best 100 detections of each image and class
IOU_50, IOU_75 = 0, 5  # positions of 0.5 and 0.75 among COCOeval's IoU thresholds 0.5, 0.55, ..., 0.95
SUMMARY_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", f"AR{MAX_DETECTIONS}")


class COCOMeanAP(DetectionMetric):
    """COCO box mAP@[.5:.95] with AP50, AP75, APs/APm/APl, AR100 and AP per class.

    ``update(preds, targets)`` takes per image ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}`` and
    ``{"boxes" [M, 4], "labels" [M]}`` with optional ``"difficult"`` [M] (crowd regions), ``"area"`` [M] (0:
    none) and ``"image_id"``, as ``VOCMeanAP`` does; ``**kwargs`` go to torchmetrics' ``Metric`` (e.g.
    ``dist_sync_fn``).
    """

    target_columns = ("difficult", "area")  # difficult becomes iscrowd; area sets the area range

    def compute(self) -> dict[str, Tensor]:
        """The summary values and AP per class (NaN where undefined)."""
        detections, ground_truths, counts = self.epoch_rows()
        categories = torch.cat([detections[:, 5], ground_truths[:, 4]]).long().unique()
        results = {key: torch.tensor(torch.nan) for key in SUMMARY_KEYS}
        results["AP_per_class"] = torch.full((self.num_classes,), torch.nan)
        if not len(categories):  # no image, or not one box in any
            return results
        with collector_paused():  # until every dict is freed again
            precision, recall = _precision_recall(detections, ground_truths, counts, categories.tolist())
        summary = [
            precision[..., 0], precision[IOU_50, ..., 0], precision[IOU_75, ..., 0],
            precision[..., 1], precision[..., 2], precision[..., 3], recall[..., 0],
        ]
        results.update({key: _defined_mean(values) for key, values in zip(SUMMARY_KEYS, summary)})
        results["AP_per_class"][categories] = _defined_mean(precision[..., 0], dims=(0, 1))
        return results


def _precision_recall(
    detections: Tensor, ground_truths: Tensor, counts: Tensor, categories: list[int]
) -> tuple[Tensor, Tensor]:
    """COCOeval_faster run once over the epoch: precision ``[IoU thresholds, recall thresholds, categories, area
    ranges]`` and recall ``[IoU thresholds, categories, area ranges]``, both for the best 100 detections of each image
    and class; area ranges: all, small, medium, large.

    Images are numbered in update order; annotation ids start at 1 (COCOeval reads id 0 as "unmatched").
    """
    images = torch.arange(len(counts))
    gt_xywh = _xywh(ground_truths[:, :4])
    own_area = ground_truths[:, 6].double()
    gt_area = torch.where(own_area > 0, own_area, gt_xywh[:, 2].double() * gt_xywh[:, 3].double())
    truth = [
        {"id": i, "image_id": image, "category_id": label, "bbox": box, "area": area, "iscrowd": crowd}
        for i, image, label, box, area, crowd in zip(
            range(1, len(ground_truths) + 1),
            images.repeat_interleave(counts[:, 1]).tolist(),
            ground_truths[:, 4].long().tolist(),
            gt_xywh.tolist(),
            gt_area.tolist(),
            ground_truths[:, 5].long().tolist(),
        )
    ]
    det_xywh = _xywh(detections[:, :4])
    found = [
        {"id": i, "image_id": image, "category_id": label, "bbox": box, "area": area, "score": score}
        for i, image, label, box, area, score in zip(
            range(1, len(detections) + 1),
            images.repeat_interleave(counts[:, 0]).tolist(),
            detections[:, 5].long().tolist(),
            det_xywh.tolist(),
            (det_xywh[:, 2].double() * det_xywh[:, 3].double()).tolist(),
            detections[:, 4].tolist(),
        )
    ]
    common = {"images": [{"id": i} for i in range(len(counts))], "categories": [{"id": c} for c in categories]}
    evaluation = COCOeval_faster(
        COCO({**common, "annotations": truth}), COCO({**common, "annotations": found}), "bbox", print_function=_silent
    )
    evaluation.params.maxDets = [MAX_DETECTIONS]
    evaluation.evaluate()
    evaluation.accumulate()
    precision, recall = (evaluation.eval[name][..., -1] for name in ("precision", "recall"))
    return torch.from_numpy(precision), torch.from_numpy(recall)


def _xywh(boxes: Tensor) -> Tensor:
    """xyxy -> COCO's xywh, subtracting in the stored dtype (float32) as torchmetrics' ``box_convert`` did."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)


def _defined_mean(values: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """Mean of the values COCOeval defines (-1: undefined) over ``dims`` (all by default); NaN where none is."""
    dims = dims if dims is not None else tuple(range(values.dim()))
    defined = values > -1
    return ((values * defined).sum(dims) / defined.sum(dims)).float()


def _silent(*args: Any, **kwargs: Any) -> None:
    """COCOeval's progress messages, dropped."""
