"""Detection metrics: Pascal VOC mAP (VOC07 11-point or area) and COCO mAP through torchmetrics."""

from lightning_det.metrics.coco import COCOMeanAP
from lightning_det.metrics.voc import VOCMeanAP

__all__ = ["COCOMeanAP", "VOCMeanAP"]
