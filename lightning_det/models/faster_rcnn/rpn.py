"""The region proposal network: anchors, the objectness/box head, and batched proposal filtering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, remove_small_boxes

from lightning_det.models.boxes import clip_to_images
from lightning_det.models.faster_rcnn.network import Network


class RPNOutputs(NamedTuple):
    """Raw RPN predictions for every anchor of the padded batch, levels concatenated in anchor order."""

    objectness: Tensor  # [B, A] logits
    deltas: Tensor  # [B, A, 4] box regression relative to the anchors
    anchors: Tensor  # [A, 4] xyxy in batch pixels, shared by every image of the padded batch
    anchor_level: Tensor  # [A] feature level of each anchor


def train_test_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    """A count given per mode, ``(train, test)``: a single number is refused, since which mode it meant is a guess."""
    if isinstance(value, (int, float)) or len(value) != 2:
        raise ValueError(f"rpn.{name}={value}: give a (train, test) pair, e.g. [2000, 1000]")
    return int(value[0]), int(value[1])


class RegionProposalNetwork(nn.Module):
    """Anchors of ``anchor_sizes`` x ``aspect_ratios`` (h/w) per feature level, torchvision's ``RPNHead``, and the
    proposal filter: per level the ``pre_nms_topk`` best anchors, decode, clip to the image, drop boxes with a side
    below ``min_size`` and those whose objectness probability is below ``score_thresh``, NMS at ``nms_thresh`` per
    level, then the ``max_detections`` best per image. Both counts are ``(train, test)`` pairs chosen by the
    module's mode (torchvision's ``pre_nms_top_n`` / ``post_nms_top_n``; ``score_thresh`` is its
    ``rpn_score_thresh``).

    ``network`` is the backbone's description (``network.Network``): its width and, when ``anchor_sizes`` is
    None, its default anchor sizes.
    """

    def __init__(
        self,
        network: Network,
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        pre_nms_topk: Sequence[int] = (12000, 6000),
        max_detections: Sequence[int] = (2000, 300),
        nms_thresh: float = 0.7,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = tuple(tuple(s) for s in (network.default_anchor_sizes if anchor_sizes is None else anchor_sizes))
        self.anchor_generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.head = RPNHead(network.out_channels, anchors, conv_depth=network.rpn_conv_depth)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.pre_nms_topk = train_test_pair("pre_nms_topk", pre_nms_topk)
        self.max_detections = train_test_pair("max_detections", max_detections)
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh

    def forward(self, images: Tensor, features: list[Tensor]) -> RPNOutputs:
        logits, regression = self.head(features)
        batch = images.shape[0]
        objectness = torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1) for o in logits], 1)
        deltas = torch.cat([r.view(batch, -1, 4, *r.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
                            for r in regression], 1)
        image_list = ImageList(images[:1], [tuple(images.shape[-2:])])
        anchors = self.anchor_generator(image_list, [f[:1] for f in features])[0]
        per_level = torch.tensor([o[0].numel() for o in logits], device=images.device)
        level = torch.arange(len(logits), device=images.device).repeat_interleave(per_level)
        return RPNOutputs(objectness, deltas, anchors, level)

    @torch.no_grad()
    def propose(self, outputs: RPNOutputs, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Proposals of the whole batch, flattened and grouped by image, best first: boxes ``[K, 4]`` and their
        image index ``[K]``, clipped as torchvision clips them to each image's own ``(h, w)`` of ``image_sizes
        [B, 2]`` rather than to the padded batch. Tensor operations only, so that it traces into an exported graph
        (for the batch size it was traced with)."""
        mode = 0 if self.training else 1
        pre_nms, post_nms = self.pre_nms_topk[mode], self.max_detections[mode]
        objectness, level = outputs.objectness.detach(), outputs.anchor_level
        batch = objectness.shape[0]
        candidates = []
        for lvl in range(int(level.max()) + 1):  # a handful of feature levels
            index = (level == lvl).nonzero()[:, 0]
            top = objectness[:, index].topk(min(pre_nms, len(index)), dim=1).indices
            candidates.append(index[top])
        anchor_index = torch.cat(candidates, 1)  # [B, N]
        scores = objectness.gather(1, anchor_index).flatten().sigmoid()  # NMS ranks probabilities, as torchvision
        deltas = outputs.deltas.detach().gather(1, anchor_index.unsqueeze(-1).expand(-1, -1, 4)).view(-1, 4)
        boxes = self.box_coder.decode_single(deltas, outputs.anchors[anchor_index.flatten()])
        image = torch.arange(batch, device=boxes.device).repeat_interleave(anchor_index.shape[1])
        boxes = clip_to_images(boxes, image, image_sizes)
        keep = remove_small_boxes(boxes, self.min_size)
        if self.score_thresh > 0:
            keep = keep[scores[keep] >= self.score_thresh]
        boxes, scores, image, level = boxes[keep], scores[keep], image[keep], level[anchor_index.flatten()][keep]
        keep = nms_per_image(boxes, scores, level, image, batch, self.nms_thresh, post_nms)
        return boxes[keep], image[keep]


def nms_per_image(
    boxes: Tensor, scores: Tensor, level: Tensor, image: Tensor, batch: int, nms_thresh: float, max_per_image: int
) -> Tensor:
    """The rows kept by NMS per image and level, at most ``max_per_image`` per image: indices grouped by image,
    best first. One ``batched_nms`` call per image, as torchvision makes them: tied scores (anchors over a uniform
    area, such as a batch's padding, share one objectness) are ordered by that call's sort, and its choice of
    algorithm by the image's box count, so only the same call keeps the same proposals in the same order."""
    kept = []
    for b in range(batch):  # a handful of images; the NMS itself is one call each
        rows = (image == b).nonzero()[:, 0]
        kept.append(rows[batched_nms(boxes[rows], scores[rows], level[rows], nms_thresh)[:max_per_image]])
    return torch.cat(kept)
