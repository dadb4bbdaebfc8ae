"""Detectors: each a ``Detector`` subclass owning its network, target assignment, loss and decoding."""

from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.models.ssd import SSD
from lightning_det.models.yolov3 import YOLOv3

__all__ = ["FasterRCNN", "SSD", "YOLOv3"]
