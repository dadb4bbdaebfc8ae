"""Turning SSD's raw outputs into detections: softmax scores, box decoding, per-class NMS for the whole batch."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from lightning_det.models.postprocess import PaddedDetections, suppress_and_pad, suppress_and_split, top_candidates
from lightning_det.models.ssd.targets import decode as decode_offsets


class SSDDecoder:
    """Scores, thresholds and one ``batched_nms`` call for a whole batch.

    Args:
        conf_thresh: drop (box, class) candidates scoring at or below this.
        nms_thresh: IoU above which a lower-scored box of the same class (and image) is suppressed.
        nms_topk: candidates per image entering NMS, best first (the reference's 400).
        keep_topk: detections kept per image after NMS, best first (the reference's 200).
        force_suppress: suppress across classes too (class-agnostic NMS).
        variances: the box coding's variances (see ``targets.py``).
    """

    def __init__(
        self,
        conf_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        nms_topk: int = 400,
        keep_topk: int = 200,
        force_suppress: bool = False,
        variances: tuple[float, float] = (0.1, 0.2),
    ) -> None:
        self.conf_thresh = conf_thresh
        self.nms_thresh = nms_thresh
        self.nms_topk = nms_topk
        self.keep_topk = keep_topk
        self.force_suppress = force_suppress
        self.variances = variances

    def __call__(
        self, loc: Tensor, conf: Tensor, priors: Tensor, image_size: tuple[int, int]
    ) -> list[dict[str, Tensor]]:
        """``loc [B, N, 4]``, ``conf [B, N, C + 1]`` raw -> per image ``{"boxes", "scores", "labels"}``, batch pixels."""
        return suppress_and_split(*self.candidates(loc, conf, priors, image_size), *self.suppression(conf))

    def padded(self, loc: Tensor, conf: Tensor, priors: Tensor, image_size: tuple[int, int]) -> PaddedDetections:
        """The same detections as ``__call__`` in fixed-shape tensors of ``keep_topk`` rows per image (for export)."""
        return suppress_and_pad(*self.candidates(loc, conf, priors, image_size), *self.suppression(conf))

    def candidates(
        self, loc: Tensor, conf: Tensor, priors: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's (box, score, label, image) candidates entering NMS, flat over images."""
        num_classes = conf.shape[-1] - 1
        boxes = clip_boxes_to_image(decode_offsets(loc, priors, self.variances), image_size)
        scores = conf.softmax(-1)[..., 1:].flatten(1)  # [B, N * C]: every (box, foreground class) pair
        scores, box_index, labels, image = top_candidates(scores, self.nms_topk, self.conf_thresh, num_classes)
        return boxes[image, box_index], scores, labels, image

    def suppression(self, conf: Tensor) -> tuple[int, int, float, int, bool]:
        """The NMS arguments after the candidates: batch size, class count, IoU threshold, cap, class-agnostic."""
        return conf.shape[0], conf.shape[-1] - 1, self.nms_thresh, self.keep_topk, self.force_suppress
