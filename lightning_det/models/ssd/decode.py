"""Turning SSD's raw outputs into detections: softmax scores, box decoding, per-class NMS for the whole batch.

With ``pre_nms_topk_per_class`` the candidates are those of torchvision's ``SSD.postprocess_detections``: per
class, the ``pre_nms_topk`` best boxes scoring above ``score_thresh``. Without it (the default), the
``pre_nms_topk`` best (box, class) pairs of the whole image scoring above ``score_thresh``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from lightning_det.models.postprocess import Decoder, top_candidates
from lightning_det.models.ssd.targets import VARIANCES
from lightning_det.models.ssd.targets import decode as decode_offsets


class SSDDecoder(Decoder):
    """The decoder part: scores, thresholds and one ``batched_nms`` call for a whole batch.

    Args:
        score_thresh: drop (box, class) candidates scoring at or below this.
        nms_thresh: IoU above which a lower-scored box of the same class (and image) is suppressed.
        pre_nms_topk: candidates per image entering NMS, best first (the reference's 400).
        max_detections: detections kept per image after NMS, best first (the reference's 200).
        class_agnostic: suppress across classes too.
        variances: the box coding's variances (the model passes its own; see ``targets.py``).
        pre_nms_topk_per_class: ``pre_nms_topk`` counts the candidates of each class of an image instead
            (torchvision's ``topk_candidates``).
    """

    def __init__(
        self,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        pre_nms_topk: int = 400,
        max_detections: int = 200,
        class_agnostic: bool = False,
        variances: Sequence[float] = VARIANCES,
        pre_nms_topk_per_class: bool = False,
    ) -> None:
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.pre_nms_topk_per_class = pre_nms_topk_per_class
        self.max_detections = max_detections
        self.class_agnostic = class_agnostic
        self.variances = variances

    def candidates(
        self, loc: Tensor, conf: Tensor, priors: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``loc [B, N, 4]``, ``conf [B, N, C + 1]`` raw -> the batch's (box, score, label, image) candidates
        entering NMS."""
        num_classes = conf.shape[-1] - 1
        boxes = clip_boxes_to_image(decode_offsets(loc, priors, self.variances), image_size)
        scores = conf.softmax(-1)[..., 1:]  # [B, N, C]: every (box, foreground class) pair
        if self.pre_nms_topk_per_class:
            scores, box_index, labels, image = top_candidates_per_class(scores, self.pre_nms_topk, self.score_thresh)
        else:
            scores, box_index, labels, image = top_candidates(scores.flatten(1), self.pre_nms_topk, self.score_thresh,
                                                              num_classes)
        return boxes[image, box_index], scores, labels, image

    def batch_and_classes(self, loc: Tensor, conf: Tensor, priors: Tensor, image_size: tuple[int, int]
                          ) -> tuple[int, int]:
        return conf.shape[0], conf.shape[-1] - 1


def top_candidates_per_class(
    scores: Tensor, pre_nms_topk: int, score_thresh: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image and class of ``scores [B, N, C]``, the ``pre_nms_topk`` best boxes scoring above
    ``score_thresh``: their scores, box indices, class indices and images, flat over the batch (as
    ``postprocess.top_candidates`` returns them)."""
    per_class = scores.transpose(1, 2)  # [B, C, N]
    best, box_index = per_class.topk(min(pre_nms_topk, per_class.shape[-1]), dim=-1)  # [B, C, K]
    image = torch.arange(best.shape[0], device=scores.device)[:, None, None].expand_as(box_index)
    labels = torch.arange(best.shape[1], device=scores.device)[None, :, None].expand_as(box_index)
    above = best > score_thresh
    return best[above], box_index[above], labels[above], image[above]
