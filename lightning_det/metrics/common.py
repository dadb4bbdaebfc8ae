"""What both metrics share: input checks (a wrong class count or a broken target box must fail loudly, not score
quietly), the shape of the result, and states kept as flat tensors that torchmetrics gathers across ranks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class PerClassVector:
    """Mixin for a torchmetrics ``Metric``: keep ``AP_per_class`` one-dimensional.

    torchmetrics squeezes every one-element tensor a ``compute`` returns, which would turn the per-class AP of a
    single-class detector into a scalar and break code that iterates over classes.
    """

    def _wrap_compute(self, compute: Callable) -> Callable:
        squeezing = super()._wrap_compute(compute)  # type: ignore[misc]

        @functools.wraps(compute)
        def compute_keeping_classes(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            results = squeezing(*args, **kwargs)
            return {**results, "AP_per_class": results["AP_per_class"].reshape(-1)}

        return compute_keeping_classes


def class_names_for(num_classes: int, class_names: list[str] | None) -> list[str]:
    """The names of classes ``0 .. num_classes - 1`` (their numbers when none are given), checked."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
    return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def check_labels(labels: Tensor, num_classes: int, kind: str) -> None:
    """Raise if a ``kind`` ("prediction" or "target") label is outside ``0 .. num_classes - 1``."""
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(
            f"{kind} label {labels[outside][0].item():g} is outside 0..{num_classes - 1}: the metric's "
            "num_classes must match the dataset and model (labels are foreground classes only, no background)"
        )


def check_target_boxes(boxes: Tensor) -> None:
    """Raise if a ground-truth box ``[M, 4]`` is not finite xyxy with ``x2 >= x1`` and ``y2 >= y1``."""
    broken = ~boxes.isfinite().all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if broken.any():
        raise ValueError(
            f"target box {boxes[broken][0].tolist()} is not finite xyxy with x2 >= x1 and y2 >= y1; "
            "check the dataset's box conversion (targets must be x1, y1, x2, y2 in pixels)"
        )


def stack_rows(items: list[dict[str, Tensor]], key: str, columns: int, kind: str) -> tuple[Tensor, list[int]]:
    """``item[key]`` of every image stacked as ``[total, columns]`` rows, with each image's row count."""
    try:
        parts = [item[key].detach().reshape(-1, columns) for item in items]
    except KeyError:
        raise ValueError(f"every {kind} dict needs a '{key}' entry (see lightning_det.metrics)") from None
    return torch.cat(parts), [len(p) for p in parts]


def optional_column(targets: list[dict[str, Tensor]], key: str, counts: list[int]) -> Tensor:
    """``target[key]`` of every image as one column ``[total, 1]``, zeros for an image without it."""
    column = [t[key].detach().reshape(-1, 1) if key in t else torch.zeros(n, 1) for t, n in zip(targets, counts)]
    if [len(c) for c in column] != counts:
        raise ValueError(f"every target needs as many '{key}' values as 'boxes'")
    return torch.cat(column)


@dataclass(frozen=True)
class BatchRows:
    """One batch's detections and ground truth as checked rows, with each image's row counts."""

    boxes: Tensor  # [N, 4] xyxy
    scores: Tensor  # [N, 1]
    labels: Tensor  # [N, 1]
    counts: list[int]  # detections per image
    gt_boxes: Tensor  # [M, 4]
    gt_labels: Tensor  # [M, 1]
    gt_counts: list[int]  # ground-truth boxes per image

    def per_image(self) -> Tensor:
        """``[images, 2]``: (detections, ground-truth boxes) of each image."""
        return torch.tensor([self.counts, self.gt_counts]).T


def checked_rows(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], num_classes: int) -> BatchRows:
    """The rows of one ``update``, after the checks both metrics make: matching lengths, finite scores, labels in
    range, valid target boxes."""
    if len(preds) != len(targets):
        raise ValueError(f"got detections for {len(preds)} images but targets for {len(targets)}")
    boxes, counts = stack_rows(preds, "boxes", 4, "prediction")
    scores, score_counts = stack_rows(preds, "scores", 1, "prediction")
    labels, label_counts = stack_rows(preds, "labels", 1, "prediction")
    if not counts == score_counts == label_counts:
        raise ValueError("every prediction needs as many 'scores' and 'labels' as 'boxes'")
    gt_boxes, gt_counts = stack_rows(targets, "boxes", 4, "target")
    gt_labels, gt_label_counts = stack_rows(targets, "labels", 1, "target")
    if gt_counts != gt_label_counts:
        raise ValueError("every target needs as many 'labels' as 'boxes'")
    if not torch.isfinite(scores).all():
        raise ValueError("a prediction score is NaN or infinite; check the model's decode step")
    check_labels(labels, num_classes, "prediction")
    check_labels(gt_labels, num_classes, "target")
    check_target_boxes(gt_boxes)
    return BatchRows(boxes, scores, labels, counts, gt_boxes, gt_labels, gt_counts)


