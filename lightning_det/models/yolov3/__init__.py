"""YOLOv3 and YOLOv3-tiny: ``network`` (Darknet head), ``anchors``, ``targets``, ``loss``, ``decode``, ``module``."""

from lightning_det.models.yolov3.module import YOLOv3

__all__ = ["YOLOv3"]
