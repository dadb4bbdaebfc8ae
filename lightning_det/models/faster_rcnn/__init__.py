"""Faster R-CNN: a two-stage detector trained on padded batches of differently shaped images."""

from lightning_det.models.faster_rcnn.module import FasterRCNN

__all__ = ["FasterRCNN"]