def image_ids(targets: list[dict[str, Tensor]]) -> Tensor | None:
    """The targets' ``image_id`` values (float64, exact for ids below 2**53), or None unless every target has one."""
    if not all("image_id" in t for t in targets):
        return None
    return torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.float64)


def first_occurrences(ids: Tensor) -> Tensor:
    """A mask of the entries of ``ids`` not seen earlier in it: Lightning's distributed sampler repeats images to
    give every rank as many, and a repeated image must be scored once."""
    _, inverse = torch.unique(ids, return_inverse=True)
    position = torch.arange(len(ids))
    first = torch.full((int(inverse.max()) + 1 if len(ids) else 0,), len(ids)).scatter_reduce(
        0, inverse, position, reduce="amin"
    )
    return torch.zeros(len(ids), dtype=torch.bool).index_fill_(0, first, True)


def flat_rows(columns: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Columns ``[n, k_i]`` side by side and flattened: how a ``"cat"`` state is stored (read by :func:`state_rows`)."""
    return torch.cat([c.to(device, dtype) for c in columns], dim=1).flatten()


def state_rows(state: list[Tensor] | Tensor, width: int) -> Tensor:
    """A flattened ``"cat"`` state (a list before sync, a tensor after) as CPU rows of ``width`` values.

    States are stored flat because torchmetrics gathers a rank that saw no batch as a 1-D empty tensor.
    """
    flat = dim_zero_cat(state) if len(state) else torch.zeros(0)
    return flat.reshape(-1, width).cpu()


class DetectionMetric(PerClassVector, Metric):
    """What ``VOCMeanAP`` and ``COCOMeanAP`` keep: an epoch's checked detections and ground truth as flat tensor
    states that torchmetrics gathers with ``"cat"`` (DDP sync for free, ranks may hold different numbers of images),
    with the targets' ``image_id`` so that an image Lightning's distributed sampler repeats counts once.

    A subclass names the optional per-box target values it keeps beside each ground-truth box
    (``target_columns``) and scores :meth:`epoch_rows` in ``compute``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    target_columns: tuple[str, ...] = ()

    detections: list[Tensor]  # (x1, y1, x2, y2, score, label) per detection, flattened
    ground_truths: list[Tensor]  # (x1, y1, x2, y2, label, *target_columns) per ground-truth box, flattened
    boxes_per_image: list[Tensor]  # (number of detections, number of ground-truth boxes) per image, flattened
    image_ids: list[Tensor]  # the targets' image_id, when every target of a batch has one

    def __init__(self, num_classes: int, class_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.class_names = class_names_for(num_classes, class_names)
        for name in ("detections", "ground_truths", "boxes_per_image", "image_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Store one batch (see the subclass for the formats), after :func:`checked_rows`' checks."""
        if not preds and not targets:
            return
        rows = checked_rows(preds, targets, self.num_classes)
        kept = [optional_column(targets, key, rows.gt_counts) for key in self.target_columns]
        self.detections.append(flat_rows([rows.boxes, rows.scores, rows.labels], self.device, self.dtype))
        self.ground_truths.append(flat_rows([rows.gt_boxes, rows.gt_labels, *kept], self.device, self.dtype))
        self.boxes_per_image.append(flat_rows([rows.per_image()], self.device, self.dtype))
        ids = image_ids(targets)
        if ids is not None:
            self.image_ids.append(ids.to(self.device))

    def epoch_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The epoch on the CPU, each image once (when every image came with its id): detection rows ``[N, 6]``,
        ground-truth rows ``[M, 5 + len(target_columns)]`` and per image (detections, ground-truth boxes), in
        update order."""
        detections = state_rows(self.detections, 6)
        ground_truths = state_rows(self.ground_truths, 5 + len(self.target_columns))
        counts = state_rows(self.boxes_per_image, 2).long()
        ids = state_rows(self.image_ids, 1).double().flatten()
        if len(ids) == len(counts):
            first = first_occurrences(ids)
            detections = detections[first.repeat_interleave(counts[:, 0])]
            ground_truths = ground_truths[first.repeat_interleave(counts[:, 1])]
            counts = counts[first]
        return detections, ground_truths, counts
