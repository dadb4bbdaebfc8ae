"""SSD's MultiBox loss: smooth L1 on the positives' box offsets plus softmax cross-entropy with hard negatives.

Of the background default boxes, only the ``neg_pos_ratio`` x (number of positives) with the highest
cross-entropy in each image are scored (hard negative mining); with no positive in an image, none are. Both
terms are summed and divided by the number of positives in the batch.

Besides the total and its two terms (``loc``: the smooth L1 per positive box, which is also the reference
``MultiBoxMetric``'s smooth L1 meter; ``conf``), one detached meter is returned: ``ce``, the mean cross-entropy
per scored default box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class MultiBoxLoss:
    """The loss part: ``(loc, conf, classes, loc_targets) -> {"loss", "loc", "conf", "ce"}``.

    Args: neg_pos_ratio: background boxes scored per positive; loc_weight: weight of the box term (alpha).
    """

    def __init__(self, neg_pos_ratio: float = 3.0, loc_weight: float = 1.0) -> None:
        self.neg_pos_ratio = neg_pos_ratio
        self.loc_weight = loc_weight

    def __call__(self, loc: Tensor, conf: Tensor, classes: Tensor, loc_targets: Tensor) -> dict[str, Tensor]:
        """``loc [B, N, 4]``, ``conf [B, N, C + 1]`` raw; ``classes [B, N]`` (0 background, -1 ignored)."""
        positive = classes > 0
        num_positive = positive.sum(1)  # [B]
        cross_entropy = F.cross_entropy(conf.flatten(0, 1), classes.clamp(min=0).flatten(), reduction="none")
        cross_entropy = cross_entropy.view_as(classes)
        negative = self.hard_negatives(cross_entropy.detach(), classes, num_positive)
        scored = positive | negative

        normaliser = num_positive.sum().clamp(min=1).float()
        box_errors = F.smooth_l1_loss(loc[positive], loc_targets[positive], reduction="sum", beta=1.0)
        loc_loss = box_errors / normaliser
        conf_loss = (cross_entropy * scored).sum() / normaliser
        return {
            "loss": self.loc_weight * loc_loss + conf_loss,
            "loc": loc_loss.detach(),
            "conf": conf_loss.detach(),
            "ce": (cross_entropy * scored).sum().detach() / scored.sum().clamp(min=1),
        }

    def hard_negatives(self, cross_entropy: Tensor, classes: Tensor, num_positive: Tensor) -> Tensor:
        """The background boxes with the highest loss, ``neg_pos_ratio`` per positive of their image."""
        background = classes == 0
        num_negative = torch.minimum(
            (self.neg_pos_ratio * num_positive).long(), background.sum(1)
        )  # [B]
        candidate_loss = cross_entropy.masked_fill(~background, -1.0)
        order = candidate_loss.argsort(1, descending=True)
        rank = order.argsort(1)
        return (rank < num_negative[:, None]) & background
