"""lightning_det: YOLOv3, SSD and Faster R-CNN training with PyTorch Lightning and Hydra.

``lightning_det.load``, ``train``, ``evaluate`` and ``export`` are the Python API (``lightning_det/api/``),
imported on first use, so ``import lightning_det`` does not load torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = ("load", "train", "evaluate", "export", "Prediction", "Predictor", "TrainResult")
__all__ = [*API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("lightning_det.api"), name)
    raise AttributeError(f"module 'lightning_det' has no attribute {name!r}")
