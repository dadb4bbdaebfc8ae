"""YOLOv3 and YOLOv3-tiny: ``network`` (Darknet body and head), ``grid`` (anchors and the prediction grid), and
the parts ``targets`` (assigner), ``loss`` and ``decode`` (decoder), tied together by ``module``."""

from lightning_det.models.yolov3.module import YOLOv3

__all__ = ["YOLOv3"]
