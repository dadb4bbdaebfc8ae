"""Test-time augmentation: decode a batch in several views (each scale, each mirrored) and merge the views'
detections per image, by non-maximum suppression or by weighted box fusion.

``evaluate tta=true`` and ``predict tta=true`` set ``Detector.tta`` to a ``TestTimeAugmentation``; the test and
predict steps then call it instead of decoding the batch once. It needs nothing of a family but its hooks
(``network_outputs``, ``decode``) and its ``decoder``'s ``max_detections`` and ``class_agnostic``, so the three
families share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from lightning_det.models.boxes import Detections, paired_iou, rank_within_groups
from lightning_det.models.postprocess import first_per_image, split_per_image, suppress_and_split

if TYPE_CHECKING:
    from lightning_det.models.detector import Detector

MERGES = ("nms", "wbf")


@dataclass(frozen=True)
class View:
    """One augmented copy of a batch: resized by ``scale`` (sides rounded to a multiple of ``size_multiple``,
    so every family's strides divide them), then mirrored left-right when ``flip``."""

    scale: float = 1.0
    flip: bool = False
    size_multiple: int = 32

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The view's batch size; scale 1 keeps the batch's own, whatever it is."""
        if self.scale == 1.0:
            return height, width
        return tuple(max(self.size_multiple, round(side * self.scale / self.size_multiple) * self.size_multiple)
                     for side in (height, width))

    def batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Tensor, Tensor]:
        """The view of ``batch`` (images and each image's ``image_size``; no labels), its scale per axis
        ``(sx, sy)`` and each image's width in the view (the axis a flip mirrors about)."""
        images = batch["images"]
        height, width = images.shape[-2:]
        image_size = batch.get("meta", {}).get("image_size")
        if image_size is None:
            image_size = torch.tensor([[height, width]] * len(images))
        image_size = image_size.to(images.device)
        view_height, view_width = self.size(height, width)
        factor = torch.tensor([view_width / width, view_height / height], device=images.device)
        if (view_height, view_width) != (height, width):
            images = F.interpolate(images, size=(view_height, view_width), mode="bilinear", align_corners=False)
        view_size = torch.minimum((image_size * factor.flip(0)).round().long(),
                                  image_size.new_tensor([view_height, view_width]))
        view_width_per_image = view_size[:, 1]
        if self.flip:
            images = mirror_within(images, view_width_per_image)
        meta = {**batch.get("meta", {}), "image_size": view_size}
        return {"images": images, "meta": meta}, factor, view_width_per_image

    def boxes_to_batch(self, boxes: Tensor, image: Tensor, factor: Tensor, view_width: Tensor) -> Tensor:
        """Boxes ``[K, 4]`` of images ``image`` in the view's pixels -> the un-augmented batch's: unmirror about
        each image's own width, then unscale."""
        if self.flip:
            right = view_width[image].to(boxes)
            boxes = torch.stack((right - boxes[:, 2], boxes[:, 1], right - boxes[:, 0], boxes[:, 3]), dim=1)
        return boxes / factor.repeat(2).to(boxes)


def mirror_within(images: Tensor, widths: Tensor) -> Tensor:
    """Mirror each image of a padded batch left-right inside its own width (column ``c < w`` takes ``w - 1 - c``),
    leaving the padding at the right where the model expects it."""
    columns = torch.arange(images.shape[-1], device=images.device)
    source = torch.where(columns < widths[:, None], widths[:, None] - 1 - columns, columns)  # [B, W]
    return images.gather(-1, source[:, None, None, :].expand_as(images))


@dataclass
class TestTimeAugmentation:
    """Decodes every view of a batch and merges their detections per image.

    Args:
        scales: the batch is decoded at each of these scales (1.0 is the batch itself).
        flip: each scale also mirrored left-right.
        merge: ``"wbf"`` (weighted box fusion: clusters of overlapping boxes become their score-weighted mean box,
            scored by the cluster's summed score over the number of views) or ``"nms"`` (the best box of each
            cluster, as it is).
        iou_thresh: IoU above which boxes of one class (and image) belong to one cluster.
        size_multiple: scaled sides are rounded to a multiple of this (the networks' largest stride).
    """

    __test__ = False  # not a pytest class, despite its name

    scales: Sequence[float] = (0.83, 1.0, 1.17)
    flip: bool = True
    merge: str = "wbf"
    iou_thresh: float = 0.55
    size_multiple: int = 32

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"tta_merge={self.merge!r}: use one of {', '.join(MERGES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"tta_scales={list(self.scales)}: give one or more positive scales, e.g. [0.83, 1, 1.17]")

    def views(self) -> list[View]:
        flips = (False, True) if self.flip else (False,)
        return [View(float(scale), flip, self.size_multiple) for scale in self.scales for flip in flips]

    def __call__(self, model: Detector, batch: dict[str, Any]) -> Detections:
        """Per image ``{"boxes", "scores", "labels"}`` in the batch's pixels, at most the decoder's
        ``max_detections``, best first."""
        candidates = self.candidates(model, batch)
        size = len(batch["images"])
        decoder = model.decoder
        if self.merge == "nms":
            return suppress_and_split(*candidates, size, model.num_classes, self.iou_thresh, decoder.max_detections,
                                      decoder.class_agnostic)
        fused = weighted_box_fusion(*candidates, model.num_classes, self.iou_thresh, len(self.views()),
                                    decoder.class_agnostic)
        boxes, scores, labels, image = fused
        keep, _, counts = first_per_image(scores.argsort(descending=True), image, size, decoder.max_detections)
        return split_per_image(boxes, scores, labels, keep, counts)

    def candidates(self, model: Detector, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every view's detections mapped back to the batch's pixels: boxes, scores, labels and images, flat."""
        boxes, scores, labels, images = [], [], [], []
        for view in self.views():
            view_batch, factor, view_width = view.batch(batch)
            try:
                outputs = model.network_outputs(view_batch)
            except RuntimeError as error:  # e.g. SSD300's last layers need about 270 px
                size = "x".join(map(str, view_batch["images"].shape[-2:]))
                raise ValueError(
                    f"tta_scales: {type(model).__name__} cannot take the {size} view (scale {view.scale}): "
                    f"{str(error).splitlines()[0]}. Use scales that keep the input as large as the network needs, "
                    "e.g. tta_scales=[1.0,1.17,1.33]"
                ) from error
            detections = model.decode(outputs, view_batch)
            image = torch.cat([torch.full((len(d["scores"]),), i, device=factor.device)
                               for i, d in enumerate(detections)])
            boxes.append(view.boxes_to_batch(torch.cat([d["boxes"] for d in detections]), image, factor, view_width))
            scores.append(torch.cat([d["scores"] for d in detections]))
            labels.append(torch.cat([d["labels"] for d in detections]))
            images.append(image)
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(images)


def weighted_box_fusion(
    boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, num_classes: int, iou_thresh: float,
    num_views: int, class_agnostic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted box fusion (Solovyev et al. 2021) of candidates flat over a batch, without a Python loop.

    Clusters are seeded by NMS at ``iou_thresh`` within each image and class (across classes when
    ``class_agnostic``): each kept box leads one, and every candidate joins the leader it overlaps most (the one
    that suppressed it, or itself). A cluster becomes the score-weighted mean of its boxes, scored by its summed
    score over ``max(num_views, its size)``: the mean score, lowered where fewer views than all found the object.
    Returns the fused boxes, scores, labels (the leader's) and images, one row per cluster.
    """
    groups = image if class_agnostic else image * num_classes + labels
    leaders = batched_nms(boxes, scores, groups, iou_thresh)
    cluster = nearest_leader(boxes, groups, leaders)
    count = torch.bincount(cluster, minlength=len(leaders))
    weight = scores.new_zeros(len(leaders)).index_add_(0, cluster, scores)
    fused = boxes.new_zeros(len(leaders), 4).index_add_(0, cluster, boxes * scores[:, None])
    fused_scores = weight / count.clamp(min=num_views)
    return fused / weight.clamp(min=1e-12)[:, None], fused_scores, labels[leaders], image[leaders]


def nearest_leader(boxes: Tensor, groups: Tensor, leaders: Tensor) -> Tensor:
    """For every box, the position in ``leaders`` (indices of boxes, best first) of the leader of its own group it
    overlaps most, ties to the better one. Only the pairs within a group are compared."""
    order = groups[leaders].argsort(stable=True)  # by group, best first inside each
    grouped = leaders[order]
    num_groups = int(groups.max()) + 1 if len(groups) else 0
    sizes = torch.bincount(groups[grouped], minlength=num_groups)
    starts = sizes.cumsum(0) - sizes
    per_box = sizes[groups]  # how many leaders each box is compared with
    box = torch.arange(len(boxes), device=boxes.device).repeat_interleave(per_box)
    slot = starts[groups[box]] + rank_within_groups(box, per_box)  # [pairs] position among the grouped leaders
    overlap = paired_iou(boxes[box], boxes[grouped[slot]])
    best = overlap.new_full((len(boxes),), -1.0).scatter_reduce(0, box, overlap, "amax")
    is_best = overlap == best[box]
    first = slot.new_full((len(boxes),), len(slot)).scatter_reduce(0, box[is_best], slot[is_best], "amin")
    return order[first]


def from_config(cfg: Mapping[str, Any]) -> TestTimeAugmentation | None:
    """The tools' ``tta`` switch and ``tta_*`` settings -> the augmentation, or ``None`` when ``tta`` is off."""
    if not cfg.get("tta"):
        return None
    return TestTimeAugmentation(scales=list(cfg.tta_scales), flip=cfg.tta_flip, merge=cfg.tta_merge,
                                iou_thresh=cfg.tta_iou_thresh)
