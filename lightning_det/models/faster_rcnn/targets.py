"""Who trains what: anchor targets for the RPN and sampled proposal targets for the RoI head, for a whole batch.

Both stages follow the same recipe: match by IoU, label positive / negative / ignored, then draw a fixed number
of samples per image with a cap on the positive share. Everything runs on flattened batch tensors with an image
index per row, so there is no loop over images or objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from lightning_det.data.collate import Labels
from lightning_det.models.boxes import group_sizes, rank_within_groups

IGNORE = -1


class GroundTruth(NamedTuple):
    """The batch's real objects, flattened: ``boxes [G, 4]``, ``labels [G]`` (0..C-1), ``image [G]``."""

    boxes: Tensor
    labels: Tensor
    image: Tensor


def ground_truth(labels: Tensor) -> GroundTruth:
    """Padded batch labels ``[B, P, 6]`` -> the valid rows, flattened."""
    valid = Labels.of(labels).valid
    rows = Labels.present(labels)
    return GroundTruth(rows.boxes, rows.classes.long(), valid.nonzero()[:, 0])


def random_rank_within_groups(group: Tensor, eligible: Tensor, num_groups: int) -> Tensor:
    """A random order of the eligible rows inside each group: rank 0, 1, ... per group; ineligible rows rank last.

    Sorting by ``group + uniform noise`` (ineligible rows pushed after all groups) shuffles every group in one
    sort; a row's rank is its position minus where its group starts.
    """
    noise = torch.rand(group.shape, device=group.device, dtype=torch.float64)
    key = torch.where(eligible, group.to(torch.float64), float(num_groups)) + noise
    order = key.argsort()
    sorted_group = torch.where(eligible, group, num_groups)[order]  # the ineligible rows: one last group
    rank = torch.empty_like(group)
    rank[order] = rank_within_groups(sorted_group, group_sizes(sorted_group, num_groups + 1))
    return torch.where(eligible, rank, torch.iinfo(rank.dtype).max)


def sample_balanced(
    positive: Tensor,
    negative: Tensor,
    group: Tensor,
    num_groups: int,
    batch_size_per_image: int,
    positive_fraction: float,
) -> tuple[Tensor, Tensor]:
    """Per image, at most ``positive_fraction * batch_size_per_image`` random positives, negatives filling the rest.

    Returns the masks of the sampled positives and sampled negatives.
    """
    positive_cap = int(batch_size_per_image * positive_fraction)
    positive_rank = random_rank_within_groups(group, positive, num_groups)
    sampled_positive = positive_rank < positive_cap
    taken = torch.bincount(group[sampled_positive], minlength=num_groups)
    negative_rank = random_rank_within_groups(group, negative, num_groups)
    sampled_negative = negative_rank < (batch_size_per_image - taken)[group]
    return sampled_positive, sampled_negative


class AnchorTargets(NamedTuple):
    """Per image and anchor ``[B, A]``: label 1 / 0 / -1 (positive, negative, not sampled) and matched box."""

    labels: Tensor
    matched_boxes: Tensor  # [B, A, 4]


class ProposalTargets(NamedTuple):
    """The RoIs sampled for the head, flattened: ``rois [R, 4]``, ``image [R]``, ``labels [R]`` with 0 for
    background and 1..C for the classes, and the matched object box ``[R, 4]``."""

    rois: Tensor
    image: Tensor
    labels: Tensor
    matched_boxes: Tensor


