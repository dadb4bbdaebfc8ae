"""lightning_det: YOLOv3, SSD and Faster R-CNN training with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
