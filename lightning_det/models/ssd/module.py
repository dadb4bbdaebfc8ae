"""``SSD``: the LightningModule tying network, default boxes, matching, MultiBox loss and decoding together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_det.models.backbones.pretrained import forget_weights_file
from lightning_det.models.detector import Detections, Detector
from lightning_det.models.postprocess import PaddedDetections
from lightning_det.models.ssd.decode import SSDDecoder
from lightning_det.models.ssd.loss import MultiBoxLoss
from lightning_det.models.ssd.network import SSDNetwork, SSDOutputs
from lightning_det.models.ssd.priors import boxes_per_location, default_boxes, linear_scale_sizes
from lightning_det.models.ssd.targets import Matches, cxcywh_to_xyxy, encode, match


class SSD(Detector):
    """SSD300 / SSD512 on reduced VGG16, or SSDLite on MobileNetV3-Large.

    Args:
        variant: ``"ssd300"``, ``"ssd512"`` or ``"ssdlite"`` (see ``network.py``).
        width: channel multiplier (rounded up to multiples of 8); 1.0 is the published network.
        l2_scale: initial scale of the L2-normalised conv4_3 (VGG variants).
        backbone_weights: ImageNet weights for the backbone (VGG16 for ssd300/ssd512, MobileNetV3-Large for
            ssdlite), width 1.0 only: a torchvision-format state dict file (e.g. ``vgg16-397923af.pth``) or a
            torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ``VGG16_Weights.IMAGENET1K_V1``) read from
            torch.hub's cache or downloaded. ``None``: random initialisation.
        aspect_ratios: per feature map, the ratios besides 1 (each adds a box and its transpose).
        min_sizes, max_sizes: per feature map, default-box sizes in input pixels; ``None``: the linear scale
            rule from ``s_min`` to ``s_max`` of the input side.
        steps: per feature map, the distance in pixels between default-box centres; ``None``: input / map size.
        clip: clip default boxes to the image.
        overlap_threshold, variances: matching and box coding (see ``targets.py``).
        neg_pos_ratio, loc_weight: the MultiBox loss (see ``loss.py``).
        conf_thresh, nms_thresh, nms_topk, keep_topk, force_suppress: decoding (see ``decode.py``).
        **kwargs: ``num_classes``, ``class_names``, ``optimizer``, ``scheduler``, ``metric`` of ``Detector``.
    """

    def __init__(
        self,
        variant: str = "ssd300",
        width: float = 1.0,
        l2_scale: float = 20.0,
        backbone_weights: str | None = None,
        aspect_ratios: Sequence[Sequence[float]] = ([2], [2, 3], [2, 3], [2, 3], [2], [2]),
        min_sizes: Sequence[float] | None = None,
        max_sizes: Sequence[float] | None = None,
        s_min: float = 0.2,
        s_max: float = 0.9,
        steps: Sequence[float] | None = None,
        clip: bool = False,
        overlap_threshold: float = 0.5,
        variances: Sequence[float] = (0.1, 0.2),
        neg_pos_ratio: float = 3.0,
        loc_weight: float = 1.0,
        conf_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        nms_topk: int = 400,
        keep_topk: int = 200,
        force_suppress: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.network = SSDNetwork(
            variant, self.num_classes, boxes_per_location(self.aspect_ratios), width, l2_scale, backbone_weights
        )
        if (min_sizes is None) != (max_sizes is None):
            raise ValueError("give both min_sizes and max_sizes, or neither (the linear scale rule is then used)")
        for name, values in (("min_sizes", min_sizes), ("max_sizes", max_sizes), ("steps", steps)):
            if values is not None and len(values) != len(self.aspect_ratios):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.aspect_ratios)} feature maps")
        self.min_sizes, self.max_sizes, self.steps = min_sizes, max_sizes, steps
        self.s_min, self.s_max, self.clip = s_min, s_max, clip
        self.overlap_threshold = overlap_threshold
        self.variances = (float(variances[0]), float(variances[1]))
        self.criterion = MultiBoxLoss(neg_pos_ratio, loc_weight)
        self.decoder = SSDDecoder(conf_thresh, nms_thresh, nms_topk, keep_topk, force_suppress, self.variances)
        self._priors: dict[tuple, Tensor] = {}

    def forward(self, images: Tensor) -> SSDOutputs:
        return self.network(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        forget_weights_file(checkpoint)

    def priors(self, outputs: SSDOutputs, image_size: tuple[int, int]) -> Tensor:
        """Default boxes ``[N, 4]`` (cx, cy, w, h) in input pixels, built once per input and map size."""
        key = (tuple(outputs.feature_sizes), image_size, outputs.loc.device)
        if key not in self._priors:
            side = min(image_size)
            if self.min_sizes is None:
                min_sizes, max_sizes = linear_scale_sizes(len(self.aspect_ratios), side, self.s_min, self.s_max)
            else:
                min_sizes, max_sizes = list(self.min_sizes), list(self.max_sizes)
            steps = self.steps or [image_size[1] / cols for _, cols in outputs.feature_sizes]
            boxes = default_boxes(
                outputs.feature_sizes, image_size, steps, min_sizes, max_sizes, self.aspect_ratios, self.clip
            )
            self._priors[key] = boxes.to(outputs.loc.device)
        return self._priors[key]

    def match(self, labels: Tensor, priors: Tensor) -> Matches:
        return match(labels, cxcywh_to_xyxy(priors), self.overlap_threshold)

    def loss(self, outputs: SSDOutputs, batch: dict[str, Any]) -> dict[str, Tensor]:
        priors = self.priors(outputs, tuple(batch["images"].shape[-2:]))
        matches = self.match(batch["labels"], priors)
        loc_targets = encode(matches.boxes, priors, self.variances)
        return self.criterion(outputs.loc, outputs.conf, matches.classes, loc_targets)

    def decode(self, outputs: SSDOutputs, batch: dict[str, Any]) -> Detections:
        image_size = tuple(batch["images"].shape[-2:])
        return self.decoder(outputs.loc, outputs.conf, self.priors(outputs, image_size), image_size)

    def decode_padded(self, outputs: SSDOutputs, image_size: tuple[int, int]) -> PaddedDetections:
        """``decode`` as fixed-shape tensors of ``keep_topk`` rows per image: what an exported model returns."""
        return self.decoder.padded(outputs.loc, outputs.conf, self.priors(outputs, image_size), image_size)
