"""The four Faster R-CNN losses: RPN objectness and box, RoI classification and box.

Box terms are the smooth L1 of the reference implementation, ``0.5 (sigma x)^2`` below ``1 / sigma^2`` and
linear above, summed over positive samples and divided by the number of sampled (non-ignored) samples, so
that the box and classification terms keep their relative weight whatever the positive share.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from lightning_det.models.faster_rcnn.targets import AnchorTargets


def sigma_smooth_l1(prediction: Tensor, target: Tensor, sigma: float) -> Tensor:
    """Summed smooth L1 with the reference's ``sigma`` (``beta = 1 / sigma^2``)."""
    return F.smooth_l1_loss(prediction, target, beta=1.0 / sigma**2, reduction="sum")


class FasterRCNNLoss:
    """The loss terms of both stages; ``rpn_sigma`` and ``roi_sigma`` are the smooth L1 sigmas of their box
    terms (the reference's 3 and 1)."""

    def __init__(self, rpn_sigma: float = 3.0, roi_sigma: float = 1.0) -> None:
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma

    def rpn(
        self, objectness: Tensor, deltas: Tensor, box_targets: Tensor, targets: AnchorTargets
    ) -> tuple[Tensor, Tensor]:
        """``(rpn_loc, rpn_cls)`` from logits ``[B, A]``, deltas and encoded targets ``[B, A, 4]``."""
        sampled = targets.labels >= 0
        positive = targets.labels == 1
        count = sampled.sum().clamp(min=1)
        loc = sigma_smooth_l1(deltas[positive], box_targets[positive], self.rpn_sigma) / count
        cls = F.binary_cross_entropy_with_logits(objectness[sampled], targets.labels[sampled].float(), reduction="sum")
        return loc, cls / count

    def roi(self, logits: Tensor, deltas: Tensor, labels: Tensor, box_targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(roi_loc, roi_cls)`` from logits ``[R, C+1]``, per-class deltas ``[R, C+1, 4]``, labels ``[R]``
        (0 = background) and encoded targets ``[R, 4]``; only the deltas of each foreground RoI's class count."""
        count = max(1, len(labels))
        positive = labels > 0
        chosen = deltas[positive, labels[positive]]
        loc = sigma_smooth_l1(chosen, box_targets[positive], self.roi_sigma) / count
        cls = F.cross_entropy(logits, labels, reduction="sum") / count if len(labels) else logits.sum() * 0
        return loc, cls
