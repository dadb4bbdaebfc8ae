"""SSD target assignment: match default boxes to objects for a whole batch at once, and code boxes as offsets.

Matching (the paper's rule): every object first takes the default box it overlaps most (so each object trains at
least one box), then every remaining default box whose best IoU with an object exceeds ``threshold`` takes that
object. Ties: a default box equally close to two objects takes the lower-indexed one; when two objects have the
same best default box, the one overlapping it more keeps it (the lower index on equal IoU), the other falls back
to the threshold rule.

Box coding with variances ``(v0, v1)``: ``t_xy = (g_xy - d_xy) / (v0 d_wh)``, ``t_wh = log(g_wh / d_wh) / v1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_det.models.boxes import MAX_LOG_SCALE, pairwise_iou

BACKGROUND = 0
IGNORE = -1


class Matches(NamedTuple):
    classes: Tensor  # long [B, N]: 0 background, 1..C the matched object's class + 1, -1 ignored (difficult)
    boxes: Tensor  # float [B, N, 4] xyxy of the matched object (zeros where background)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return torch.cat((boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2), -1)


def match(labels: Tensor, priors_xyxy: Tensor, threshold: float = 0.5) -> Matches:
    """Assign every default box of every image an object or background; see the module docstring.

    ``labels`` is the padded batch ``[B, P, 6]`` = (class, x1, y1, x2, y2, difficult) with class -1 on padding.
    Default boxes matched to a difficult object are ignored by the loss (neither positive nor negative).
    """
    valid = labels[..., 0] >= 0  # [B, P]
    iou = pairwise_iou(labels[..., 1:5], priors_xyxy).masked_fill(~valid[..., None], -1.0)  # [B, P, N]
    best_overlap, best_object = iou.max(1)  # per default box: [B, N]
    best_prior = iou.argmax(2)  # per object: [B, P]

    num_priors = priors_xyxy.shape[0]
    claims = (best_prior[..., None] == torch.arange(num_priors, device=labels.device)) & valid[..., None]
    claimed = claims.any(1)  # [B, N]: some object's best default box
    claimant = iou.masked_fill(~claims, -2.0).argmax(1)  # the closest object among those claiming it
    matched_object = torch.where(claimed, claimant, best_object)
    positive = claimed | (best_overlap >= threshold)

    rows = torch.gather(labels, 1, matched_object[..., None].expand(-1, -1, 6))  # [B, N, 6]
    classes = torch.where(positive, rows[..., 0].long() + 1, BACKGROUND)
    classes = classes.masked_fill(positive & (rows[..., 5] > 0), IGNORE)
    boxes = rows[..., 1:5] * positive[..., None]
    return Matches(classes, boxes)


def encode(boxes_xyxy: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """Objects ``[..., N, 4]`` xyxy -> offsets from the default boxes ``priors [N, 4]`` (cx, cy, w, h)."""
    size = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=1e-6)
    centre = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2
    offset_xy = (centre - priors[:, :2]) / (variances[0] * priors[:, 2:])
    offset_wh = torch.log(size / priors[:, 2:]) / variances[1]
    return torch.cat((offset_xy, offset_wh), -1)


def decode(offsets: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """The inverse of :func:`encode`: offsets ``[..., N, 4]`` -> xyxy boxes."""
    centre = priors[:, :2] + offsets[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp((offsets[..., 2:] * variances[1]).clamp(max=MAX_LOG_SCALE))
    return torch.cat((centre - size / 2, centre + size / 2), -1)
