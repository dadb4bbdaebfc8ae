"""The results report of a training run: ``results.csv`` every epoch, the images once training is over."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_det.callbacks.image_logger import ValidationImageLogger
from lightning_det.metrics import VOCMeanAP
from lightning_det.report.confusion import confusion_matrix
from lightning_det.report.plots import results_figure
from lightning_det.report.results_csv import append_row, read_rows
from lightning_det.report.writer import save_figure, save_image, write_evaluation_report

log = logging.getLogger(__name__)


def epoch_row(trainer: L.Trainer, validated: bool = True) -> dict[str, float]:
    """The finished epoch's mean training loss terms, its validation values (``validated``: else the columns stay
    empty, not the last validation's) and the learning rate."""
    metrics = trainer.callback_metrics
    row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
    row.update({name.removesuffix("_epoch"): float(value) for name, value in sorted(metrics.items())
                if name.startswith("train/") and name.endswith("_epoch")})
    if validated:
        row.update({name: float(value) for name, value in sorted(metrics.items()) if name.startswith("val/")})
    if trainer.optimizers:
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
    return row


class ResultsReport(L.Callback):
    """Appends a row to ``<dirpath>/results.csv`` after every training epoch; when the best checkpoint is validated
    at the end of ``train`` (any ``trainer.validate``), writes ``results.png``, ``pr_curve.png``, ``f1_curve.png``,
    ``confusion_matrix.png``, ``labels.png`` (training set) and ``val_batch_pred.png`` there and to the run's
    image loggers (TensorBoard, MLflow, W&B).

    The curves come from a VOC metric at ``iou_threshold`` of the report's own, whatever ``metric=`` is
    (Ultralytics' plots are at IoU 0.5 too); the confusion matrix counts detections scoring at least ``conf``.
    Under DDP every rank feeds the metric and the matrix and rank 0 writes.
    """

    def __init__(self, dirpath: str | Path, conf: float = 0.25, iou_threshold: float = 0.5, max_images: int = 16,
                 score_thresh: float = 0.3) -> None:
        self.dirpath = Path(dirpath)
        self.conf = conf
        self.iou_threshold = iou_threshold
        self.image_grid = ValidationImageLogger(max_images=max_images, score_thresh=score_thresh)
        self.metric: VOCMeanAP | None = None
        self.confusion: torch.Tensor | None = None
        self.grid: torch.Tensor | None = None
        self.validated_epoch = -1  # the last training epoch a validation followed (a time budget skips some)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            validated = self.validated_epoch == trainer.current_epoch
            append_row(self.dirpath / "results.csv", epoch_row(trainer, validated))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "validate":  # validation during fit only feeds results.csv
            self.metric = None
            return
        size = pl_module.num_classes + 1
        self.metric = VOCMeanAP(pl_module.num_classes, iou_threshold=self.iou_threshold).to(pl_module.device)
        self.confusion = torch.zeros(size, size, dtype=torch.long)
        self.grid = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.metric is None or not outputs:
            return
        self.metric.update(outputs["detections"], outputs["targets"])
        self.confusion += confusion_matrix(outputs["detections"], outputs["targets"], pl_module.num_classes,
                                           self.conf, self.iou_threshold)
        if batch_idx == 0 and trainer.is_global_zero:
            self.grid = self.image_grid.predictions(trainer, pl_module, batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch
        if self.metric is None:
            return
        voc = self.metric.compute()  # every rank: the metric gathers their detections
        confusion = trainer.strategy.reduce(self.confusion.to(pl_module.device), reduce_op="sum").cpu()
        self.metric = None
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        rows = read_rows(self.dirpath / "results.csv")
        if rows:
            save_figure(self.dirpath, "results", results_figure(rows), trainer, step)
        records = trainer.datamodule.records
        write_evaluation_report(self.dirpath, pl_module.class_names, voc, confusion,
                                records.get("train", records.get("val", [])), self.conf, self.iou_threshold,
                                trainer, step)
        if self.grid is not None:
            save_image(self.dirpath, "val_batch_pred", self.grid, trainer, step)
