"""``SSD``: the LightningModule tying network, default boxes, matching, MultiBox loss and decoding together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_det.models.backbones.pretrained import forget_weights_file
from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.postprocess import PaddedDetections
from lightning_det.models.ssd.decode import SSDDecoder
from lightning_det.models.ssd.loss import MultiBoxLoss
from lightning_det.models.ssd.network import SSDNetwork, SSDOutputs
from lightning_det.models.ssd.prior_fit import fit_scales, square_resized_boxes
from lightning_det.models.ssd.priors import boxes_per_location, default_boxes, linear_scale_sizes
from lightning_det.models.ssd.targets import Matches, cxcywh_to_xyxy, encode, match

DEFAULT_ASPECT_RATIOS = ([2], [2, 3], [2, 3], [2, 3], [2], [2])


def layout_priors(
    feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], aspect_ratios: Sequence[Sequence[float]],
    s_min: float, s_max: float, min_sizes: Sequence[float] | None = None, max_sizes: Sequence[float] | None = None,
    steps: Sequence[float] | None = None, clip: bool = False,
) -> Tensor:
    """Default boxes ``[N, 4]`` (cx, cy, w, h) of maps ``feature_sizes`` on an ``image_size`` input: the given
    sizes, or the linear scale rule from ``s_min`` to ``s_max`` of the shorter input side."""
    if min_sizes is None:
        min_sizes, max_sizes = linear_scale_sizes(len(aspect_ratios), min(image_size), s_min, s_max)
    steps = steps or [image_size[1] / cols for _, cols in feature_sizes]
    return default_boxes(feature_sizes, image_size, steps, list(min_sizes), list(max_sizes),
                         [list(r) for r in aspect_ratios], clip)


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
        fit_scales: check ``s_min``/``s_max`` against the training boxes before training and refit them where
            their default boxes match too few (see :meth:`fit_to_data`); the result is stored in the checkpoint.
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
        aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
        min_sizes: Sequence[float] | None = None,
        max_sizes: Sequence[float] | None = None,
        s_min: float = 0.2,
        s_max: float = 0.9,
        fit_scales: bool = False,
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

    @classmethod
    def fit_to_data(cls, arguments: dict[str, Any], records: list, img_size: int, seed: int = 0) -> dict[str, Any]:
        """With ``fit_scales``, ``s_min``/``s_max`` refitted where their default boxes miss the training boxes
        (:func:`~lightning_det.models.ssd.prior_fit.fit_scales`); explicit ``min_sizes`` are never changed."""
        if not arguments.get("fit_scales") or arguments.get("min_sizes") is not None:
            return arguments
        variant = arguments.get("variant", "ssd300")
        aspect_ratios = arguments.get("aspect_ratios", DEFAULT_ASPECT_RATIOS)
        probe = SSDNetwork(variant, 1, boxes_per_location(aspect_ratios), width=0.125).eval()
        with torch.no_grad():
            feature_sizes = probe(torch.zeros(1, 3, img_size, img_size)).feature_sizes
        size = (img_size, img_size)

        def priors_for(s_min: float, s_max: float) -> Tensor:
            return layout_priors(feature_sizes, size, aspect_ratios, s_min, s_max, steps=arguments.get("steps"),
                                 clip=arguments.get("clip", False))

        s_min, s_max = fit_scales(*square_resized_boxes(records, img_size, seed), priors_for,
                                  arguments.get("s_min", 0.2), arguments.get("s_max", 0.9),
                                  arguments.get("overlap_threshold", 0.5))
        return {**arguments, "s_min": s_min, "s_max": s_max}

    def forward(self, images: Tensor) -> SSDOutputs:
        return self.network(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        forget_weights_file(checkpoint)

    def priors(self, outputs: SSDOutputs, image_size: tuple[int, int]) -> Tensor:
        """Default boxes ``[N, 4]`` (cx, cy, w, h) in input pixels, built once per input and map size."""
        key = (tuple(outputs.feature_sizes), image_size, outputs.loc.device)
        if key not in self._priors:
            boxes = layout_priors(outputs.feature_sizes, image_size, self.aspect_ratios, self.s_min, self.s_max,
                                  self.min_sizes, self.max_sizes, self.steps, self.clip)
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
