"""``YOLOv3``: the LightningModule tying network, anchors, target assignment, loss and decoding together."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.parts import PartConfig, build_part
from lightning_det.models.postprocess import PaddedDetections
from lightning_det.models.transfer import ClassRows, layer_rows
from lightning_det.models.yolov3.anchor_clustering import check_anchors, letterboxed_sizes
from lightning_det.models.yolov3.darknet_weights import load_darknet_weights
from lightning_det.models.yolov3.decode import YOLOv3Decoder
from lightning_det.models.yolov3.grid import (
    DARKNET_ANCHORS,
    DEFAULT_ANCHORS,
    PredictionGrid,
    anchors_tensor,
    configured_anchors,
    make_grid,
)
from lightning_det.models.yolov3.loss import YOLOv3Loss
from lightning_det.models.yolov3.network import Prediction, build_network
from lightning_det.models.yolov3.targets import YOLOv3Assigner

if TYPE_CHECKING:
    from lightning_det.data.records import AnnotationRecord

log = logging.getLogger(__name__)


class YOLOv3(Detector):
    """YOLOv3 or YOLOv3-tiny.

    Args:
        variant: ``"yolov3"`` (Darknet-53, three levels at strides 8/16/32), ``"tiny"`` (two levels, 16/32) or
            ``"tiny3"`` (yolov3-tiny_3l.cfg: tiny with a third level at stride 8).
        width: channel multiplier (channels rounded up to multiples of 8); 1.0 is the Darknet network.
        depth: residual-block multiplier of Darknet-53 (``yolov3`` only); 1.0 is the Darknet network.
        anchors: per level, smallest stride first, ``(w, h)`` pixel pairs; ``"auto"`` or ``"default"``: Darknet's
            COCO anchors (``auto`` is refitted to the training boxes by :meth:`fit_to_data` before training, or
            set to the init_from weights' by :meth:`fit_to_weights`); ``"darknet"``: those Darknet's published
            ``.weights`` were trained with.
        strides: the levels' strides; fixed by the variant, given only to be checked against it.
        assigner: the target assignment part, :class:`~lightning_det.models.yolov3.targets.YOLOv3Assigner` by
            default: called with ``(labels, grid)``, returns the ``Targets`` the loss takes.
        loss: the loss part, :class:`~lightning_det.models.yolov3.loss.YOLOv3Loss` by default: built with the
            data's ``num_classes``, called with ``(preds, grid, targets, labels)``, returns the loss terms.
        decoder: the decoding part, :class:`~lightning_det.models.yolov3.decode.YOLOv3Decoder` by default: called
            with ``(preds, grid, image_size)``; its ``padded`` method gives the fixed-shape output of export.
        **kwargs: ``num_classes``, ``class_names``, ``optimizer``, ``scheduler``, ``metric`` of ``Detector``.

    Each part is a plain config (see ``models/parts.py``): ``None`` or no ``_target_`` takes the default class.
    """

    input_multiple: ClassVar[int] = 32  # the coarsest grid's stride, in both variants
    cpu_bf16: ClassVar[bool] = True  # bf16 steps at 0.56-0.62x of float32's (yolov3_tiny w0.5, 256-512 px)
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"variant": tuple(sorted(DEFAULT_ANCHORS))}
    renamed: ClassVar[dict[str, str]] = {
        "iou_t": "assigner.positive_iou",
        "assigner.iou_t": "assigner.positive_iou",
        "best_anchor_only": "assigner.best_anchor_only",
        "box_loss": "loss.box_loss",
        "giou": "loss.giou",
        "xy": "loss.xy",
        "wh": "loss.wh",
        "obj": "loss.obj",
        "cls": "loss.cls",
        "obj_pw": "loss.obj_pw",
        "cls_pw": "loss.cls_pw",
        "ignore_thresh": "loss.ignore_thresh",
        "conf_thresh": "decoder.score_thresh",
        "nms_thresh": "decoder.nms_thresh",
        "nms_topk": "decoder.max_detections",
        "pre_nms_topk": "decoder.pre_nms_topk",
        "multi_label": "decoder.multi_label",
        "force_suppress": "decoder.class_agnostic",
    }

    def __init__(
        self,
        variant: str = "yolov3",
        width: float = 1.0,
        depth: float = 1.0,
        anchors: str | Sequence[Sequence[float]] | None = "auto",
        strides: Sequence[int] | None = None,
        assigner: PartConfig = None,
        loss: PartConfig = None,
        decoder: PartConfig = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if variant not in DEFAULT_ANCHORS:
            raise ValueError(f"unknown YOLOv3 variant {variant!r}: use one of {sorted(DEFAULT_ANCHORS)}")
        anchor_table = anchors_tensor(configured_anchors(anchors, variant))
        self.network = build_network(variant, self.num_classes, anchor_table.shape[1], width, depth)
        self.strides = list(self.network.strides)
        if len(anchor_table) != len(self.strides):
            raise ValueError(f"variant {variant!r} has {len(self.strides)} levels but anchors give {len(anchor_table)}")
        if strides is not None and list(strides) != self.strides:
            raise ValueError(f"variant {variant!r} predicts at strides {self.strides}, not {list(strides)}")
        self.register_buffer("anchors", anchor_table, persistent=False)
        self.assigner = build_part(assigner, YOLOv3Assigner)
        self.criterion = build_part(loss, YOLOv3Loss, num_classes=self.num_classes)
        self.decoder = build_part(decoder, YOLOv3Decoder)

    @classmethod
    def fit_to_data(cls, arguments: dict[str, Any], records: list[AnnotationRecord], img_size: int,
                    seed: int = 0) -> dict[str, Any]:
        """``anchors: auto`` becomes Darknet's anchors, or k-means ones where those miss the training boxes at the
        training size (best possible recall at the assigner's ``positive_iou``); the list is stored in the checkpoint,
        so evaluation, prediction and export use it."""
        if arguments.get("anchors", "auto") != "auto":
            return arguments
        variant = arguments.get("variant", "yolov3")
        wh = letterboxed_sizes(records, img_size)
        anchors = anchors_tensor(DEFAULT_ANCHORS[variant])
        positive_iou = assigner_positive_iou(arguments.get("assigner"))
        fitted = check_anchors(wh, anchors, positive_iou, seed=seed) if len(wh) else anchors
        return {**arguments, "anchors": fitted.view(len(anchors), -1).tolist()}

    @classmethod
    def fit_to_weights(cls, arguments: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
        """``anchors: auto`` with pretrained weights becomes the anchors those were trained with (a checkpoint's
        list, Darknet's for a ``.weights`` file), never refitted to the data: the loaded box and objectness rows
        predict relative to them."""
        if arguments.get("anchors", "auto") != "auto":
            return arguments
        if recorded.get("format") == "foreign":
            anchors = DARKNET_ANCHORS[arguments.get("variant", "yolov3")]
        elif recorded.get("anchors") is not None and not isinstance(recorded["anchors"], str):
            anchors = recorded["anchors"]
        else:
            return arguments
        log.info("anchors: %s, as the init_from weights were trained with", anchors)
        return {**arguments, "anchors": anchors}

    def forward(self, images: Tensor) -> list[Tensor]:
        """Raw predictions per level, smallest stride first: ``[B, A, H, W, 5 + C]``."""
        return self.network(images)

    def grid(self, outputs: list[Tensor]) -> PredictionGrid:
        return make_grid([o.shape[2:4] for o in outputs], self.anchors, self.strides)

    def loss(self, outputs: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        grid = self.grid(outputs)
        labels = batch["labels"]
        return self.criterion(flatten(outputs), grid, self.assigner(labels, grid), labels)

    def decode(self, outputs: list[Tensor], batch: dict[str, Any]) -> Detections:
        return self.decoder(flatten(outputs), self.grid(outputs), tuple(batch["images"].shape[-2:]))

    def decode_padded(self, outputs: list[Tensor], image_size: tuple[int, int]) -> PaddedDetections:
        """``decode`` as fixed-shape tensors of ``max_detections`` rows per image: what an exported model returns."""
        return self.decoder.padded(flatten(outputs), self.grid(outputs), image_size)

    def class_rows(self) -> dict[str, ClassRows]:
        """Each level's prediction conv: per anchor, box and objectness rows, then one row per class."""
        rows: dict[str, ClassRows] = {}
        for prediction in self.network.modules():
            if isinstance(prediction, Prediction):
                rows |= layer_rows(self, prediction.conv, ClassRows(groups=prediction.num_anchors, lead=5))
        return rows

    def load_foreign_weights(self, path: str, cutoff: int | None = None) -> dict[str, int]:
        """``init_from`` for Darknet ``.weights`` files (``cutoff=52`` reads only the Darknet-53 backbone)."""
        return load_darknet_weights(self.network, path, cutoff)


def flatten(outputs: list[Tensor]) -> Tensor:
    """Per-level ``[B, A, H, W, 5 + C]`` -> ``[B, N, 5 + C]`` in the order ``PredictionGrid`` describes."""
    return torch.cat([o.flatten(1, 3) for o in outputs], 1)


def assigner_positive_iou(config: PartConfig) -> float:
    """The shape IoU above which the configured assigner trains an anchor: the threshold the best possible recall
    of ``anchors: auto`` (and of ``python -m lightning_det.tools.anchors``) is counted at."""
    return build_part(config, YOLOv3Assigner).positive_iou
