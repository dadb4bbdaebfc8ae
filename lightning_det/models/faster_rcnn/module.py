"""``FasterRCNN``: backbone, RPN and RoI head wired to the batch contract, trained on whole padded batches."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_det.models.backbones.pretrained import forget_weights_file
from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.faster_rcnn.decode import decode_detections
from lightning_det.models.faster_rcnn.loss import roi_losses, rpn_losses
from lightning_det.models.faster_rcnn.network import build_network
from lightning_det.models.faster_rcnn.roi_head import RoIHead
from lightning_det.models.faster_rcnn.rpn import RegionProposalNetwork, RPNOutputs
from lightning_det.models.faster_rcnn.targets import assign_anchors, ground_truth, sample_proposals
from lightning_det.report.loggers import log_image


class FasterRCNNOutputs(NamedTuple):
    """What ``forward`` returns: the feature maps (the RoI head reads them later) and the raw RPN predictions."""

    features: OrderedDict[str, Tensor]
    rpn: RPNOutputs
    image_size: tuple[int, int]


class FasterRCNN(Detector):
    """Faster R-CNN with a VGG16, ResNet-50-FPN or MobileNetV3-FPN backbone.

    ``forward`` runs the backbone and the RPN head only, because which RoIs the second stage sees depends on
    the stage: ``loss`` samples ``roi_batch_size`` RoIs per image from the proposals (plus the objects) and
    runs the head on them, in training and in validation alike; ``decode`` runs it on the test-time proposals.

    Args:
        backbone: ``vgg16`` | ``resnet50_fpn`` | ``mobilenet_v3_fpn``.
        frozen_blocks: VGG16 conv blocks kept frozen (the reference freezes the first two).
        representation: width of the two-layer MLP box head of the FPN backbones (VGG16 uses fc6/fc7, 4096).
        fpn_channels: FPN width of ``mobilenet_v3_fpn`` (torchvision uses 256; narrower is much faster on CPU).
        width: channel multiplier of the ``mobilenet_v3_fpn`` backbone (torchvision's ``width_mult``); 1.0 is the
            published network, the only one ``backbone_weights`` fit.
        backbone_weights: ImageNet weights for the backbone (torchvision's vgg16, resnet50 or mobilenet_v3_large):
            a torchvision-format state dict file (e.g. ``resnet50-11ad3fa6.pth``) or a torchvision weights name
            (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``) read from torch.hub's cache or
            downloaded. VGG16 also fills its fc6/fc7 box head. ``None``: random initialisation.
        pretrained_layout: frozen batch norm and frozen first stages for the FPN backbones (torchvision's
            fine-tuning layout); ``None`` = whether ``backbone_weights`` is given. Checkpoints record it, so a
            detector rebuilt from one needs no weights file.
        anchor_sizes: per feature level, anchor sides in input pixels; ``None`` = the backbone's default
            (VGG16: 128, 256, 512 = scales 8, 16, 32 at stride 16).
        aspect_ratios: anchor height / width ratios, the same on every level.
        rpn_positive_iou, rpn_negative_iou, rpn_batch_size, rpn_positive_fraction: anchor targets
            (see ``targets.assign_anchors``).
        rpn_pre_nms_top_n, rpn_post_nms_top_n: ``(train, test)`` proposal counts; rpn_nms_thresh, rpn_min_size:
            proposal NMS and minimum side (see ``rpn.RegionProposalNetwork``).
        roi_batch_size, roi_positive_fraction, roi_positive_iou, roi_negative_iou: proposal targets
            (see ``targets.sample_proposals``); box_mean, box_std: their box-target normalisation.
        roi_pooling: ``align`` (RoIAlign) or ``pool`` (RoIPool, VGG16 only); roi_output_size, sampling_ratio.
        rpn_sigma, roi_sigma: smooth L1 sigmas of the box losses.
        score_thresh, nms_thresh, detections_per_image: decoding (see ``decode.py``).
        **kwargs: ``num_classes``, ``class_names``, ``optimizer``, ``scheduler``, ``metric`` of ``Detector``.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v3_fpn",
        frozen_blocks: int = 2,
        representation: int = 1024,
        fpn_channels: int = 256,
        width: float = 1.0,
        backbone_weights: str | None = None,
        pretrained_layout: bool | None = None,
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_positive_iou: float = 0.7,
        rpn_negative_iou: float = 0.3,
        rpn_batch_size: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_pre_nms_top_n: Sequence[int] = (12000, 6000),
        rpn_post_nms_top_n: Sequence[int] = (2000, 300),
        rpn_nms_thresh: float = 0.7,
        rpn_min_size: float = 1e-3,
        roi_batch_size: int = 128,
        roi_positive_fraction: float = 0.25,
        roi_positive_iou: float = 0.5,
        roi_negative_iou: Sequence[float] = (0.0, 0.5),
        box_mean: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        box_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        roi_pooling: str = "align",
        roi_output_size: int = 7,
        sampling_ratio: int = 2,
        rpn_sigma: float = 3.0,
        roi_sigma: float = 1.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.3,
        detections_per_image: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pretrained_layout = backbone_weights is not None if pretrained_layout is None else pretrained_layout
        network = build_network(
            backbone, frozen_blocks, representation, fpn_channels, backbone_weights, self.pretrained_layout, width
        )
        self.backbone = network.backbone
        self.rpn = RegionProposalNetwork(
            network.out_channels,
            anchor_sizes if anchor_sizes is not None else network.default_anchor_sizes,
            aspect_ratios,
            tuple(rpn_pre_nms_top_n),
            tuple(rpn_post_nms_top_n),
            rpn_nms_thresh,
            rpn_min_size,
        )
        self.roi_head = RoIHead(
            network.roi_feature_names, network.box_head, network.representation, self.num_classes,
            roi_pooling, roi_output_size, sampling_ratio, box_mean, box_std,
        )
        self.anchor_rule = dict(
            positive_iou=rpn_positive_iou, negative_iou=rpn_negative_iou,
            batch_size_per_image=rpn_batch_size, positive_fraction=rpn_positive_fraction,
        )
        self.roi_rule = dict(
            batch_size_per_image=roi_batch_size, positive_fraction=roi_positive_fraction,
            positive_iou=roi_positive_iou, negative_iou=tuple(roi_negative_iou),
        )
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma
        self.decode_rule = dict(
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_image=detections_per_image
        )
        self.rpn_confusion = MulticlassConfusionMatrix(num_classes=2)
        self.roi_confusion = MulticlassConfusionMatrix(num_classes=self.num_classes + 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        forget_weights_file(checkpoint, pretrained_layout=self.pretrained_layout)

    def forward(self, images: Tensor) -> FasterRCNNOutputs:
        features = self.backbone(images)
        return FasterRCNNOutputs(features, self.rpn(images, list(features.values())), tuple(images.shape[-2:]))

    def loss(self, outputs: FasterRCNNOutputs, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["labels"]
        rpn = outputs.rpn
        anchor_targets = assign_anchors(rpn.anchors, labels, **self.anchor_rule)
        anchor_box_targets = self.rpn.box_coder.encode_single(
            anchor_targets.matched_boxes.flatten(0, 1), rpn.anchors.repeat(labels.shape[0], 1)
        ).view_as(rpn.deltas)
        rpn_loc, rpn_cls = rpn_losses(rpn.objectness, rpn.deltas, anchor_box_targets, anchor_targets, self.rpn_sigma)

        with torch.no_grad():
            proposals, proposal_image = self.rpn.propose(rpn, outputs.image_size)
            rois = sample_proposals(proposals, proposal_image, ground_truth(labels), labels.shape[0], **self.roi_rule)
            roi_box_targets = self.roi_head.encode(rois.matched_boxes, rois.rois)
        logits, deltas = self.roi_head(outputs.features, rois.rois, rois.image, outputs.image_size)
        roi_loc, roi_cls = roi_losses(logits, deltas, rois.labels, roi_box_targets, self.roi_sigma)

        if self.training:
            sampled = anchor_targets.labels >= 0
            self.rpn_confusion.update((rpn.objectness[sampled] > 0).long().detach(), anchor_targets.labels[sampled])
            self.roi_confusion.update(logits.detach().argmax(1), rois.labels)
        total = rpn_loc + rpn_cls + roi_loc + roi_cls
        return {"loss": total, "rpn_loc": rpn_loc, "rpn_cls": rpn_cls, "roi_loc": roi_loc, "roi_cls": roi_cls}

    def decode(self, outputs: FasterRCNNOutputs, batch: dict[str, Any]) -> Detections:
        proposals, image = self.rpn.propose(outputs.rpn, outputs.image_size)
        logits, deltas = self.roi_head(outputs.features, proposals, image, outputs.image_size)
        boxes = self.roi_head.decode(deltas, proposals)
        return decode_detections(
            logits, boxes, image, batch["images"].shape[0], outputs.image_size, **self.decode_rule
        )

    def decode_padded(self, outputs: FasterRCNNOutputs, image_size: tuple[int, int]) -> None:
        raise NotImplementedError(
            "FasterRCNN cannot be exported yet: its RoI head splits proposals per image by Python counts (a trace"
            " would freeze them), and its pipeline keeps each image's aspect ratio instead of one input size."
            " YOLOv3 and SSD checkpoints export."
        )

    def on_train_epoch_end(self) -> None:
        """Log the epoch's RPN (background, object) and RoI (background, classes) confusion matrices as images."""
        for name, metric in (("rpn", self.rpn_confusion), ("roi", self.roi_confusion)):
            if metric.update_count:
                log_matrix_image(self, f"confusion/{name}", metric.compute())
            metric.reset()


def confusion_image(matrix: Tensor, cell: int = 16) -> Tensor:
    """Row-normalised confusion matrix (rows: truth, columns: prediction) as a ``[1, N*cell, N*cell]`` heat map."""
    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    return rows.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(0)


def log_matrix_image(module: Detector, tag: str, matrix: Tensor) -> None:
    log_image(module.trainer, tag, confusion_image(matrix))
