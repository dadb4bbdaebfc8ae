"""``FasterRCNN``: backbone, RPN and RoI head wired to the batch contract, trained on whole padded batches."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_det.models.backbones.pretrained import IMAGENET_MEAN, IMAGENET_STD, forget_weights_file, renamed
from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.faster_rcnn.decode import FasterRCNNDecoder
from lightning_det.models.faster_rcnn.loss import FasterRCNNLoss, StageOutputs
from lightning_det.models.faster_rcnn.network import build_network
from lightning_det.models.faster_rcnn.roi_head import RoIHead
from lightning_det.models.faster_rcnn.rpn import RegionProposalNetwork, RPNOutputs
from lightning_det.models.faster_rcnn.targets import FasterRCNNAssigner
from lightning_det.models.parts import PartConfig, build_part
from lightning_det.models.postprocess import PaddedDetections
from lightning_det.models.transfer import ClassRows, layer_rows

#: Our tensor names -> torchvision's Faster R-CNN's, by prefix (the backbone and the RPN are named alike).
TORCHVISION_NAMES = {"backbone.": "backbone.", "rpn.": "rpn.", "roi_head.box_head.": "roi_heads.box_head.",
                     "roi_head.predictor.": "roi_heads.box_predictor."}


@dataclass(frozen=True)
class Frozen:
    """The fixed parts of the backbone, one node for the two settings of it.

    Args:
        blocks: VGG16 conv blocks kept frozen (the reference freezes the first two).
        bn_eps: epsilon of the frozen batch norm of ``pretrained_layout``: torchvision's COCO
            ``fasterrcnn_resnet50_fpn`` weights (converted from Detectron) were trained with 0.
    """

    blocks: int = 2
    bn_eps: float = 1e-5


class FasterRCNNOutputs(NamedTuple):
    """What ``forward`` returns: the feature maps (the RoI head reads them later), the raw RPN predictions and
    the batch's proposals (flattened boxes ``[K, 4]`` with their image index ``[K]``), computed once for both
    ``loss`` and ``decode``; the padded batch's ``(h, w)`` and each image's own ``image_sizes [B, 2]`` inside it,
    which proposals and detections are clipped to."""

    features: OrderedDict[str, Tensor]
    rpn: RPNOutputs
    proposals: Tensor
    proposal_image: Tensor
    image_size: tuple[int, int]
    image_sizes: Tensor


class FasterRCNN(Detector):
    """Faster R-CNN with a VGG16, ResNet-50-FPN or MobileNetV3-FPN backbone; the FPN ones build torchvision's COCO
    detectors exactly and load their weights whole (``from_torchvision``).

    ``forward`` runs the backbone, the RPN and its proposal filter (the counts of the module's mode), because
    which RoIs the second stage sees depends on the stage: ``loss`` samples RoIs per image from the proposals
    (plus the objects) and runs the head on them, in training and in validation alike; ``decode`` runs it on the
    proposals themselves. A validation batch filters its proposals once, for both.

    Network settings:
        backbone: ``vgg16`` | ``resnet50_fpn`` | ``resnet50_fpn_v2`` | ``mobilenet_v3_fpn``; ``resnet50_fpn_v2`` is
            torchvision's ``fasterrcnn_resnet50_fpn_v2`` (batch norm in the FPN, two-convolution RPN head,
            convolutional box head).
        width: channel multiplier of the ``mobilenet_v3_fpn`` backbone (torchvision's ``width_mult``); 1.0 is the
            published network, the only one ``backbone_weights`` fit.
        backbone_weights: ImageNet weights for the backbone (torchvision's vgg16, resnet50 or mobilenet_v3_large):
            a torchvision-format state dict file (e.g. ``resnet50-11ad3fa6.pth``) or a torchvision weights name
            (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``) read from torch.hub's cache or
            downloaded. VGG16 also fills its fc6/fc7 box head. ``None``: random initialisation.
        pretrained_layout: frozen batch norm and frozen first stages for the FPN backbones (torchvision's
            fine-tuning layout; ``resnet50_fpn_v2`` keeps ordinary batch norm, as torchvision's v2 does);
            ``None`` = whether ``backbone_weights`` is given. Checkpoints record it, so a detector rebuilt from
            one needs no weights file.
        frozen: what stays fixed of the backbone (:class:`Frozen`: VGG16's first conv blocks, the epsilon of the
            frozen batch norm of ``pretrained_layout``); a plain dict, ``None``: its defaults.
        representation: width of the box head of the FPN backbones: its two-layer MLP, or the fully connected
            layer after the convolutions of ``resnet50_fpn_v2`` (VGG16 uses fc6/fc7, 4096).
        fpn_channels: FPN width of ``mobilenet_v3_fpn`` (torchvision uses 256; narrower is much faster on CPU).

    Parts, each a plain dict (``_target_`` optional: the class named here; ``None``: its defaults), see
    ``models/parts.py``:
        rpn: anchors, RPN head and proposal filter (``rpn.RegionProposalNetwork``).
        assigner: anchor and proposal targets (``targets.FasterRCNNAssigner``).
        roi_head: RoI pooling and predictor, box-target normalisation (``roi_head.RoIHead``).
        loss: the four loss terms (``loss.FasterRCNNLoss``).
        decoder: score threshold, NMS and detections per image (``decode.FasterRCNNDecoder``).
        **kwargs: ``num_classes``, ``class_names``, ``optimizer``, ``scheduler``, ``metric`` of ``Detector``.
    """

    #: torchvision's ``GeneralizedRCNNTransform`` normalisation: ImageNet's, which its backbones' weights expect.
    default_pixel_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    default_pixel_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    export_batch_fixed: ClassVar[str | None] = (
        "its RoI head pools the proposals of each image of the batch in turn (torchvision's MultiScaleRoIAlign"
        " takes a box list per image), a loop the trace unrolls"
    )
    renamed: ClassVar[dict[str, str]] = {
        "anchor_sizes": "rpn.anchor_sizes",
        "aspect_ratios": "rpn.aspect_ratios",
        "rpn_pre_nms_top_n": "rpn.pre_nms_topk",
        "rpn_post_nms_top_n": "rpn.max_detections",
        "rpn_nms_thresh": "rpn.nms_thresh",
        "rpn_min_size": "rpn.min_size",
        "rpn_positive_iou": "assigner.rpn_positive_iou",
        "rpn_negative_iou": "assigner.rpn_negative_iou",
        "rpn_batch_size": "assigner.rpn_batch_size",
        "rpn_positive_fraction": "assigner.rpn_positive_fraction",
        "roi_batch_size": "assigner.roi_batch_size",
        "roi_positive_fraction": "assigner.roi_positive_fraction",
        "roi_positive_iou": "assigner.roi_positive_iou",
        "roi_negative_iou": "assigner.roi_negative_iou",
        "roi_pooling": "roi_head.pooling",
        "roi_output_size": "roi_head.output_size",
        "sampling_ratio": "roi_head.sampling_ratio",
        "box_mean": "roi_head.box_mean",
        "box_std": "roi_head.box_std",
        "rpn_sigma": "loss.rpn_sigma",
        "roi_sigma": "loss.roi_sigma",
        "score_thresh": "decoder.score_thresh",
        "nms_thresh": "decoder.nms_thresh",
        "detections_per_image": "decoder.max_detections",
        "frozen_blocks": "frozen.blocks",
        "frozen_bn_eps": "frozen.bn_eps",
    }

    def __init__(
        self,
        backbone: str = "mobilenet_v3_fpn",
        width: float = 1.0,
        backbone_weights: str | None = None,
        pretrained_layout: bool | None = None,
        frozen: PartConfig = None,
        representation: int = 1024,
        fpn_channels: int = 256,
        rpn: PartConfig = None,
        assigner: PartConfig = None,
        roi_head: PartConfig = None,
        loss: PartConfig = None,
        decoder: PartConfig = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pretrained_layout = backbone_weights is not None if pretrained_layout is None else pretrained_layout
        fixed = build_part(frozen, Frozen)
        network = build_network(
            backbone, fixed.blocks, representation, fpn_channels, backbone_weights, self.pretrained_layout, width,
            fixed.bn_eps,
        )
        self.backbone = network.backbone
        self.rpn = build_part(rpn, RegionProposalNetwork, network=network)
        self.roi_head = build_part(roi_head, RoIHead, network=network, num_classes=self.num_classes)
        self.assigner = build_part(assigner, FasterRCNNAssigner)
        self.criterion = build_part(loss, FasterRCNNLoss)
        self.decoder = build_part(decoder, FasterRCNNDecoder)
        self.rpn_confusion = MulticlassConfusionMatrix(num_classes=2)
        self.roi_confusion = MulticlassConfusionMatrix(num_classes=self.num_classes + 1)

    def class_rows(self) -> dict[str, ClassRows]:
        """The RoI predictor: a background row, then one score row per class; four box rows per class likewise."""
        predictor = self.roi_head.predictor
        return {**layer_rows(self, predictor.cls_score, ClassRows(lead=1)),
                **layer_rows(self, predictor.bbox_pred, ClassRows(lead=4, per_class=4))}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        forget_weights_file(checkpoint, pretrained_layout=self.pretrained_layout)

    def from_torchvision(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ``roi_heads.box_head`` / ``roi_heads.box_predictor`` are our ``roi_head.box_head`` /
        ``roi_head.predictor``; the backbone and ``rpn.head`` have the same names. A tensor the source lacks raises
        ``KeyError`` with its torchvision name, except batch-norm step counters: batch norm fills them in on
        loading, and frozen batch norm has none (the source's are left out)."""
        names = renamed(self, TORCHVISION_NAMES).names
        return {ours: state[theirs] for ours, theirs in names.items()
                if theirs in state or not ours.endswith("num_batches_tracked")}

    def network_outputs(self, batch: dict[str, Any]) -> FasterRCNNOutputs:
        """``forward`` on the normalised images with each image's size, so that proposals and detections are
        clipped to the image rather than to the padded batch."""
        image_sizes = batch.get("meta", {}).get("image_size")
        return self(self.normalise(batch["images"], image_sizes), image_sizes)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> FasterRCNNOutputs:
        """The network on normalised images; ``image_sizes [B, 2]``: each image's ``(h, w)`` inside the padded batch
        (``None``: the whole batch size, e.g. an exported model's fixed canvas)."""
        features = self.backbone(images)
        image_size = tuple(images.shape[-2:])
        if image_sizes is None:
            image_sizes = torch.tensor(image_size, device=images.device).expand(images.shape[0], 2)
        image_sizes = image_sizes.to(images.device)
        rpn = self.rpn(images, list(features.values()))
        proposals, proposal_image = self.rpn.propose(rpn, image_sizes)
        return FasterRCNNOutputs(features, rpn, proposals, proposal_image, image_size, image_sizes)

    def loss(self, outputs: FasterRCNNOutputs, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["labels"]
        rpn = outputs.rpn
        anchor_targets = self.assigner.anchors(rpn.anchors, labels)
        anchor_box_targets = self.rpn.box_coder.encode_single(
            anchor_targets.matched_boxes.flatten(0, 1), rpn.anchors.repeat(labels.shape[0], 1)
        ).view_as(rpn.deltas)

        with torch.no_grad():
            rois = self.assigner.proposals(outputs.proposals, outputs.proposal_image, labels)
            roi_box_targets = self.roi_head.encode(rois.matched_boxes, rois.rois)
        logits, deltas = self.roi_head(outputs.features, rois.rois, rois.image, outputs.image_size)

        if self.training:
            sampled = anchor_targets.labels >= 0
            self.rpn_confusion.update((rpn.objectness[sampled] > 0).long().detach(), anchor_targets.labels[sampled])
            self.roi_confusion.update(logits.detach().argmax(1), rois.labels)
        return self.criterion(StageOutputs(rpn.objectness, rpn.deltas, anchor_targets.labels, anchor_box_targets),
                              StageOutputs(logits, deltas, rois.labels, roi_box_targets))

    def decode(self, outputs: FasterRCNNOutputs, batch: dict[str, Any]) -> Detections:
        return self.decoder(*self.second_stage(outputs), batch["images"].shape[0], outputs.image_sizes)

    def decode_padded(self, outputs: FasterRCNNOutputs, image_size: tuple[int, int]) -> PaddedDetections:
        """``decode`` as fixed-shape tensors of ``max_detections`` rows per image: what an exported model returns.
        Boxes are clipped to the image sizes ``forward`` was given (an exported model: its input ``image_size``)."""
        batch = next(iter(outputs.features.values())).shape[0]
        return self.decoder.padded(*self.second_stage(outputs), batch, outputs.image_sizes)

    def second_stage(self, outputs: FasterRCNNOutputs) -> tuple[Tensor, Tensor, Tensor]:
        """The RoI head on the proposals themselves: class logits ``[K, C+1]``, per-class boxes ``[K, C+1, 4]``
        and each proposal's image."""
        proposals, image = outputs.proposals, outputs.proposal_image
        logits, deltas = self.roi_head(outputs.features, proposals, image, outputs.image_size)
        return logits, self.roi_head.decode(deltas, proposals), image

    def on_train_epoch_start(self) -> None:
        for metric in (self.rpn_confusion, self.roi_confusion):
            metric.reset()

    def training_matrices(self) -> dict[str, Tensor]:
        """The epoch's RPN (background, object) and RoI (background, classes) confusion matrices, rows the truth."""
        return {f"confusion/{name}": metric.compute()
                for name, metric in (("rpn", self.rpn_confusion), ("roi", self.roi_confusion)) if metric.update_count}
