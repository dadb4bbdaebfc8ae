"""``SSD``: the LightningModule tying network, default boxes, matching, MultiBox loss and decoding together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from lightning_det.models.backbones.pretrained import forget_weights_file, pretrained_normalisation
from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.parts import PartConfig, build_part
from lightning_det.models.postprocess import PaddedDetections
from lightning_det.models.ssd.decode import SSDDecoder
from lightning_det.models.ssd.loss import MultiBoxLoss
from lightning_det.models.ssd.network import VARIANTS, SSDNetwork, SSDOutputs
from lightning_det.models.ssd.prior_fit import fit_scales, square_resized_boxes
from lightning_det.models.ssd.priors import DefaultBoxes
from lightning_det.models.ssd.targets import VARIANCES, DefaultBoxMatcher, encode
from lightning_det.models.transfer import ClassRows, layer_rows

DEFAULT_VARIANT = "ssd300"


class SSD(Detector):
    """SSD300 / SSD512 on reduced VGG16, or SSDLite on MobileNetV3-Large.

    Args:
        variant: ``"ssd300"``, ``"ssd512"`` or ``"ssdlite"`` (see ``network.py``).
        width: channel multiplier (rounded up to multiples of 8); 1.0 is the published network.
        l2_scale: initial scale of the L2-normalised conv4_3 (VGG variants).
        backbone_weights: ImageNet weights for the backbone (VGG16 for ssd300/ssd512, MobileNetV3-Large for
            ssdlite), width 1.0 only: a torchvision-format state dict file (e.g. ``vgg16-397923af.pth``) or a
            torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ``VGG16_Weights.IMAGENET1K_V1``) read from
            torch.hub's cache or downloaded. ``None``: random initialisation. With weights and no ``pixel_mean``,
            the input is normalised with ImageNet's mean/std, as those weights were trained.
        reduced_tail: ssdlite: halve the channels of MobileNetV3's last stage (torchvision's option, which its COCO
            SSDLite has; ImageNet's MobileNetV3 weights do not fit it).
        variances: the box coding's variances, shared by the training targets and the decoder (``targets.py``).
        prior: the default-box part, :class:`~lightning_det.models.ssd.priors.DefaultBoxes` by default: called
            with ``(feature_sizes, image_size)``, returns the default boxes (cx, cy, w, h); its
            ``boxes_per_location`` sizes the heads.
        assigner: the matching part, :class:`~lightning_det.models.ssd.targets.DefaultBoxMatcher` by default:
            called with ``(labels, priors_xyxy)``, returns the ``Matches`` the targets are coded from.
        loss: the loss part, :class:`~lightning_det.models.ssd.loss.MultiBoxLoss` by default: called with
            ``(loc, conf, classes, loc_targets)``, returns the loss terms.
        decoder: the decoding part, :class:`~lightning_det.models.ssd.decode.SSDDecoder` by default: built with
            the ``variances``, called with ``(loc, conf, priors, image_size)``; its ``padded`` method gives the
            fixed-shape output of export.
        **kwargs: ``num_classes``, ``class_names``, ``optimizer``, ``scheduler``, ``metric``, ``pixel_mean``,
            ``pixel_std`` of ``Detector``.

    Each part is a plain config (see ``models/parts.py``): ``None`` or no ``_target_`` takes the default class.
    ``conf/model/ssd300_vgg16_coco.yaml`` and ``ssdlite320_coco.yaml`` build torchvision's COCO SSDs exactly, whose
    weights ``from_torchvision`` takes.
    """

    #: The reference's input normalisation: its mean pixel (R, G, B) subtracted, no scaling.
    default_pixel_mean: ClassVar[tuple[float, float, float]] = (123.0, 117.0, 104.0)
    default_pixel_std: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": tuple(VARIANTS)}
    renamed: ClassVar[dict[str, str]] = {
        "aspect_ratios": "prior.aspect_ratios",
        "min_sizes": "prior.min_sizes",
        "max_sizes": "prior.max_sizes",
        "s_min": "prior.s_min",
        "s_max": "prior.s_max",
        "fit_scales": "prior.fit_scales",
        "steps": "prior.steps",
        "clip": "prior.clip",
        "overlap_threshold": "assigner.positive_iou",
        "assigner.overlap_threshold": "assigner.positive_iou",
        "neg_pos_ratio": "loss.neg_pos_ratio",
        "loc_weight": "loss.loc_weight",
        "conf_thresh": "decoder.score_thresh",
        "nms_thresh": "decoder.nms_thresh",
        "nms_topk": "decoder.pre_nms_topk",
        "keep_topk": "decoder.max_detections",
        "force_suppress": "decoder.class_agnostic",
    }

    def __init__(
        self,
        variant: str = DEFAULT_VARIANT,
        width: float = 1.0,
        l2_scale: float = 20.0,
        backbone_weights: str | None = None,
        reduced_tail: bool = False,
        variances: Sequence[float] = VARIANCES,
        prior: PartConfig = None,
        assigner: PartConfig = None,
        loss: PartConfig = None,
        decoder: PartConfig = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**pretrained_normalisation(backbone_weights, kwargs))
        self.prior = build_part(prior, DefaultBoxes)
        self.network = SSDNetwork(
            variant, self.num_classes, self.prior.boxes_per_location, width, l2_scale, backbone_weights, reduced_tail
        )
        self.variances = (float(variances[0]), float(variances[1]))
        self.assigner = build_part(assigner, DefaultBoxMatcher)
        self.criterion = build_part(loss, MultiBoxLoss)
        self.decoder = build_part(decoder, SSDDecoder, variances=self.variances)
        self._priors: dict[tuple, Tensor] = {}

    @classmethod
    def fit_to_data(cls, arguments: dict[str, Any], records: list, img_size: int, seed: int = 0) -> dict[str, Any]:
        """With the prior's ``fit_scales``, its ``s_min``/``s_max`` refitted where their default boxes miss the
        training boxes at the assigner's threshold (:func:`~lightning_det.models.ssd.prior_fit.fit_scales`);
        explicit ``min_sizes`` are never changed."""
        prior_config = dict(arguments.get("prior") or {})
        prior = build_part(prior_config, DefaultBoxes)
        if not prior.fit_scales or prior.min_sizes is not None:
            return arguments
        probe = SSDNetwork(arguments.get("variant", DEFAULT_VARIANT), 1, prior.boxes_per_location, width=0.125)
        with torch.no_grad():
            feature_sizes = probe.eval()(torch.zeros(1, 3, img_size, img_size)).feature_sizes
        size = (img_size, img_size)

        def priors_for(s_min: float, s_max: float) -> Tensor:
            return build_part({**prior_config, "s_min": s_min, "s_max": s_max}, DefaultBoxes)(feature_sizes, size)

        threshold = build_part(arguments.get("assigner"), DefaultBoxMatcher).positive_iou
        s_min, s_max = fit_scales(*square_resized_boxes(records, img_size, seed), priors_for, prior.s_min,
                                  prior.s_max, threshold)
        return {**arguments, "prior": {**prior_config, "s_min": s_min, "s_max": s_max}}

    def forward(self, images: Tensor) -> SSDOutputs:
        return self.network(images)

    def class_rows(self) -> dict[str, ClassRows]:
        """Each map's last confidence conv: per default box, the background row and then one row per class."""
        rows: dict[str, ClassRows] = {}
        heads = self.network.head.classification_head.module_list
        for head, boxes in zip(heads, self.prior.boxes_per_location):
            last_conv = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
            rows |= layer_rows(self, last_conv, ClassRows(groups=boxes, lead=1))
        return rows

    def from_torchvision(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ``ssd300_vgg16`` (for ``variant=ssd300``) or ``ssdlite320_mobilenet_v3_large`` (for
        ``variant=ssdlite``) state dict in our names, through the network's ``torchvision_mapping``; a tensor
        the source lacks raises ``KeyError`` with its torchvision name (``state[theirs]``)."""
        return {f"network.{ours}": state[theirs] for ours, theirs in self.network.torchvision_mapping().names.items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        forget_weights_file(checkpoint)

    def priors(self, outputs: SSDOutputs, image_size: tuple[int, int]) -> Tensor:
        """Default boxes ``[N, 4]`` (cx, cy, w, h) in input pixels, built once per input and map size."""
        key = (tuple(outputs.feature_sizes), image_size, outputs.loc.device)
        if key not in self._priors:
            self._priors[key] = self.prior(outputs.feature_sizes, image_size).to(outputs.loc.device)
        return self._priors[key]

    def loss(self, outputs: SSDOutputs, batch: dict[str, Any]) -> dict[str, Tensor]:
        priors = self.priors(outputs, tuple(batch["images"].shape[-2:]))
        matches = self.assigner(batch["labels"], box_convert(priors, "cxcywh", "xyxy"))
        loc_targets = encode(matches.boxes, priors, self.variances)
        return self.criterion(outputs.loc, outputs.conf, matches.classes, loc_targets)

    def decode(self, outputs: SSDOutputs, batch: dict[str, Any]) -> Detections:
        image_size = tuple(batch["images"].shape[-2:])
        return self.decoder(outputs.loc, outputs.conf, self.priors(outputs, image_size), image_size)

    def decode_padded(self, outputs: SSDOutputs, image_size: tuple[int, int]) -> PaddedDetections:
        """``decode`` as fixed-shape tensors of ``max_detections`` rows per image: what an exported model returns."""
        return self.decoder.padded(outputs.loc, outputs.conf, self.priors(outputs, image_size), image_size)
