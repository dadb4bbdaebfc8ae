"""Pascal VOC detection mAP as a torchmetrics ``Metric``, following the official devkit's matching rules.

Devkit rules (``VOCevaldet.m``) reproduced here:

- the detections of a class are ranked by score, highest first; the sort is stable, so equal scores keep their
  arrival order (images in ``update`` order, then each image's own order);
- each detection looks at every ground-truth box of its image and class, *matched or not*, and takes the one with
  the highest IoU (the first box on IoU ties); IoU >= ``iou_threshold`` makes it a candidate for that box;
- a candidate of a difficult box is ignored (neither true nor false positive); the first candidate of a normal box
  is a true positive, later ones are duplicates (false positives); a detection below the threshold is a false
  positive;
- difficult boxes are not counted in a class's number of positives; a class without positives has AP NaN and is
  left out of the mean.

How the greedy matching is vectorised: because a detection's best box does not depend on which boxes earlier
detections took, all best boxes are found at once (IoU of every detection against the boxes of its image and class,
then a segment arg-max). The only order-dependent question, "was this box already taken by a higher-ranked
detection?", is a segment minimum of score ranks per box. Precision and recall are prefix sums per class, the
monotone precision envelope is a segmented reverse cumulative maximum, and the VOC07 11-point samples are counts
of detections below each recall level: no Python loop over images, detections or classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_det.metrics.common import DetectionMetric

# The 11 recall levels of the VOC07 metric, built as 0.1 * k in float64 like the devkit ports in common use
# (py-faster-rcnn, Detectron2, MMDetection), so a recall of exactly 0.3, 0.6 or 0.7 is scored as they score it.
VOC07_RECALL_LEVELS = torch.arange(11, dtype=torch.float64) * 0.1


class VOCMeanAP(DetectionMetric):
    """Pascal VOC mAP at one IoU threshold: VOC2010+ area under the precision envelope, or VOC07 11-point.

    ``update(preds, targets)`` takes per image ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}`` and
    ``{"boxes" [M, 4], "labels" [M], "difficult" [M] bool}`` (``difficult`` may be left out: none are).
    ``compute()`` returns ``"mAP"``, ``"AP_per_class"`` (``[num_classes]``, NaN where a class has no positives),
    ``"recall"`` (mean over those classes of the recall reached with every detection) and ``"pr_counts"``
    (``[num_classes, pr_thresholds, 3]``: true positives, false positives and missed objects counting the
    detections scoring at least ``i / (pr_thresholds - 1)``: the points of a precision-recall curve per class).

    A target may carry its ``"image_id"``: an image seen twice then counts once (under DDP, Lightning's sampler
    repeats a few images so that every rank gets as many batches; without ids they would count twice).

    Box convention: continuous pixel edges, as the readers produce them (VOC's 1-based inclusive ``xmin..xmax``
    becomes ``[xmin - 1, xmax]``), so ``x2 - x1`` is already the devkit's ``xmax - xmin + 1``. ``plus_one`` is
    only for boxes given as raw inclusive pixel indices; with the readers' boxes it would count a pixel twice.

    Inputs are stored as float32: scores that differ only beyond float32 precision count as ties. Under DDP the
    ranks' images are gathered rank after rank, so exact score ties *between images* may be ordered differently
    than in a single-process run, as with the devkit fed the same detections in another file order.
    """

    target_columns = ("difficult",)

    def __init__(
        self,
        num_classes: int,
        iou_threshold: float = 0.5,
        use_07_metric: bool = False,
        use_difficult: bool = False,
        plus_one: bool = False,
        class_names: list[str] | None = None,
        pr_thresholds: int = 101,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, **kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.use_07_metric = use_07_metric
        self.use_difficult = use_difficult
        self.plus_one = plus_one
        self.pr_thresholds = pr_thresholds

    def compute(self) -> dict[str, Tensor]:
        """mAP, AP per class and mean recall over the classes that have positives."""
        detections, ground_truths, counts = self.epoch_rows()
        detections, ground_truths = detections.double(), ground_truths.double()
        images = torch.arange(len(counts))
        det_image = images.repeat_interleave(counts[:, 0])
        gt_image = images.repeat_interleave(counts[:, 1])

        det_boxes, scores, det_labels = detections[:, :4], detections[:, 4], detections[:, 5].long()
        gt_boxes, gt_labels = ground_truths[:, :4], ground_truths[:, 4].long()
        difficult = ground_truths[:, 5] > 0
        if self.use_difficult:
            difficult = torch.zeros_like(difficult)

        best_iou, best_gt = best_ground_truth(
            det_boxes,
            det_image * self.num_classes + det_labels,
            gt_boxes,
            gt_image * self.num_classes + gt_labels,
            self.plus_one,
        )
        score_order = torch.sort(scores, descending=True, stable=True).indices
        is_tp, is_ignored = _assign(best_iou >= self.iou_threshold, best_gt, difficult, score_order)

        # Rank by class, then score (both sorts stable), and drop ignored detections: they move neither curve.
        ranked = score_order[torch.sort(det_labels[score_order], stable=True).indices]
        ranked = ranked[~is_ignored[ranked]]
        positives = torch.bincount(gt_labels[~difficult], minlength=self.num_classes)
        curve = _Curve(is_tp[ranked].long(), det_labels[ranked], positives, self.num_classes)

        if self.use_07_metric:
            ap = _eleven_point_ap(curve)
        else:
            ap = torch.zeros(self.num_classes, dtype=torch.float64).index_add_(
                0, curve.labels, curve.is_tp * curve.envelope
            ) / positives
        has_positives = positives > 0
        ap = torch.where(has_positives, ap, torch.nan)
        recall = curve.true_positives_per_class[has_positives] / positives[has_positives]
        return {
            "mAP": ap.nanmean().float(),
            "AP_per_class": ap.float(),
            "recall": recall.mean().float() if has_positives.any() else torch.tensor(torch.nan),
            "pr_counts": _threshold_counts(scores[ranked], curve, self.pr_thresholds).float(),
        }


class _Curve:
    """Ranked detections of all classes (class-major, then score) with their precision and recall."""

    def __init__(self, is_tp: Tensor, labels: Tensor, positives: Tensor, num_classes: int) -> None:
        self.is_tp = is_tp
        self.labels = labels
        self.positives = positives
        self.per_class = torch.bincount(labels, minlength=num_classes)
        self.start = torch.cumsum(self.per_class, 0) - self.per_class
        self.true_positives_per_class = torch.bincount(labels, weights=is_tp.double(), minlength=num_classes)
        tp_before_class = torch.cumsum(self.true_positives_per_class, 0) - self.true_positives_per_class
        cumulative_tp = torch.cumsum(is_tp, 0).double() - tp_before_class[labels]
        position = torch.arange(len(labels)) - self.start[labels]
        self.precision = cumulative_tp / (position + 1)
        self.recall = cumulative_tp / positives[labels]
        self.envelope = _segmented_reverse_cummax(self.precision, labels, num_classes)


def _threshold_counts(scores: Tensor, curve: _Curve, thresholds: int) -> Tensor:
    """``[C, thresholds, 3]`` (TP, FP, FN) over the detections scoring at least each threshold ``i / (T - 1)``."""
    top = (scores * (thresholds - 1)).floor().clamp(max=thresholds - 1).long()  # the last threshold each one reaches
    counted = top >= 0
    cells = (curve.labels * thresholds + top)[counted]
    size = curve.per_class.numel() * thresholds
    tp = torch.bincount(cells, weights=curve.is_tp[counted].double(), minlength=size)
    fp = torch.bincount(cells, weights=1.0 - curve.is_tp[counted].double(), minlength=size)
    at_least = torch.stack((tp, fp), -1).view(-1, thresholds, 2).flip(1).cumsum(1).flip(1)
    missed = curve.positives[:, None] - at_least[..., 0]
    return torch.cat((at_least, missed.unsqueeze(-1)), -1)


def _pair_iou(a: Tensor, b: Tensor, plus_one: bool) -> Tensor:
    """IoU of box ``a[i]`` with box ``b[i]``; ``plus_one`` counts both end pixels of raw inclusive indices."""
    extra = 1.0 if plus_one else 0.0
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0]) + extra).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1]) + extra).clamp(min=0)
    intersection = width * height
    area_a = (a[:, 2] - a[:, 0] + extra) * (a[:, 3] - a[:, 1] + extra)
    area_b = (b[:, 2] - b[:, 0] + extra) * (b[:, 3] - b[:, 1] + extra)
    union = area_a + area_b - intersection
    return torch.where(intersection > 0, intersection / union, 0.0)


def best_ground_truth(
    det_boxes: Tensor, det_group: Tensor, gt_boxes: Tensor, gt_group: Tensor, plus_one: bool
) -> tuple[Tensor, Tensor]:
    """For each detection, the highest IoU with a box of its group (image x class) and that box's index (-1: none).

    Ground truth is sorted by group so each detection's boxes form one contiguous run; every (detection, box) pair
    of a run is scored, then reduced per detection. The first box of the run wins IoU ties, as in the devkit.
    """
    gt_order = torch.sort(gt_group, stable=True).indices
    sorted_groups = gt_group[gt_order]
    first = torch.searchsorted(sorted_groups, det_group, side="left")
    run_length = torch.searchsorted(sorted_groups, det_group, side="right") - first
    pair_det = torch.arange(len(det_group)).repeat_interleave(run_length)
    pair_start = (torch.cumsum(run_length, 0) - run_length)[pair_det]
    pair_gt = first[pair_det] + torch.arange(len(pair_det)) - pair_start  # position in the sorted ground truth
    iou = _pair_iou(det_boxes[pair_det], gt_boxes[gt_order[pair_gt]], plus_one)

    best_iou = torch.zeros(len(det_group), dtype=iou.dtype).scatter_reduce(0, pair_det, iou, "amax")
    no_box = len(gt_order)
    ties_at_best = torch.where(iou == best_iou[pair_det], pair_gt, no_box)
    best_sorted = torch.full_like(det_group, no_box).scatter_reduce(0, pair_det, ties_at_best, "amin")
    best_gt = torch.cat([gt_order, torch.tensor([-1])])[best_sorted]
    return best_iou, best_gt


def _assign(overlaps: Tensor, best_gt: Tensor, difficult: Tensor, score_order: Tensor) -> tuple[Tensor, Tensor]:
    """True positives and ignored detections: the highest-ranked candidate of each normal box takes it."""
    hits_difficult = torch.zeros_like(overlaps)
    hits_difficult[overlaps] = difficult[best_gt[overlaps]]
    claims = overlaps & ~hits_difficult
    rank = torch.empty_like(score_order)
    rank[score_order] = torch.arange(len(score_order))
    claimed_box, claim_rank = best_gt[claims], rank[claims]
    first_claim = torch.full((len(difficult),), len(rank)).scatter_reduce(0, claimed_box, claim_rank, "amin")
    is_tp = torch.zeros_like(overlaps)
    is_tp[claims] = claim_rank == first_claim[claimed_box]
    return is_tp, hits_difficult


def _segmented_reverse_cummax(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``max(values[j] for j >= i in the same class)`` for class-major sorted ``values``, computed exactly.

    Values are replaced by their integer rank among all values and offset per class so that, read backwards, each
    class's keys exceed every key of the classes read before it; one cumulative maximum then never crosses a class.
    """
    distinct, value_rank = torch.unique(values, return_inverse=True)
    key = (num_classes - 1 - labels) * len(distinct) + value_rank
    source = torch.cummax(key.flip(0), 0).indices
    return values.flip(0)[source].flip(0)


def _eleven_point_ap(curve: _Curve) -> Tensor:
    """VOC07: mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= level (0 if never reached).

    Recall only grows along a class's ranking, so the detections below a level are a prefix of the class; the best
    precision beyond it is the envelope at the first detection that reaches the level.
    """
    num_classes = len(curve.per_class)
    below = torch.zeros(num_classes, len(VOC07_RECALL_LEVELS), dtype=torch.long).index_add_(
        0, curve.labels, (curve.recall[:, None] < VOC07_RECALL_LEVELS).long()
    )
    reached = below < curve.per_class[:, None]
    first_reaching = torch.where(reached, curve.start[:, None] + below, len(curve.labels))
    envelope = torch.cat([curve.envelope, torch.zeros(1, dtype=curve.envelope.dtype)])
    return envelope[first_reaching].mean(1)
