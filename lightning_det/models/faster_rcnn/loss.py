"""The four Faster R-CNN losses: RPN objectness and box, RoI classification and box.

Box terms are the smooth L1 of the reference implementation, ``0.5 (sigma x)^2`` below ``1 / sigma^2`` and
linear above, summed over positive samples and divided by the number of sampled (non-ignored) samples, so
that the box and classification terms keep their relative weight whatever the positive share.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor
from torch.nn import functional as F


def sigma_smooth_l1(prediction: Tensor, target: Tensor, sigma: float) -> Tensor:
    """Summed smooth L1 with the reference's ``sigma`` (``beta = 1 / sigma^2``)."""
    return F.smooth_l1_loss(prediction, target, beta=1.0 / sigma**2, reduction="sum")


class StageOutputs(NamedTuple):
    """One stage's outputs and targets, as its loss terms take them."""

    scores: Tensor  # RPN: objectness logits [B, A]; RoI: class logits [R, C+1]
    deltas: Tensor  # RPN: [B, A, 4]; RoI: per-class [R, C+1, 4]
    labels: Tensor  # RPN: 1 object, 0 background, -1 not sampled [B, A]; RoI: class [R], 0 background
    box_targets: Tensor  # the encoded boxes the positives regress to: [B, A, 4]; [R, 4]


class FasterRCNNLoss:
    """The loss terms of both stages; ``rpn_sigma`` and ``roi_sigma`` are the smooth L1 sigmas of their box
    terms (the reference's 3 and 1)."""

    def __init__(self, rpn_sigma: float = 3.0, roi_sigma: float = 1.0) -> None:
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma

    def __call__(self, rpn: StageOutputs, roi: StageOutputs) -> dict[str, Tensor]:
        rpn_loc, rpn_cls = self.rpn(rpn)
        roi_loc, roi_cls = self.roi(roi)
        total = rpn_loc + rpn_cls + roi_loc + roi_cls
        return {"loss": total, "rpn_loc": rpn_loc, "rpn_cls": rpn_cls, "roi_loc": roi_loc, "roi_cls": roi_cls}

    def rpn(self, stage: StageOutputs) -> tuple[Tensor, Tensor]:
        """``(rpn_loc, rpn_cls)``: box terms of the positive anchors, objectness of the sampled ones."""
        sampled = stage.labels >= 0
        positive = stage.labels == 1
        count = sampled.sum().clamp(min=1)
        loc = sigma_smooth_l1(stage.deltas[positive], stage.box_targets[positive], self.rpn_sigma) / count
        cls = F.binary_cross_entropy_with_logits(stage.scores[sampled], stage.labels[sampled].float(), reduction="sum")
        return loc, cls / count

    def roi(self, stage: StageOutputs) -> tuple[Tensor, Tensor]:
        """``(roi_loc, roi_cls)``; only the deltas of each foreground RoI's class count."""
        labels = stage.labels
        count = max(1, len(labels))
        positive = labels > 0
        chosen = stage.deltas[positive, labels[positive]]
        loc = sigma_smooth_l1(chosen, stage.box_targets[positive], self.roi_sigma) / count
        cls = F.cross_entropy(stage.scores, labels, reduction="sum") / count if len(labels) else stage.scores.sum() * 0
        return loc, cls
