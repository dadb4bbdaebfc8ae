"""Callbacks for what Lightning does not already provide."""

from lightning_det.callbacks.best_reload import ReloadBestAndDecay, RestoreBestOnDecay
from lightning_det.callbacks.checkpoint import RunCheckpoint
from lightning_det.callbacks.checkpoint_io import SafeCheckpointIO
from lightning_det.callbacks.ema import ModelEMA
from lightning_det.callbacks.freeze import Freeze
from lightning_det.callbacks.image_logger import ValidationImageLogger
from lightning_det.callbacks.interrupt import InterruptCheckpoint
from lightning_det.callbacks.multiscale import MultiScale
from lightning_det.callbacks.results_report import ResultsReport
from lightning_det.callbacks.run_end import RunEnd
from lightning_det.callbacks.speed import ChannelsLast, Compile
from lightning_det.callbacks.time_budget import BudgetedEarlyStopping, TimeBudget
from lightning_det.callbacks.validation_summary import ValidationSummary

__all__ = [
    "BudgetedEarlyStopping",
    "ChannelsLast",
    "Compile",
    "Freeze",
    "InterruptCheckpoint",
    "ModelEMA",
    "MultiScale",
    "ReloadBestAndDecay",
    "RestoreBestOnDecay",
    "ResultsReport",
    "RunCheckpoint",
    "RunEnd",
    "SafeCheckpointIO",
    "TimeBudget",
    "ValidationImageLogger",
    "ValidationSummary",
]