class FasterRCNNAssigner:
    """The targets of both stages: the anchor rule of the RPN (``rpn_*``) and the proposal sampling rule of the
    RoI head (``roi_*``), torchvision's two ``Matcher`` + ``BalancedPositiveNegativeSampler`` pairs.

    Anchors: positive at IoU >= ``rpn_positive_iou`` with some object, or the best anchor (ties included) of some
    object; negative with a best IoU below ``rpn_negative_iou``; ignored in between. Proposals: foreground at IoU
    >= ``roi_positive_iou`` with an object of the same image, background at an IoU in ``roi_negative_iou``
    ``[lo, hi)``. Each stage then samples ``*_batch_size`` per image with at most ``*_positive_fraction`` positive.
    """

    def __init__(
        self,
        rpn_positive_iou: float = 0.7,
        rpn_negative_iou: float = 0.3,
        rpn_batch_size: int = 256,
        rpn_positive_fraction: float = 0.5,
        roi_batch_size: int = 128,
        roi_positive_fraction: float = 0.25,
        roi_positive_iou: float = 0.5,
        roi_negative_iou: Sequence[float] = (0.0, 0.5),
    ) -> None:
        self.rpn_positive_iou = rpn_positive_iou
        self.rpn_negative_iou = rpn_negative_iou
        self.rpn_batch_size = rpn_batch_size
        self.rpn_positive_fraction = rpn_positive_fraction
        self.roi_batch_size = roi_batch_size
        self.roi_positive_fraction = roi_positive_fraction
        self.roi_positive_iou = roi_positive_iou
        self.roi_negative_iou = tuple(roi_negative_iou)

    def anchors(self, anchors: Tensor, labels: Tensor) -> AnchorTargets:
        """RPN targets for anchors ``[A, 4]`` shared by the padded batch, from batch labels ``[B, P, 6]``."""
        batch, pad = labels.shape[:2]
        objects = Labels.of(labels)
        valid = objects.valid  # [B, P]
        iou = box_iou(anchors, objects.boxes.reshape(-1, 4)).view(len(anchors), batch, pad).permute(1, 0, 2)
        iou = torch.where(valid.unsqueeze(1), iou, -1.0)  # [B, A, P]; padding rows never match
        best_iou, best_object = iou.max(2)
        best_for_object = iou.amax(1, keepdim=True)  # [B, 1, P]
        forced = ((iou == best_for_object) & valid.unsqueeze(1) & (best_for_object > 0)).any(2)
        positive = (best_iou >= self.rpn_positive_iou) | forced
        negative = (best_iou < self.rpn_negative_iou) & ~positive
        image = torch.arange(batch, device=anchors.device).repeat_interleave(len(anchors))
        sampled_positive, sampled_negative = sample_balanced(
            positive.flatten(), negative.flatten(), image, batch, self.rpn_batch_size, self.rpn_positive_fraction
        )
        target = torch.full_like(image, IGNORE)
        target[sampled_negative] = 0
        target[sampled_positive] = 1
        matched = objects.boxes.gather(1, best_object.unsqueeze(-1).expand(-1, -1, 4))
        return AnchorTargets(target.view(batch, -1), matched)

    def proposals(self, proposals: Tensor, proposal_image: Tensor, labels: Tensor) -> ProposalTargets:
        """RoIs for the head from proposals ``[K, 4]`` of images ``proposal_image`` and batch labels ``[B, P, 6]``
        (the objects are added as proposals too, so every object has a perfect RoI)."""
        truth = ground_truth(labels)
        rois = torch.cat((proposals, truth.boxes))
        image = torch.cat((proposal_image, truth.image))
        if len(truth.boxes):
            iou = box_iou(rois, truth.boxes)
            iou = torch.where(image.unsqueeze(1) == truth.image.unsqueeze(0), iou, -1.0)
            best_iou, best_object = iou.max(1)
        else:
            best_iou = rois.new_full((len(rois),), -1.0)
            best_object = torch.zeros(len(rois), dtype=torch.long, device=rois.device)
        positive = best_iou >= self.roi_positive_iou
        low, high = self.roi_negative_iou
        negative = (best_iou < high) & ((best_iou >= low) | (best_iou < 0))  # no object in the image: background
        sampled_positive, sampled_negative = sample_balanced(
            positive, negative, image, labels.shape[0], self.roi_batch_size, self.roi_positive_fraction
        )
        keep = sampled_positive | sampled_negative
        object_boxes = truth.boxes if len(truth.boxes) else rois.new_zeros(1, 4)
        object_labels = truth.labels + 1 if len(truth.boxes) else best_object.new_zeros(1)
        roi_labels = torch.where(sampled_positive, object_labels[best_object], 0)
        return ProposalTargets(rois[keep], image[keep], roi_labels[keep], object_boxes[best_object][keep])
