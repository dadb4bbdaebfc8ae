"""Non-maximum suppression over a whole batch, then per-image detections in one of two layouts: a list of
variable-length dicts (training, evaluation, prediction) or fixed-shape padded tensors (exported models).

Both layouts come from the same selection, written with tensor operations only (no Python numbers read from the
data), so that it traces into ONNX and TorchScript graphs unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from lightning_det.models.boxes import Detections, group_sizes, rank_within_groups

# Sort key of a kept candidate: image * IMAGE_KEY + its position in score order. Unique while a batch has fewer
# candidates than this, so any sort (ONNX's TopK is not stable) orders by image, then best first.
IMAGE_KEY = 2**40
# The label of the padding rows of ``PaddedDetections`` (as in the batch label contract).
PAD_LABEL = -1


class PaddedDetections(NamedTuple):
    """Fixed-shape detections of a batch: the first ``num_detections[b]`` rows of image ``b`` are its detections,
    best first; the rows after them hold zero boxes, zero scores and label ``PAD_LABEL``."""

    boxes: Tensor  # [B, K, 4] xyxy, batch-image pixels
    scores: Tensor  # [B, K]
    labels: Tensor  # [B, K] long
    num_detections: Tensor  # [B] long


def top_candidates(
    scores: Tensor, pre_nms_topk: int, score_thresh: float, num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidates entering NMS from per-image scores ``[B, N * num_classes]`` laid out box-major (every
    (box, class) pair a candidate; ``num_classes=1`` for one score per box): each image's ``pre_nms_topk`` best,
    then those scoring above ``score_thresh``. Returns their scores, box indices, class indices and images, flat
    over the batch."""
    scores, candidate = scores.topk(min(pre_nms_topk, scores.shape[1]), dim=1)
    image = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(candidate)
    above = scores > score_thresh
    candidate = candidate[above]
    return scores[above], candidate // num_classes, candidate % num_classes, image[above]


def best_per_image(
    boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, batch: int, num_classes: int,
    nms_thresh: float, max_per_image: int, class_agnostic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One ``batched_nms`` call for every candidate of the batch (grouped by image, and by class unless
    ``class_agnostic``), then the best ``max_per_image`` of each image.

    Returns the kept candidates' indices grouped by image and best first within each, their rank within their
    image, and the number kept per image ``[batch]``.
    """
    groups = image if class_agnostic else image * num_classes + labels
    keep = batched_nms(boxes, scores, groups, nms_thresh)  # sorted by decreasing score
    return first_per_image(keep, image, batch, max_per_image)


def first_per_image(order: Tensor, image: Tensor, batch: int, max_per_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """Of the rows ``order`` (best first), the first ``max_per_image`` of each image: their indices grouped by image
    and best first within each, their rank within their image, and the number kept per image ``[batch]``."""
    position = torch.ones_like(order).cumsum(0)
    order = order[(image[order] * IMAGE_KEY + position).argsort()]
    owner = image[order]
    rank = rank_within_groups(owner, group_sizes(owner, batch))
    within = rank < max_per_image
    return order[within], rank[within], group_sizes(owner[within], batch)


def split_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor, counts: Tensor) -> Detections:
    """The rows ``keep`` (grouped by image, ``counts`` per image) as one ``{"boxes", "scores", "labels"}`` dict
    per image."""
    counts = counts.tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts))
    ]


def suppress_and_split(
    boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, batch: int, num_classes: int,
    nms_thresh: float, max_per_image: int, class_agnostic: bool = False,
) -> Detections:
    """``best_per_image`` as one ``{"boxes", "scores", "labels"}`` dict per image."""
    keep, _, counts = best_per_image(
        boxes, scores, labels, image, batch, num_classes, nms_thresh, max_per_image, class_agnostic
    )
    return split_per_image(boxes, scores, labels, keep, counts)


def suppress_and_pad(
    boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, batch: int, num_classes: int,
    nms_thresh: float, max_per_image: int, class_agnostic: bool = False,
) -> PaddedDetections:
    """``best_per_image`` as ``PaddedDetections`` with ``K = max_per_image`` rows per image."""
    keep, rank, counts = best_per_image(
        boxes, scores, labels, image, batch, num_classes, nms_thresh, max_per_image, class_agnostic
    )
    slot = (image[keep] * max_per_image + rank,)
    rows = batch * max_per_image
    return PaddedDetections(
        boxes.new_zeros(rows, 4).index_put(slot, boxes[keep]).view(batch, max_per_image, 4),
        scores.new_zeros(rows).index_put(slot, scores[keep]).view(batch, max_per_image),
        torch.full((rows,), PAD_LABEL, dtype=torch.long, device=labels.device)
        .index_put(slot, labels[keep].long())
        .view(batch, max_per_image),
        counts,
    )


class Decoder:
    """The ``decoder`` part of every family. A family writes ``candidates`` (its raw outputs -> the boxes, scores,
    labels and images of the (box, class) pairs entering NMS, flat over the batch: where ``score_thresh`` and
    ``pre_nms_topk`` act) and ``batch_and_classes``; the one batched NMS and both layouts are here, so evaluation
    and an exported graph select the same detections."""

    nms_thresh: float
    max_detections: int
    class_agnostic: bool

    def candidates(self, *outputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def batch_and_classes(self, *outputs: Any) -> tuple[int, int]:
        """The batch size and the number of (foreground) classes of ``outputs``."""
        raise NotImplementedError

    def __call__(self, *outputs: Any) -> Detections:
        """Per image ``{"boxes", "scores", "labels"}`` in batch pixels."""
        return suppress_and_split(*self.candidates(*outputs), *self.suppression(*outputs))

    def padded(self, *outputs: Any) -> PaddedDetections:
        """The same detections in fixed-shape tensors of ``max_detections`` rows per image (what export traces)."""
        return suppress_and_pad(*self.candidates(*outputs), *self.suppression(*outputs))

    def suppression(self, *outputs: Any) -> tuple[int, int, float, int, bool]:
        return (*self.batch_and_classes(*outputs), self.nms_thresh, self.max_detections, self.class_agnostic)
