"""Precision, recall and F1 against the confidence threshold, from the VOC metric's (TP, FP, missed) counts at
rising thresholds (``VOCMeanAP.compute()["pr_counts"]``, ``[C, T, 3]``)."""

from __future__ import annotations

import torch
from torch import Tensor


def has_objects(pr_counts: Tensor) -> Tensor:
    """``[C]`` whether each class has ground truth (TP + missed at the lowest threshold): curves are drawn only
    for those."""
    return (pr_counts[:, 0, 0] + pr_counts[:, 0, 2]) > 0


def precision_recall(pr_counts: Tensor) -> tuple[Tensor, Tensor]:
    """``[C, T]`` precision and recall per class at thresholds ``i / (T - 1)``. Where no detection is left above
    a threshold, precision is 1: the curve's end point at zero recall."""
    tp, fp, missed = pr_counts.double().unbind(-1)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 1.0)
    return precision, tp / (tp + missed).clamp(min=1)


def f1_by_threshold(pr_counts: Tensor) -> Tensor:
    """``[C, T]`` F1 = 2 TP / (2 TP + FP + FN) per class at thresholds ``i / (T - 1)``; NaN for classes without
    objects. ``pr_counts`` is ``VOCMeanAP.compute()["pr_counts"]`` (``[C, T, 3]``)."""
    tp, fp, missed = pr_counts.double().unbind(-1)
    f1 = 2 * tp / (2 * tp + fp + missed).clamp(min=1)
    return torch.where(has_objects(pr_counts)[:, None], f1, torch.nan)


def best_f1_threshold(pr_counts: Tensor) -> tuple[float, float]:
    """(confidence, F1) where the mean F1 over the classes with objects is highest: the threshold to deploy with.

    Among thresholds with the same best F1 the highest is taken: it keeps fewer detections for the same score.
    """
    mean_f1 = f1_by_threshold(pr_counts).nanmean(0).nan_to_num(0.0)
    thresholds = torch.linspace(0, 1, pr_counts.shape[1], dtype=torch.float64)
    best = mean_f1.max()
    index = int(torch.nonzero(mean_f1 == best).max())
    return float(thresholds[index]), float(best)
