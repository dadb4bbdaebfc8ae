"""The second stage: pool each RoI's features, run the box head, predict C+1 class scores and per-class boxes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_pool

from lightning_det.models.faster_rcnn.network import Network


class RoIPool(nn.Module):
    """Classic max RoI pooling on the single feature map (VGG16); the scale is read from the feature size."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(
        self, features: OrderedDict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        (feature,) = features.values()
        scale = feature.shape[-1] / image_shapes[0][1]
        return roi_pool(feature, boxes, self.output_size, spatial_scale=scale)


class RoIHead(nn.Module):
    """RoI pooling (``pooling="align"``: ``MultiScaleRoIAlign`` with ``sampling_ratio`` points per bin side;
    ``"pool"``: max pooling, single-level backbones only) to ``output_size`` x ``output_size``, the network's box
    head (VGG16's fc6/fc7, or the FPN backbones' two-layer MLP), and torchvision's ``FastRCNNPredictor`` for
    ``num_classes`` + background.

    Box targets are encoded relative to the RoI and normalised as ``(t - box_mean) / box_std``.
    """

    def __init__(
        self,
        network: Network,
        num_classes: int,
        pooling: str = "align",
        output_size: int = 7,
        sampling_ratio: int = 2,
        box_mean: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        box_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        super().__init__()
        feature_names = network.roi_feature_names
        if pooling == "align":
            self.pooler: nn.Module = MultiScaleRoIAlign(feature_names, output_size, sampling_ratio)
        elif pooling == "pool" and len(feature_names) == 1:
            self.pooler = RoIPool(output_size)
        else:
            raise ValueError(f"roi_head.pooling={pooling!r} with feature levels {feature_names}: use 'align', or "
                             "'pool' with a single-level backbone (vgg16)")
        self.feature_names = feature_names
        self.box_head = network.box_head
        self.predictor = FastRCNNPredictor(network.representation, num_classes + 1)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.register_buffer("box_mean", torch.tensor(box_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("box_std", torch.tensor(box_std, dtype=torch.float32), persistent=False)

    def forward(
        self, features: OrderedDict[str, Tensor], rois: Tensor, image: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, C+1]`` and normalised per-class box deltas ``[R, C+1, 4]`` for RoIs ``[R, 4]`` of
        images ``image`` in a padded batch of ``image_size``.

        The pooler takes one box list per image. Each image's rows are found by a mask, not by Python counts,
        so that an exported graph keeps them data-dependent (a trace would freeze counts into constants)."""
        batch = next(iter(features.values())).shape[0]
        rows = [(image == b).nonzero()[:, 0] for b in range(batch)]
        levels = OrderedDict((k, features[k]) for k in self.feature_names)
        pooled = self.pooler(levels, [rois[r] for r in rows], [image_size] * batch)
        logits, deltas = self.predictor(self.box_head(pooled))
        restore = torch.cat(rows).argsort()
        return logits[restore], deltas[restore].view(*logits.shape, 4)

    def encode(self, boxes: Tensor, rois: Tensor) -> Tensor:
        return (self.box_coder.encode_single(boxes, rois) - self.box_mean) / self.box_std

    def decode(self, deltas: Tensor, rois: Tensor) -> Tensor:
        """Normalised deltas ``[R, K, 4]`` -> boxes ``[R, K, 4]``."""
        raw = deltas * self.box_std + self.box_mean
        boxes = self.box_coder.decode_single(raw.flatten(0, 1), rois.repeat_interleave(deltas.shape[1], 0))
        return boxes.view_as(deltas)
