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
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from lightning_det.models.faster_rcnn.network import Network
from lightning_det.models.postprocess import first_per_image


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
    proposal filter: per level the ``pre_nms_topk`` best anchors, decode, clip, drop boxes with a side below
    ``min_size``, NMS at ``nms_thresh`` per level, then the ``max_detections`` best per image. Both counts are
    ``(train, test)`` pairs chosen by the module's mode (torchvision's ``pre_nms_top_n`` / ``post_nms_top_n``).

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
    ) -> None:
        super().__init__()
        sizes = tuple(tuple(s) for s in (network.default_anchor_sizes if anchor_sizes is None else anchor_sizes))
        self.anchor_generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        self.head = RPNHead(network.out_channels, self.anchor_generator.num_anchors_per_location()[0])
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.pre_nms_topk = train_test_pair("pre_nms_topk", pre_nms_topk)
        self.max_detections = train_test_pair("max_detections", max_detections)
        self.nms_thresh = nms_thresh
        self.min_size = min_size

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
    def propose(self, outputs: RPNOutputs, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Proposals of the whole batch, flattened and grouped by image, best first: boxes ``[K, 4]`` and their
        image index ``[K]``. Tensor operations only, so that it traces into an exported graph."""
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
        scores = objectness.gather(1, anchor_index).flatten()
        deltas = outputs.deltas.detach().gather(1, anchor_index.unsqueeze(-1).expand(-1, -1, 4)).view(-1, 4)
        boxes = self.box_coder.decode_single(deltas, outputs.anchors[anchor_index.flatten()])
        boxes = clip_boxes_to_image(boxes, image_size)
        image = torch.arange(batch, device=boxes.device).repeat_interleave(anchor_index.shape[1])
        keep = remove_small_boxes(boxes, self.min_size)
        boxes, scores, image = boxes[keep], scores[keep], image[keep]
        groups = image * (int(level.max()) + 1) + level[anchor_index.flatten()][keep]
        keep = batched_nms(boxes, scores, groups, self.nms_thresh)  # best first
        keep = first_per_image(keep, image, batch, post_nms)[0]
        return boxes[keep], image[keep]
