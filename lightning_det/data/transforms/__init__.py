"""Data pipelines, one per detector family, built on ``torchvision.transforms.v2``."""

from lightning_det.data.transforms.common import (
    DetectionTransform,
    EpochAugment,
    LetterboxTransform,
    Sample,
    clip_and_filter,
    letterbox,
)
from lightning_det.data.transforms.rcnn import RCNNTransform
from lightning_det.data.transforms.ssd import SSDEvalTransform, SSDTrainTransform
from lightning_det.data.transforms.yolo import YoloTrainTransform

__all__ = [
    "DetectionTransform",
    "EpochAugment",
    "LetterboxTransform",
    "RCNNTransform",
    "SSDEvalTransform",
    "SSDTrainTransform",
    "Sample",
    "YoloTrainTransform",
    "clip_and_filter",
    "letterbox",
]
