"""The public Python API: ``load`` a checkpoint and ``predict``; ``train``, ``evaluate`` and ``export`` as their
commands do (docs/api.md)."""

from lightning_det.api.jobs import Overrides, TrainResult, evaluate, export, train
from lightning_det.api.predictor import Images, Prediction, Predictor, load

__all__ = ["Images", "Overrides", "Prediction", "Predictor", "TrainResult", "evaluate", "export", "load", "train"]
