"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor

from lightning_det.report.curves import best_f1_threshold, f1_by_threshold, has_objects, precision_recall

DPI = 100


def png_bytes(figure: Figure) -> bytes:
    """The figure rendered as a PNG file's bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)  # the non-interactive Agg canvas, whatever backend matplotlib would pick
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    """``uint8 [H, W, 3]`` pixels of PNG bytes: what the image loggers are given, so they show the file's own image."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def results_figure(rows: list[dict[str, str]]) -> Figure:
    """One panel per results.csv column (loss terms, val mAP, lr) against the epoch."""
    columns = [key for key in (rows[0] if rows else {}) if key not in ("epoch", "step")]
    width = min(5, max(1, len(columns)))
    height = max(1, -(-len(columns) // width))
    figure = Figure(figsize=(3 * width, 2.5 * height), layout="constrained")
    epochs = [int(float(row["epoch"])) for row in rows]
    for index, column in enumerate(columns):
        axes = figure.add_subplot(height, width, index + 1)
        points = [(epoch, float(row[column])) for epoch, row in zip(epochs, rows) if row[column]]  # validated
        axes.plot([x for x, _ in points], [y for _, y in points], marker=".", linewidth=1.5)  # epochs only
        axes.set_title(column, fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(labelsize=7)
    return figure


def _curve_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    return figure, axes


def pr_figure(pr_counts: Tensor, ap_per_class: Tensor, class_names: list[str]) -> Figure:
    """Precision against recall per class (the metric's points at rising score thresholds), AP at IoU 0.5 in the
    legend, and the mean over the classes with objects."""
    precision, recall = precision_recall(pr_counts)
    figure, axes = _curve_axes("Precision-recall (IoU 0.5)", "recall", "precision")
    drawn = has_objects(pr_counts)
    for index, name in enumerate(class_names):
        if drawn[index]:
            axes.plot(recall[index], precision[index], linewidth=1, label=f"{name} {ap_per_class[index]:.3f}")
    if drawn.any():
        axes.plot(recall[drawn].mean(0), precision[drawn].mean(0), linewidth=3, color="blue",
                  label=f"all classes {ap_per_class[drawn].mean():.3f} mAP@0.5")
        axes.legend(loc="lower left", fontsize=8)
    return figure


def f1_figure(pr_counts: Tensor, class_names: list[str]) -> Figure:
    """F1 against the confidence threshold per class, and the class mean with its best threshold."""
    f1 = f1_by_threshold(pr_counts)
    thresholds = np.linspace(0, 1, pr_counts.shape[1])
    figure, axes = _curve_axes("F1 against confidence", "confidence", "F1")
    for index, name in enumerate(class_names):
        if not f1[index].isnan().all():
            axes.plot(thresholds, f1[index], linewidth=1, label=name)
    if not f1.isnan().all():
        confidence, best = best_f1_threshold(pr_counts)
        axes.plot(thresholds, f1.nanmean(0), linewidth=3, color="blue",
                  label=f"all classes {best:.2f} at {confidence:.2f}")
        axes.legend(loc="lower left", fontsize=8)
    return figure


def confusion_figure(matrix: Tensor, class_names: list[str], conf: float, iou_threshold: float) -> Figure:
    """The counts, and the colour of each cell its share of its true-class column."""
    names = [*class_names, "background"]
    counts = matrix.double()
    share = counts / counts.sum(0, keepdim=True).clamp(min=1)
    side = min(12.0, 3 + 0.5 * len(names))
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set(xlabel="true", ylabel="predicted",
             title=f"Confusion matrix (score >= {conf:g}, IoU >= {iou_threshold:g})")
    if len(names) <= 30:
        for (row, column), value in np.ndenumerate(counts.long().numpy()):
            if value:
                colour = "white" if share[row, column] > 0.5 else "black"
                axes.text(column, row, str(value), ha="center", va="center", fontsize=7, color=colour)
    return figure


def labels_figure(boxes: np.ndarray, labels: np.ndarray, image_sizes: np.ndarray, class_names: list[str]) -> Figure:
    """Objects per class, and box sizes and centres as shares of their image (``image_sizes`` per box: w, h)."""
    figure = Figure(figsize=(12, 4), layout="constrained")
    counts = np.bincount(labels, minlength=len(class_names))
    bars = figure.add_subplot(1, 3, 1)
    bars.bar(range(len(class_names)), counts)
    bars.set_xticks(range(len(class_names)), class_names, rotation=90 if len(class_names) > 8 else 0, fontsize=8)
    bars.set(title=f"{len(labels)} objects", ylabel="objects")
    scale = np.tile(np.maximum(image_sizes, 1), 2)
    relative = boxes / scale
    sizes = figure.add_subplot(1, 3, 2)
    sizes.hist2d(relative[:, 2] - relative[:, 0], relative[:, 3] - relative[:, 1], bins=50, range=[[0, 1], [0, 1]],
                 cmap="Blues", cmin=1)
    sizes.set(title="box size", xlabel="width / image width", ylabel="height / image height")
    centres = figure.add_subplot(1, 3, 3)
    centres.hist2d((relative[:, 0] + relative[:, 2]) / 2, (relative[:, 1] + relative[:, 3]) / 2, bins=50,
                   range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    centres.set(title="box centre", xlabel="x / image width", ylabel="y / image height")
    centres.invert_yaxis()
    return figure
