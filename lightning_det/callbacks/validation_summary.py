"""What a person reads after each validation beyond the scalars: the per-class AP table and PR curves."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import Tensor

from lightning_det.models.detector import summary_values
from lightning_det.report.curves import has_objects, precision_recall
from lightning_det.report.loggers import tensorboard

log = logging.getLogger(__name__)


class ValidationSummary(L.Callback):
    """After each validation (not the sanity check), from the detector's ``validation_results``: the per-class AP
    table on the console (rank zero), and per-class precision-recall curves in TensorBoard's PR tab
    (``val_PR/<class>``; classes without objects are left out)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = pl_module.validation_results
        if not results or trainer.sanity_checking:
            return
        if "pr_counts" in results:
            log_pr_curves(trainer, results["pr_counts"], pl_module.class_names, pl_module.global_step)
        if "AP_per_class" in results and trainer.is_global_zero:
            log.info("\n%s", per_class_table(pl_module.class_names, results["AP_per_class"],
                                             summary_values(results), pl_module.scored_epoch()))


def per_class_table(class_names: list[str], per_class: Tensor, scalars: dict[str, Tensor], epoch: int) -> str:
    """A text table of AP per class under a line of the epoch's summary values."""
    width = max(8, *(len(n) for n in class_names))
    lines = [f"epoch {epoch}: " + "  ".join(f"{k}={v.item():.4f}" for k, v in scalars.items())]
    lines.append(f"{'class':<{width}}  AP")
    lines += [
        f"{name:<{width}}  {'n/a (no ground truth)' if math.isnan(ap) else f'{ap:.4f}'}"
        for name, ap in zip(class_names, per_class.tolist())
    ]
    return "\n".join(lines)


def log_pr_curves(trainer: L.Trainer, counts: Tensor, class_names: list[str], step: int) -> None:
    """The VOC metric's (TP, FP, missed) counts at rising score thresholds as TensorBoard PR curves."""
    logger = tensorboard(trainer)
    if logger is None:
        return
    counts = counts.cpu()
    tp, fp, missed = counts.double().unbind(-1)
    precision, recall = precision_recall(counts)
    drawn = has_objects(counts)
    for index, name in enumerate(class_names):
        if not drawn[index]:
            continue
        logger.experiment.add_pr_curve_raw(
            f"val_PR/{name}", tp[index], fp[index], torch.zeros_like(tp[index]), missed[index],
            precision[index], recall[index], global_step=step, num_thresholds=counts.shape[1],
        )
