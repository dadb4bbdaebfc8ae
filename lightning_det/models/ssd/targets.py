"""SSD target assignment: match default boxes to objects for a whole batch at once, and code boxes as offsets.

Matching (the paper's rule): every object first takes the default box it overlaps most (so each object trains at
least one box), then every remaining default box whose best IoU with an object exceeds ``positive_iou``
takes that object. Ties: a default box equally close to two objects takes the lower-indexed one; when two objects
have the same best default box, the one overlapping it more keeps it (the lower index on equal IoU), the other
falls back to the threshold rule.

Box coding with variances ``(v0, v1)``: ``t_xy = (g_xy - d_xy) / (v0 d_wh)``, ``t_wh = log(g_wh / d_wh) / v1``:
torchvision's ``BoxCoder`` with weights ``(1/v0, 1/v0, 1/v1, 1/v1)``, as its own SSD uses ``(10, 10, 5, 5)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_convert

from lightning_det.data.collate import Labels
from lightning_det.models.boxes import MAX_LOG_SCALE, pairwise_iou

BACKGROUND = 0
IGNORE = -1
#: The paper's variances, shared by the coding of the training targets and the decoder.
VARIANCES = (0.1, 0.2)
#: Smallest object side coded (px): background rows are zero boxes, whose log size would be minus infinity.
MIN_SIDE = 1e-6


class Matches(NamedTuple):
    classes: Tensor  # long [B, N]: 0 background, 1..C the matched object's class + 1, -1 ignored (difficult)
    boxes: Tensor  # float [B, N, 4] xyxy of the matched object (zeros where background)


class DefaultBoxMatcher:
    """The assigner: ``(labels, priors_xyxy) -> Matches``, by the rule of the module docstring.

    Args:
        positive_iou: IoU at or above which a default box takes an object besides each object's best box.
    """

    def __init__(self, positive_iou: float = 0.5) -> None:
        self.positive_iou = positive_iou

    def __call__(self, labels: Tensor, priors_xyxy: Tensor) -> Matches:
        """Assign every default box of every image an object or background.

        ``labels`` is the padded batch ``[B, P, 6]`` = (class, x1, y1, x2, y2, difficult) with class -1 on padding.
        Default boxes matched to a difficult object are ignored by the loss (neither positive nor negative).
        """
        objects = Labels.of(labels)
        valid = objects.valid  # [B, P]
        iou = pairwise_iou(objects.boxes, priors_xyxy).masked_fill(~valid[..., None], -1.0)  # [B, P, N]
        best_overlap, best_object = iou.max(1)  # per default box: [B, N]
        best_prior = iou.argmax(2)  # per object: [B, P]

        num_priors = priors_xyxy.shape[0]
        claims = (best_prior[..., None] == torch.arange(num_priors, device=labels.device)) & valid[..., None]
        claimed = claims.any(1)  # [B, N]: some object's best default box
        claimant = iou.masked_fill(~claims, -2.0).argmax(1)  # the closest object among those claiming it
        matched_object = torch.where(claimed, claimant, best_object)
        positive = claimed | (best_overlap >= self.positive_iou)

        rows = Labels.of(torch.gather(labels, 1, matched_object[..., None].expand(-1, -1, 6)))  # [B, N, 6]
        classes = torch.where(positive, rows.classes.long() + 1, BACKGROUND)
        classes = classes.masked_fill(positive & (rows.difficult > 0), IGNORE)
        boxes = rows.boxes * positive[..., None]
        return Matches(classes, boxes)


def box_coder(variances: Sequence[float]) -> BoxCoder:
    """torchvision's coder for SSD's variances (its ``bbox_xform_clip`` is our ``MAX_LOG_SCALE``)."""
    centre, size = variances
    return BoxCoder((1 / centre, 1 / centre, 1 / size, 1 / size), bbox_xform_clip=MAX_LOG_SCALE)


def encode(boxes_xyxy: Tensor, priors: Tensor, variances: Sequence[float] = VARIANCES) -> Tensor:
    """Objects ``[..., N, 4]`` xyxy -> offsets from the default boxes ``priors [N, 4]`` (cx, cy, w, h)."""
    boxes = torch.cat((boxes_xyxy[..., :2], torch.maximum(boxes_xyxy[..., 2:], boxes_xyxy[..., :2] + MIN_SIDE)), -1)
    flat = boxes.reshape(-1, 4)
    repeats = flat.shape[0] // priors.shape[0]
    offsets = box_coder(variances).encode_single(flat, box_convert(priors, "cxcywh", "xyxy").repeat(repeats, 1))
    return offsets.view_as(boxes)


def decode(offsets: Tensor, priors: Tensor, variances: Sequence[float] = VARIANCES) -> Tensor:
    """The inverse of :func:`encode`: offsets ``[..., N, 4]`` -> xyxy boxes. The leading dimensions go into
    ``BoxCoder``'s codes-per-box axis, so the default boxes are read once for the whole batch."""
    prior_dim = offsets.dim() - 2  # counted from the front: ONNX's Transpose takes no negative dimensions
    per_prior = offsets.movedim(prior_dim, 0)  # [N, ..., 4]
    boxes = box_coder(variances).decode_single(per_prior.reshape(priors.shape[0], -1),
                                               box_convert(priors, "cxcywh", "xyxy"))
    return boxes.view_as(per_prior).movedim(0, prior_dim)
