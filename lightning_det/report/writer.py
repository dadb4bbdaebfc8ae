"""Write the report's images beside the checkpoints and the same pixels to every image logger of the run.

Both training (the ``ResultsReport`` callback) and ``python -m lightning_det.tools.evaluate`` go through
``write_evaluation_report``, so the two report the same things the same way.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from lightning_det.data.records import AnnotationRecord
from lightning_det.io import write_atomically
from lightning_det.report.curves import best_f1_threshold
from lightning_det.report.loggers import log_image
from lightning_det.report.plots import (
    confusion_figure,
    f1_figure,
    labels_figure,
    png_bytes,
    png_pixels,
    pr_figure,
)

log = logging.getLogger(__name__)


def save_png(folder: Path, name: str, data: bytes, trainer: L.Trainer | None = None, step: int = 0) -> Path:
    """``<folder>/<name>.png`` written atomically, and the same image as ``report/<name>`` to the image loggers
    of ``trainer`` (None: the file only, as ``evaluate`` does)."""
    path = folder / f"{name}.png"
    write_atomically(path, lambda file: file.write(data))
    if trainer is not None:
        log_image(trainer, f"report/{name}", torch.tensor(png_pixels(data)).permute(2, 0, 1), step)
    return path


def save_figure(folder: Path, name: str, figure: Figure, trainer: L.Trainer | None = None, step: int = 0) -> Path:
    return save_png(folder, name, png_bytes(figure), trainer, step)


def save_image(folder: Path, name: str, image: Tensor, trainer: L.Trainer | None = None, step: int = 0) -> Path:
    """A ``uint8 [3, H, W]`` image (a drawn grid) as a PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="png")
    return save_png(folder, name, buffer.getvalue(), trainer, step)


def label_arrays(records: list[AnnotationRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every object's box, class and image (w, h), for ``labels.png``."""
    boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in records]) if records else np.zeros((0, 4))
    labels = np.concatenate([r.labels for r in records]).astype(np.int64) if records else np.zeros(0, np.int64)
    sizes = np.repeat([[r.width, r.height] for r in records], [len(r.labels) for r in records], axis=0)
    return boxes, labels, sizes.reshape(-1, 2)


def write_evaluation_report(
    folder: Path,
    class_names: list[str],
    voc: dict[str, Tensor],
    confusion: Tensor,
    records: list[AnnotationRecord],
    conf: float,
    iou_threshold: float,
    trainer: L.Trainer | None = None,
    step: int = 0,
) -> None:
    """``pr_curve.png``, ``f1_curve.png``, ``confusion_matrix.png`` and ``labels.png`` (of ``records``) from a
    ``VOCMeanAP(iou_threshold=0.5).compute()`` result and a ``confusion_matrix`` (also to ``trainer``'s image
    loggers); logs the best-F1 threshold."""
    folder.mkdir(parents=True, exist_ok=True)
    pr_counts = voc["pr_counts"].cpu()
    save_figure(folder, "pr_curve", pr_figure(pr_counts, voc["AP_per_class"].cpu(), class_names), trainer, step)
    save_figure(folder, "f1_curve", f1_figure(pr_counts, class_names), trainer, step)
    save_figure(folder, "confusion_matrix", confusion_figure(confusion.cpu(), class_names, conf, iou_threshold),
                trainer, step)
    save_figure(folder, "labels", labels_figure(*label_arrays(records), class_names), trainer, step)
    confidence, f1 = best_f1_threshold(pr_counts)
    log.info("best F1 %.3f (all classes) at confidence %.2f; report written to %s", f1, confidence, folder)
